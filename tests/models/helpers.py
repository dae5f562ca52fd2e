"""Small model configurations that keep CPU tests fast while exercising every code path, and checkpoint
files in PySlowFast's layout written from its rules rather than from this project's model."""

from __future__ import annotations

import math
import os
import pickle
import types
from collections import OrderedDict
from typing import Any

import torch
import yaml

from pipeline.models.mvit import MViTConfig


def tiny_config(version: int = 1, **overrides: Any) -> MViTConfig:
    """A 4-block, 3-stage MViT on 4x32x32 clips; v2 switches on MViTv2's mechanisms."""
    values: dict[str, Any] = dict(
        num_classes=7,
        num_frames=4,
        crop_size=32,
        embed_dim=16,
        num_heads=1,
        depth=4,
        stage_starts=(1, 3),
        kv_stride=(1, 2, 2),
        drop_path_rate=0.0,
        head_dropout=0.0,
    )
    if version == 2:
        values.update(
            abs_pos_embed=False, rel_pos=True, residual_pooling=True, pool_q_every_block=True, dim_mul_in_attention=True
        )
    values.update(overrides)
    return MViTConfig(**values)


def pytorchvideo_mvit_b_16x4(**overrides: Any):
    """PyTorchVideo's own MViT-B 16x4 (its hub ``mvit_base_16x4`` settings), an independent implementation."""
    from pytorchvideo.models.vision_transformers import create_multiscale_vision_transformers

    settings: dict[str, Any] = dict(
        spatial_size=224,
        temporal_size=16,
        embed_dim_mul=[[1, 2.0], [3, 2.0], [14, 2.0]],
        atten_head_mul=[[1, 2.0], [3, 2.0], [14, 2.0]],
        pool_q_stride_size=[[1, 1, 2, 2], [3, 1, 2, 2], [14, 1, 2, 2]],
        pool_kv_stride_adaptive=[1, 8, 8],
        pool_kvq_kernel=[3, 3, 3],
    )
    settings.update(overrides)
    return create_multiscale_vision_transformers(**settings)


# -- PySlowFast checkpoint files, written from PySlowFast's naming and shape rules --------------------------
#
# Facts from facebookresearch/SlowFast, not this project's state dict (so a name or shape the converter
# gets wrong cannot cancel out):
# - slowfast/utils/checkpoint.py save_checkpoint: torch.save of {"epoch", "model_state", "optimizer_state",
#   "cfg" (cfg.dump(), a YAML string), and "scaler_state" under mixed precision}; model_state is the
#   state dict of the model as trained, DDP's "module." already stripped, deep-copied (an OrderedDict with
#   its _metadata) and still on the GPU.
# - slowfast/models/video_model_builder.py class MViT: cls_token, pos_embed_spatial / _temporal / _class
#   (SEP_POS_EMBED) or pos_embed, none without USE_ABS_POS; patch_embed.proj (stem_helper.PatchEmbed);
#   blocks.N; norm; head.projection (head_helper.TransformerBasicHead). Per block: heads x HEAD_MUL and
#   width x DIM_MUL at the listed blocks (the width changes in the block itself with DIM_MUL_IN_ATT, else
#   in the MLP of the block before); Q pooled where POOL_Q_STRIDE lists the block; the K/V stride starts at
#   POOL_KV_STRIDE_ADAPTIVE and is divided by each Q stride; kernels are POOL_KVQ_KERNEL, or s + 1 where
#   the stride s > 1 (else 1); the grid shrinks by integer division by each Q stride.
# - slowfast/models/attention.py: blocks.N.norm1, attn.qkv (3 x width) or attn.q / attn.k / attn.v
#   (SEPARATE_QKV or POOL_FIRST), attn.proj, attn.pool_{q,k,v} (depthwise Conv3d, no bias, on
#   width // heads channels, of the input width under POOL_FIRST) each with attn.norm_{q,k,v} in MODE
#   "conv" and nothing in "max" / "avg", no pooling where kernel and stride are both 1; attn.rel_pos_h /
#   rel_pos_w (2 * max(H // q stride, H // kv stride) - 1 rows) and attn.rel_pos_t (2 * T - 1 rows), each
#   width // heads wide; norm2 and mlp.fc1 / mlp.fc2 (common.Mlp) on the attention width; proj where the
#   width changes. A module's own parameters precede its submodules' in a state dict.


