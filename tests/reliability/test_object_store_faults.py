"""Object-store faults between the pipeline and S3 (moto behind ``faults.FaultProxy``).

Transient faults (HTTP 500/503, connections closed without a response, downloads cut off halfway)
must be ridden out by the retries (``core.s3.RetryPolicy``) without changing a
byte of output or losing a sample; a permanent outage must stop the run within a bounded time with
one clear line, leaving nothing partial under a final name.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import s3fs
from faults import FaultProxy
from preprocess_helpers import cli, cli_env, published, s3_objects, shard_samples

from pipeline.data.loader import EpochStats
from pipeline.data.service import build_dataset
from preprocessing.synth import SynthKinetics, synth_kinetics
from tests.data.data_helpers import run_epoch, small_config

ARGS = ("--short-side", "64", "--shard-samples", "2", "--shard-bytes", "0", "--workers", "2", "--no-progress")
OUTAGE_BOUND_S = 60.0  # a permanent outage must end the run within this (default retry policy)


@dataclass(frozen=True)
class Reference:
    raw: Path
    shards: Path  # an uninterrupted local run: the bytes every S3 run must reproduce
    files: dict[str, bytes]
    keys: list[str]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = tmp_path_factory.mktemp("store_faults")
    raw, out = root / "raw", root / "reference"
    synth_kinetics(SynthKinetics(str(raw), classes=2, per_class=4, val_per_class=0, seconds=1, fps=15, width=96,
                                 height=64, seed=9))  # fmt: skip
    cli(*_args(raw, str(out)))
    files = published(out)
    keys = [key for name, data in files.items() if name.endswith(".tar") for key, _ in shard_samples(data)]
    assert len(keys) == 8 and sum(n.endswith(".tar") for n in files) == 4
    return Reference(raw, out, files, keys)


def _args(raw: Path, out: str, *extra: str) -> list[str]:
    return ["kinetics", "--csv", str(raw / "annotations" / "train.csv"), "--videos", str(raw / "train"), "--out", out,
            *ARGS, *extra]  # fmt: skip


def _new_prefix(s3_server: str) -> str:
    """An empty s3://bucket/prefix on the moto server (created directly, not through the proxy)."""
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_server).mkdir(bucket)
    return f"s3://{bucket}/shards"


def _published_on_s3(url: str, s3_server: str) -> dict[str, bytes]:
    return {k: v for k, v in s3_objects(url, {"endpoint_url": s3_server}).items() if not k.startswith("_state/")}


def _keys(files: dict[str, bytes]) -> list[str]:
    return [key for name, data in files.items() if name.endswith(".tar") for key, _ in shard_samples(data)]


# ---- preprocessing uploads ------------------------------------------------------------------------

TRANSIENT: dict[str, Callable[[FaultProxy], list[Any]]] = {  # arms the faults, returns their rules
    "http_500_and_503": lambda p: [p.fail_next(2, 503, {"PUT"}), p.fail_next(2, 500)],
    "connections_dropped": lambda p: [p.drop_next(3, {"PUT"}), p.drop_for(1.0, after=1)],
    "mixed": lambda p: [p.fail_next(1, 503), p.drop_next(1), p.fail_next(1, 500, {"PUT"}), p.drop_next(1, {"PUT"}),
                        p.fail_next(1, 503, {"GET"}), p.drop_next(1, {"DELETE"})],
}  # fmt: skip


def assert_every_rule_fired(proxy: FaultProxy, rules: list[Any]) -> None:
    """Each planted fault happened: a counted rule faulted all its requests, a timed one at least one,
    and the proxy injected nothing else."""
    for i, rule in enumerate(rules):
        assert rule.fired >= 1 and rule.remaining in (None, 0), f"rule {i} ({rule.kind}) fired {rule.fired} times"
    assert proxy.stats.faults == sum(rule.fired for rule in rules), proxy.stats


@pytest.mark.parametrize("fault", list(TRANSIENT))
def test_upload_with_transient_faults_is_retried_to_identical_output(reference: Reference, s3_server: str,
                                                                     fault_proxy: FaultProxy, fault: str,
                                                                     ledger: Any) -> None:  # fmt: skip
    """Uploads hit by transient 500/503/dropped connections: retried, output byte-identical to a fault-free run"""
    url = _new_prefix(s3_server)
    rules = TRANSIENT[fault](fault_proxy)
    result = cli(*_args(reference.raw, url, "--s3-endpoint-url", fault_proxy.url))
    assert_every_rule_fired(fault_proxy, rules)
    assert "8 inputs = 8 written + 0 rejected" in result.stdout
    found = _published_on_s3(url, s3_server)
    assert found == reference.files, "retried uploads must give exactly the fault-free bytes"
    ledger.account(inputs=reference.keys, delivered=_keys(found))


# The 503 case runs with the default retry policy (the bound users get); the dropped-connections
# case with AWS_MAX_ATTEMPTS=2, which also shows the setting reaches the CLI's worker processes.
OUTAGES = {"http_503_default_retries": (503, {}), "connections_dropped_2_attempts": (None, {"AWS_MAX_ATTEMPTS": "2"})}


