"""A poison sample costs that sample only: the decoder actor decodes each sample in a child process, so a
segfault, an abort, an OOM-style SIGKILL or a hang becomes FAILED rows with the reason (after bounded
retries), the rest of the batch decodes, and the same actor goes on. Faults are planted through
``MVIT_FAULTS`` (core/faults.py) and fire inside the real decode path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from data_helpers import REPO, small_config

from core import faults
from pipeline.data.decode import Decoder
from pipeline.data.plan import FAILED, OK


def _samples(root: Path, count: int) -> list[tuple[str, bytes, dict]]:
    out = []
    for shard in sorted(root.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for key in sorted({name.rsplit(".", 1)[0] for name in tar.getnames()}):
                member = lambda ext: tar.extractfile(f"{key}.{ext}").read()  # noqa: E731
                out.append((key, member("mp4"), json.loads(member("json"))))
    assert len(out) >= count
    return out[:count]


def _batch(samples: list[tuple[str, bytes, dict]], keys: list[str] | None = None) -> dict[str, np.ndarray]:
    """One batch of the samples, renamed to ``keys`` (the names faults are planted on)."""
    keys = keys or [key for key, _, _ in samples]
    rows = [{"key": k, "data": data, "label": 1, "meta": json.dumps(meta), "kind": 0, "pos": 0, "unit": 0,
             "epoch": 0, "error": ""} for k, (_, data, meta) in zip(keys, samples)]  # fmt: skip
    return {c: np.array([r[c] for r in rows], dtype=object) for c in rows[0]}


_PLAN = {"segv": "segfault", "abrt": "abort", "oom": "kill", "flaky": "kill:1", "flaky2": "kill:1", "stuck": "hang",
         "bad": "raise"}


@pytest.fixture(scope="module")
def isolated(kinetics_shards: Path) -> Iterator[Decoder]:
    """One decoder actor object with faults planted on the keys of ``_PLAN`` (one zygote for the module);
    each test sets the bounds it needs on its ``DecodeProcess`` and the fixture restores them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(faults.ENV, json.dumps({"decode": _PLAN}))
        decoder = Decoder(small_config(str(kinetics_shards)), "video", train=True)
    try:
        yield decoder
    finally:
        decoder._process.close()


@pytest.fixture
def decoder(isolated: Decoder) -> Iterator[Decoder]:
    process = isolated._process
    saved = (process.timeout_s, process.retries, process.recycle_after)
    process.restarts = 0
    try:
        yield isolated
    finally:
        process.timeout_s, process.retries, process.recycle_after = saved


def _reasons(out: dict[str, np.ndarray], views: int) -> dict[str, str]:
    return {str(out["video_id"][i]): str(out["error"][i]) for i in range(0, len(out["status"]), views)
            if out["status"][i] == FAILED}  # fmt: skip


def test_crashing_samples_fail_alone_and_the_actor_goes_on(decoder: Decoder, kinetics_shards: Path) -> None:
    """A segfault, an abort and an OOM-style SIGKILL each fail their sample after one retry; the others decode."""
    decoder._process.retries = 1
    samples = _samples(kinetics_shards, 5)
    out = decoder(_batch(samples, ["good-a", "segv", "abrt", "oom", "good-b"]))
    views = decoder.views
    reasons = _reasons(out, views)
    assert set(reasons) == {"segv", "abrt", "oom"}
    assert "killed by SIGSEGV on each of 2 attempts" in reasons["segv"]
    assert "killed by SIGABRT" in reasons["abrt"]
    assert "killed by SIGKILL (the kernel's OOM killer sends SIGKILL)" in reasons["oom"]
    statuses = out["status"].reshape(5, views)[:, 0].tolist()
    assert statuses == [OK, FAILED, FAILED, FAILED, OK]
    assert not out["video"][views : 4 * views].any() and out["video"][:views].any()
    assert decoder._process.restarts == 6  # 3 samples x 2 attempts: each crash cost one child
    # The same actor decodes the next batch, and the views equal an unharmed in-process decode.
    again = decoder(_batch(samples[:2], ["good-c", "good-d"]))
    assert again["status"].tolist() == [OK] * 2 * views
    cfg_local = small_config(str(kinetics_shards))
    cfg_local.decoder.isolate = False
    reference = Decoder(cfg_local, "video", train=True)(_batch(samples[:2], ["good-c", "good-d"]))
    np.testing.assert_array_equal(again["video"], reference["video"])


