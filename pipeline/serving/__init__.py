"""Serving exports of a trained MViT: ONNX (onnxruntime) and torch.export programs, each verified against
the eager model and carrying the class names and input spec a server needs (``python -m pipeline.export``).

Nothing here knows how a model reference is resolved: the exporters take a ``LoadedModel`` (config,
weights, classes); ``pipeline.serving.model.read_final_model`` is the one reader of a final model folder.
"""
