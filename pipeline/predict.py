"""Class predictions for video and image files: ``python -m pipeline.predict --model REF FILE_OR_URL...``.

A model's accuracy was measured on what the data service made of each sample, so a prediction is only
comparable with it when a file goes through the same steps. Nothing here decodes: every input's bytes go
to the data service's evaluation decoder (``pipeline.data.decode.Decoder``, in its decode child process
unless ``data.decoder.isolate`` is off), with the same caps, the same ``eval_clips`` x ``eval_crops`` views
at ``eval_short_side``, ``normalize`` with the recipe's mean/std, and the softmax averaged over a video's
views by evaluation's own ``VideoAccumulator``.

The recipe comes from ``--config`` (the experiment the model was trained with, plus ``key=value``
overrides) or else from the defaults ``pipeline.serving.spec.default_recipe`` picks for the model, as
export does. A file is read whole (local or ``s3://``, at most ``data.max_member_bytes``), as a shard
member would be; it is not transcoded, so a file preprocessing would have resized is seen at its own size.

Exit status: 0 every input predicted, 1 some inputs failed (one ``error: INPUT: reason`` line each on
stderr, the others still predicted), 2 nothing decoded: a bad model reference, config or option, or a
model that does not fit the data recipe. See docs/serving.md ("Predicting on files").
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from core.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from core.errors import ConfigError, credentials_hint, one_line
from core.redact import redact_value
from pipeline.evaluate import parse_views  # --views means the same to both commands

# key.path=value among the positional arguments (as pipeline/train.py takes them); an input whose name
# looks like one is given as ./name
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")


class InputFailed(Exception):
    """One input could not be predicted; ``str(err)`` is the reason on its error line."""


@dataclass
class Predictor:
    """A model and the data recipe its inputs are decoded with; ``predict`` one input at a time."""

    model: Any  # pipeline.model_ref.InferenceModel
    data: Any  # pipeline.data.config.DataConfig
    recipe: str  # where the recipe came from: the --config file, or the defaults
    batch_size: int  # views per forward
    s3_endpoint_url: str | None = None

    def __post_init__(self) -> None:
        from pipeline.data.decode import choose_decode_device, decord_has_cuda

        self.modality = "image" if self.model.config.num_frames == 1 else "video"
        if self.modality == "video":
            # decoder.device=gpu without a CUDA Decord: refused before any input, not by the decoder at the first
            choose_decode_device(self.data.decoder.device, decord_has_cuda(), [])
        # The decoder starts with the first input that was read, so a run whose inputs all fail before that
        # never starts a decode child (closing one that is still importing waits seconds for it).
        self._decoder: Any = None

    def decoder(self) -> Any:
        if self._decoder is None:
            import torch

            from pipeline.data.decode import Decoder

            threads = torch.get_num_threads()
            self._decoder = Decoder(self.data, self.modality, train=False)
            torch.set_num_threads(threads)  # an in-process decoder sets its own CPU share; the model keeps all cores
        return self._decoder

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()

    @property
    def views(self) -> int:
        """Views per input: clips x crops for a video, one for an image (as evaluation takes them)."""
        from pipeline.data.decode import views_per_sample

        return views_per_sample(self.data, self.modality, False)

    def read(self, source: str) -> bytes:
        """The input's bytes, refused unread above ``data.max_member_bytes``: the cap a shard member has."""
        import fsspec

        from core.s3 import storage_options_for

        kind = _other_kind(source, self.modality, self.model.config.num_frames)
        if kind:
            raise InputFailed(kind)
        cap = self.data.max_member_bytes
        try:
            fs, path = fsspec.core.url_to_fs(source, **storage_options_for(source, self.s3_endpoint_url))
            info = fs.info(path)
            if info.get("type") == "directory":
                raise InputFailed("is a folder, not a file")
            size = int(info.get("size") or 0)
            if size > cap:
                raise InputFailed(f"{size} bytes, over data.max_member_bytes={cap}: not read")
            data = fs.cat_file(path)
        except InputFailed:
            raise
        except FileNotFoundError:
            raise InputFailed("no such file") from None
        except Exception as err:  # noqa: BLE001 - unreadable, no credentials, endpoint down: this input's line
            raise InputFailed(f"cannot read it: {one_line(err)}{credentials_hint(err)}") from None
        if len(data) > cap:  # it grew while being read
            raise InputFailed(f"over data.max_member_bytes={cap}: not read")
        return data

    def decode(self, data: bytes, key: str) -> np.ndarray:
        """(views, 3, T, crop, crop) uint8: the evaluation views of one input. No metadata is given: the
        decoder sizes everything from the stream and only compares metadata when a sample has some."""
        from pipeline.data.decode import failure_reason

        try:
            views = self.decoder().decode_sample(data, {}, key, 0)
        except Exception as exc:  # noqa: BLE001 - a file that does not decode fails alone, as a sample does
            raise InputFailed(failure_reason(exc)) from None
        return np.array(views)  # a copy: a decode child's reply is a read-only buffer

    def probabilities(self, views: np.ndarray, key: str) -> Any:
        """Softmax averaged over the views (a float32 tensor of the class count), as evaluation averages
        a video's views: the same normalisation and the same accumulator, ``batch_size`` views a forward."""
        import torch

        from pipeline.data.device import normalize
        from pipeline.trainer.evaluate import VideoAccumulator

        acc, mean, std = VideoAccumulator(), self.data.augment.mean, self.data.augment.std
        video = torch.from_numpy(views)
        with torch.no_grad():
            for start in range(0, len(video), self.batch_size):
                chunk = video[start:start + self.batch_size]
                unlabelled = torch.full((len(chunk),), -1, dtype=torch.int64)
                acc.add(self.model.model(normalize(chunk, mean, std)), unlabelled, [key] * len(chunk))
        return acc.prob_sum[key] / acc.views[key]

    def predict(self, source: str) -> Any:
        """The averaged probabilities of one input; ``InputFailed`` when it cannot be read or decoded."""
        return self.probabilities(self.decode(self.read(source), source), source)


