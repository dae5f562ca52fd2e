"""The GPU figures the project claims, measured in one run on a bare CUDA machine.

Nobody working on this project has had a GPU: this script is prepared so that the first person who
does can answer every open GPU question with one command, within 8 minutes, and hand back one report.
It needs torch and torchvision only (plus the repository's torch-only modules: ``pipeline.models``,
``pipeline.trainer.parallelize``, ``pipeline.data.device_augment``), no Ray, pyarrow, fsspec, MLflow or
decoders, not even PyYAML, so a freshly started CUDA machine with the repository copied onto it runs
it as is.

    python benchmarks/gpu_check.py --out DIR [--budget-s 480]    # on a CUDA machine, bf16
    python benchmarks/gpu_check.py --smoke --out DIR             # tiny models on the CPU (CI runs this)

Sections, each independent (a failure is recorded with its error and the next one still runs):

- ``matmul_peak``: the GEMM FLOP/s this device reaches in the run's dtype, the yardstick for MFU.
- ``attention``: which ``scaled_dot_product_attention`` backend our models' training step runs, and
  whether it still runs with only the fused (flash / memory-efficient) kernels allowed; if not, why.
- ``throughput``: fwd+bwd step time, clips/s, MFU and step memory of ours against torchvision's
  ``mvit_v1_b`` / ``mvit_v2_s`` holding the same weights, at doubling batch sizes up to the largest
  that fits (a CUDA out-of-memory ends a model's climb).
- ``fsdp``: one FSDP2 step on a one-process mesh (NCCL on GPU, gloo on CPU), as the trainer shards
  the model, lands on the same loss and weights as the plain step.
- ``activation_checkpointing``: the activation memory the model's checkpointing switch saves and the
  step time it costs.
- ``device_augment``: clips/s of the on-device path: the decoder's crops resized and flipped, then
  RandAugment + erasing.
- ``compile``: the step-time speed-up of ``torch.compile`` as the trainer applies it (per block), and
  which blocks still ran eagerly afterwards.

A global deadline (``--budget-s``) stops the batch-size climbs early and turns the sections it reaches
into "skipped: out of time". The report (``gpu_check.json`` and ``gpu_check.md`` in ``--out``) ends
with pass/fail against the targets in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import gc
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_STARTED = time.monotonic()  # the budget counts from here: torch's import is part of the run

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a bare machine has the repository copied, not installed
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from pipeline.models.convert import load_weights  # noqa: E402
from pipeline.models.flops import model_stats  # noqa: E402
from pipeline.models.mvit import MViT, MViTConfig  # noqa: E402
from pipeline.models.presets import preset_config  # noqa: E402
from pipeline.trainer.parallelize import FSDPSettings, apply_compile, apply_fsdp  # noqa: E402

MIB = 2**20

# The targets docs/benchmarks.md states for the GPU run (MViT-B 16x4, bf16 fwd+bwd).
TARGET_SPEEDUP = 1.2
TARGET_MFU = 0.40

# Dense bf16 tensor-core peaks from NVIDIA's datasheets, in FLOP/s (one multiply-add = 2 FLOPs), the
# denominator MFU is conventionally quoted against; the measured GEMM peak is reported beside it.
# Matched against torch.cuda.get_device_name(), first match wins.
DATASHEET_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("A100", 312e12),
)

# The forward op each SDPA backend dispatches to (backward ops end in "_backward" and are not counted).
_SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}
FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

# The tiny network of --smoke (tests/models' tiny config): 4 blocks, 3 stages, on 4x32x32 clips.
TINY = dict(num_classes=7, num_frames=4, crop_size=32, embed_dim=16, num_heads=1, depth=4, stage_starts=(1, 3),
            kv_stride=(1, 2, 2), drop_path_rate=0.0, head_dropout=0.0)  # fmt: skip
# Inductor's cold C++ build grows with the number of distinct blocks; two (one stage change) cover
# every code path of a version (tests/models/test_model.py) at a quarter of the CPU compile time.
TINY_COMPILE = dict(TINY, depth=2, stage_starts=(1,))


@dataclass(frozen=True)
class Variant:
    preset: str
    torchvision: str


VARIANTS = (Variant("mvit_b_16x4", "mvit_v1_b"), Variant("mvitv2_s_16x4", "mvit_v2_s"))


@dataclass(frozen=True)
class Plan:
    """The sizes of one run: the real models in bf16 on a GPU, or the tiny ones in fp32 on the CPU."""

    smoke: bool
    device: torch.device
    dtype: torch.dtype
    overrides: dict[str, Any]  # MViTConfig fields replaced in every preset (TINY in the smoke)
    batches: tuple[int, ...]  # the throughput climb
    warmup: int
    steps: int
    matmul_n: int
    matmul_repeats: int
    attention_batch: int
    fsdp_batch: int
    checkpointing_batch: int
    compile_overrides: dict[str, Any]
    compile_batch: int
    compile_min_s: float  # a compile section started with less time left would overrun the budget
    augment_batch: int
    augment_iters: int
    ladder_share: float  # fraction of the budget each variant's climb may spend

    @classmethod
    def gpu(cls) -> Plan:
        return cls(smoke=False, device=torch.device("cuda"), dtype=torch.bfloat16, overrides={},
                   batches=tuple(2**i for i in range(10)), warmup=2, steps=5, matmul_n=8192, matmul_repeats=5,
                   attention_batch=1, fsdp_batch=2, checkpointing_batch=16, compile_overrides={},
                   compile_batch=16, compile_min_s=150.0, augment_batch=32, augment_iters=10,
                   ladder_share=0.2)  # fmt: skip

    @classmethod
    def cpu_smoke(cls) -> Plan:
        return cls(smoke=True, device=torch.device("cpu"), dtype=torch.float32, overrides=TINY, batches=(1, 2),
                   warmup=1, steps=1, matmul_n=256, matmul_repeats=3, attention_batch=1, fsdp_batch=2,
                   checkpointing_batch=2, compile_overrides=TINY_COMPILE, compile_batch=2, compile_min_s=0.0,
                   augment_batch=2, augment_iters=2, ladder_share=0.2)  # fmt: skip


@dataclass
class Clock:
    budget_s: float
    started: float = _STARTED

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.budget_s - self.elapsed()


# -- report records ----------------------------------------------------------------------------------------


@dataclass
class PeakResult:
    dtype: str
    n: int  # square GEMM size
    measured_tflops: float
    datasheet_tflops: float | None  # None where the device is not in DATASHEET_BF16 (or not bf16)


@dataclass
class AttentionCheck:
    variant: str
    backends: dict[str, int]  # forward SDPA calls per backend in one training step
    fused_only_train: str  # "ok", or the error of a training step restricted to flash / memory-efficient
    fused_only_no_grad: str  # the same restriction on a forward without gradients
    kernel_warnings: list[str]  # torch's own reasons for not using a kernel, as it warned them
    verdict: str


@dataclass
class AttentionResult:
    checks: list[AttentionCheck]
    torchvision_attention: str = "explicit matmul + softmax (torchvision's MViT does not call SDPA)"


@dataclass
class ModelAtBatch:
    step_s: float | None = None  # median fwd+bwd step; None when it did not fit
    clips_per_s: float | None = None
    tflops: float | None = None  # model FLOP/s achieved, / 1e12
    of_measured_peak: float | None = None
    of_datasheet_peak: float | None = None
    step_memory_mib: float | None = None  # CUDA allocator peak above the resident weights; None on CPU
    error: str | None = None  # "out of memory", or why it was not tried


@dataclass
class BatchRow:
    batch: int
    ours: ModelAtBatch
    torchvision: ModelAtBatch
    speedup: float | None  # torchvision's step time / ours (> 1: ours is faster)


@dataclass
class VariantThroughput:
    variant: str
    torchvision: str
    train_gflop_per_clip: float  # 3 x forward, 2 FLOPs per multiply-add (pipeline/models/flops.py)
    rows: list[BatchRow]
    stopped: str  # why the climb ended
    largest_common_batch: int | None = None
    speedup_at_largest_common: float | None = None
    ours_best: BatchRow | None = None  # the row of ours' best clips/s
    torchvision_best: BatchRow | None = None


@dataclass
class ThroughputResult:
    dtype: str
    variants: list[VariantThroughput]


@dataclass
class FsdpRegime:
    precision: str
    loss_plain: float
    loss_fsdp: float
    max_update_error: float  # max over tensors of |dW_fsdp - dW_plain|_2 / |dW_plain|_2
    worst_tensor: str
    plain_repeat_error: float  # the same measure between two plain steps: this device's own run-to-run noise
    tolerance: float  # what the update and loss errors must stay within: max(the fixed bound, 2 x the noise)
    matched: bool


@dataclass
class FsdpResult:
    backend: str
    world_size: int
    batch: int
    variants: dict[str, list[FsdpRegime]]
    matched: bool
    not_compared: dict[str, str] = field(default_factory=dict)  # precision -> why this device cannot judge it


@dataclass
class CheckpointingResult:
    variant: str
    batch: int
    activations_mib_off: float | None  # allocated memory held from the end of forward to backward
    activations_mib_on: float | None
    peak_step_mib_off: float | None  # CUDA allocator peak above the resident model; None on CPU
    peak_step_mib_on: float | None
    step_s_off: float
    step_s_on: float
    memory_saving: float | None  # 1 - on/off: of the peak on CUDA, of the held activations on CPU
    step_time_cost: float  # on/off - 1


@dataclass
class AugmentResult:
    batch: int
    shape: list[int]
    params_s: float  # random_params per batch, median
    render_s: float  # render_on_device (resize and flip the crops) per batch, median
    augment_s: float  # augment_on_device per batch, median
    clips_per_s: float
    output_checked: str


@dataclass
class CompileResult:
    variant: str
    batch: int
    backend: str
    first_step_s: float  # the compiled model's first step, compilation included
    eager_step_s: float
    compiled_step_s: float
    speedup: float
    eager_blocks: list[int]  # blocks that ran eagerly after compiling (e.g. dynamo's recompile limit)


@dataclass
class Section:
    name: str
    status: str  # "ok", "error", "skipped"
    seconds: float
    result: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class Target:
    name: str
    target: str
    measured: str
    status: str  # "pass", "fail", "not measured", "n/a (smoke)"


@dataclass
class Report:
    created: str
    command: str
    smoke: bool
    device: str
    dtype: str
    torch: str
    torchvision: str
    cuda: str | None
    budget_s: float
    elapsed_s: float = 0.0
    sections: list[Section] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)


@dataclass
class Context:
    """What later sections may use from earlier ones; none depends on it being filled."""

    peak: PeakResult | None = None


# -- shared measurement ------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fwd_bwd_step(model: torch.nn.Module, clip: torch.Tensor, labels: torch.Tensor) -> float:
    """One forward+backward in seconds, synchronised; the gradients are dropped, as before the next
    batch's forward in training."""
    sync(clip.device)
    start = time.perf_counter()
    loss = F.cross_entropy(model(clip).float(), labels)
    loss.backward()
    sync(clip.device)
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """The best FLOP/s of an n x n x n GEMM, 2 FLOPs per multiply-add: what this device's matmul units
    deliver today, measured rather than taken from a datasheet, so a fraction of it is comparable
    across machines."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    per_timing = max(1, int(2e13 // (2 * n**3))) if device.type == "cuda" else 1  # ~20 ms a timing on a GPU
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(per_timing):
            torch.mm(a, b)
        sync(device)
        best = max(best, 2 * n**3 * per_timing / (time.perf_counter() - start))
    return best


def train_flops_per_clip(cfg: MViTConfig) -> float:
    """Model FLOPs of one training step per clip: the project's counter gives multiply-adds of the
    forward; a FLOP is half a multiply-add there, and backward costs twice the forward."""
    return 3 * 2 * model_stats(cfg).gflops * 1e9


def datasheet_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in DATASHEET_BF16 if key in name), None)


def sdpa_backends(run: Callable[[], Any]) -> dict[str, int]:
    """Forward SDPA calls per backend while ``run`` runs, read from the profiler's op names: the
    dispatcher picks the backend inside the op, and no public API says which it took."""
    activities = [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        run()
    counts: dict[str, int] = {}
    for event in prof.key_averages():
        backend = _SDPA_OPS.get(event.key)
        if backend:
            counts[backend] = counts.get(backend, 0) + event.count
    return counts


def free_memory(device: torch.device) -> None:
    """Hands the CUDA caching allocator's free blocks back, after collecting the reference cycles (an
    exception's frames) that may still hold tensors. Nothing to do on the CPU, where a full collection
    of torch's objects costs 0.3 s each time."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()[:2000]


