"""The MViT architecture as data: ``MViTConfig`` (stage level) and its per-block table (``block_specs``).

Kept apart from the modules (``pipeline.models.mvit``) and free of torch, so that an experiment's config
schema, the presets and the FLOP/parameter tables can be read and validated without loading torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

from core.errors import ConfigError

Triple = tuple[int, int, int]
THW = tuple[int, int, int]

POOL_MODES: tuple[str, ...] = ("conv", "max", "avg")


def _triple(name: str, v: Sequence[int] | int, temporal: int = 1) -> Triple:
    """The (T, H, W) value of field ``name``. ``temporal`` fills the T axis of an image setting (H, W):
    1 for kernels and strides, 0 for paddings."""
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(x) for x in v)
    if len(t) == 2:  # an image setting (H, W): no temporal extent
        t = (temporal,) + t
    if len(t) != 3:
        raise ConfigError("has the wrong length: expected 1, 2 or 3 integers", name, v)
    return t  # type: ignore[return-value]


@dataclass
class MViTConfig:
    """Everything that determines an MViT network. Presets live in ``pipeline.models.presets``.

    Stage layout is given the way the paper's tables and PySlowFast's configs give it: ``stage_starts``
    lists the blocks that open a new scale stage. Each of those blocks pools Q by ``q_stride`` and
    doubles the number of heads; the channel dimension doubles in the MLP of the block *before* it
    (v1, paper Table 2) or inside the attention of the block itself (v2, ``dim_mul_in_attention``).
    """

    num_classes: int = 400
    num_frames: int = 16  # input frames T (1 for images)
    crop_size: int = 224  # input H = W
    in_channels: int = 3
    embed_dim: int = 96
    num_heads: int = 1
    depth: int = 16
    stage_starts: tuple[int, ...] = (1, 3, 14)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    patch_kernel: Triple = (3, 7, 7)
    patch_stride: Triple = (2, 4, 4)
    patch_padding: Triple = (1, 3, 3)
    pool_kernel: Triple = (3, 3, 3)  # kernel of every Q/K/V pooling
    pool_mode: str = "conv"  # Q/K/V pooling operator: "conv" (depthwise, learned, the paper's MViT-B), "max", "avg"
    pool_padding: Triple | None = None  # padding of every Q/K/V pooling; None = pool_kernel // 2 per axis
    pool_norm: bool = True  # LayerNorm on each head's pooled Q/K/V (the paper; PySlowFast only for "conv")
    q_stride: Triple = (1, 2, 2)  # Q pooling stride at each stage start
    kv_stride: Triple = (1, 8, 8)  # adaptive K/V stride of block 0, divided by every Q stride after it
    pool_q_every_block: bool = False  # v2: Q is pooled (stride 1) in every block, not only at stage starts
    sep_pos_embed: bool = True  # separable space/time absolute position embeddings (video); joint otherwise
    abs_pos_embed: bool = True  # v2 drops absolute position embeddings for relative ones
    rel_pos: bool = False  # v2: decomposed relative position bias
    residual_pooling: bool = False  # v2: add pooled Q to the attention output
    dim_mul_in_attention: bool = False  # v2: channels change in the attention of the stage's first block
    norm_eps: float = 1e-6
    # NOTE: PyTorchVideo 0.1.5 builds the Q/K/V pooling norms with LayerNorm's default eps (1e-5) while
    # PySlowFast and torchvision use 1e-6 everywhere; set 1e-5 to reproduce PyTorchVideo models exactly.
    pool_norm_eps: float = 1e-6
    drop_path_rate: float = 0.2
    head_dropout: float = 0.5
    attention_dropout: float = 0.0
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        """Raises ``ConfigError`` keyed by the field name (``depth``): this config does not know where it
        lives, so an experiment config's loader places the key under its section (``model.depth``)."""
        for name in ("patch_kernel", "patch_stride", "pool_kernel", "q_stride", "kv_stride"):
            setattr(self, name, _triple(name, getattr(self, name)))
        self.patch_padding = _triple("patch_padding", self.patch_padding, temporal=0)
        if self.pool_padding is not None:
            self.pool_padding = _triple("pool_padding", self.pool_padding, temporal=0)
        self.stage_starts = tuple(int(s) for s in self.stage_starts)
        if self.depth < 1:
            raise ConfigError("must be >= 1", "depth", self.depth)
        if any(not 0 < s < self.depth for s in self.stage_starts):
            raise ConfigError(f"{ConfigError.VALUE} must lie in 1..depth-1 ({self.depth - 1})", "stage_starts",
                              self.stage_starts, related=("depth",))
        for name in ("num_classes", "num_frames", "crop_size", "embed_dim", "num_heads"):
            if getattr(self, name) < 1:
                raise ConfigError("must be >= 1", name, getattr(self, name))
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"{ConfigError.VALUE} is not divisible by num_heads {self.num_heads}", "embed_dim",
                              self.embed_dim, related=("num_heads",))
        grid = self.token_grid
        if min(grid) < 1:  # the frames (T) or the crop (H, W) give no patch at all
            name = "num_frames" if grid[0] < 1 else "crop_size"
            raise ConfigError(f"{ConfigError.VALUE} is too small for patch_kernel {self.patch_kernel} / patch_stride "
                              f"{self.patch_stride} (input {self.input_shape} leaves no tokens)", name,
                              getattr(self, name))
        self._check_pooling()

    def _check_pooling(self) -> None:
        """Refuses pooling settings that would only fail later, inside a forward pass, with a shape error."""
        if self.pool_mode not in POOL_MODES:
            raise ConfigError(f"must be one of {', '.join(map(repr, POOL_MODES))}", "pool_mode", self.pool_mode)
        # NOTE: torch's max/avg pooling refuses padding above half the kernel; conv mode gets the same
        # limit so that switching pool_mode never turns a valid config into an invalid one.
        padding, limit = self.resolved_pool_padding, tuple(k // 2 for k in self.pool_kernel)
        value = ConfigError.VALUE
        if any(p < 0 for p in padding):
            raise ConfigError("must be >= 0 on every axis", "pool_padding", padding)
        if any(p > m for p, m in zip(padding, limit)):
            raise ConfigError(f"{value} exceeds half of pool_kernel {self.pool_kernel} (at most {limit} per axis)",
                              "pool_padding", padding)
        # Each error is keyed by the field to change.
        for i, spec in enumerate(block_specs(self)):
            self._check_avg_pool_input(i, spec)
            if min(spec.kv_grid) < 1:  # only an explicit padding below kernel // 2 can get here
                raise ConfigError(
                    f"{value}: block {i}'s K/V pooling (kernel {spec.kernel_kv}, stride {spec.stride_kv}) leaves "
                    f"no tokens of its {spec.input_grid} grid", "pool_padding", spec.padding_kv,
                )
            skip = _skip_grid(spec.input_grid, spec.stride_q)
            if spec.q_grid != skip:
                field_name = "pool_kernel" if self.pool_padding is None else "pool_padding"
                raise ConfigError(
                    f"{value}: block {i}'s Q pooling (kernel {spec.kernel_q}, stride {spec.stride_q}, padding "
                    f"{spec.padding_q}) turns its {spec.input_grid} grid into {spec.q_grid}, but the max-pooled "
                    f"skip connection gives {skip}; choose pool_kernel / pool_padding so that both agree",
                    field_name, getattr(self, field_name),
                )

    def _check_avg_pool_input(self, index: int, spec: BlockSpec) -> None:
        """torch's avg_pool3d (unlike max pooling and conv) refuses a grid smaller than the kernel even
        when padding would make room, so such an avg model could be built but never run."""
        if self.pool_mode != "avg":
            return
        for what, kernel, stride in (("Q", spec.kernel_q, spec.stride_q), ("K/V", spec.kernel_kv, spec.stride_kv)):
            if _pools(kernel, stride) and any(g < k for g, k in zip(spec.input_grid, kernel)):
                raise ConfigError(
                    f"{ConfigError.VALUE} needs every pooled token grid at least as large as pool_kernel {kernel} "
                    f"(torch's avg_pool3d rule), but block {index}'s {what} pooling sees {spec.input_grid}; "
                    "use more frames / a larger crop, a smaller pool_kernel, or pool_mode 'max' / 'conv'",
                    "pool_mode", self.pool_mode,
                )

    @property
    def resolved_pool_padding(self) -> Triple:
        """The Q/K/V pooling padding actually used: ``pool_padding`` or, unset, half the kernel."""
        if self.pool_padding is not None:
            return self.pool_padding
        return tuple(k // 2 for k in self.pool_kernel)  # type: ignore[return-value]

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one input clip."""
        return (self.in_channels, self.num_frames, self.crop_size, self.crop_size)

    @property
    def token_grid(self) -> THW:
        """(T, H, W) of the token grid after the patch embedding."""
        size = (self.num_frames, self.crop_size, self.crop_size)
        return tuple(  # type: ignore[return-value]
            (s + 2 * p - k) // st + 1
            for s, k, st, p in zip(size, self.patch_kernel, self.patch_stride, self.patch_padding)
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MViTConfig":
        """Builds a config from plain values, naming any key that is not a field."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown MViT config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class BlockSpec:
    """One row of the architecture table: what a single ``MultiScaleBlock`` does."""

    dim_in: int
    dim_out: int
    num_heads: int
    kernel_q: Triple  # (1, 1, 1) with stride (1, 1, 1) means Q is not pooled
    stride_q: Triple
    kernel_kv: Triple
    stride_kv: Triple
    drop_path: float
    input_grid: THW  # token grid (T, H, W) entering the block
    attn_dim: int  # width of attention and MLP: dim_out when the width changes in attention (v2)
    padding_q: Triple = (0, 0, 0)  # (0, 0, 0) where Q is not pooled
    padding_kv: Triple = (0, 0, 0)

    @property
    def q_grid(self) -> THW:
        """Token grid of the pooled Q, which is also the grid leaving the block."""
        return _pooled_grid(self.input_grid, self.kernel_q, self.stride_q, self.padding_q)

    @property
    def kv_grid(self) -> THW:
        return _pooled_grid(self.input_grid, self.kernel_kv, self.stride_kv, self.padding_kv)


def _pools(kernel: Triple, stride: Triple) -> bool:
    return math.prod(kernel) > 1 or math.prod(stride) > 1


def block_specs(cfg: MViTConfig) -> list[BlockSpec]:
    """Derives the per-block table from the stage-level config, as PySlowFast's builder does.

    Heads double and Q is pooled at each stage start; the adaptive K/V stride starts at ``kv_stride``
    and is divided by each Q stride, so K/V stay at a fixed resolution across stages.
    """
    specs: list[BlockSpec] = []
    dim, heads = cfg.embed_dim, cfg.num_heads
    kv_stride = cfg.kv_stride
    grid = cfg.token_grid
    no_pool = (1, 1, 1)
    padding = cfg.resolved_pool_padding
    for i in range(cfg.depth):
        starts_stage = i in cfg.stage_starts
        if starts_stage:
            heads *= 2
            kv_stride = tuple(max(s // q, 1) for s, q in zip(kv_stride, cfg.q_stride))  # type: ignore[assignment]
        stride_q = cfg.q_stride if starts_stage else no_pool
        kernel_q = cfg.pool_kernel if (starts_stage or cfg.pool_q_every_block) else no_pool
        if cfg.dim_mul_in_attention:
            dim_in, dim_out = dim, dim * 2 if starts_stage else dim
        else:
            dim_in, dim_out = dim, dim * 2 if (i + 1) in cfg.stage_starts else dim
        drop_path = cfg.drop_path_rate * i / (cfg.depth - 1) if cfg.depth > 1 else 0.0
        spec = BlockSpec(
            dim_in=dim_in,
            dim_out=dim_out,
            num_heads=heads,
            kernel_q=kernel_q,
            stride_q=stride_q,
            kernel_kv=cfg.pool_kernel,
            stride_kv=kv_stride,
            drop_path=drop_path,
            input_grid=grid,
            attn_dim=dim_out if cfg.dim_mul_in_attention else dim_in,
            padding_q=padding if _pools(kernel_q, stride_q) else (0, 0, 0),
            padding_kv=padding if _pools(cfg.pool_kernel, kv_stride) else (0, 0, 0),
        )
        specs.append(spec)
        dim = dim_out
        grid = spec.q_grid
    return specs


def _pooled_grid(grid: THW, kernel: Triple, stride: Triple, padding: Triple) -> THW:
    """Output size of conv/max/avg pooling (floor mode), the same arithmetic for all three."""
    if not _pools(kernel, stride):
        return grid
    return tuple(  # type: ignore[return-value]
        (g + 2 * p - k) // s + 1 for g, k, s, p in zip(grid, kernel, stride, padding)
    )


def _skip_kernel(stride_q: Triple) -> Triple:
    """Kernel of the skip connection's max pool (PySlowFast's rule): one wider than the stride where it strides."""
    return tuple(s + 1 if s > 1 else s for s in stride_q)  # type: ignore[return-value]


def _skip_grid(grid: THW, stride_q: Triple) -> THW:
    if math.prod(stride_q) == 1:
        return grid
    kernel = _skip_kernel(stride_q)
    return _pooled_grid(grid, kernel, stride_q, tuple(k // 2 for k in kernel))  # type: ignore[arg-type]
