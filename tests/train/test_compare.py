"""The comparison CLI against a real local MLflow store and a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import mlflow

from pipeline.compare import main


def _run(uri: str, name: str, lr: str, losses: list[float], top1: float) -> None:
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("cmp")
    with mlflow.start_run(run_name=name):
        mlflow.log_params({"optim.lr": lr, "trainer.epochs": "3"})
        for step, loss in enumerate(losses):
            mlflow.log_metric("train/loss", loss, step=step)
        mlflow.log_metric("val/video_top1", top1, step=len(losses))


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