# -- models ------------------------------------------------------------------------------------------------


def _tiny_torchvision(cfg: MViTConfig) -> torch.nn.Module:
    """torchvision's MViT with the per-block table of ``cfg`` (torchvision builds mvit_v1_b / mvit_v2_s
    only at full size); MViTv2's switches map onto its residual-pooling / rel-pos / projection flags."""
    from torchvision.models.video.mvit import MSBlockConfig

    def pooled(kernel: tuple[int, ...], stride: tuple[int, ...]) -> bool:
        return any(k > 1 for k in kernel) or any(s > 1 for s in stride)

    blocks = [
        MSBlockConfig(
            num_heads=s.num_heads, input_channels=s.dim_in, output_channels=s.dim_out,
            kernel_q=list(s.kernel_q) if pooled(s.kernel_q, s.stride_q) else [],
            kernel_kv=list(s.kernel_kv),
            stride_q=list(s.stride_q) if pooled(s.kernel_q, s.stride_q) else [],
            stride_kv=list(s.stride_kv),
        )
        for s in MViT(cfg).specs
    ]  # fmt: skip
    v2 = cfg.rel_pos
    return torchvision.models.video.MViT(
        spatial_size=(cfg.crop_size, cfg.crop_size), temporal_size=cfg.num_frames, block_setting=blocks,
        residual_pool=v2, residual_with_cls_embed=False, rel_pos_embed=v2, proj_after_attn=v2,
        dropout=cfg.head_dropout, stochastic_depth_prob=cfg.drop_path_rate, num_classes=cfg.num_classes,
    )  # fmt: skip