def pyslowfast_cfg(version: int = 1, num_frames: int = 4, crop_size: int = 32, num_classes: int = 7,
                   **mvit: Any) -> dict[str, Any]:
    """PySlowFast's config (its own section and key names) for the network ``tiny_config(version,
    num_frames=num_frames)`` describes at the default size; ``mvit`` overrides keys of the MVIT section."""
    section: dict[str, Any] = dict(
        MODE="conv", POOL_FIRST=False, SEPARATE_QKV=False, CLS_EMBED_ON=True, USE_MEAN_POOLING=False,
        PATCH_2D=False, PATCH_KERNEL=[3, 7, 7], PATCH_STRIDE=[2, 4, 4], PATCH_PADDING=[1, 3, 3],
        EMBED_DIM=16, NUM_HEADS=1, MLP_RATIO=4.0, QKV_BIAS=True, DROPPATH_RATE=0.0, DEPTH=4, NORM="layernorm",
        DIM_MUL=[[1, 2.0], [3, 2.0]], HEAD_MUL=[[1, 2.0], [3, 2.0]], POOL_KVQ_KERNEL=[3, 3, 3],
        POOL_KV_STRIDE_ADAPTIVE=[1, 2, 2], POOL_Q_STRIDE=[[1, 1, 2, 2], [3, 1, 2, 2]], ZERO_DECAY_POS_CLS=False,
        USE_ABS_POS=True, SEP_POS_EMBED=True, REL_POS_SPATIAL=False, REL_POS_TEMPORAL=False,
        RESIDUAL_POOLING=False, DIM_MUL_IN_ATT=False, DROPOUT_RATE=0.0,
    )  # fmt: skip
    if version == 2:  # configs/Kinetics/MVITv2_S_16x4.yaml's switches
        section.update(
            USE_ABS_POS=False, REL_POS_SPATIAL=True, REL_POS_TEMPORAL=True, RESIDUAL_POOLING=True, DIM_MUL_IN_ATT=True,
            POOL_Q_STRIDE=[[i, 1, 2, 2] if i in (1, 3) else [i, 1, 1, 1] for i in range(4)],
        )
    section.update(mvit)
    return {
        "DATA": {"NUM_FRAMES": num_frames, "TRAIN_CROP_SIZE": crop_size, "TEST_CROP_SIZE": crop_size,
                 "INPUT_CHANNEL_NUM": [3]},
        "MODEL": {"ARCH": "mvit", "MODEL_NAME": "MViT", "NUM_CLASSES": num_classes, "DROPOUT_RATE": 0.0},
        "MVIT": section,
    }


def _pool_kernel(mvit: dict[str, Any], stride: list[int] | None) -> list[int] | None:
    """None where PySlowFast builds no pooling: no stride listed, or kernel and stride both all ones."""
    if stride is None:
        return None
    kernel = list(mvit["POOL_KVQ_KERNEL"] or [s + 1 if s > 1 else s for s in stride])
    return None if math.prod(kernel) == 1 and math.prod(stride) == 1 else kernel


