"""The two export paths of an eval-mode MViT: an ONNX file (``torch.onnx.export`` with the dynamo-based
exporter and onnxscript) and a ``torch.export`` ExportedProgram (``torch.export.save``). Both trace the
same graph with ``torch.export``; the batch axis is fixed or a ``torch.export.Dim``.

A model that does not export is refused with one line naming the operator that failed, not the
exporter's multi-page report.
"""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from pipeline.models.config import MViTConfig
from pipeline.serving.model import ServingError
from pipeline.serving.spec import INPUT_NAME, OUTPUT_NAME

# Opset 23 is the first with a native ONNX Attention op: the exporter maps
# F.scaled_dot_product_attention (with MViTv2's additive bias as attn_mask) onto it. From opset 18
# (the dynamo exporter's minimum) to 22 the same call is decomposed into MatMul / Softmax / MatMul.
DEFAULT_OPSET = 23
MIN_OPSET = 18
META_FILE = "serving.json"  # the metadata's name inside a .pt2 archive (torch.export.save extra_files)

# aten.linalg_eig in "No ONNX function found for <OpOverload(op='aten.linalg_eig', ...)>" or in
# "call_function[target=torch.ops.aten.linalg_eig.default]"
_OP = re.compile(r"op='([\w.]+)'|target=torch\.ops\.([\w.]+?)(?:\.default)?\]")


def example_clips(cfg: MViTConfig, batch: int, seed: int = 0) -> torch.Tensor:
    """Normalised-scale random clips (N(0, 1)), the tracing example and the verification input."""
    return torch.randn((batch,) + cfg.input_shape, generator=torch.Generator().manual_seed(seed))


def _dynamic(batch: int | None) -> tuple[int, tuple[dict, ...] | None]:
    """(the example's batch size, dynamic_shapes): a dynamic batch is traced at 2, since torch.export
    specialises a size-1 axis to the constant 1."""
    if batch is None:
        return 2, ({0: torch.export.Dim("batch", min=1)},)
    return batch, None


def _chain_text(err: BaseException) -> str:
    texts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        texts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(texts)


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no detail")


def refusal(err: BaseException, what: str) -> ServingError:
    """The one line for an exporter failure: the operator when one is named, else the error's first line."""
    text = _chain_text(err)
    match = _OP.search(text)
    if match:
        return ServingError(f"the model does not export to {what}: operator {match.group(1) or match.group(2)} "
                            f"has no translation ({type(err).__name__})")
    return ServingError(f"the model does not export to {what}: {type(err).__name__}: {_first_line(text)[:300]}")


def check_onnx(opset: int) -> None:
    """Refuses, before any work, an opset the exporter cannot write or an install without the ``export``
    extra."""
    if opset < MIN_OPSET:
        raise ServingError(f"--opset {opset}: the dynamo-based ONNX exporter needs opset >= {MIN_OPSET}")
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ServingError(f"--format onnx needs {', '.join(missing)}: pip install 'mvit-pipeline[export]' "
                           "(or scripts/setup_env.sh export)")


def export_onnx(model: nn.Module, cfg: MViTConfig, path: Path, batch: int | None, meta: dict,
                opset: int = DEFAULT_OPSET) -> Path:
    """Writes ``path`` (batch None: dynamic) with ``meta``'s entries as metadata_props (JSON values)."""
    check_onnx(opset)
    size, dynamic_shapes = _dynamic(batch)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's advice on its own internals, not the user's
            program = torch.onnx.export(model, (example_clips(cfg, size),), dynamo=True, verbose=False,
                                        opset_version=opset, dynamic_shapes=dynamic_shapes, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], optimize=True)
    except Exception as err:  # noqa: BLE001 - every exporter failure becomes the one line
        raise refusal(err, f"ONNX (opset {opset})") from None
    for key, value in meta.items():
        program.model.metadata_props[key] = json.dumps(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    return path


def export_program(model: nn.Module, cfg: MViTConfig, path: Path, batch: int | None, meta: dict) -> Path:
    """Writes ``path`` with ``torch.export.save``; ``meta`` travels inside the archive as ``serving.json``."""
    size, dynamic_shapes = _dynamic(batch)
    try:
        program = torch.export.export(model, (example_clips(cfg, size),), dynamic_shapes=dynamic_shapes)
    except Exception as err:  # noqa: BLE001 - every exporter failure becomes the one line
        raise refusal(err, "torch.export") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path), extra_files={META_FILE: json.dumps(meta)})
    return path