def build_pair(variant: Variant, plan: Plan, **overrides: Any) -> tuple[MViTConfig, MViT, torch.nn.Module]:
    """Ours and torchvision's network with the same weights (torchvision's, converted), on the plan's
    device and dtype, in training mode."""
    cfg = preset_config(variant.preset, **{**plan.overrides, **overrides})
    torch.manual_seed(0)
    if plan.overrides or overrides:
        reference = _tiny_torchvision(cfg)
    else:
        reference = getattr(torchvision.models.video, variant.torchvision)()
    ours = MViT(cfg)
    load_weights(ours, reference.state_dict())
    return cfg, ours.to(plan.device, plan.dtype).train(), reference.to(plan.device, plan.dtype).train()


def build_ours(variant: Variant, plan: Plan, **overrides: Any) -> tuple[MViTConfig, MViT]:
    cfg = preset_config(variant.preset, **{**plan.overrides, **overrides})
    torch.manual_seed(0)
    return cfg, MViT(cfg).to(plan.device, plan.dtype).train()


def inputs(cfg: MViTConfig, batch: int, plan: Plan, dtype: torch.dtype | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    g = torch.Generator().manual_seed(1)
    clip = torch.randn((batch,) + cfg.input_shape, generator=g)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    return clip.to(plan.device, dtype or plan.dtype), labels.to(plan.device)


# -- sections ----------------------------------------------------------------------------------------------


def section_matmul_peak(plan: Plan, clock: Clock, ctx: Context) -> PeakResult:
    flops = matmul_peak(plan.device, plan.dtype, plan.matmul_n, plan.matmul_repeats)
    sheet = datasheet_peak(plan.device, plan.dtype)
    ctx.peak = PeakResult(str(plan.dtype).removeprefix("torch."), plan.matmul_n, flops / 1e12,
                          None if sheet is None else sheet / 1e12)
    return ctx.peak


def _fused_only(run: Callable[[], Any]) -> tuple[str, list[str]]:
    """``run`` with only the flash and memory-efficient kernels allowed: "ok" or the error, and the
    reasons torch warned for each kernel it could not use."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(FUSED):
                run()
            outcome = "ok"
        except RuntimeError as err:
            outcome = _error_text(err)
    return outcome, sorted({str(w.message).split(" (Triggered internally")[0][:300] for w in caught})


def _attention_verdict(cfg: MViTConfig, backends: dict[str, int], train: str, no_grad: str) -> str:
    if not backends:
        return "no SDPA call was seen"
    if "math" not in backends:
        return "fused: " + ", ".join(sorted(backends))
    if train != "ok" and no_grad == "ok":
        cause = ("its attn_mask (the relative-position bias, computed from q and the rel_pos tables) requires "
                 "grad" if cfg.rel_pos else "a tensor it is given requires grad")
        return (f"math fallback in training: the fused kernels refuse the call only when gradients flow: {cause}, "
                f"and no fused kernel on this device computes a mask gradient; without gradients it runs fused")
    return f"math fallback: the fused kernels refuse the call even without gradients ({no_grad})"


def _attention_check(variant: Variant, plan: Plan) -> AttentionCheck:
    cfg, model = build_ours(variant, plan)
    clip, labels = inputs(cfg, plan.attention_batch, plan)
    backends = sdpa_backends(lambda: fwd_bwd_step(model, clip, labels))
    train, train_warnings = _fused_only(lambda: fwd_bwd_step(model, clip, labels))
    with torch.no_grad():
        no_grad, no_grad_warnings = _fused_only(lambda: model(clip))
    model.zero_grad(set_to_none=True)
    return AttentionCheck(variant.preset, backends, train, no_grad, sorted(set(train_warnings) | set(no_grad_warnings)),
                          _attention_verdict(cfg, backends, train, no_grad))


def section_attention(plan: Plan, clock: Clock, ctx: Context) -> AttentionResult:
    checks = []
    for variant in VARIANTS:
        checks.append(_attention_check(variant, plan))
        free_memory(plan.device)
    return AttentionResult(checks)


def _timed(model: torch.nn.Module, clip: torch.Tensor, labels: torch.Tensor, plan: Plan) -> float | None:
    """One step's seconds, or None when it ran out of memory; the memory is freed only here, after the
    exception (whose frames hold the step's tensors) is gone."""
    try:
        return fwd_bwd_step(model, clip, labels)
    except torch.OutOfMemoryError:
        pass
    model.zero_grad(set_to_none=True)  # an OOM leaves partial gradients behind
    free_memory(plan.device)
    return None


def _try_warmup(model: torch.nn.Module, clip: torch.Tensor, labels: torch.Tensor, plan: Plan
                ) -> tuple[bool, float | None]:  # fmt: skip
    """Warm-up steps of one model: (fits, CUDA peak step memory in MiB above what was resident)."""
    cuda = plan.device.type == "cuda"
    free_memory(plan.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(plan.device)
        resident = torch.cuda.memory_allocated(plan.device)
    fits = all(_timed(model, clip, labels, plan) is not None for _ in range(plan.warmup))
    if not fits:
        return False, None
    return True, (torch.cuda.max_memory_allocated(plan.device) - resident) / MIB if cuda else None


def _figures(step_times: list[float], batch: int, flops_per_clip: float, ctx: Context,
             memory: float | None) -> ModelAtBatch:  # fmt: skip
    step = statistics.median(step_times)
    achieved = flops_per_clip * batch / step
    peak = ctx.peak
    return ModelAtBatch(
        step_s=step, clips_per_s=batch / step, tflops=achieved / 1e12,
        of_measured_peak=achieved / (peak.measured_tflops * 1e12) if peak else None,
        of_datasheet_peak=achieved / (peak.datasheet_tflops * 1e12) if peak and peak.datasheet_tflops else None,
        step_memory_mib=memory,
    )  # fmt: skip


def _measure_batch(models: dict[str, torch.nn.Module], fits: dict[str, bool], cfg: MViTConfig, batch: int,
                   plan: Plan, flops: float, ctx: Context) -> BatchRow:  # fmt: skip
    """Both models at one batch size, timed steps interleaved (ours, theirs, ours, ...) so that machine
    noise hits both alike; a model that did not fit a smaller batch is not tried again."""
    clip, labels = inputs(cfg, batch, plan)
    memory: dict[str, float | None] = {}
    tried = [name for name in models if fits[name]]
    for name in tried:
        fits[name], memory[name] = _try_warmup(models[name], clip, labels, plan)
    times: dict[str, list[float]] = {name: [] for name in models if fits[name]}
    for _ in range(plan.steps):
        for name in list(times):
            seconds = _timed(models[name], clip, labels, plan)
            if seconds is None:  # fitted the warm-up, not the timing: it does not fit
                fits[name] = False
                del times[name]
            else:
                times[name].append(seconds)
    del clip, labels
    free_memory(plan.device)
    row = {name: (_figures(times[name], batch, flops, ctx, memory.get(name)) if name in times
                  else ModelAtBatch(error="out of memory" if name in tried else "not tried: out of memory below"))
           for name in models}  # fmt: skip
    ours, theirs = row["ours"], row["torchvision"]
    speedup = theirs.step_s / ours.step_s if ours.step_s and theirs.step_s else None
    return BatchRow(batch, ours, theirs, speedup)


def _climb(variant: Variant, plan: Plan, clock: Clock, ctx: Context) -> VariantThroughput:
    cfg, ours, theirs = build_pair(variant, plan)
    models = {"ours": ours, "torchvision": theirs}
    flops = train_flops_per_clip(cfg)
    fits = {name: True for name in models}
    rows: list[BatchRow] = []
    slice_end = clock.elapsed() + plan.ladder_share * clock.budget_s
    stopped = "the last batch size of the climb"
    for batch in plan.batches:
        if clock.elapsed() > slice_end or clock.left() <= 0:
            stopped = f"out of time before batch {batch}"
            break
        rows.append(_measure_batch(models, fits, cfg, batch, plan, flops, ctx))
        if not any(fits.values()):
            stopped = f"neither model fits batch {batch} (out of memory)"
            break
    del models, ours, theirs
    free_memory(plan.device)
    result = VariantThroughput(variant.preset, variant.torchvision, flops / 1e9, rows, stopped)
    common = [r for r in rows if r.speedup is not None]
    if common:
        result.largest_common_batch, result.speedup_at_largest_common = common[-1].batch, common[-1].speedup
    ours_rows = [r for r in rows if r.ours.clips_per_s]
    theirs_rows = [r for r in rows if r.torchvision.clips_per_s]
    result.ours_best = max(ours_rows, key=lambda r: r.ours.clips_per_s or 0.0, default=None)
    result.torchvision_best = max(theirs_rows, key=lambda r: r.torchvision.clips_per_s or 0.0, default=None)
    return result


def section_throughput(plan: Plan, clock: Clock, ctx: Context) -> ThroughputResult:
    return ThroughputResult(str(plan.dtype).removeprefix("torch."),
                            [_climb(variant, plan, clock, ctx) for variant in VARIANTS])


@contextlib.contextmanager
def single_process_group(device: torch.device) -> Iterator[Any]:
    """A one-rank process group and its device mesh: NCCL on a GPU, gloo on the CPU, rendezvous through
    a FileStore in a temporary folder, so that no port is opened for it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")  # one rank: NCCL's bootstrap stays on loopback
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, store=dist.FileStore(os.path.join(tmp, "store"), 1), rank=0, world_size=1)
        try:
            yield init_device_mesh(device.type, (1,))
        finally:
            dist.destroy_process_group()


# Relative tolerances of one step's weight updates (L2 norm of the difference over that of the update, per
# tensor) and of the loss, against the plain step, unless the plain step differs more from itself. fp32
# (TF32 off): summation order only. bf16: a few units in the last place of bf16 (2^-8 relative).
FSDP_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
_SGD_LR = 0.1
# A bf16 result further than this from fp32 is broken, not rounded (bf16 rounding gives ~3e-3 here).
_BF16_SANE = 0.05


def _plain_step(model: MViT, clip: torch.Tensor, labels: torch.Tensor, compute_dtype: torch.dtype | None) -> float:
    """The step FSDP2 must reproduce, without FSDP: forward and backward on a ``compute_dtype`` copy of
    the weights, gradients brought back to fp32 (FSDP's reduce dtype), SGD on the fp32 weights."""
    compute = model if compute_dtype is None else copy.deepcopy(model).to(compute_dtype)
    loss = F.cross_entropy(compute(clip.to(compute_dtype or clip.dtype)).float(), labels)
    loss.backward()
    if compute is not model:
        for param, low in zip(model.parameters(), compute.parameters()):
            param.grad = None if low.grad is None else low.grad.float()
    torch.optim.SGD(model.parameters(), lr=_SGD_LR).step()
    return loss.item()


def _fsdp_step(model: MViT, mesh: Any, clip: torch.Tensor, labels: torch.Tensor,
               compute_dtype: torch.dtype | None) -> float:  # fmt: skip
    apply_fsdp(model, mesh, FSDPSettings(param_dtype=compute_dtype, reduce_dtype=torch.float32))
    loss = F.cross_entropy(model(clip).float(), labels)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=_SGD_LR).step()
    return loss.item()


def _update_error(before: dict[str, torch.Tensor], want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]
                  ) -> tuple[float, str]:  # fmt: skip
    """The worst tensor's |update_got - update_want|_2 / |update_want|_2, and its name."""
    worst, worst_name = 0.0, ""
    for name, start in before.items():
        expected, actual = want[name] - start, got[name] - start
        scale = expected.norm().item()
        error = (actual - expected).norm().item() / scale if scale > 0 else actual.norm().item()
        if error > worst:
            worst, worst_name = error, name
    return worst, worst_name


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """True fp32 for the fp32 comparison: cuDNN convolutions default to TF32, whose 10-bit mantissa would
    swamp the summation-order differences the fp32 tolerance is sized for."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _fsdp_regime(cfg: MViTConfig, plan: Plan, mesh: Any, precision: str, compute_dtype: torch.dtype | None
                 ) -> FsdpRegime:  # fmt: skip
    """One plain step, a second plain step (the noise floor: atomics in some backward kernels make a GPU
    differ from itself) and one FSDP2 step, from the same weights on the same batch."""
    torch.manual_seed(0)
    plain = MViT(cfg).to(plan.device).train()
    repeat, sharded = copy.deepcopy(plain), copy.deepcopy(plain)
    before = {k: v.detach().clone() for k, v in plain.state_dict().items()}
    clip, labels = inputs(cfg, plan.fsdp_batch, plan, torch.float32)
    with _no_tf32() if compute_dtype is None else contextlib.nullcontext():
        loss_plain = _plain_step(plain, clip, labels, compute_dtype)
        _plain_step(repeat, clip, labels, compute_dtype)
        loss_fsdp = _fsdp_step(sharded, mesh, clip, labels, compute_dtype)
    gathered = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in sharded.state_dict().items()}
    error, worst = _update_error(before, plain.state_dict(), gathered)
    noise, _ = _update_error(before, plain.state_dict(), repeat.state_dict())
    tolerance = max(FSDP_TOLERANCE[precision], 2 * noise)
    loss_ok = abs(loss_fsdp - loss_plain) <= tolerance * max(abs(loss_plain), 1.0)
    return FsdpRegime(precision, loss_plain, loss_fsdp, error, worst, noise, tolerance,
                      loss_ok and error <= tolerance)


def bf16_pooling_gradient_error(device: torch.device) -> float:
    """Relative L2 error, against fp32, of the bf16 weight gradient of a depthwise Conv3d fed a permuted
    token tensor, as the Q/K/V pooling feeds it. On torch 2.14's CPU it is ~1 (and changes from run to
    run with two threads): no bf16 step there can be compared with another, FSDP or not."""
    g = torch.Generator().manual_seed(0)
    tokens, weight, probe = (torch.randn(*shape, generator=g) for shape in
                             ((4, 2 * 8 * 8, 16), (16, 1, 3, 3, 3), (4, 16, 2, 4, 4)))  # fmt: skip
    grads = []
    for dtype in (torch.float32, torch.bfloat16):
        x = tokens.to(device, dtype).reshape(4, 2, 8, 8, 16).permute(0, 4, 1, 2, 3)
        w = weight.to(device, dtype).detach().requires_grad_()
        out = F.conv3d(x, w, stride=(1, 2, 2), padding=1, groups=16)
        (out.float() * probe.to(device)).sum().backward()
        grads.append(w.grad.float())
    return ((grads[1] - grads[0]).norm() / grads[0].norm()).item()


def section_fsdp(plan: Plan, clock: Clock, ctx: Context) -> FsdpResult:
    # Dropout and stochastic depth off: the two steps must see the same network, not the same RNG draws.
    deterministic = dict(drop_path_rate=0.0, head_dropout=0.0)
    variants: dict[str, list[FsdpRegime]] = {}
    regimes_here = [("fp32", None)]
    not_compared = {}
    bf16_error = bf16_pooling_gradient_error(plan.device)
    if bf16_error <= _BF16_SANE:
        regimes_here.append(("bf16", torch.bfloat16))
    else:
        distance = f"{bf16_error:.2f} away from" if math.isfinite(bf16_error) else "not even finite, against"
        not_compared["bf16"] = (f"this device's bf16 depthwise Conv3d weight gradient (the Q/K/V pooling) is "
                                f"{distance} fp32 (relative L2) on the model's permuted input: broken, so bf16 "
                                f"steps cannot be compared")
    with single_process_group(plan.device) as mesh:
        for variant in VARIANTS:
            cfg = preset_config(variant.preset, **{**plan.overrides, **deterministic})
            variants[variant.preset] = []
            for precision, compute_dtype in regimes_here:
                variants[variant.preset].append(_fsdp_regime(cfg, plan, mesh, precision, compute_dtype))
                free_memory(plan.device)
    return FsdpResult("nccl" if plan.device.type == "cuda" else "gloo", 1, plan.fsdp_batch, variants,
                      all(r.matched for regimes in variants.values() for r in regimes), not_compared)


class _HeapInUse:
    """Bytes the C heap has handed out (glibc ``mallinfo2``: small blocks + mmapped ones), which is where
    torch's CPU allocator takes tensors from; None where the C library has no mallinfo2."""

    class _Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]  # fmt: skip

    def __init__(self) -> None:
        libc = ctypes.CDLL(None)
        self._mallinfo2 = getattr(libc, "mallinfo2", None)
        if self._mallinfo2 is not None:
            self._mallinfo2.restype = self._Info

    def __call__(self) -> int | None:
        if self._mallinfo2 is None:
            return None
        info = self._mallinfo2()
        return info.uordblks + info.hblkhd


