"""The torch-free base that ``preprocessing`` and ``pipeline`` share, one copy of each concern:

- ``storage``   fsspec URLs and the atomic ``Store`` every shard, manifest and artifact goes through
- ``s3``        the S3 endpoint resolution and the one retry policy, for s3fs and for pyarrow
- ``manifest``  the shard-set contract (names, manifest schema, key digests)
- ``tar_members`` a shard's tar members read within bounds (the data service and ``verify`` share it)
- ``redact``    secrets out of text, mappings and log records (by environment value and by credential shape)
                before they reach a log, MLflow, an error line or a file
- ``errors``    one-line error text and the error types both sides raise (config, unsafe checkpoints)
- ``loopback``  the switch that keeps a local Ray on 127.0.0.1
- ``child``     child processes that die with their parent, and how a process ended in words
- ``media``     the raw file suffixes read as videos and as images (preprocessing's inputs, prediction's)

Nothing here imports torch, and nothing imports ``pipeline`` or ``preprocessing``: layers point down.
"""
