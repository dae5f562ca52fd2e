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


def test_evaluations_are_listed_below_the_training_run_they_evaluate(tracking_uri, tmp_path, capsys):
    """Tagged as pipeline.evaluate tags its runs: each evaluation right below its training run, with its kind,
    its views and its eval/ metrics in the training run's accuracy columns; one bar per run in the plot."""
    from pipeline.evaluate import EVALUATES_TAG, KIND_TAG, VIEWS_TAG

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("cmp-eval")
    with mlflow.start_run(run_name="trained") as trained:
        mlflow.log_params({"data.sampling.eval_clips": "5", "data.sampling.eval_crops": "1"})
        mlflow.log_metrics({"val/video_top1": 71.0, "train/loss": 0.5})
    with mlflow.start_run(run_name="other"):
        mlflow.log_params({"data.sampling.eval_clips": "2", "data.sampling.eval_crops": "1"})
        mlflow.log_metric("val/video_top1", 40.0)
    with mlflow.start_run(run_name="tested", tags={KIND_TAG: "evaluation", EVALUATES_TAG: trained.info.run_id,
                                                   VIEWS_TAG: "10x3"}):
        mlflow.log_metrics({"eval/video_top1": 74.5, "eval/video_top5": 93.0})
    capsys.readouterr()
    assert main(["--experiment", "cmp-eval", "--tracking-uri", tracking_uri, "--out", str(tmp_path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:5]]
    assert rows[0][:3] == ["trained", "train", "5x1"] and "71.000" in rows[0]
    assert rows[1][:5] == ["tested", "(of", "trained)", "eval", "10x3"] and rows[1][-5:-3] == ["74.500", "93.000"]
    assert rows[2][:3] == ["other", "train", "2x1"]
    assert (tmp_path / "video_top1_by_run.png").read_bytes().startswith(b"\x89PNG")