@pytest.mark.slow
@pytest.mark.parametrize("outage", list(OUTAGES))
def test_upload_during_a_permanent_outage_fails_fast_with_one_line(reference: Reference, s3_server: str,
                                                                   fault_proxy: FaultProxy, outage: str,
                                                                   ledger: Any) -> None:  # fmt: skip
    """Store down mid-run: the CLI exits 1 within 60 s with one error line, nothing partial; a rerun completes"""
    url = _new_prefix(s3_server)
    args = _args(reference.raw, url, "--s3-endpoint-url", fault_proxy.url)
    status, env = OUTAGES[outage]
    # Down from the request after the first shard's PUT (a shard is published last, after its journal record):
    # one or two shards (the two workers' PUTs in flight) are complete, the rest are not. A count of requests
    # (after=k) raced the two workers: in one CI run the outage began before any shard was published.
    outage = fault_proxy.fail_always(status=status, armed_by=r"^PUT [^?]*\.tar$")
    started = time.monotonic()
    result = cli(*args, check=False, timeout=OUTAGE_BOUND_S + 30, env=cli_env(**env))
    seconds = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert seconds < OUTAGE_BOUND_S, f"gave up only after {seconds:.0f}s"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: storage failure ("), result.stderr
    assert "rerun the same command to resume" in errors[0] and "Traceback" not in result.stderr
    assert outage.fired >= 1

    found = _published_on_s3(url, s3_server)
    assert "train.manifest.json" not in found, "no manifest for an unfinished split"
    done = sum(name.endswith(".tar") for name in found)
    assert 0 < done < sum(name.endswith(".tar") for name in reference.files), f"the outage did not land mid-run: {done} shards done"
    for name, data in found.items():  # every object at a final name is complete and correct
        assert data == reference.files[name], f"{name} is partial or wrong"

    fault_proxy.heal()
    rerun = cli(*args)
    assert f"({done} already complete)" in rerun.stdout
    found = _published_on_s3(url, s3_server)
    assert found == reference.files
    ledger.account(inputs=reference.keys, delivered=_keys(found))


def test_unreachable_store_at_start_is_one_line_not_a_missing_bucket(reference: Reference, s3_server: str,
                                                                     fault_proxy: FaultProxy) -> None:  # fmt: skip
    """Store answering 503 from the start: exit 1 naming the outage (not "bucket does not exist"), fast"""
    url = _new_prefix(s3_server)
    outage = fault_proxy.fail_always(status=503)
    started = time.monotonic()
    result = cli(*_args(reference.raw, url, "--s3-endpoint-url", fault_proxy.url), check=False,
                 timeout=OUTAGE_BOUND_S + 30)  # fmt: skip
    assert time.monotonic() - started < OUTAGE_BOUND_S
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: storage failure (OSError: cannot reach the bucket of s3://" in result.stderr
    assert outage.fired >= 1
    assert _published_on_s3(url, s3_server) == {}


# ---- data service reads ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards_on_s3(reference: Reference, s3_server: str) -> str:
    """The reference shard set copied to moto (directly, not through the proxy)."""
    url = _new_prefix(s3_server)
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    for name in reference.files:
        fs.put_file(str(reference.shards / name), f"{url}/{name}")
    return url


def _read_epoch(url: str, proxy: FaultProxy, before: Callable[[FaultProxy], Any]) -> tuple[list, EpochStats]:
    """Build the dataset through the proxy (the manifest is read fault-free), arm the faults, read one epoch."""
    cfg = small_config(url, s3_endpoint_url=proxy.url)
    cfg.decoder.min_actors = cfg.decoder.max_actors = 1
    ds = build_dataset(cfg, "train", train=True)
    before(proxy)
    batches, stats, _ = run_epoch(ds, 1, epoch=0)
    return batches[0], EpochStats.merge(stats)


def test_shard_reads_with_transient_faults_deliver_every_sample_once(reference: Reference, shards_on_s3: str,
                                                                     fault_proxy: FaultProxy, ray_cluster: None,
                                                                     ledger: Any) -> None:  # fmt: skip
    """Shard reads hit by 503s, 500s, dropped and cut-off responses: retried, every sample delivered once"""

    rules: list[Any] = []

    def arm(proxy: FaultProxy) -> None:
        rules.extend([proxy.fail_next(2, status=503), proxy.fail_next(1, status=500), proxy.drop_next(2),
                      proxy.cut_next(2, methods={"GET"})])

    batches, total = _read_epoch(shards_on_s3, fault_proxy, arm)
    assert_every_rule_fired(fault_proxy, rules)
    assert fault_proxy.stats.faults == 7, fault_proxy.stats
    first_views = [vid for b in batches for vid, view in zip(b["video_id"], b["view"]) if view == 0]
    ledger.account(inputs=reference.keys, delivered=first_views, rejected=[k for k, _ in total.failures])
    assert total.complete and total.failed == 0 and total.samples == len(reference.keys)


def test_shard_reads_during_a_permanent_outage_fail_clearly_in_bounded_time(shards_on_s3: str, fault_proxy: FaultProxy,
                                                                            ray_cluster: None) -> None:  # fmt: skip
    """Store down while an epoch is read: the loader raises an error naming the shard within 60 s, no hang"""
    outcome: dict[str, Any] = {}
    rules: list[Any] = []

    def read() -> None:
        try:
            outcome["result"] = _read_epoch(shards_on_s3, fault_proxy, lambda p: rules.append(p.fail_always(status=503)))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome["error"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(OUTAGE_BOUND_S + 30)
    seconds = time.monotonic() - started
    assert not thread.is_alive(), "the epoch hangs during an outage"
    assert seconds < OUTAGE_BOUND_S, f"gave up only after {seconds:.0f}s"
    error = outcome.get("error")
    assert error is not None, f"an epoch read during an outage must fail, got {outcome.get('result')}"
    assert isinstance(error, OSError), type(error)
    assert f"cannot open shard {shards_on_s3}/train-00000" in str(error)
    assert rules[0].fired >= 1
