"""Serving exports of a trained MViT: ONNX (onnxruntime) and torch.export programs, each verified against
the eager model and carrying the class names and input spec a server needs (``python -m pipeline.export``).

The exporters take a network and its config; ``pipeline.serving.model.load_model`` gets them from any model
reference through ``pipeline.model_ref``, the one resolver of references in the project.
"""
