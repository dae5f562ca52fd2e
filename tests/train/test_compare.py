"""The comparison CLI against a real local MLflow store and a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from pipeline.compare import main


def _run(uri: str, name: str, lr: str, losses: list[float], top1: float) -> None:
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("cmp")
    with mlflow.start_run(run_name=name):
        mlflow.log_params({"optim.lr": lr, "trainer.epochs": "3"})
        for step, loss in enumerate(losses):
            mlflow.log_metric("train/loss", loss, step=step)
        mlflow.log_metric("val/video_top1", top1, step=len(losses))


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` (SQLite backend, proxied artifacts) on a free loopback port."""
    root = tmp_path_factory.mktemp("mlflow_server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")]
    log = (root / "server.log").open("w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (root / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(0.5)
        yield url
    finally:
        import os
        import signal

        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


@pytest.fixture(params=["sqlite", "server"])
def tracking_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "server":
        return request.getfixturevalue("tracking_server")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_compare_shows_only_differing_params_and_writes_plots(tracking_uri, tmp_path, capsys):
    uri = tracking_uri
    _run(uri, "small-lr", "0.001", [2.0, 1.5, 1.0], 60.0)
    _run(uri, "big-lr", "0.01", [2.0, 1.0, 0.5], 80.0)
    capsys.readouterr()  # MLflow's own "View run ..." lines
    assert main(["--experiment", "cmp", "--tracking-uri", uri, "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "optim.lr" in header and "trainer.epochs" not in header
    assert "small-lr" in out and "big-lr" in out and "80.000" in out and "60.000" in out
    for png in ("loss.png", "accuracy.png"):
        data = (tmp_path / "plots" / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    assert main(["--experiment", "cmp", "--tracking-uri", uri, "--runs", "big-lr", "--out", str(tmp_path / "p2")]) == 0
    assert "small-lr" not in capsys.readouterr().out
