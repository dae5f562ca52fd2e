"""Raw Kinetics / ImageNet -> WebDataset tar shards on any fsspec URL."""

__version__ = "0.1.0"