def pyslowfast_mvit_state(cfg: dict[str, Any], seed: int | None = 0) -> OrderedDict[str, torch.Tensor]:
    """What PySlowFast's ``MViT(cfg).state_dict()`` holds, in its order, each tensor filled from ``seed``
    (``None``: shapes only, on the meta device, for full-size networks).

    Names and shapes follow the facts listed above; 2-D patches and layer scale are left out.
    """
    mvit, data = cfg["MVIT"], cfg["DATA"]
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()

    def put(name: str, *shape: int) -> None:
        if generator is None:
            state[name] = torch.empty(*shape, device="meta")
        else:
            state[name] = torch.randn(*shape, generator=generator)

    def linear(name: str, out_features: int, in_features: int, bias: bool = True) -> None:
        put(f"{name}.weight", out_features, in_features)
        if bias:
            put(f"{name}.bias", out_features)

    def layer_norm(name: str, width: int) -> None:
        put(f"{name}.weight", width)
        put(f"{name}.bias", width)

    width, heads, classes = mvit["EMBED_DIM"], mvit["NUM_HEADS"], cfg["MODEL"]["NUM_CLASSES"]
    crop, stride = data["TRAIN_CROP_SIZE"], mvit["PATCH_STRIDE"]
    grid = [data["NUM_FRAMES"] // stride[0], crop // stride[1], crop // stride[2]]
    cls = 1 if mvit["CLS_EMBED_ON"] else 0
    if cls:
        put("cls_token", 1, 1, width)
    if mvit["USE_ABS_POS"] and mvit["SEP_POS_EMBED"]:
        put("pos_embed_spatial", 1, grid[1] * grid[2], width)
        put("pos_embed_temporal", 1, grid[0], width)
        if cls:
            put("pos_embed_class", 1, 1, width)
    elif mvit["USE_ABS_POS"]:
        put("pos_embed", 1, math.prod(grid) + cls, width)
    put("patch_embed.proj.weight", width, data["INPUT_CHANNEL_NUM"][0], *mvit["PATCH_KERNEL"])
    put("patch_embed.proj.bias", width)

    dim_mul, head_mul = dict(mvit["DIM_MUL"]), dict(mvit["HEAD_MUL"])
    q_strides = {row[0]: list(row[1:]) for row in mvit["POOL_Q_STRIDE"]}
    kv_stride = list(mvit["POOL_KV_STRIDE_ADAPTIVE"])
    in_att, pool_first = mvit["DIM_MUL_IN_ATT"], mvit["POOL_FIRST"]
    for i in range(mvit["DEPTH"]):
        heads = int(heads * head_mul.get(i, 1))
        stride_q = q_strides.get(i)
        if stride_q is not None:
            kv_stride = [max(s // q, 1) for s, q in zip(kv_stride, stride_q)]
        width_out = int(width * (dim_mul.get(i, 1) if in_att else dim_mul.get(i + 1, 1)))
        att = width_out if in_att else width
        head_width = att // heads
        block = f"blocks.{i}"
        layer_norm(f"{block}.norm1", width)
        if mvit["REL_POS_SPATIAL"]:
            size = grid[1]
            rows = 2 * max(size // stride_q[1] if stride_q else size, size // kv_stride[1]) - 1
            put(f"{block}.attn.rel_pos_h", rows, head_width)
            put(f"{block}.attn.rel_pos_w", rows, head_width)
        if mvit["REL_POS_TEMPORAL"]:
            put(f"{block}.attn.rel_pos_t", 2 * grid[0] - 1, head_width)
        if pool_first or mvit["SEPARATE_QKV"]:
            for part in "qkv":
                linear(f"{block}.attn.{part}", att, width, mvit["QKV_BIAS"])
        else:
            linear(f"{block}.attn.qkv", 3 * att, width, mvit["QKV_BIAS"])
        linear(f"{block}.attn.proj", att, att)
        if mvit["MODE"] == "conv":
            channels = (width if pool_first else att) // heads
            for part, kernel in (("q", _pool_kernel(mvit, stride_q)), ("k", _pool_kernel(mvit, kv_stride)),
                                 ("v", _pool_kernel(mvit, kv_stride))):
                if kernel is not None:
                    put(f"{block}.attn.pool_{part}.weight", channels, 1, *kernel)
                    layer_norm(f"{block}.attn.norm_{part}", channels)
        layer_norm(f"{block}.norm2", att)
        hidden = int(att * mvit["MLP_RATIO"])
        linear(f"{block}.mlp.fc1", hidden, att)
        linear(f"{block}.mlp.fc2", width_out, hidden)
        if width_out != width:
            linear(f"{block}.proj", width_out, width)
        if stride_q is not None:
            grid = [g // s for g, s in zip(grid, stride_q)]
        width = width_out
    layer_norm("norm", width)
    linear("head.projection", classes, width)
    prefixes = {key.rsplit(".", n)[0] for key in state for n in range(1, key.count(".") + 1)}
    state._metadata = OrderedDict((p, {"version": 1}) for p in ["", *sorted(prefixes)])  # type: ignore[attr-defined]
    return state


class _OnTheGpuPickler(pickle.Pickler):
    """Records every storage as living on ``cuda:0``, as in the files of a model saved where it trained.

    ``torch.save`` subclasses the module's ``Pickler`` with its own ``persistent_id``; the instance
    attribute set here, before pickling starts, wraps it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        storage_id = self.persistent_id

        def on_the_gpu(obj: Any) -> Any:
            pid = storage_id(obj)
            if isinstance(pid, tuple) and pid[0] == "storage":
                pid = (*pid[:3], "cuda:0", *pid[4:])
            return pid

        self.persistent_id = on_the_gpu  # type: ignore[method-assign]
        super().__init__(*args, **kwargs)


_ON_THE_GPU = types.ModuleType("pickle_on_the_gpu")
_ON_THE_GPU.Pickler = _OnTheGpuPickler  # type: ignore[attr-defined]


def save_pyslowfast_checkpoint(path: str | os.PathLike[str], cfg: dict[str, Any], seed: int = 0,
                               epoch: int = 30) -> OrderedDict[str, torch.Tensor]:
    """Writes ``path`` laid out as PySlowFast's ``save_checkpoint`` writes it (AdamW and AMP state, as its
    MViT configs train) and returns the model state written into it."""
    state = pyslowfast_mvit_state(cfg, seed)
    steps = 1000 * epoch
    optimizer_state = {
        "state": {
            i: {"step": torch.tensor(float(steps)), "exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)}
            for i, t in enumerate(state.values())
        },
        "param_groups": [{
            "lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05, "amsgrad": False,
            "foreach": None, "maximize": False, "capturable": False, "differentiable": False, "fused": None,
            "layer_decay": 1.0, "apply_LARS": False, "params": list(range(len(state))),
        }],
    }  # fmt: skip
    checkpoint = {
        "epoch": epoch,
        "model_state": state,
        "optimizer_state": optimizer_state,
        "cfg": yaml.safe_dump(cfg),
        "scaler_state": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                         "_growth_tracker": 0},
    }
    with open(path, "wb") as f:
        torch.save(checkpoint, f, pickle_module=_ON_THE_GPU)
    return state
