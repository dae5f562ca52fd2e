"""Small model configurations that keep CPU tests fast while exercising every code path."""

from __future__ import annotations

from typing import Any

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