def _allocated(device: torch.device, heap: _HeapInUse) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else heap()


def _checkpointing_run(model: MViT, clip: torch.Tensor, labels: torch.Tensor, plan: Plan, heap: _HeapInUse
                       ) -> tuple[float | None, float | None, float]:  # fmt: skip
    """(activation MiB held between forward and backward, CUDA peak step MiB, median step s)."""
    fwd_bwd_step(model, clip, labels)
    free_memory(plan.device)
    cuda = plan.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(plan.device)
    resident = _allocated(plan.device, heap)
    loss = F.cross_entropy(model(clip).float(), labels)
    held = _allocated(plan.device, heap)
    loss.backward()
    peak = (torch.cuda.max_memory_allocated(plan.device) - resident) / MIB if cuda else None
    del loss
    model.zero_grad(set_to_none=True)
    activations = None if resident is None or held is None else (held - resident) / MIB
    times = [fwd_bwd_step(model, clip, labels) for _ in range(plan.steps)]
    return activations, peak, statistics.median(times)


def section_activation_checkpointing(plan: Plan, clock: Clock, ctx: Context) -> CheckpointingResult:
    variant = VARIANTS[0]
    cfg, model = build_ours(variant, plan)
    clip, labels = inputs(cfg, plan.checkpointing_batch, plan)
    heap = _HeapInUse()
    off = _checkpointing_run(model, clip, labels, plan, heap)
    model.set_grad_checkpointing(True)  # what ParallelSettings(activation_checkpointing=True) switches on
    on = _checkpointing_run(model, clip, labels, plan, heap)
    basis_off, basis_on = (off[1], on[1]) if plan.device.type == "cuda" else (off[0], on[0])
    saving = 1 - basis_on / basis_off if basis_off and basis_on is not None else None
    return CheckpointingResult(variant.preset, plan.checkpointing_batch, off[0], on[0], off[1], on[1], off[2],
                               on[2], saving, on[2] / off[2] - 1)  # fmt: skip


