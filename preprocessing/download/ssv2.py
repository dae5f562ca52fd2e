"""`download ssv2`: Something-Something v2 cannot be fetched by a tool, so this says how to get it and
checks what a person downloaded.

Qualcomm distributes the release only after a licence is accepted on its site, behind a login, so
there is no URL to fetch; what a tool can do is say where to go and what to do with the files, then
verify the tree against its own JSON files (`preprocessing.ssv2.check_release`) before hours are
spent preprocessing an incomplete one.
"""

from __future__ import annotations

import os

RELEASE_PAGE = "https://developer.qualcomm.com/software/ai-datasets/something-something"


def instructions(out: str) -> str:
    """How to obtain the release into `out` (printed before any check)."""
    return f"""\
Something-Something v2 needs a licence accepted on Qualcomm's site, so it cannot be downloaded here:
  1. sign in at {RELEASE_PAGE} and accept the licence;
  2. download the video parts (20bn-something-something-v2-00 ... -19) and the labels package;
  3. extract them into {out}:
       cat 20bn-something-something-v2-?? | tar -xz -C {out}      # -> {out}/20bn-something-something-v2/{{id}}.webm
       then unzip the labels package so that its four something-something-v2-*.json files are in {out}/labels
  4. run this command again to check the tree, then:
       python -m preprocessing ssv2 --root {out} --split train --out SHARDS"""


def holds_release(out: str) -> bool:
    """Whether `out` has anything to check: a folder with at least one entry."""
    return os.path.isdir(out) and any(os.scandir(out))
