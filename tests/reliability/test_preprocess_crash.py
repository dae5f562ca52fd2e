"""Preprocessing killed with SIGKILL at a random moment, then rerun: the result equals an uninterrupted
run byte for byte, and nothing partial ever sits at a final name (local folder and S3).

The kill moment of each case is drawn from its seed over the run: after a drawn number of shards
(at least one) is published, plus a drawn part of one shard's encoding time (measured on the
uninterrupted run), so the kills land at different stages (between shards, inside shards, while
publishing) even on a busy machine. Each case asserts that its kill landed mid-run: some shards
published and some not, so the rerun really resumed. The whole process group (the CLI and its worker
processes) is killed with no chance to clean up.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import s3fs
from preprocess_helpers import REPO, cli, cli_command, cli_env, published, s3_objects

from preprocessing.synth import SynthKinetics, synth_kinetics

# 12 one-clip shards; upscaling to a 480 short side gives each shard enough work (~0.3 s) to be killed
# inside it, and the whole run ~2-3 s on a 2-core machine.
ARGS = ("--short-side", "480", "--shard-samples", "1", "--shard-bytes", "0", "--workers", "2", "--no-progress")
SHARDS = 12
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Reference:
    raw: Path
    files: dict[str, bytes]  # published objects of the uninterrupted run
    seconds: float


def _args(raw: Path, out: str, *extra: str) -> list[str]:
    return ["kinetics", "--csv", str(raw / "annotations" / "train.csv"), "--videos", str(raw / "train"), "--out", out,
            *ARGS, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = tmp_path_factory.mktemp("crash")
    raw = root / "raw"
    synth_kinetics(SynthKinetics(str(raw), classes=3, per_class=SHARDS // 3, val_per_class=0, seconds=4, fps=25,
                                 width=96, height=64, seed=5))  # fmt: skip
    started = time.monotonic()
    cli(*_args(raw, str(root / "reference")))
    seconds = time.monotonic() - started
    files = published(root / "reference")
    assert len([n for n in files if n.endswith(".tar")]) == SHARDS
    return Reference(raw, files, seconds)


def _kill_at_random(args: list[str], seed: int, seconds: float, done: Callable[[], int], env: dict[str, str]) -> str:
    """Start the CLI and SIGKILL its whole process group at a point drawn from ``seed``: once a drawn
    number of shards is published (``done()`` counts them), plus a drawn part of one shard's time, so
    the kill lands inside the run however busy the machine is. Returns where it landed.

    At least one shard is waited for (a kill during interpreter start-up would make the rerun a fresh
    run), and at most ``SHARDS - 5``: two workers publish at most about three more shards in the drawn
    extra time, so some are always left."""
    rng = random.Random(seed)
    wait_for, extra = rng.randrange(1, SHARDS - 4), rng.uniform(0, 1.5) * seconds / SHARDS
    process = subprocess.Popen(cli_command(*args), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while done() < wait_for and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(extra)
    finished = process.poll() is not None
    if not finished:
        os.killpg(process.pid, signal.SIGKILL)  # the CLI and its workers, no cleanup of any kind
    process.wait()
    assert not finished, f"the run finished before the kill (waited for {wait_for} shards + {extra:.2f}s)"
    return f"waited for {wait_for} shards + {extra:.2f}s"


def _assert_mid_run(survivors: int, delay: str) -> None:
    assert 0 < survivors < SHARDS, f"the kill ({delay}) did not land mid-run: {survivors}/{SHARDS} shards published"


def _check_final_names(found: dict[str, bytes], expected: dict[str, bytes]) -> int:
    """Whatever a killed run left under a final name is complete and correct; returns the shard count."""
    for name, data in found.items():
        assert name in expected, f"unexpected object at a final name: {name}"
        assert data == expected[name], f"{name} differs from the uninterrupted run's (partial or wrong)"
    if "train.manifest.json" in found:  # the manifest is written last: every shard is there too
        assert found == expected
    return sum(name.endswith(".tar") for name in found)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_then_rerun_is_byte_identical_local(reference: Reference, tmp_path: Path, seed: int,
                                                    record_property: Any) -> None:  # fmt: skip
    """Preprocessing SIGKILLed at a random moment, rerun: byte-identical output, nothing partial at a final name"""
    out = tmp_path / "out"
    done = lambda: len(list(out.glob("train-*.tar")))  # noqa: E731
    delay = _kill_at_random(_args(reference.raw, str(out)), seed, reference.seconds, done, cli_env())
    survivors = _check_final_names(published(out), reference.files)
    record_property("kill", f"{delay}: {survivors}/{SHARDS} shards published")
    _assert_mid_run(survivors, delay)

    rerun = cli(*_args(reference.raw, str(out)))
    assert f"({survivors} already complete)" in rerun.stdout, f"killed ({delay}): {rerun.stdout}"
    assert published(out) == reference.files, "the resumed run must equal the uninterrupted run byte for byte"
    assert list((out / "_state" / "tmp").iterdir()) == [], "temporary files of the killed run are cleaned up"


@pytest.mark.slow
def test_sigkill_then_rerun_is_byte_identical_on_s3(reference: Reference, s3_bucket: Any, tmp_path: Path,
                                                    record_property: Any) -> None:  # fmt: skip
    """Preprocessing to S3 SIGKILLed mid-run, rerun: byte-identical objects, no partial object, no local temp left"""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = cli_env(TMPDIR=str(tmpdir))
    args = _args(reference.raw, s3_bucket.url, "--s3-endpoint-url", s3_bucket.endpoint_url)
    fs = s3fs.S3FileSystem(**s3_bucket.storage_options)

    def done() -> int:
        fs.invalidate_cache()
        return len(fs.glob(f"{s3_bucket.url}/train-*.tar"))

    delay = _kill_at_random(args, 3, reference.seconds, done, env)
    objects = s3_objects(s3_bucket.url, s3_bucket.storage_options)
    survivors = _check_final_names({k: v for k, v in objects.items() if not k.startswith("_state/")}, reference.files)
    record_property("kill", f"{delay}: {survivors}/{SHARDS} shards published")
    _assert_mid_run(survivors, delay)
    staged = [p for p in tmpdir.rglob("mvit-shard*")]
    assert staged == [], f"the killed run left local staging files: {staged}"

    rerun = cli(*args, env=env)
    assert f"({survivors} already complete)" in rerun.stdout, f"killed ({delay}): {rerun.stdout}"
    objects = s3_objects(s3_bucket.url, s3_bucket.storage_options)
    assert {k: v for k, v in objects.items() if not k.startswith("_state/")} == reference.files