def section_device_augment(plan: Plan, clock: Clock, ctx: Context) -> AugmentResult:
    """The training step's share of ``augment.on_device``: the decoder's crops (RandomResizedCrop boxes of a
    frame decoded at 1.43x the crop's side, e.g. 320x427 for 224, each its own size) resized and flipped
    (``render_on_device``), then RandAugment and erasing (``augment_on_device``)."""
    from pipeline.data.device_augment import augment_on_device, random_params, render_on_device

    cfg = preset_config(VARIANTS[0].preset, **plan.overrides)
    batch, crop, frames = plan.augment_batch, cfg.crop_size, cfg.num_frames
    shape = (batch, 3, frames, crop, crop)
    rng = random.Random(2)
    generator = torch.Generator().manual_seed(2)
    sizes = [(rng.randint(crop, round(crop * 1.43)), rng.randint(crop, round(crop * 1.9))) for _ in range(batch)]
    crops = [torch.randint(0, 256, (frames, h, w, 3), dtype=torch.uint8, generator=generator).to(plan.device)
             for h, w in sizes]  # fmt: skip
    flips = torch.tensor([i % 2 for i in range(batch)], dtype=torch.int8)
    video = render_on_device(crops, flips, crop, frames, plan.device)  # warm-up
    out = augment_on_device(video, random_params(batch, crop, seed=0, device=plan.device))
    if out.dtype != torch.uint8 or tuple(out.shape) != shape or out.device != crops[0].device:
        raise AssertionError(f"render + augment_on_device returned {out.dtype} {tuple(out.shape)} on {out.device}, "
                             f"expected uint8 {shape} on {crops[0].device}")
    param_times, render_times, augment_times = [], [], []
    for i in range(plan.augment_iters):
        start = time.perf_counter()
        params = random_params(batch, crop, seed=i + 1, device=plan.device)
        sync(plan.device)
        param_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        video = render_on_device(crops, flips, crop, frames, plan.device)
        sync(plan.device)
        render_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        augment_on_device(video, params)
        sync(plan.device)
        augment_times.append(time.perf_counter() - start)
    render_s, augment_s = statistics.median(render_times), statistics.median(augment_times)
    return AugmentResult(batch, list(shape), statistics.median(param_times), render_s, augment_s,
                         batch / (render_s + augment_s), "uint8, same shape, same device")  # fmt: skip