def test_a_crash_that_a_retry_gets_past_loses_nothing(decoder: Decoder, kinetics_shards: Path) -> None:
    """A sample whose first decode is killed (transient) decodes on the retry: delivered, not failed."""
    sample = _samples(kinetics_shards, 1)
    decoder._process.retries = 1
    out = decoder(_batch(sample, ["flaky"]))
    assert out["status"].tolist() == [OK] * decoder.views and decoder._process.restarts == 1
    decoder._process.retries = 0  # no retry allowed: the same transient crash fails the sample
    out = decoder(_batch(sample, ["flaky2"]))
    assert out["status"].tolist() == [FAILED] * decoder.views
    assert "on each of 1 attempts" in out["error"][0]


def test_a_hanging_decode_is_cut_off_at_the_deadline(decoder: Decoder, kinetics_shards: Path) -> None:
    """A decode that never returns (dmlc/decord#269) is killed after sample_timeout_s and fails its sample only."""
    decoder._process.timeout_s = 3.0
    started = time.monotonic()
    out = decoder(_batch(_samples(kinetics_shards, 2), ["stuck", "fine"]))
    took = time.monotonic() - started
    reasons = _reasons(out, decoder.views)
    assert list(reasons) == ["stuck"] and "did not finish within decoder.sample_timeout_s=3 s" in reasons["stuck"]
    assert out["status"][decoder.views :].tolist() == [OK] * decoder.views
    assert 3.0 <= took < 30, took  # the deadline, not retries of it


def test_a_decode_error_keeps_the_child(decoder: Decoder, kinetics_shards: Path) -> None:
    """A decode that raises fails its sample with the exception and costs no child process."""
    samples = _samples(kinetics_shards, 1)
    batch = _batch(samples * 3, ["bad", "cut", "ok"])
    batch["data"][1] = b"\0" * 99
    decoder._process.start()
    pid = decoder._process.pid
    out = decoder(batch)
    reasons = _reasons(out, decoder.views)
    assert reasons["bad"] == "PlantedFault: planted decode error"
    assert "cut" in reasons and "ok" not in reasons
    assert decoder._process.restarts == 0 and decoder._process.pid == pid


def test_the_child_is_recycled_to_bound_leaks(decoder: Decoder, kinetics_shards: Path) -> None:
    """After recycle_after samples the decode child is replaced by a fresh one (Decord leaks: dmlc/decord#197)."""
    decoder._process.recycle_after = 2
    decoder._process._served = 0
    pids = []
    for sample in _samples(kinetics_shards, 5):
        assert decoder(_batch([sample]))["status"].tolist() == [OK] * decoder.views
        pids.append(decoder._process.pid)
    assert len(set(pids)) == 3 and pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
    assert decoder._process.restarts == 0  # recycling is not a restart


