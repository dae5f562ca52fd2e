"""The MViT model family. Nothing in this package knows about Ray or FSDP."""
