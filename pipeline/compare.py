"""Compare the runs of an experiment: ``python -m pipeline.compare --experiment NAME [--runs ID ...]``.

Prints one row per run with only the parameters that differ between the runs (the shared ones would
only hide the difference) and the key metrics, and writes PNG plots of the loss and accuracy curves and
of each run's video top-1. Training runs and evaluation runs (``pipeline.evaluate``) are listed side by
side: each evaluation right below the training run it evaluates, with its kind and its views per video
(a training run's are those of its validation), so a 10x3 test of a model reads next to the 5x1
validation it trained with. Works against any MLflow tracking URI: the local SQLite store the demo
writes, or a tracking server.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.evaluate import EVALUATES_TAG, KIND_TAG, VIEWS_TAG

# Columns: (heading, the training run's metric, the evaluation run's metric)
KEY_METRICS = (("video_top1", "val/video_top1", "eval/video_top1"), ("video_top5", "val/video_top5", "eval/video_top5"),
               ("view_top1", "val/view_top1", "eval/view_top1"), ("train/loss", "train/loss", None),
               ("train/clips_per_s", "train/clips_per_s", None))
CURVES = {"loss.png": ("train/loss",), "accuracy.png": ("val/video_top1", "val/view_top1")}
SCORES_PNG = "video_top1_by_run.png"


@dataclass
class RunSummary:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "eval" if self.tags.get(KIND_TAG) == "evaluation" else "train"

    @property
    def views(self) -> str:
        """Views per video, ``CLIPSxCROPS``: the evaluation's, or those the training run validated with."""
        if self.kind == "eval":
            return self.tags.get(VIEWS_TAG, "-")
        clips, crops = self.params.get("data.sampling.eval_clips"), self.params.get("data.sampling.eval_crops")
        return f"{clips}x{crops}" if clips and crops else "-"

    def metric(self, train_key: str, eval_key: str | None) -> float | None:
        return self.metrics.get(eval_key) if self.kind == "eval" and eval_key else self.metrics.get(train_key)


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))


def load_runs(client, experiment: str, run_ids: Sequence[str] | None = None) -> list[RunSummary]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment named {experiment!r} at {client.tracking_uri}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000)
    if run_ids:
        wanted = set(run_ids)
        runs = [r for r in runs if r.info.run_id in wanted or r.info.run_name in wanted]
        missing = wanted - {r.info.run_id for r in runs} - {r.info.run_name for r in runs}
        if missing:
            raise SystemExit(f"runs not found in {experiment!r}: {', '.join(sorted(missing))}")
    summaries = [
        RunSummary(r.info.run_id, r.info.run_name or r.info.run_id[:8], r.info.status, dict(r.data.params),
                   dict(r.data.metrics), dict(r.data.tags))
        for r in runs
    ]
    return beside_their_training_runs(summaries)


def beside_their_training_runs(runs: Sequence[RunSummary]) -> list[RunSummary]:
    """Each evaluation right after the training run it evaluates (when that run is listed), else in order."""
    listed = {r.run_id for r in runs}
    placed = {r.run_id for r in runs if r.kind == "eval" and r.tags.get(EVALUATES_TAG) in listed}
    ordered: list[RunSummary] = []
    for run in runs:
        if run.run_id in placed:
            continue
        ordered.append(run)
        ordered += [e for e in runs if e.run_id in placed and e.tags.get(EVALUATES_TAG) == run.run_id]
    return ordered


def differing_params(runs: Sequence[RunSummary]) -> list[str]:
    keys = sorted({k for r in runs for k in r.params})
    return [k for k in keys if len({r.params.get(k) for r in runs}) > 1]


def format_table(runs: Sequence[RunSummary]) -> str:
    params = differing_params(runs) if len(runs) > 1 else []
    header = ["run", "kind", "views", "status", *params, *(m[0] for m in KEY_METRICS)]
    rows = [header]
    names = {r.run_id: r.name for r in runs}
    for r in runs:
        values = [r.metric(train_key, eval_key) for _, train_key, eval_key in KEY_METRICS]
        metric_cells = [f"{v:.3f}" if v is not None else "-" for v in values]
        evaluates = r.tags.get(EVALUATES_TAG)
        name = f"  {r.name} (of {names[evaluates]})" if r.kind == "eval" and evaluates in names else r.name
        rows.append([name, r.kind, r.views, r.status, *[r.params.get(p, "-") for p in params], *metric_cells])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if len(runs) > 1 and not params:
        lines.append("(all runs have identical parameters)")
    return "\n".join(lines)


def plot_curves(client, runs: Sequence[RunSummary], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, metrics in CURVES.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        plotted = False
        for run in runs:
            for metric in metrics:
                history = sorted(client.get_metric_history(run.run_id, metric), key=lambda m: m.step)
                if history:
                    ax.plot([m.step for m in history], [m.value for m in history], label=f"{run.name} {metric}")
                    plotted = True
        ax.set_xlabel("step")
        ax.set_ylabel(" / ".join(metrics))
        if plotted:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data logged", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_scores(runs: Sequence[RunSummary], out_dir: Path) -> Path:
    """One bar per run: its final video top-1 (training runs: the last validation; evaluations: theirs), labelled
    with its kind and views, so an evaluation's number stands beside its training run's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    scored = [(r, r.metric("val/video_top1", "eval/video_top1")) for r in runs]
    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.4 * max(len(scored), 1)))
    labels = [f"{r.name} ({r.kind}, {r.views})" for r, _ in scored]
    values = [v if v is not None else 0.0 for _, v in scored]
    colors = ["tab:orange" if r.kind == "eval" else "tab:blue" for r, _ in scored]
    bars = ax.barh(range(len(scored)), values, color=colors)
    for bar, (_, value) in zip(bars, scored):
        ax.text(bar.get_width() + 0.5, bar.get_y() + bar.get_height() / 2, "-" if value is None else f"{value:.1f}",
                va="center", fontsize="small")
    ax.set_yticks(range(len(scored)), labels, fontsize="small")
    ax.invert_yaxis()  # the table's order, top to bottom
    ax.set_xlim(0, 105)
    ax.set_xlabel("video top-1 (%)")
    fig.tight_layout()
    path = out_dir / SCORES_PNG
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--runs", nargs="*", help="run ids or run names (default: all runs of the experiment)")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI")
    parser.add_argument("--out", type=Path, default=Path("compare"), help="folder for the PNG plots")
    args = parser.parse_args(argv)
    client = _client(args.tracking_uri)
    runs = load_runs(client, args.experiment, args.runs)
    if not runs:
        print(f"experiment {args.experiment!r} has no runs")
        return 1
    print(format_table(runs))
    for path in [*plot_curves(client, runs, args.out), plot_scores(runs, args.out)]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
