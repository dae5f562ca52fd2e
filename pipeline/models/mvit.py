"""Multiscale Vision Transformers (Fan et al., ICCV 2021, arXiv 2104.11227) and MViTv2 (Li et al., CVPR 2022).

One self-contained file: the architecture is written as data (``MViTConfig`` -> a per-block table of
``BlockSpec`` rows, see ``block_specs``) and a handful of small modules that consume that table.
Parameter names follow PySlowFast, the paper's reference code, so that its checkpoints load without
renaming; ``pipeline.models.convert`` maps the torchvision and PyTorchVideo layouts onto these names.

This module knows nothing about Ray, FSDP or devices: distribution wraps ``MViT.blocks`` from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

Triple = tuple[int, int, int]
THW = tuple[int, int, int]

POOL_MODES: tuple[str, ...] = ("conv", "max", "avg")


def _triple(v: Sequence[int] | int, temporal: int = 1) -> Triple:
    """``temporal`` fills the T axis of an image setting (H, W): 1 for kernels and strides, 0 for paddings."""
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(x) for x in v)
    if len(t) == 2:  # an image setting (H, W): no temporal extent
        t = (temporal,) + t
    if len(t) != 3:
        raise ValueError(f"expected 1, 2 or 3 integers, got {v!r}")
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
        for name in ("patch_kernel", "patch_stride", "pool_kernel", "q_stride", "kv_stride"):
            setattr(self, name, _triple(getattr(self, name)))
        self.patch_padding = _triple(self.patch_padding, temporal=0)
        if self.pool_padding is not None:
            self.pool_padding = _triple(self.pool_padding, temporal=0)
        self.stage_starts = tuple(int(s) for s in self.stage_starts)
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if any(not 0 < s < self.depth for s in self.stage_starts):
            raise ValueError(f"stage_starts {self.stage_starts} must lie in 1..depth-1 ({self.depth - 1})")
        for name in ("num_classes", "num_frames", "crop_size", "embed_dim", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        grid = self.token_grid
        if min(grid) < 1:
            raise ValueError(f"input {self.input_shape} is too small for patch stride {self.patch_stride}")
        self._check_pooling()

    def _check_pooling(self) -> None:
        """Refuses pooling settings that would only fail later, inside a forward pass, with a shape error."""
        if self.pool_mode not in POOL_MODES:
            raise ValueError(f"pool_mode must be one of {', '.join(map(repr, POOL_MODES))}, got {self.pool_mode!r}")
        # NOTE: torch's max/avg pooling refuses padding above half the kernel; conv mode gets the same
        # limit so that switching pool_mode never turns a valid config into an invalid one.
        padding, limit = self.resolved_pool_padding, tuple(k // 2 for k in self.pool_kernel)
        if any(p < 0 for p in padding):
            raise ValueError(f"pool_padding must be >= 0 on every axis, got {padding}")
        if any(p > m for p, m in zip(padding, limit)):
            raise ValueError(
                f"pool_padding {padding} exceeds half of pool_kernel {self.pool_kernel} (at most {limit} per axis)"
            )
        # Messages open with the field to change: the experiment config loader keys its errors on it.
        for i, spec in enumerate(block_specs(self)):
            self._check_avg_pool_input(i, spec)
            if min(spec.kv_grid) < 1:  # only an explicit padding below kernel // 2 can get here
                raise ValueError(
                    f"pool_padding {spec.padding_kv}: block {i}'s K/V pooling (kernel {spec.kernel_kv}, stride "
                    f"{spec.stride_kv}) leaves no tokens of its {spec.input_grid} grid"
                )
            skip = _skip_grid(spec.input_grid, spec.stride_q)
            if spec.q_grid != skip:
                field_name = "pool_kernel" if self.pool_padding is None else "pool_padding"
                raise ValueError(
                    f"{field_name} {getattr(self, field_name)}: block {i}'s Q pooling (kernel {spec.kernel_q}, "
                    f"stride {spec.stride_q}, padding {spec.padding_q}) turns its {spec.input_grid} grid into "
                    f"{spec.q_grid}, but the max-pooled skip connection gives {skip}; "
                    "choose pool_kernel / pool_padding so that both agree"
                )

    def _check_avg_pool_input(self, index: int, spec: BlockSpec) -> None:
        """torch's avg_pool3d (unlike max pooling and conv) refuses a grid smaller than the kernel even
        when padding would make room, so such an avg model could be built but never run."""
        if self.pool_mode != "avg":
            return
        for what, kernel, stride in (("Q", spec.kernel_q, spec.stride_q), ("K/V", spec.kernel_kv, spec.stride_kv)):
            if _pools(kernel, stride) and any(g < k for g, k in zip(spec.input_grid, kernel)):
                raise ValueError(
                    f"pool_mode 'avg' needs every pooled token grid at least as large as pool_kernel {kernel} "
                    f"(torch's avg_pool3d rule), but block {index}'s {what} pooling sees {spec.input_grid}; "
                    "use more frames / a larger crop, a smaller pool_kernel, or pool_mode 'max' / 'conv'"
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
            raise ValueError(f"unknown MViT config keys {unknown}; known keys: {sorted(known)}")
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


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample during training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _pool_tokens(x: torch.Tensor, pool: nn.Module, grid: THW) -> tuple[torch.Tensor, THW]:
    """Pools the (B, heads, 1 + T*H*W, C) token tensor over its spatio-temporal grid.

    The cls token (index 0) is kept out of pooling and put back in front, as in the paper.
    """
    B, heads, _, C = x.shape
    cls_tok, tokens = x[:, :, :1], x[:, :, 1:]
    tokens = tokens.reshape(B * heads, *grid, C).permute(0, 4, 1, 2, 3)
    tokens = pool(tokens)
    new_grid: THW = tuple(tokens.shape[2:])  # type: ignore[assignment]
    tokens = tokens.reshape(B, heads, C, -1).transpose(2, 3)
    return torch.cat((cls_tok, tokens), dim=2), new_grid


def _rel_index(q_size: int, k_size: int) -> torch.Tensor:
    """Index into a relative-position table for every (q, k) pair of one axis, scale-aware (MViTv2)."""
    q_ratio = max(k_size / q_size, 1.0)
    k_ratio = max(q_size / k_size, 1.0)
    dist = torch.arange(q_size)[:, None] * q_ratio - torch.arange(k_size)[None, :] * k_ratio
    return (dist + (k_size - 1) * k_ratio).long()


def _resize_table(table: torch.Tensor, length: int) -> torch.Tensor:
    if table.shape[0] == length:
        return table
    return F.interpolate(table.t().unsqueeze(0), size=length, mode="linear").squeeze(0).t()


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    q_grid: THW,
    k_grid: THW,
    rel_pos_t: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
) -> torch.Tensor:
    """MViTv2's decomposed relative position term, as an additive (B, heads, Nq, Nk) attention bias.

    The bias is q . (R_t + R_h + R_w) for the grid tokens and zero for any pair involving a cls token.
    """
    qt, qh, qw = q_grid
    kt, kh, kw = k_grid
    Rt = _resize_table(rel_pos_t, 2 * max(qt, kt) - 1)[_rel_index(qt, kt)]
    Rh = _resize_table(rel_pos_h, 2 * max(qh, kh) - 1)[_rel_index(qh, kh)]
    Rw = _resize_table(rel_pos_w, 2 * max(qw, kw) - 1)[_rel_index(qw, kw)]
    B, heads, _, C = q.shape
    r_q = q[:, :, 1:].reshape(B, heads, qt, qh, qw, C)
    bias_t = torch.einsum("bnthwc,tkc->bnthwk", r_q, Rt.to(q.dtype))
    bias_h = torch.einsum("bnthwc,hkc->bnthwk", r_q, Rh.to(q.dtype))
    bias_w = torch.einsum("bnthwc,wkc->bnthwk", r_q, Rw.to(q.dtype))
    bias = (
        bias_t[..., :, None, None] + bias_h[..., None, :, None] + bias_w[..., None, None, :]
    ).reshape(B, heads, qt * qh * qw, kt * kh * kw)
    return F.pad(bias, (1, 0, 1, 0))  # zero rows/columns for the cls token


def _pool_op(mode: str, channels: int, kernel: Triple, stride: Triple, padding: Triple) -> nn.Module:
    """The pooling operator of ``pool_mode``; only "conv" has weights (and a state-dict entry)."""
    if mode == "max":
        return nn.MaxPool3d(kernel, stride=stride, padding=padding)
    if mode == "avg":  # counts padded zeros in the average (torch's default, as in PySlowFast)
        return nn.AvgPool3d(kernel, stride=stride, padding=padding)
    return nn.Conv3d(channels, channels, kernel, stride=stride, padding=padding, groups=channels, bias=False)


class MultiScaleAttention(nn.Module):
    """Multi Head Pooling Attention: Q, K and V are pooled over the token grid before attending.

    Pooling (``pool_mode``) is a depthwise Conv3d on each head's channels (shared by the heads, no bias),
    or a parameter-free max or average pool, followed by LayerNorm; attention cost shrinks with the K/V
    stride and Q's stride sets the output resolution.
    """

    def __init__(self, spec: BlockSpec, cfg: MViTConfig) -> None:
        super().__init__()
        dim_in, dim = spec.dim_in, spec.attn_dim
        self.num_heads = spec.num_heads
        if dim % self.num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by {self.num_heads} heads")
        self.head_dim = dim // self.num_heads
        self.dim = dim
        self.dropout = cfg.attention_dropout
        self.residual_pooling = cfg.residual_pooling
        self.qkv = nn.Linear(dim_in, 3 * dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(dim, dim)

        def pool_and_norm(
            kernel: Triple, stride: Triple, padding: Triple
        ) -> tuple[nn.Module | None, nn.Module | None]:
            if not _pools(kernel, stride):
                return None, None
            pool = _pool_op(cfg.pool_mode, self.head_dim, kernel, stride, padding)
            # NOTE: PySlowFast normalises only after conv pooling and skips the norm for max/avg; the
            # paper puts LayerNorm after every pooling, hence pool_norm=True
            # by default in every mode; pool_norm=False reproduces PySlowFast's max/avg models.
            norm = nn.LayerNorm(self.head_dim, eps=cfg.pool_norm_eps) if cfg.pool_norm else None
            return pool, norm

        self.pool_q, self.norm_q = pool_and_norm(spec.kernel_q, spec.stride_q, spec.padding_q)
        self.pool_k, self.norm_k = pool_and_norm(spec.kernel_kv, spec.stride_kv, spec.padding_kv)
        self.pool_v, self.norm_v = pool_and_norm(spec.kernel_kv, spec.stride_kv, spec.padding_kv)

        self.rel_pos = cfg.rel_pos
        if cfg.rel_pos:
            # NOTE: table sizes follow PySlowFast: spatial tables cover the larger of the Q and K/V grids
            # computed from H alone, the temporal table covers the block's input T.
            size = spec.input_grid[1]
            q_size = size // spec.stride_q[1]
            kv_size = size // spec.stride_kv[1]
            spatial = 2 * max(q_size, kv_size) - 1
            self.rel_pos_h = nn.Parameter(torch.zeros(spatial, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(spatial, self.head_dim))
            self.rel_pos_t = nn.Parameter(torch.zeros(2 * spec.input_grid[0] - 1, self.head_dim))

    def _pool(
        self, x: torch.Tensor, pool: nn.Module | None, norm: nn.Module | None, grid: THW
    ) -> tuple[torch.Tensor, THW]:
        if pool is None:
            return x, grid
        x, grid = _pool_tokens(x, pool, grid)
        return (x if norm is None else norm(x)), grid

    def forward(self, x: torch.Tensor, grid: THW) -> tuple[torch.Tensor, THW]:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, q_grid = self._pool(q, self.pool_q, self.norm_q, grid)
        k, k_grid = self._pool(k, self.pool_k, self.norm_k, grid)
        v, _ = self._pool(v, self.pool_v, self.norm_v, grid)

        bias = None
        if self.rel_pos:
            bias = decomposed_rel_pos_bias(q, q_grid, k_grid, self.rel_pos_t, self.rel_pos_h, self.rel_pos_w)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )
        if self.residual_pooling:
            # NOTE: PySlowFast leaves the cls token out of the residual pooling connection.
            out = torch.cat((out[:, :, :1], out[:, :, 1:] + q[:, :, 1:]), dim=2)
        out = out.transpose(1, 2).reshape(B, -1, self.dim)
        return self.proj(out), q_grid


class Mlp(nn.Module):
    def __init__(self, dim_in: int, hidden: int, dim_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MultiScaleBlock(nn.Module):
    """Pre-norm transformer block whose attention may change resolution (Q pooling) and width.

    When Q is pooled the skip path is max-pooled to the same grid; when the width changes the skip
    path is projected by a Linear layer (on norm2's output in v1, on norm1's output in v2).
    """

    def __init__(self, spec: BlockSpec, cfg: MViTConfig) -> None:
        super().__init__()
        self.dim_in, self.dim_out = spec.dim_in, spec.dim_out
        self.proj_in_attention = cfg.dim_mul_in_attention
        attn_dim = spec.attn_dim
        self.norm1 = nn.LayerNorm(spec.dim_in, eps=cfg.norm_eps)
        self.attn = MultiScaleAttention(spec, cfg)
        self.drop_path = DropPath(spec.drop_path)
        self.norm2 = nn.LayerNorm(attn_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(attn_dim, int(attn_dim * cfg.mlp_ratio), spec.dim_out)
        self.proj = nn.Linear(spec.dim_in, spec.dim_out) if spec.dim_in != spec.dim_out else None
        self.pool_skip: nn.Module | None = None
        if math.prod(spec.stride_q) > 1:
            kernel = _skip_kernel(spec.stride_q)
            self.pool_skip = nn.MaxPool3d(kernel, stride=spec.stride_q, padding=tuple(k // 2 for k in kernel))

    def forward(self, x: torch.Tensor, grid: THW) -> tuple[torch.Tensor, THW]:
        x_norm = self.norm1(x)
        x_attn, new_grid = self.attn(x_norm, grid)
        if self.proj is not None and self.proj_in_attention:
            x = self.proj(x_norm)
        if self.pool_skip is not None:
            x = _pool_tokens(x.unsqueeze(1), self.pool_skip, grid)[0].squeeze(1)
        x = x + self.drop_path(x_attn)
        x_norm = self.norm2(x)
        if self.proj is not None and not self.proj_in_attention:
            x = self.proj(x_norm)
        return x + self.drop_path(self.mlp(x_norm)), new_grid


class PatchEmbed(nn.Module):
    """Cube (video) or patch (image, temporal kernel 1) embedding by a strided convolution."""

    def __init__(self, cfg: MViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv3d(
            cfg.in_channels, cfg.embed_dim, cfg.patch_kernel, stride=cfg.patch_stride, padding=cfg.patch_padding
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, THW]:
        x = self.proj(x)
        grid: THW = tuple(x.shape[2:])  # type: ignore[assignment]
        return x.flatten(2).transpose(1, 2), grid


class Head(nn.Module):
    def __init__(self, dim: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.projection = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.dropout(x))


class MViT(nn.Module):
    """MViT classifier over (B, C, T, H, W) clips or (B, C, H, W) images; returns logits.

    The input grid must match the configured ``num_frames`` x ``crop_size``: position embeddings are
    resized when a checkpoint is *loaded* at another size (``pipeline.models.convert``), not per call.
    """

    def __init__(self, cfg: MViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.specs = block_specs(cfg)
        self.grid = cfg.token_grid
        self.patch_embed = PatchEmbed(cfg)
        C = cfg.embed_dim
        t, h, w = self.grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed_spatial = self.pos_embed_temporal = self.pos_embed_class = self.pos_embed = None
        if cfg.abs_pos_embed and cfg.sep_pos_embed:
            self.pos_embed_spatial = nn.Parameter(torch.zeros(1, h * w, C))
            self.pos_embed_temporal = nn.Parameter(torch.zeros(1, t, C))
            self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, C))
        elif cfg.abs_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + t * h * w, C))
        self.blocks = nn.ModuleList(MultiScaleBlock(spec, cfg) for spec in self.specs)
        self.norm = nn.LayerNorm(self.specs[-1].dim_out, eps=cfg.norm_eps)
        self.head = Head(self.specs[-1].dim_out, cfg.num_classes, cfg.head_dropout)
        self.grad_checkpointing = cfg.grad_checkpointing
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ViT-style init used by PySlowFast: truncated normal (std 0.02) for Linear and embeddings."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.startswith(("cls_token", "pos_embed")) or name.rsplit(".", 1)[-1].startswith("rel_pos_"):
                nn.init.trunc_normal_(p, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameter names the optimiser should not decay (embeddings and tokens; norms/biases by rule)."""
        return {
            n
            for n, _ in self.named_parameters()
            if n.startswith(("cls_token", "pos_embed")) or n.rsplit(".", 1)[-1].startswith("rel_pos_")
        }

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.grad_checkpointing = enabled

    def _add_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            return x + self.pos_embed
        if self.pos_embed_spatial is not None:
            t, hw = self.pos_embed_temporal.shape[1], self.pos_embed_spatial.shape[1]  # type: ignore[union-attr]
            pos = self.pos_embed_spatial.repeat(1, t, 1) + torch.repeat_interleave(
                self.pos_embed_temporal, hw, dim=1  # type: ignore[arg-type]
            )
            return x + torch.cat((self.pos_embed_class, pos), dim=1)  # type: ignore[arg-type]
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the final-normed cls token embedding, shape (B, C_last)."""
        if x.ndim == 4:
            x = x.unsqueeze(2)
        if x.ndim != 5:
            raise ValueError(f"expected (B, C, T, H, W) or (B, C, H, W) input, got shape {tuple(x.shape)}")
        x, grid = self.patch_embed(x)
        if grid != self.grid:
            raise ValueError(
                f"input gives a {grid} token grid but the model was built for {self.grid} "
                f"(num_frames={self.cfg.num_frames}, crop_size={self.cfg.crop_size})"
            )
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self._add_pos_embed(x)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x, grid = checkpoint(block, x, grid, use_reentrant=False)
            else:
                x, grid = block(x, grid)
        return self.norm(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