def _other_kind(source: str, modality: str, frames: int) -> str | None:
    suffix = PurePosixPath(source.split("?", 1)[0]).suffix.lower()
    if modality == "video" and suffix in IMAGE_SUFFIXES:
        return f"an image ({suffix}), but the model takes video clips of {frames} frames"
    if modality == "image" and suffix in VIDEO_SUFFIXES:
        return f"a video ({suffix}), but the model takes images"
    return None


def top_k(probs: Any, k: int, classes: Sequence[str] | None) -> list[dict[str, Any]]:
    values, indices = probs.topk(min(k, probs.shape[0]))
    return [{"index": i, "class": classes[i] if classes else None, "probability": p}
            for i, p in zip(indices.tolist(), values.tolist())]


def load(args: argparse.Namespace, overrides: list[str]) -> Predictor:
    """Everything that can refuse the run before an input is read: options, config, model reference, and
    the model against the recipe. Raises ``ConfigError`` or ``ServingError``."""
    from pipeline.serving.model import load_model
    from pipeline.serving.spec import check_experiment, default_recipe

    views = parse_views(args.views) if args.views is not None else None
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if overrides and not args.config:
        raise ConfigError(f"key=value overrides apply to an experiment: give --config (got {' '.join(overrides)})")
    exp = None
    if args.config:
        from pipeline.config import load_config

        exp = load_config(args.config, overrides)  # the recipe; load_model reads the network from it as export does
    model = load_model(args.model, args.config, args.tracking_uri, args.s3_endpoint_url, overrides)
    if exp is not None:
        check_experiment(model.config, exp, args.config)
        data, recipe = exp.data, args.config
    else:
        data, recipe = default_recipe(model.config)
    if views is not None:
        data.sampling.eval_clips, data.sampling.eval_crops = views
    return Predictor(model, data, recipe, args.batch_size or data.eval_batch_size, args.s3_endpoint_url)


