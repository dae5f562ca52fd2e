"""docs/reliability.md's case table is the suite's: regenerated whenever a case is added, renamed,
re-described or removed, and written by a run in which every case passed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.cases import REPORT_BEGIN, REPORT_END, cases_table, table_rows

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "reliability.md"


def test_the_reliability_page_lists_every_collected_case_as_passed(tmp_path: Path) -> None:
    dump = tmp_path / "cases.json"
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "reliability", "tests"],
        cwd=REPO, env={**os.environ, "RELIABILITY_CASES_JSON": str(dump)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    cases = json.loads(dump.read_text())
    assert len(cases) > 200, len(cases)
    want = {key: (expected, variants) for key, (expected, _, variants) in table_rows(cases_table(cases)).items()}

    page = PAGE.read_text()
    block = page[page.index(REPORT_BEGIN) : page.index(REPORT_END)]
    rows = table_rows(block)
    got = {key: (expected, variants) for key, (expected, _, variants) in rows.items()}
    regenerate = "regenerate it: RELIABILITY_REPORT=docs/reliability.md python -m pytest -m reliability tests"
    assert sorted(set(want) - set(got)) == [], f"cases missing from docs/reliability.md; {regenerate}"
    assert sorted(set(got) - set(want)) == [], f"docs/reliability.md lists cases the suite no longer has; {regenerate}"
    changed = {key: (got[key], want[key]) for key in want if got[key] != want[key]}
    assert not changed, f"(docs, suite) differ in description or variant count: {changed}; {regenerate}"

    # ... and the run that wrote it passed every case, on a commit that is named
    not_passed = {key: row for key, row in rows.items() if row[1] != row[2]}
    assert not not_passed, f"cases not passed in the run that wrote the page: {not_passed}"
    summary = re.search(r"cases tried: (\d+), passed: (\d+), failed: 0, not run: 0, samples lost: 0, "
                        r"samples duplicated: 0, secrets leaked: 0\ncommit: [0-9a-f]{12}", block)  # fmt: skip
    assert summary and summary[1] == summary[2] == str(len(cases)), block[:400]
