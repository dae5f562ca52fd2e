"""Checkpoint import and export between this project's MViT and the layouts people actually have.

Formats understood:
- ``native``: this project's own names (which are PySlowFast's names with a fused ``attn.qkv``).
- ``slowfast``: PySlowFast files (``{"epoch", "model_state", "optimizer_state", "cfg"}``, plus
  ``"scaler_state"`` under mixed precision; ``cfg`` is the YAML text of the training config), with
  the fused ``attn.qkv`` (the MViTv1 release files and MViTv2's) or with separate ``attn.q`` /
  ``attn.k`` / ``attn.v`` (PySlowFast from 2021-06-30 until MViTv2's release, and ``MVIT.SEPARATE_QKV``).
  Fused files detect as ``native``: their names are this project's.
- ``pytorchvideo``: ``create_multiscale_vision_transformers`` names (``patch_embed.patch_model``,
  ``cls_positional_encoding.*``, ``norm_embed``, ``head.proj``).
- ``torchvision``: ``torchvision.models.video.mvit_v1_b`` / ``mvit_v2_s`` names.

Loading is strict on purpose: every key the model expects must be provided and every provided key
must be used, with matching shapes, or a ``CheckpointMismatch`` names the offending keys. (PySlowFast
loads with ``strict=False`` and silently keeps random weights for whatever did not match.) The only
shape changes applied are the documented ones: position embeddings and relative-position tables are
resized when the checkpoint was trained at another input size, and an image checkpoint loaded into a
video model is inflated: its 2-D kernels (patch embedding, Q/K/V pooling) repeated over the model's
temporal kernel and divided by its length, its joint position embedding split into the separable
class / spatial / (zero) temporal ones (``fit_to_model``). What no key or shape shows (Q/K/V pooled
before their projections, max vs avg pooling, residual pooling) is read from a PySlowFast file's ``cfg``.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from core.errors import CheckpointMismatch, UnsafeCheckpoint, weights_only_refusal
from pipeline.models.mvit import MViT, MViTConfig

StateDict = dict[str, torch.Tensor]
Format = Literal["native", "slowfast", "pytorchvideo", "torchvision"]
FORMATS: tuple[str, ...] = ("native", "slowfast", "pytorchvideo", "torchvision")


def load_checkpoint_file(path: str | os.PathLike[str]) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU; refuses, naming the file, anything that would
    need the unrestricted unpickler (a ``__reduce__`` payload runs code the moment it is unpickled).

    Raises ``UnsafeCheckpoint`` for such files and ``FileNotFoundError`` for a missing one.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpoint(
            f"refused to load checkpoint {os.fspath(path)}: it holds more than tensors and plain containers "
            f"(weights only load failed: {weights_only_refusal(err)}); only load files from a trusted "
            "source, and then convert them to a plain state dict"
        ) from None


# Key correspondences as templates: ``{n}`` stands for a block index, ``{x}`` for one of q/k/v. A
# template ending in "." maps a key prefix, any other one a whole key. Both directions of the
# torchvision mapping are generated from this one table.
_TORCHVISION_NAMES: list[tuple[str, str]] = [
    ("patch_embed.proj.", "conv_proj."),
    ("cls_token", "pos_encoding.class_token"),
    ("pos_embed_spatial", "pos_encoding.spatial_pos"),
    ("pos_embed_temporal", "pos_encoding.temporal_pos"),
    ("pos_embed_class", "pos_encoding.class_pos"),
    ("blocks.{n}.attn.proj.", "blocks.{n}.attn.project.0."),
    ("blocks.{n}.attn.pool_{x}.", "blocks.{n}.attn.pool_{x}.pool."),
    ("blocks.{n}.attn.norm_{x}.", "blocks.{n}.attn.pool_{x}.norm_act.0."),
    ("blocks.{n}.mlp.fc1.", "blocks.{n}.mlp.0."),
    ("blocks.{n}.mlp.fc2.", "blocks.{n}.mlp.3."),
    ("blocks.{n}.proj.", "blocks.{n}.project."),
    ("head.projection.", "head.1."),
]

# (pattern, replacement) pairs applied in order to each key; the first match wins.
_Rules = list[tuple[str, str]]
_PLACEHOLDERS = {"{n}": r"(\d+)", "{x}": "([qkv])"}


def _rule(source: str, target: str) -> tuple[str, str]:
    """Turns a (source, target) template pair into a regex rule."""
    pattern = re.escape(source)
    for placeholder, group in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape(placeholder), group)
    replacement, index = target, 0
    for token in re.findall(r"\{[nx]\}", source):
        index += 1
        replacement = replacement.replace(token, f"\\{index}", 1)
    return "^" + pattern + ("" if source.endswith(".") else "$"), replacement


_TORCHVISION_TO_NATIVE: _Rules = [_rule(tv, ours) for ours, tv in _TORCHVISION_NAMES]
_NATIVE_TO_TORCHVISION: _Rules = [_rule(ours, tv) for ours, tv in _TORCHVISION_NAMES]

_PYTORCHVIDEO_TO_NATIVE: _Rules = [
    (r"^patch_embed\.patch_model\.", "patch_embed.proj."),
    (r"^cls_positional_encoding\.", ""),
    (r"^norm_embed\.", "norm."),
    (r"^head\.proj\.", "head.projection."),
]

# torchvision stores these without the leading singleton axes this model (and PySlowFast) use.
_TORCHVISION_UNBATCHED = {
    "cls_token": ("pos_encoding.class_token", 2),
    "pos_embed_class": ("pos_encoding.class_pos", 2),
    "pos_embed_spatial": ("pos_encoding.spatial_pos", 1),
    "pos_embed_temporal": ("pos_encoding.temporal_pos", 1),
}


def _rename(state: Mapping[str, torch.Tensor], rules: _Rules) -> StateDict:
    compiled = [(re.compile(p), r) for p, r in rules]
    out: StateDict = {}
    for key, value in state.items():
        new_key = key
        for pattern, repl in compiled:
            if pattern.search(key):
                new_key = pattern.sub(repl, key)
                break
        if new_key in out:
            raise CheckpointMismatch(f"two checkpoint keys map to {new_key!r} (second one: {key!r})")
        out[new_key] = value
    return out


def _fuse_separate_qkv(state: StateDict) -> StateDict:
    """Some PySlowFast and PyTorchVideo checkpoints keep Q, K, V as three Linear layers; we use one.

    Stacking them is exact only when they project before pooling, as ours does: ``check_slowfast_cfg``
    refuses PySlowFast files that pool first.
    """
    out = dict(state)
    pattern = re.compile(r"^(blocks\.\d+\.attn)\.q\.(weight|bias)$")
    for key in [k for k in state if pattern.match(k)]:
        prefix, kind = pattern.match(key).groups()  # type: ignore[union-attr]
        parts = [f"{prefix}.{name}.{kind}" for name in ("q", "k", "v")]
        missing = [p for p in parts if p not in state]
        if missing:
            raise CheckpointMismatch(f"separate q/k/v projection is incomplete: missing {missing}")
        out[f"{prefix}.qkv.{kind}"] = torch.cat([state[p] for p in parts], dim=0)
        for p in parts:
            del out[p]
    return out


def unwrap_checkpoint(obj: object) -> StateDict:
    """Finds the model weights inside a loaded checkpoint object (PySlowFast wraps them in ``model_state``)."""
    if not isinstance(obj, Mapping):
        raise CheckpointMismatch(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    for wrapper in ("model_state", "model", "state_dict"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointMismatch("checkpoint contains no tensors")
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def detect_format(state: Mapping[str, torch.Tensor]) -> Format:
    keys = set(state)
    if "conv_proj.weight" in keys or "pos_encoding.class_token" in keys:
        return "torchvision"
    if "patch_embed.patch_model.weight" in keys or any(k.startswith("cls_positional_encoding.") for k in keys):
        return "pytorchvideo"
    if "patch_embed.proj.weight" in keys:
        return "slowfast" if any(re.match(r"^blocks\.\d+\.attn\.q\.", k) for k in keys) else "native"
    raise CheckpointMismatch(
        "cannot tell the checkpoint format from its keys (first keys: " + ", ".join(sorted(keys)[:5]) + ")"
    )


def to_native(state: Mapping[str, torch.Tensor], source: Format | Literal["auto"] = "auto") -> StateDict:
    """Renames (and reshapes) a foreign state dict into this project's layout."""
    fmt = detect_format(state) if source == "auto" else source
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
    if fmt == "torchvision":
        out = _rename(state, _TORCHVISION_TO_NATIVE)
        for key, (_, axes) in _TORCHVISION_UNBATCHED.items():
            if key in out:
                t = out[key]
                out[key] = t.reshape((1,) * axes + tuple(t.shape))
        return out
    if fmt == "pytorchvideo":
        return _fuse_separate_qkv(_rename(state, _PYTORCHVIDEO_TO_NATIVE))
    return _fuse_separate_qkv(dict(state))


