"""Entry point of a training job (the driver).

    ray job submit --address ... --working-dir . -- python pipeline/train.py --config configs/experiment/demo.yaml
    python pipeline/train.py --config configs/experiment/demo.yaml trainer.epochs=3   # starts a local Ray
    python -m pipeline.train ...    or    mvit-train ...                              # the same

The work is done by ``pipeline.trainer.job``. Run as a script, Python puts ``pipeline/`` first on
``sys.path``; ``import pipeline`` still resolves to the checkout through the installed project (or,
in a Ray job, through the working directory that Ray puts on ``PYTHONPATH``), and no module in
``pipeline/`` has the name of an installed top-level module (``tests/test_layout.py``).
"""

import sys

from pipeline.trainer.job import main

if __name__ == "__main__":
    sys.exit(main())
