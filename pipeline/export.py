"""Export a trained MViT for serving: ``python -m pipeline.export --model REF --out PATH``.

``--model`` is any model reference (``pipeline.model_ref``): a final model folder, a checkpoint, a
``runs:/`` or ``models:/`` URI.

``--format onnx`` (default) writes an ONNX file for onnxruntime (dynamo-based exporter, opset 23 by
default); ``--format torch-export`` writes a torch.export ExportedProgram (.pt2, ``torch.export.load``).
``--batch dynamic`` (default) leaves the batch axis free; ``--batch N`` fixes it.

Each export is read back from its file and its logits compared with the eager model's on random clips
(batch 1 and 3 when dynamic, N when fixed) within atol = rtol = 1e-4 (fp32); a failed check removes the
file. The class names, the input spec (frames, crop, normalisation mean/std, frame stride, evaluation
views) and the verification go into the file's metadata and a sidecar ``PATH.json``.
The data recipe comes from ``--config`` (the experiment YAML the model was trained with, checked
against the model: frames, crop, channels, classes) or else from pipeline.data's defaults.
See docs/serving.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import fsspec
import torch

from core.errors import ConfigError, one_line
from core.s3 import storage_options_for
from core.storage import is_local
from pipeline.serving import exporters, verify
from pipeline.serving.model import ServingError, load_model
from pipeline.serving.spec import default_input_spec, input_spec_from_experiment, metadata

FORMATS = {"onnx": ".onnx", "torch-export": ".pt2"}


def parse_batch(text: str) -> int | None:
    """None for 'dynamic', else the fixed batch size (a positive int)."""
    if text == "dynamic":
        return None
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ServingError(f"--batch must be 'dynamic' or a positive integer, got {text!r}")


def _check_out(out: str, fmt: str) -> None:
    suffix = FORMATS[fmt]
    if not out.endswith(suffix):
        raise ServingError(f"--out {out!r} must end in {suffix} for --format {fmt}")


def run(args: argparse.Namespace) -> int:
    batch = parse_batch(args.batch)
    _check_out(args.out, args.format)
    if args.format == "onnx":
        exporters.check_onnx(args.opset)
    loaded = load_model(args.model, args.config, args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
                        args.s3_endpoint_url)
    cfg, model = loaded.config, loaded.model
    spec = input_spec_from_experiment(cfg, args.config) if args.config else default_input_spec(cfg)
    export = {"format": args.format, "batch": "dynamic" if batch is None else batch, "source": loaded.source,
              "torch": torch.__version__}
    if args.format == "onnx":
        export["opset"] = args.opset
    meta = metadata(spec, tuple(loaded.classes) if loaded.classes else None, cfg, export)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mvit-serving-") as tmp:
        local = Path(args.out) if is_local(args.out) else Path(tmp) / Path(args.out).name
        if args.format == "onnx":
            exporters.export_onnx(model, cfg, local, batch, meta, args.opset)
            runner, runtime = verify.onnx_runner(local), "onnxruntime CPUExecutionProvider"
        else:
            exporters.export_program(model, cfg, local, batch, meta)
            runner, runtime = verify.program_runner(local), "torch.export.load(...).module()"
        exported_s = time.perf_counter() - start
        result = verify.verify(model, cfg, runner, runtime, (1, 3) if batch is None else (batch,))
        lines = [f"batch {c.batch}: max |logit diff| {c.max_abs_diff:.2e}" for c in result.checks]
        if not result.passed:
            local.unlink()
            raise ServingError(f"{args.format} export disagrees with the eager model ({'; '.join(lines)}; allowed "
                             f"{verify.ATOL:g} + {verify.RTOL:g} x |logit|): file removed")
        sidecar = local.with_name(local.name + ".json")
        sidecar.write_text(json.dumps({**meta, "verification": result.to_dict()}, indent=2) + "\n")
        if not is_local(args.out):
            fs, target = fsspec.core.url_to_fs(args.out, **storage_options_for(args.out, args.s3_endpoint_url))
            fs.put_file(str(local), target)
            fs.put_file(str(sidecar), target + ".json")
    print(f"wrote {args.out} ({args.format}, batch {export['batch']}, {exported_s:.1f}s) and {args.out}.json")
    print(f"verified against eager with {runtime}: {', '.join(lines)} (allowed {verify.ATOL:g} + "
          f"{verify.RTOL:g} x |logit|)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="model reference: a final model folder, a checkpoint file or folder (local or s3://), "
                        "runs:/RUN_ID/PATH, models:/NAME/VERSION or models:/NAME@ALIAS (a bare checkpoint also "
                        "needs --config for its network)")
    parser.add_argument("--tracking-uri", help="MLflow store of runs:/ and models:/ references (default: "
                        "$MLFLOW_TRACKING_URI)")
    parser.add_argument("--out", required=True, help="the file to write (.onnx or .pt2), local or s3://...")
    parser.add_argument("--format", choices=sorted(FORMATS), default="onnx", help="default: %(default)s")
    parser.add_argument("--batch", default="dynamic", help="'dynamic' or a fixed positive batch size "
                        "(default: %(default)s)")
    parser.add_argument("--config", help="the experiment YAML the model was trained with: its data recipe "
                        "(normalisation, frame stride, evaluation views) goes into the metadata")
    parser.add_argument("--opset", type=int, default=exporters.DEFAULT_OPSET,
                        help=f"ONNX opset, >= {exporters.MIN_OPSET} (default: %(default)s, the first with a native "
                        "Attention op)")
    parser.add_argument("--s3-endpoint-url", help="S3 endpoint for s3:// paths (default: $AWS_ENDPOINT_URL_S3 "
                        "/ $AWS_ENDPOINT_URL, else AWS)")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ServingError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
    except OSError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