def count_eager_calls(model: MViT) -> list[int]:
    """Per block, the forward calls that ran eagerly: the hook's branch is dead while dynamo traces it,
    so compiled code never counts, and a block dynamo gave up on (its recompile limit) counts each call."""
    counts = [0] * len(model.blocks)

    def hook(index: int) -> Callable[..., None]:
        def count(module: torch.nn.Module, args: Any) -> None:
            if not torch.compiler.is_compiling():
                counts[index] += 1
        return count

    for i, block in enumerate(model.blocks):
        block.norm1.register_forward_pre_hook(hook(i))
    return counts


def section_compile(plan: Plan, clock: Clock, ctx: Context) -> CompileResult:
    variant = VARIANTS[0]
    cfg, eager = build_ours(variant, plan, **plan.compile_overrides)
    compiled = copy.deepcopy(eager)
    counts = count_eager_calls(compiled)
    apply_compile(compiled)  # the trainer's compile: each block in place, with the default backend
    clip, labels = inputs(cfg, plan.compile_batch, plan)
    first = fwd_bwd_step(compiled, clip, labels)
    for _ in range(plan.warmup):
        fwd_bwd_step(eager, clip, labels)
        fwd_bwd_step(compiled, clip, labels)
    counts[:] = [0] * len(counts)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(plan.steps):
        times["eager"].append(fwd_bwd_step(eager, clip, labels))
        times["compiled"].append(fwd_bwd_step(compiled, clip, labels))
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return CompileResult(variant.preset, plan.compile_batch, str(torch.compiler.get_default_backend()), first,
                         eager_s, compiled_s, eager_s / compiled_s, [i for i, n in enumerate(counts) if n])


