"""`--ray` runs shards as Ray tasks (here on a private local Ray instance) and writes the same bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from shard_helpers import cli_env, output_files, run_cli


@pytest.mark.slow
def test_ray_backend_matches_local_processes(kinetics_raw: Path, tmp_path: Path) -> None:
    common = ["kinetics", "--csv", str(kinetics_raw / "annotations" / "train.csv"), "--videos", str(kinetics_raw / "train"),
              "--short-side", "64", "--shard-samples", "3", "--no-progress"]  # fmt: skip
    # "local": a private Ray instance, never a cluster someone else runs on this machine.
    result = run_cli(*common, "--out", str(tmp_path / "ray"), "--ray", "local", env=cli_env())
    assert "Started a local Ray instance" in result.stderr
    run_cli(*common, "--out", str(tmp_path / "local"), "--workers", "2")
    assert output_files(tmp_path / "ray") == output_files(tmp_path / "local")