_OWNER = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    from data_helpers import small_config
    from pipeline.data.decode import Decoder
    cfg = small_config({root!r})
    cfg.decoder.sample_timeout_s = 600
    decoder = Decoder(cfg, "video", train=True)
    decoder._process.start()
    print(decoder._process.pid, flush=True)
    row = dict(key="stuck", data=b"x", label=1, meta=json.dumps({{"width": 96, "height": 64}}), kind=0, pos=0,
               unit=0, epoch=0, error="")
    decoder({{c: np.array([v], dtype=object) for c, v in row.items()}})
    """
)


def test_a_hung_child_does_not_outlive_its_actor(kinetics_shards: Path, tmp_path: Path) -> None:
    """An actor killed while its child hangs (SIGKILL: no cleanup runs) takes the child with it."""
    script = tmp_path / "owner.py"
    script.write_text(_OWNER.format(tests=str(Path(__file__).parent), root=str(kinetics_shards)))
    env = {**os.environ, "PYTHONPATH": str(REPO), faults.ENV: json.dumps({"decode": {"stuck": "hang"}})}
    owner = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        child = psutil.Process(int(owner.stdout.readline()))
        descendants = psutil.Process(owner.pid).children(recursive=True)
        assert child in descendants  # the decode child
        time.sleep(1.0)  # the hang has begun
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=30)
        gone, alive = psutil.wait_procs(descendants, timeout=20)
        assert not alive, f"left behind: {[p.pid for p in alive]}"
    finally:
        if owner.poll() is None:
            owner.kill()
        owner.stdout.close()


def test_a_broken_decoder_setup_fails_the_actor_not_every_sample(kinetics_shards: Path) -> None:
    """A child that cannot even start (here: an impossible decode device) is an actor error, not N failed samples."""
    from pipeline.data.isolation import ChildSettings, DecodeProcess

    cfg = small_config(str(kinetics_shards))
    process = DecodeProcess(ChildSettings(cfg, "video", True, "gpu", 0), timeout_s=10, retries=1, recycle_after=0)
    try:
        with pytest.raises(RuntimeError, match="the decode process could not start: RuntimeError: GPU decoding asked "
                                               "for, but Decord was built without CUDA"):
            process.decode(b"x", {}, "k", 0)
    finally:
        process.close()


def test_fault_plans_are_checked() -> None:
    """A malformed MVIT_FAULTS stops with a message, never silently plants nothing."""
    with pytest.raises(ValueError, match="not a valid fault plan: decode fault 'melt'"):
        faults.parse('{"decode": {"k": "melt"}}')
    with pytest.raises(ValueError, match="not a valid fault plan"):
        faults.parse('{"decod": {}}')
    plan = faults.parse('{"decode": {"k": "hang:2"}, "raise_at": {"rank": 1, "step": 3}}')
    assert [plan.decode_fault("k", a) for a in (1, 2, 3)] == ["hang", "hang", None]
    assert plan.raise_at == (1, 3) and plan.decode_fault("other", 1) is None
    plan = faults.parse('{"kill_read": ["train-000001.tar"], "kill_decoder_actor": ["k"]}')
    assert plan.kill_read == {"train-000001.tar"} and plan.kill_decoder_actor == {"k"} and not plan.empty
    with pytest.raises(ValueError, match="kill_read must be a list of names"):
        faults.parse('{"kill_read": "train-000001.tar"}')
    assert faults.parse("{}").empty


def test_replies_from_the_child_are_checked_data_never_pickles() -> None:
    """What a decode child sends back is JSON plus raw uint8 bytes: a pickle or a mis-sized array is a failed sample."""
    import multiprocessing
    import pickle

    from pipeline.data.isolation import _read_reply

    ours, theirs = multiprocessing.Pipe()
    theirs.send_bytes(json.dumps({"status": "ok", "dtype": "uint8", "shape": [2, 2]}).encode())
    theirs.send_bytes(bytes([1, 2, 3, 4]))
    status, views = _read_reply(ours)
    assert status == "ok" and views.tolist() == [[1, 2], [3, 4]]
    theirs.send_bytes(pickle.dumps(("ok", np.zeros(3))))  # what a compromised child might try
    assert _read_reply(ours) == ("error", "the decode process sent a malformed reply")
    theirs.send_bytes(json.dumps({"status": "ok", "dtype": "object", "shape": [1]}).encode())
    theirs.send_bytes(b"x")
    assert _read_reply(ours)[0] == "error"
    theirs.send_bytes(json.dumps({"status": "ok", "dtype": "uint8", "shape": [3]}).encode())
    theirs.send_bytes(b"xx")
    assert _read_reply(ours) == ("error", "the decode process sent uint8 [3] in 2 bytes")


def test_the_decoder_actor_module_does_not_import_torch() -> None:
    """An isolated decoder actor never decodes itself: its module leaves torch, torchvision and webdataset to the child."""
    code = ("import sys, pipeline.data.decode; "
            "print(sorted(m for m in ('torch', 'torchvision', 'webdataset', 'decord') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]