SECTIONS: tuple[tuple[str, Callable[[Plan, Clock, Context], Any]], ...] = (
    ("matmul_peak", section_matmul_peak),
    ("attention", section_attention),
    ("throughput", section_throughput),
    ("fsdp", section_fsdp),
    ("activation_checkpointing", section_activation_checkpointing),
    ("device_augment", section_device_augment),
    ("compile", section_compile),
)


def run_section(name: str, fn: Callable[[Plan, Clock, Context], Any], plan: Plan, clock: Clock,
                ctx: Context) -> Section:  # fmt: skip
    if clock.left() <= 0:
        return Section(name, "skipped", 0.0, error="skipped: out of time")
    if name == "compile" and clock.left() < plan.compile_min_s:
        return Section(name, "skipped", 0.0, error=f"skipped: out of time ({clock.left():.0f} s left, a cold "
                                                   f"compile needs about {plan.compile_min_s:.0f} s)")
    start = time.monotonic()
    try:
        result = fn(plan, clock, ctx)
    except Exception as err:  # noqa: BLE001 - one section's failure is the report's content, not the run's end
        tail = "".join(traceback.format_exception(err)[-3:])[-1500:]
        section = Section(name, "error", time.monotonic() - start, error=f"{_error_text(err)}\n{tail}")
    else:
        section = Section(name, "ok", time.monotonic() - start, result=asdict(result))
    free_memory(plan.device)
    print(f"[{clock.elapsed():6.1f}s] {name}: {section.status} ({section.seconds:.1f}s)", flush=True)
    return section


# -- targets and report ------------------------------------------------------------------------------------


def _result(report: Report, name: str) -> dict[str, Any] | None:
    return next((s.result for s in report.sections if s.name == name and s.status == "ok"), None)


def _mvit_b(throughput: dict[str, Any] | None) -> dict[str, Any] | None:
    if throughput is None:
        return None
    return next((v for v in throughput["variants"] if v["variant"] == VARIANTS[0].preset), None)


