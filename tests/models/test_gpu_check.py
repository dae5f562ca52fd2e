"""benchmarks/gpu_check.py runs on a machine that has torch and torchvision and nothing else of the
project's dependencies, and each of its sections measures what its report says.

The first GPU anyone gets for this project is a bare CUDA machine with the repository copied onto it;
a script that imports Ray or pyarrow by accident would fail there and waste the loan. So the smoke run
here happens in an interpreter where those packages cannot be imported and the installed project is
off ``sys.path``: the script must find the repository by itself.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

from pipeline.models.flops import model_stats
from pipeline.models.mvit import MViT
from pipeline.models.presets import preset_config

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
NOT_ON_A_BARE_MACHINE = ("ray", "pyarrow", "fsspec", "s3fs", "omegaconf", "mlflow", "decord", "av", "webdataset",
                         "yaml")
SECTIONS = ["matmul_peak", "attention", "throughput", "fsdp", "activation_checkpointing", "device_augment",
            "compile"]  # fmt: skip

# Runs a script as __main__ where the packages named in argv[1] cannot be imported (as if not installed)
# and neither can the project itself (argv[2]: its editable install's finders and its folder on sys.path
# are removed), as on a machine where the repository was only copied.
_BARE_MACHINE = """
import importlib.abc, importlib.util, os, runpy, sys
missing, repo, script = set(sys.argv[1].split(",")), os.path.realpath(sys.argv[2]), sys.argv[3]

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in missing:
            raise ModuleNotFoundError(f"No module named {name!r} (not on a bare CUDA machine)", name=name)
        return None

def editable(hook):
    return getattr(hook, "__module__", "").startswith("__editable__")

sys.meta_path[:] = [NotInstalled()] + [f for f in sys.meta_path if not editable(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not editable(h)]
sys.path_importer_cache.clear()
for name in [m for m in sys.modules if m.split(".")[0] in missing]:
    del sys.modules[name]
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != repo]
assert importlib.util.find_spec("pipeline") is None, "the project is still importable"
sys.argv = [script, *sys.argv[4:]]
runpy.run_path(script, run_name="__main__")
"""


def _sections(report: dict) -> dict[str, dict]:
    return {s["name"]: s for s in report["sections"]}


def _gpu_check() -> ModuleType:
    """The script as a module, loaded from its file (benchmarks/ is not a package)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # its dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def test_smoke_runs_every_section_with_torch_and_torchvision_only(tmp_path):
    # aot_eager: dynamo's capture and AOTAutograd's backward graph, without inductor's C++ build (1-2 min
    # cold on two cores even for two blocks); the GPU run compiles with inductor.
    cmd = [sys.executable, "-c", _BARE_MACHINE, ",".join(NOT_ON_A_BARE_MACHINE), str(REPO), str(SCRIPT),
           "--smoke", "--out", str(tmp_path / "out"), "--compile-backend", "aot_eager"]  # fmt: skip
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert f"report: {tmp_path / 'out' / 'gpu_check.md'}" in run.stdout

    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    sections = _sections(report)
    assert list(sections) == SECTIONS
    failed = {name: s["error"] for name, s in sections.items() if s["status"] != "ok"}
    assert not failed, failed
    assert report["smoke"] and report["dtype"] == "float32"
    results = {name: s["result"] for name, s in sections.items()}

    assert results["matmul_peak"]["measured_tflops"] > 0
    assert results["matmul_peak"]["datasheet_tflops"] is None  # a CPU has no bf16 datasheet entry

    tiny = {v: preset_config(v, **_gpu_check().TINY) for v in ("mvit_b_16x4", "mvitv2_s_16x4")}
    for check in results["attention"]["checks"]:
        # one forward SDPA call per block, whichever backend took it
        assert sum(check["backends"].values()) == tiny[check["variant"]].depth, check
        if "math" in check["backends"]:
            assert check["verdict"].startswith("math fallback") and check["fused_only_train"] != "ok", check
        else:
            assert check["verdict"] == "fused: " + ", ".join(sorted(check["backends"])), check
            assert check["fused_only_train"] == "ok", check

    for v in results["throughput"]["variants"]:
        assert v["train_gflop_per_clip"] == 3 * 2 * model_stats(tiny[v["variant"]]).gflops
        assert [row["batch"] for row in v["rows"]] == [1, 2]
        for row in v["rows"]:
            for model in ("ours", "torchvision"):
                assert row[model]["step_s"] > 0 and 0 < row[model]["of_measured_peak"], row
            assert row["speedup"] == row["torchvision"]["step_s"] / row["ours"]["step_s"]
        assert v["largest_common_batch"] == 2

    fsdp = results["fsdp"]
    assert fsdp["backend"] == "gloo" and fsdp["matched"]
    for regimes in fsdp["variants"].values():
        fp32 = next(r for r in regimes if r["precision"] == "fp32")
        assert fp32["max_update_error"] <= 1e-4 and abs(fp32["loss_fsdp"] - fp32["loss_plain"]) <= 1e-4, fp32
    # torch's CPU bf16 depthwise Conv3d weight gradient is broken: the report says so instead of comparing
    assert "bf16" in fsdp["not_compared"] or all(len(r) == 2 for r in fsdp["variants"].values())

    ac = results["activation_checkpointing"]
    assert 0 < ac["activations_mib_on"] < ac["activations_mib_off"] and ac["memory_saving"] > 0, ac

    augment = results["device_augment"]
    assert augment["clips_per_s"] > 0 and augment["shape"] == [2, 3, 4, 32, 32]

    compiled = results["compile"]
    assert compiled["backend"] == "aot_eager" and compiled["speedup"] > 0
    assert compiled["eager_blocks"] == []  # both blocks ran their compiled code

    targets = {t["name"]: t["status"] for t in report["targets"]}
    assert targets.pop("FSDP2 one-rank step equals the plain step") == "pass"
    assert set(targets.values()) == {"n/a (smoke)"}  # tiny CPU figures are not judged against GPU targets
    markdown = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "## throughput: ok" in markdown and "| target | wanted | measured | result |" in markdown


