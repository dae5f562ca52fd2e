"""How often x264's MB-tree bug changes an encode, and whether the regression test catches it.

x264's macroblock-tree rate control (core 165, bundled with PyAV) reads uninitialised stack memory in
its SIMD code, so with it on the same clip can encode to different bytes when the heap layout differs
(preprocessing/transcode.py turns it off: ``mbtree=0``). This runs the regression test's own churn loop
(tests/preprocessing/churn.py: 8 clips, ``CHURN_ROUNDS`` rounds, each a new order and a growing heap),
each run in a fresh process as pytest would, with MB-tree on (the bug back) for ``--runs`` seeds and
with the shipped settings once, and prints per run the encodes that differ from their clip's usual
output and whether the test would have failed.

    python benchmarks/x264_churn.py              # 5 runs with the bug back + 1 shipped (~4 min on 2 cores)
    python benchmarks/x264_churn.py --runs 10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def one_run(params: str, rounds: int, seed: int) -> dict:
    """The test's loop with ``X264_PARAMS = params``, in this process: odd encodes out of all."""
    import preprocessing.transcode as transcode
    from tests.preprocessing.churn import churn_clips, churn_encodes, odd_encodes

    transcode.X264_PARAMS = params
    with tempfile.TemporaryDirectory(prefix="mvit-x264-churn-") as tmp:
        clips = churn_clips(Path(tmp))
        started = time.monotonic()
        odd = odd_encodes(churn_encodes(clips, rounds, seed=seed))
        total = rounds * len(clips)
    return {"params": params, "seed": seed, "odd": odd, "encodes": total, "s_per_encode": (time.monotonic() - started) / total}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs (seeds 0..N-1) with MB-tree on (default 5)")
    parser.add_argument("--_one", nargs=3, metavar=("PARAMS", "ROUNDS", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        print(json.dumps(one_run(args._one[0], int(args._one[1]), int(args._one[2]))))
        return 0
    from preprocessing.transcode import X264_PARAMS
    from tests.preprocessing.churn import CHURN_ROUNDS

    plan = [("mbtree=1", seed) for seed in range(args.runs)] + [(X264_PARAMS, 0)]
    caught = 0
    for params, seed in plan:
        done = subprocess.run([sys.executable, __file__, "--_one", params, str(CHURN_ROUNDS), str(seed)],
                              capture_output=True, text=True, check=True, cwd=REPO)
        run = json.loads(done.stdout.strip().splitlines()[-1])
        bug_back = params != X264_PARAMS
        caught += bug_back and run["odd"] > 0
        print(f"{'MB-tree on (bug back)' if bug_back else f'shipped ({params})'}, seed {seed}: {run['odd']} of "
              f"{run['encodes']} encodes differ from their clip's usual output; the test would "
              f"{'FAIL' if run['odd'] else 'pass'} ({run['s_per_encode']:.2f} s an encode)", flush=True)
    print(f"the test's loop ({CHURN_ROUNDS} rounds of 8 encodes) caught the bug in {caught} of {args.runs} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