def _check_torchvision_pooling(state: Mapping[str, torch.Tensor], cfg: MViTConfig | None) -> None:
    """torchvision's MViT pools Q/K/V only by a depthwise conv with kernel // 2 padding, always followed
    by LayerNorm; any other pooling would load (or fail to load) and then compute something else.

    Max/avg pooling shows in the state dict as a pooling norm without a conv; ``cfg`` catches what the
    weights cannot show (max/avg without norms, a non-default padding).
    """
    if cfg is not None:
        default_padding = tuple(k // 2 for k in cfg.pool_kernel)
        if cfg.pool_mode != "conv" or not cfg.pool_norm or cfg.resolved_pool_padding != default_padding:
            raise CheckpointMismatch(
                "torchvision's MViT only pools Q/K/V by conv with kernel // 2 padding and a LayerNorm; this model "
                f"has pool_mode={cfg.pool_mode!r}, pool_padding={cfg.resolved_pool_padding}, "
                f"pool_norm={cfg.pool_norm} and cannot be exported to torchvision"
            )
    pattern = re.compile(r"^(blocks\.\d+\.attn)\.(pool|norm)_([qkv])\.weight$")
    found: dict[str, set[str]] = {"pool": set(), "norm": set()}
    for key in state:
        match = pattern.match(key)
        if match:
            found[match.group(2)].add(f"{match.group(1)}.*_{match.group(3)}")
    unmatched = sorted(found["pool"] ^ found["norm"])
    if unmatched:
        raise CheckpointMismatch(
            "torchvision's MViT only pools Q/K/V by conv followed by LayerNorm, but these poolings have a conv "
            f"without a norm or a norm without a conv (max/avg pooling): {', '.join(unmatched[:6])}"
            + (" ..." if len(unmatched) > 6 else "")
        )


def to_torchvision(state: Mapping[str, torch.Tensor], cfg: MViTConfig | None = None) -> StateDict:
    """Exports a native state dict in torchvision's ``MViT`` layout (loadable by ``mvit_v1_b``/``mvit_v2_s``).

    Pass the model's ``cfg`` whenever it is at hand: only the config tells a non-default pooling padding
    (and max/avg pooling without norms) apart from torchvision's conv pooling.
    """
    if "pos_embed" in state:
        raise CheckpointMismatch("torchvision's MViT has no joint position embedding (image models cannot be exported)")
    _check_torchvision_pooling(state, cfg)
    out = _rename(state, _NATIVE_TO_TORCHVISION)
    for tv_key, axes in _TORCHVISION_UNBATCHED.values():
        if tv_key in out:
            out[tv_key] = out[tv_key].reshape(tuple(out[tv_key].shape[axes:]))
    return out


def _resize_spatial_pos(pos: torch.Tensor, hw: int) -> torch.Tensor:
    """(1, h*w, C) -> (1, hw, C) by bicubic interpolation over a square grid."""
    src, dst = math.isqrt(pos.shape[1]), math.isqrt(hw)
    if src * src != pos.shape[1] or dst * dst != hw:
        raise CheckpointMismatch(f"cannot resize a non-square spatial position embedding ({pos.shape[1]} -> {hw})")
    grid = pos.reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(dst, dst), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, hw, -1).to(pos.dtype)