def evaluate_targets(report: Report) -> list[Target]:
    """Pass/fail against the GPU targets; the smoke's tiny CPU figures are shown but not judged."""
    judge = (lambda ok: "n/a (smoke)") if report.smoke else (lambda ok: "pass" if ok else "fail")
    targets = []
    b = _mvit_b(_result(report, "throughput"))
    speedup = b and b["speedup_at_largest_common"]
    targets.append(Target("MViT-B 16x4 bf16 fwd+bwd throughput, ours / torchvision mvit_v1_b",
                          f">= {TARGET_SPEEDUP}x at the largest batch both fit",
                          f"{speedup:.2f}x at batch {b['largest_common_batch']}" if speedup else "not measured",
                          judge(speedup >= TARGET_SPEEDUP) if speedup else "not measured"))
    best = b and b["ours_best"] and b["ours_best"]["ours"]
    mfu = best and (best["of_datasheet_peak"] or best["of_measured_peak"])
    basis = "datasheet" if best and best["of_datasheet_peak"] else "measured GEMM"
    targets.append(Target("MViT-B 16x4 bf16 MFU (ours, best batch)", f">= {TARGET_MFU:.0%} of the {basis} peak",
                          f"{mfu:.1%} at batch {b['ours_best']['batch']}" if mfu else "not measured",
                          judge(mfu >= TARGET_MFU) if mfu else "not measured"))
    attention = _result(report, "attention")
    if attention:
        maths = [c["variant"] for c in attention["checks"] if "math" in c["backends"] or not c["backends"]]
        targets.append(Target("SDPA backend of ours' training step", "flash / memory-efficient, never math",
                              "; ".join(f"{c['variant']}: {c['verdict']}" for c in attention["checks"]),
                              judge(not maths)))
    else:
        targets.append(Target("SDPA backend of ours' training step", "flash / memory-efficient, never math",
                              "not measured", "not measured"))
    fsdp = _result(report, "fsdp")
    targets.append(Target("FSDP2 one-rank step equals the plain step", "loss and updates within tolerance",
                          ("matched" if fsdp["matched"] else "differs") if fsdp else "not measured",
                          ("pass" if fsdp["matched"] else "fail") if fsdp else "not measured"))
    return targets


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _markdown_throughput(result: dict[str, Any]) -> list[str]:
    lines = []
    for v in result["variants"]:
        gflop = _fmt(v["train_gflop_per_clip"], ".4g")
        lines += [f"**{v['variant']}** against torchvision `{v['torchvision']}` ({gflop} GFLOP per clip per "
                  f"step; climb ended: {v['stopped']})", "",
                  "| batch | ours step s | ours clips/s | ours MFU (measured / datasheet) | ours step MiB "
                  "| tv step s | tv clips/s | tv MFU (measured / datasheet) | tv step MiB | speed-up |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in v["rows"]:
            cells = [str(row["batch"])]
            for name in ("ours", "torchvision"):
                m = row[name]
                if m["step_s"] is None:
                    cells += [m["error"] or "-", "-", "-", "-"]
                else:
                    cells += [f"{m['step_s']:.4f}", f"{m['clips_per_s']:.2f}",
                              f"{_pct(m['of_measured_peak'])} / {_pct(m['of_datasheet_peak'])}",
                              _fmt(m["step_memory_mib"], ".0f")]
            cells.append("-" if row["speedup"] is None else f"{row['speedup']:.2f}x")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _markdown_section(section: Section) -> list[str]:
    lines = [f"## {section.name}: {section.status} ({section.seconds:.1f} s)", ""]
    if section.status != "ok":
        return lines + ["```", section.error or "", "```", ""]
    result = section.result or {}
    if section.name == "throughput":
        return lines + _markdown_throughput(result)
    return lines + ["```json", json.dumps(result, indent=1), "```", ""]


def write_report(report: Report, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(asdict(report), indent=1) + "\n")
    lines = [f"# GPU check: {report.device}", "",
             f"{report.created}, `{report.command}`, torch {report.torch}, torchvision {report.torchvision}, "
             f"CUDA {report.cuda or '-'}, {report.dtype}, {report.elapsed_s:.0f} s of a {report.budget_s:.0f} s "
             f"budget{' (smoke: tiny models on the CPU; the targets are not judged)' if report.smoke else ''}.", "",
             "| target | wanted | measured | result |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {t.name} | {t.target} | {t.measured} | {t.status} |" for t in report.targets]
    lines.append("")
    for section in report.sections:
        lines += _markdown_section(section)
    path = out / "gpu_check.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check", help="report folder")
    parser.add_argument("--budget-s", type=float, default=480.0, help="global deadline (default 8 minutes)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, to test the script itself")
    parser.add_argument("--sections", default=",".join(name for name, _ in SECTIONS),
                        help="comma-separated sections to run, in their fixed order (default: all)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's default backend for the compile section (the trainer uses inductor)")
    args = parser.parse_args(argv)
    chosen = set(args.sections.split(","))
    unknown = chosen - {name for name, _ in SECTIONS}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; known: {', '.join(name for name, _ in SECTIONS)}")
    if args.smoke:
        plan = Plan.cpu_smoke()
    elif torch.cuda.is_available():
        plan = Plan.gpu()
    else:
        parser.error("no CUDA device here: run with --smoke for the CPU check of the script itself")
    clock = Clock(args.budget_s)
    threads = torch.get_num_threads()
    report = Report(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        smoke=plan.smoke,
        device=torch.cuda.get_device_name() if plan.device.type == "cuda" else f"cpu ({threads} threads)",
        dtype=str(plan.dtype).removeprefix("torch."), torch=torch.__version__, torchvision=torchvision.__version__,
        cuda=torch.version.cuda, budget_s=args.budget_s,
    )  # fmt: skip
    ctx = Context()
    torch.compiler.set_default_backend(args.compile_backend)
    try:
        for name, fn in SECTIONS:
            if name in chosen:
                report.sections.append(run_section(name, fn, plan, clock, ctx))
            else:
                report.sections.append(Section(name, "skipped", 0.0, error="skipped: not selected (--sections)"))
    finally:
        torch.compiler.set_default_backend(None)
    report.targets = evaluate_targets(report)
    report.elapsed_s = clock.elapsed()
    path = write_report(report, args.out)
    for target in report.targets:
        print(f"{target.status:>12}  {target.name}: {target.measured}")
    print(f"report: {path} (and {path.with_suffix('.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
