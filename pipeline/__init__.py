"""MViT training pipeline: models, data-loading service, Ray Train + FSDP2 training, MLflow tracking."""

__version__ = "0.1.0"
