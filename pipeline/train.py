"""Entry point of a training job.

    ray job submit --address ... --working-dir . -- python pipeline/train.py --config configs/experiment/demo.yaml
    python pipeline/train.py --config configs/experiment/demo.yaml trainer.epochs=3   # starts a local Ray

The work is done by ``pipeline.train.job`` (this file only makes the checkout importable when run
as a script, e.g. from the working directory Ray uploads for a job).
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, Python puts pipeline/ itself on sys.path; put the checkout root there instead so
    # `import pipeline` finds this checkout and no module in pipeline/ shadows a top-level name.
    here = Path(__file__).resolve().parent
    sys.path = [str(here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != here]
    from pipeline.train.job import main

    sys.exit(main())