def test_a_section_that_fails_or_runs_out_of_time_is_reported_and_the_rest_still_run(tmp_path):
    """A section's exception becomes its report entry and the next section runs; with the budget spent,
    a section is skipped instead of started."""
    gpu_check = _gpu_check()

    def broken(plan, clock, ctx):
        raise RuntimeError("planted failure")

    plan, ctx = gpu_check.Plan.cpu_smoke(), gpu_check.Context()
    clock = gpu_check.Clock(budget_s=1e9)
    failed = gpu_check.run_section("broken", broken, plan, clock, ctx)
    assert failed.status == "error" and "RuntimeError: planted failure" in failed.error
    peak = gpu_check.run_section("matmul_peak", gpu_check.section_matmul_peak, plan, clock, ctx)
    assert peak.status == "ok" and ctx.peak is not None and ctx.peak.measured_tflops > 0

    late = gpu_check.run_section("matmul_peak", gpu_check.section_matmul_peak, plan, gpu_check.Clock(0.0), ctx)
    assert (late.status, late.error) == ("skipped", "skipped: out of time")


def test_the_eager_block_count_sees_blocks_that_dynamo_gave_up_on():
    """Blocks whose dynamo recompile limit ran out run eagerly; the compile section's hook counts them."""
    gpu_check = _gpu_check()
    torch.manual_seed(0)
    # drop-path rates differ per block: each block is a recompile of the shared forward code
    model = MViT(preset_config("mvit_b_16x4", num_classes=7, num_frames=4, crop_size=32, embed_dim=16, depth=4,
                               stage_starts=(1, 3), kv_stride=(1, 2, 2), drop_path_rate=0.3, head_dropout=0.0))
    counts = gpu_check.count_eager_calls(model)
    for block in model.blocks:
        block.compile(backend="eager", recompile_limit=1)
    model(torch.randn(1, 3, 4, 32, 32)).sum().backward()
    assert counts[0] == 0  # the first block's graph was compiled and ran
    assert all(n > 0 for n in counts[1:]), counts


def test_the_trainers_compile_compiles_every_block_of_a_model_deeper_than_the_recompile_limit():
    """apply_compile gives each block its own recompile budget: 10 blocks, each a different graph of the
    shared forward (drop-path rates differ per block), all run compiled; dynamo's default limit is 8."""
    from pipeline.trainer.parallelize import apply_compile

    gpu_check = _gpu_check()
    torch.manual_seed(0)
    model = MViT(preset_config("mvit_b_16x4", num_classes=7, num_frames=4, crop_size=32, embed_dim=16, depth=10,
                               stage_starts=(1, 3), kv_stride=(1, 2, 2), drop_path_rate=0.3, head_dropout=0.0))
    counts = gpu_check.count_eager_calls(model)
    torch.compiler.set_default_backend("eager")  # dynamo's capture without a backend compiler: the limit is dynamo's
    try:
        apply_compile(model)
        model(torch.randn(1, 3, 4, 32, 32)).sum().backward()
    finally:
        torch.compiler.set_default_backend(None)
    assert counts == [0] * 10, counts