def _resize_1d(table: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Linear interpolation of a table along ``dim``."""
    moved = table.movedim(dim, -1).float()
    lead = moved.shape[:-1]
    out = F.interpolate(moved.reshape(1, -1, moved.shape[-1]), size=length, mode="linear", align_corners=False)
    return out.reshape(*lead, length).movedim(-1, dim).to(table.dtype)


_Resizer = Callable[[torch.Tensor, torch.Size], torch.Tensor]


def _resizer_for(key: str) -> _Resizer | None:
    if key == "pos_embed_spatial":
        return lambda t, shape: _resize_spatial_pos(t, shape[1])
    if key == "pos_embed_temporal":
        return lambda t, shape: _resize_1d(t, shape[1], dim=1)
    if key == "pos_embed":  # joint (image) embedding: cls slot + square grid
        return lambda t, shape: torch.cat((t[:, :1], _resize_spatial_pos(t[:, 1:], shape[1] - 1)), dim=1)
    if re.search(r"\.attn\.rel_pos_[thw]$", key):
        return lambda t, shape: _resize_1d(t, shape[0], dim=0)
    return None


def check_slowfast_cfg(obj: object, cfg: MViTConfig) -> None:
    """Refuses a PySlowFast file whose training config (``cfg``, YAML text) sets what its weights cannot show.

    Three ``MVIT`` settings change what the weights compute without changing a key or a shape:
    ``POOL_FIRST`` (Q/K/V pooled before their separate projections: fused, they would be applied
    before pooling), ``MODE`` (max and avg pooling have no weights) and ``RESIDUAL_POOLING``. A file
    without a readable ``cfg`` is judged by its weights alone.
    """
    text = obj.get("cfg") if isinstance(obj, Mapping) and "model_state" in obj else None
    if not isinstance(text, str):
        return
    import yaml  # here, not at the top: a bare CUDA machine (benchmarks/gpu_check.py) has torch but no PyYAML

    try:
        mvit = yaml.safe_load(text).get("MVIT")
    except (yaml.YAMLError, AttributeError):
        return
    if not isinstance(mvit, Mapping):
        return
    problems = []
    if mvit.get("POOL_FIRST"):
        problems.append("MVIT.POOL_FIRST is true (Q/K/V pooled before their projections; this model pools after)")
    mode = mvit.get("MODE", "conv")
    if mode != cfg.pool_mode:
        problems.append(f"MVIT.MODE is {mode!r} but this model has pool_mode={cfg.pool_mode!r}")
    residual = bool(mvit.get("RESIDUAL_POOLING", False))
    if residual != cfg.residual_pooling:
        problems.append(f"MVIT.RESIDUAL_POOLING is {residual} but this model has "
                        f"residual_pooling={cfg.residual_pooling}")
    if problems:
        raise CheckpointMismatch("the PySlowFast checkpoint was trained as another network: " + "; ".join(problems))


HeadPolicy = Literal["keep", "new", "drop"]
_HEAD = "head."
# Conv kernels an image checkpoint holds with no (or a length-1) temporal axis: the patch embedding and the
# Q/K/V pooling convs.
_INFLATABLE = re.compile(r"^(patch_embed\.proj|blocks\.\d+\.attn\.pool_[qkv])\.weight$")


def inflate_kernel(weight: torch.Tensor, frames: int) -> torch.Tensor:
    """A 2-D conv kernel, (O, I, kh, kw) or (O, I, 1, kh, kw), repeated over ``frames`` time steps and divided
    by ``frames`` (I3D's inflation, PySlowFast's ``CHECKPOINT_INFLATE``): on a clip whose frames are all the
    same image, every output whose temporal window lies inside the clip equals the 2-D conv's on that image."""
    if weight.ndim == 4:
        weight = weight.unsqueeze(2)
    if weight.shape[2] != 1:
        raise CheckpointMismatch(f"only a kernel with one time step can be inflated, got shape {tuple(weight.shape)}")
    return weight.repeat(1, 1, frames, 1, 1) / frames


@dataclass(frozen=True)
class FittedState:
    """A checkpoint's weights fitted to a model: ``state`` has exactly the model's keys and shapes;
    ``reinitialized`` names the keys that hold the model's own fresh values, ``adapted`` says which keys
    were reshaped and how (for the job's log)."""

    state: StateDict
    reinitialized: tuple[str, ...]
    adapted: tuple[str, ...]


def _joint_to_separable(state: StateDict, model: MViT, adapted: list[str]) -> None:
    """An image checkpoint's joint position embedding (cls slot + square grid) as a video model's separable
    ones: the class slot, the grid as the spatial table (resized to the model's grid) and a zero temporal
    table, so every frame's tokens get the image's position code, and nothing else."""
    pos = state.pop("pos_embed")
    t, h, w = model.grid
    state["pos_embed_class"] = pos[:, :1]
    state["pos_embed_spatial"] = pos[:, 1:] if pos.shape[1] - 1 == h * w else _resize_spatial_pos(pos[:, 1:], h * w)
    state["pos_embed_temporal"] = pos.new_zeros((1, t, pos.shape[2]))
    adapted.append(f"pos_embed {tuple(pos.shape)} -> pos_embed_class + pos_embed_spatial (1, {h * w}, "
                   f"{pos.shape[2]}) + pos_embed_temporal of zeros (1, {t}, {pos.shape[2]})")


def _single_frame_pos(pos: torch.Tensor, model: MViT) -> torch.Tensor:
    """A joint image position embedding for a joint model of ``model.grid``: the grid resized, then the same
    spatial code for every frame (tokens are laid out time-major)."""
    t, h, w = model.grid
    grid = pos[:, 1:] if pos.shape[1] - 1 == h * w else _resize_spatial_pos(pos[:, 1:], h * w)
    return torch.cat((pos[:, :1], grid.repeat(1, t, 1)), dim=1)


def fit_to_model(model: MViT, state: Mapping[str, torch.Tensor], head: HeadPolicy = "keep") -> FittedState:
    """Checks a native state dict against ``model`` (any device, ``meta`` included) and reshapes what has a
    defined meaning in the model: position embeddings and relative-position tables resized to its grid, an
    image model's kernels inflated over time and its joint position embedding split (see ``inflate_kernel``,
    ``_joint_to_separable``).

    ``head``: ``keep`` loads the classifier as it is (strict: another class count is a mismatch); ``new``
    re-initialises it only when its class count differs from the model's; ``drop`` always. The checkpoint's
    classifier is ignored by name, never by accident. Anything else that does not fit raises
    ``CheckpointMismatch`` naming every missing, unexpected and mis-shaped key.
    """
    expected = model.state_dict()
    state = dict(state)
    adapted: list[str] = []
    reinitialized: list[str] = []
    head_keys = sorted(k for k in expected if k.startswith(_HEAD))
    if head == "drop" or (head == "new" and any(
            k in state and state[k].shape != expected[k].shape for k in head_keys)):
        state = {k: v for k, v in state.items() if not k.startswith(_HEAD)}
        reinitialized = head_keys
    for key in reinitialized:
        state[key] = expected[key]
    # An image checkpoint: its patch kernel has no (or a length-1) time axis. Only then is a joint position
    # embedding a single frame's grid; a video's joint one (T x H x W) has no spatial part to take.
    patch = state.get("patch_embed.proj.weight")
    image_source = patch is not None and (patch.ndim == 4 or patch.shape[2] == 1)
    if image_source and "pos_embed" in state and "pos_embed" not in expected and "pos_embed_spatial" in expected \
            and not any(k in state for k in ("pos_embed_spatial", "pos_embed_temporal", "pos_embed_class")):
        _joint_to_separable(state, model, adapted)
    for key in [k for k in state if _INFLATABLE.match(k) and k in expected]:
        have, want = state[key], expected[key]
        if have.ndim == 4 and want.ndim == 5 or (have.ndim == 5 and have.shape[2] == 1 and want.shape[2] > 1):
            if tuple(have.shape[:2]) + tuple(have.shape[-2:]) == tuple(want.shape[:2]) + tuple(want.shape[-2:]):
                state[key] = inflate_kernel(have, want.shape[2])
                if want.shape[2] > 1:
                    adapted.append(f"{key} inflated over {want.shape[2]} time steps")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = []
    for key in sorted(set(expected) & set(state)):
        want, have = expected[key].shape, state[key].shape
        if want == have:
            continue
        resize = _resizer_for(key)
        if key == "pos_embed" and image_source and model.grid[0] > 1 and math.isqrt(have[1] - 1) ** 2 == have[1] - 1:
            resize = lambda t, _: _single_frame_pos(t, model)  # noqa: E731 - an image's embedding, every frame
        if resize is not None and len(want) == len(have):
            try:
                state[key] = resize(state[key], want)
            except CheckpointMismatch:  # no grid to resize (non-square): a mismatch like any other
                pass
            if state[key].shape == want:
                adapted.append(f"{key} resized {tuple(have)} -> {tuple(want)}")
                continue
        mis_shaped.append(f"{key}: checkpoint {tuple(have)} vs model {tuple(want)}")
    if missing or unexpected or mis_shaped:
        lines = []
        if missing:
            lines.append(f"missing ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"unexpected ({len(unexpected)}): {', '.join(unexpected)}")
        if mis_shaped:
            lines.append(f"shape mismatch ({len(mis_shaped)}): {'; '.join(mis_shaped)}")
        raise CheckpointMismatch("checkpoint does not fit the model:\n  " + "\n  ".join(lines))
    return FittedState(state, tuple(reinitialized), tuple(adapted))


def adapt_to_model(model: MViT, state: Mapping[str, torch.Tensor], drop_head: bool = False) -> StateDict:
    """``fit_to_model``'s state: ``drop_head=True`` leaves the classifier at its fresh initialisation."""
    return fit_to_model(model, state, "drop" if drop_head else "keep").state


def load_weights(
    model: MViT,
    source: str | os.PathLike[str] | Mapping[str, object],
    fmt: Format | Literal["auto"] = "auto",
    drop_head: bool = False,
) -> Format:
    """Loads a checkpoint file (or an already loaded object) into ``model``; returns the detected format.

    Files are read with ``torch.load(weights_only=True)`` (``load_checkpoint_file``): a checkpoint can
    carry tensors and plain containers, never code; anything else raises ``UnsafeCheckpoint``.
    """
    obj = source if isinstance(source, Mapping) else load_checkpoint_file(source)
    check_slowfast_cfg(obj, model.cfg)
    state = unwrap_checkpoint(obj)
    detected = detect_format(state) if fmt == "auto" else fmt
    native = adapt_to_model(model, to_native(state, detected), drop_head=drop_head)
    model.load_state_dict(native, strict=True)
    return detected