def _print_human(shown: str, views: int, top: list[dict[str, Any]]) -> None:
    print(f"{shown}  ({views} view{'s' if views != 1 else ''})")
    for entry in top:
        name = entry["class"] if entry["class"] is not None else f"class {entry['index']}"
        print(f"  {entry['probability']:.4f}  {name}")
    sys.stdout.flush()


def run(predictor: Predictor, inputs: list[str], k: int, as_json: bool) -> int:
    classes = predictor.model.classes
    results, failed = [], 0
    for source in inputs:
        shown = redact_value(source)
        try:
            probs = predictor.predict(source)
        except InputFailed as err:
            failed += 1
            reason = redact_value(" ".join(str(err).split()))
            print(f"error: {shown}: {reason}", file=sys.stderr, flush=True)
            results.append({"input": shown, "error": reason})
            continue
        top = top_k(probs, k, classes)
        results.append({"input": shown, "views": predictor.views, "top": top})
        if not as_json:
            _print_human(shown, predictor.views, top)
    if as_json:
        sampling = predictor.data.sampling
        views = ({"clips": sampling.eval_clips, "crops": sampling.eval_crops} if predictor.modality == "video"
                 else {"clips": 1, "crops": 1})
        print(json.dumps({"model": predictor.model.source, "recipe": predictor.recipe, "modality": predictor.modality,
                          "views": views, "top_k": min(k, predictor.model.config.num_classes),
                          "classes": list(classes) if classes else None, "results": results}, indent=2))
    return 1 if failed else 0


def _split_positionals(values: list[str]) -> tuple[list[str], list[str]]:
    overrides = [v for v in values if _OVERRIDE.match(v)]
    return [v for v in values if not _OVERRIDE.match(v)], overrides


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides are key.path=value pairs among the inputs, e.g. data.decoder.isolate=false "
               "data.augment.eval_short_side=256 (with --config).")
    parser.add_argument("--model", required=True, help="a model reference: a final model folder, a checkpoint file "
                        "or DCP folder (local or s3://), runs:/RUN_ID/PATH, models:/NAME/VERSION, models:/NAME@ALIAS")
    parser.add_argument("inputs", nargs="+", metavar="FILE_OR_URL", help="videos (.mp4, .mkv, .webm, ...) for a "
                        "video model, images (.jpg, .png, ...) for an image model; local or s3://")
    parser.add_argument("--config", help="the experiment YAML the model was trained with: its data recipe (views, "
                        "short side, mean/std, caps) and, for weights that do not record it, the network")
    parser.add_argument("--views", metavar="KxC", help="evaluation views: K clips x C crops (1 or 3), overriding "
                        "data.sampling.eval_clips / eval_crops as pipeline.evaluate's --views does (videos only: "
                        "an image is one view)")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per input (default: %(default)s, at "
                        "most the class count)")
    parser.add_argument("--batch-size", type=int, help="views per forward (default: data.eval_batch_size)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout instead of text")
    parser.add_argument("--tracking-uri", help="MLflow store of runs:/ and models:/ references (default: "
                        "$MLFLOW_TRACKING_URI)")
    parser.add_argument("--s3-endpoint-url", help="S3 endpoint for s3:// inputs and references (default: "
                        "$AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL, else AWS)")
    args = parser.parse_args(argv)
    inputs, overrides = _split_positionals(args.inputs)
    if not inputs:
        parser.error("no input files (only key=value overrides)")
    if args.tracking_uri is None:
        import os

        args.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    # A sample that fails is this command's own error line; the data service's warning about it would repeat it.
    logging.getLogger("pipeline.data").setLevel(logging.ERROR)
    from pipeline.serving.model import ServingError

    try:
        predictor = load(args, overrides)
    except (ConfigError, ServingError) as err:
        print(f"error: {redact_value(' '.join(str(err).split()))}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # no decoder for this recipe (decoder.device=gpu without CUDA Decord)
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    try:
        return run(predictor, inputs, args.top_k, args.json)
    finally:
        predictor.close()


if __name__ == "__main__":
    sys.exit(main())
