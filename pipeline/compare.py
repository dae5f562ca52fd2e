"""Compare the runs of an experiment: ``python -m pipeline.compare --experiment NAME [--runs ID ...]``.

Prints one row per run with only the parameters that differ between the runs (the shared ones would
only hide the difference) and the key metrics, and writes PNG plots of the loss and accuracy curves.
Works against any MLflow tracking URI: the local SQLite store the demo writes, or a tracking server.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

KEY_METRICS = ("val/video_top1", "val/video_top5", "val/view_top1", "train/loss", "train/clips_per_s")
CURVES = {"loss.png": ("train/loss",), "accuracy.png": ("val/video_top1", "val/view_top1")}


@dataclass
class RunSummary:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]


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
    return [
        RunSummary(r.info.run_id, r.info.run_name or r.info.run_id[:8], r.info.status, dict(r.data.params),
                   dict(r.data.metrics))
        for r in runs
    ]


def differing_params(runs: Sequence[RunSummary]) -> list[str]:
    keys = sorted({k for r in runs for k in r.params})
    return [k for k in keys if len({r.params.get(k) for r in runs}) > 1]


def format_table(runs: Sequence[RunSummary]) -> str:
    params = differing_params(runs) if len(runs) > 1 else []
    header = ["run", "status", *params, *KEY_METRICS]
    rows = [header]
    for r in runs:
        metric_cells = [f"{r.metrics[m]:.3f}" if m in r.metrics else "-" for m in KEY_METRICS]
        rows.append([r.name, r.status, *[r.params.get(p, "-") for p in params], *metric_cells])
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
    for path in plot_curves(client, runs, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
