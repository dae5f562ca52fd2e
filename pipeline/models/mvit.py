"""Multiscale Vision Transformers (Fan et al., ICCV 2021, arXiv 2104.11227) and MViTv2 (Li et al., CVPR 2022).

The architecture is written as data in ``pipeline.models.config`` (``MViTConfig`` -> a per-block table
of ``BlockSpec`` rows, see ``block_specs``); this file holds the handful of small modules that consume
that table.
Parameter names follow PySlowFast, the paper's reference code, so that its checkpoints load without
renaming; ``pipeline.models.convert`` maps the torchvision and PyTorchVideo layouts onto these names.

This module knows nothing about Ray, FSDP or devices: distribution wraps ``MViT.blocks`` from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.models.config import THW, BlockSpec, MViTConfig, Triple, _pools, _skip_kernel, block_specs


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
