"""Entry point of `python -m preprocessing` and of the `mvit-preprocess` console script."""

import sys

from preprocessing.cli import main

if __name__ == "__main__":
    sys.exit(main())
