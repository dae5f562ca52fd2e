"""Reliability cases, wherever they live: the case table of docs/reliability.md and the ``ledger``.

A *case* is a test of ``tests/reliability/`` or any test marked ``@pytest.mark.reliability`` (the node
faults of ``tests/cluster/test_node_loss.py``). Its docstring's first line states the expected behaviour;
a run prints a summary at the end (cases tried, passed, samples lost, secrets leaked) and, when
``RELIABILITY_REPORT`` names a file, writes the Markdown table of cases and results that
``docs/reliability.md`` carries:

- ``RELIABILITY_REPORT=docs/reliability.md`` (a file with the ``reliability-cases`` markers): the summary
  line and the table replace what lies between the markers; the rest of the page is kept;
- ``RELIABILITY_REPORT=-``: the table is printed with the summary instead of written;
- any other file: it is overwritten with the table alone.

Cases that move samples through the system account for them with the ``ledger`` fixture: every input is
either delivered exactly once or recorded as a rejection with a reason; anything else is a lost sample.
A training job's samples are not seen one by one from outside, so a job case accounts for each epoch
through the counts and the key-identity check the job itself logs (``Ledger.account_epochs``); the
summary's "samples lost" sums both kinds. Cases that check outputs for planted secrets account for them
with ``Ledger.account_text``: every planted value found in an output counts as a secret leaked. The hooks
are installed by ``tests/conftest.py``, so they see every test of the suite.

The table carries the commit the cases ran on; ``tests/test_docs_cases.py`` fails when the table in
docs/reliability.md and the cases the suite collects disagree (a case added, renamed, removed or
re-described without the page being regenerated).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

_SUITE_DIR = Path(__file__).parent / "reliability"


@dataclass
class _Case:
    nodeid: str
    expected: str
    outcome: str = "not run"
    lost: int = 0
    duplicated: int = 0
    leaked: int = 0


@dataclass
class _Suite:
    cases: dict[str, _Case] = field(default_factory=dict)

    def case(self, item: pytest.Item) -> _Case:
        if item.nodeid not in self.cases:
            doc = (getattr(item, "function", None).__doc__ or "").strip().splitlines()
            self.cases[item.nodeid] = _Case(item.nodeid, doc[0].strip() if doc else item.name)
        return self.cases[item.nodeid]


_SUITE = _Suite()


class Ledger:
    """Counts, for one case, samples that went in against samples delivered and samples rejected, and
    planted secrets found in what the system printed, logged or stored."""

    def __init__(self, case: _Case) -> None:
        self._case = case

    def account(self, inputs: Iterable[str], delivered: Iterable[str], rejected: Iterable[str] = ()) -> None:
        """Records the case's loss and duplication, then asserts both are zero.

        ``inputs`` are the ids that went in, ``delivered`` every id that came out (one entry per delivery),
        ``rejected`` the ids recorded as rejected. An input neither delivered nor rejected is lost; one
        delivered twice, or both delivered and rejected, is duplicated.
        """
        inputs, rejected = set(inputs), list(rejected)
        counts = Counter(delivered)
        counts.update(rejected)
        lost = sorted(inputs - set(counts))
        duplicated = sorted(k for k, n in counts.items() if n > 1)
        unknown = sorted(set(counts) - inputs)
        self._case.lost += len(lost)
        self._case.duplicated += len(duplicated)
        assert not lost, f"{len(lost)} samples lost: {lost[:10]}"
        assert not duplicated, f"{len(duplicated)} samples delivered more than once: {duplicated[:10]}"
        assert not unknown, f"samples that were never inputs came out: {unknown[:10]}"

    def account_epochs(self, split: int, client: Any, run_id: str, epochs: int) -> None:
        """Records a training job's loss and duplication from its MLflow run, then asserts both are zero.

        Per epoch the job logs ``data/samples`` (delivered) and ``data/failed`` (counted FAILED with a
        reason) and ``data/identity_checked`` (1: the keys of both add up to the manifest's digest of the
        split, so no sample was delivered twice in place of another). ``split`` samples went in each
        epoch; fewer out is a loss, more is a duplication, and an epoch whose identity was not checked
        cannot be accounted (the assertion says so). An epoch logged twice (a restart between its end
        and its checkpoint) is counted once, by its last record.
        """
        series = {name: _last_per_step(client.get_metric_history(run_id, f"data/{name}"))
                  for name in ("samples", "failed", "identity_checked")}  # fmt: skip
        assert all(len(values) == epochs for values in series.values()), (epochs, series)
        lost = duplicated = 0
        for epoch, (samples, failed, checked) in enumerate(zip(*series.values())):
            out = int(samples + failed)
            lost, duplicated = lost + max(0, split - out), duplicated + max(0, out - split)
            assert checked == 1.0, f"epoch {epoch}: its samples' identity was not checked, so they cannot be accounted"
        self._case.lost += lost
        self._case.duplicated += duplicated
        assert not lost and not duplicated, f"{lost} samples lost, {duplicated} duplicated over {epochs} epochs: {series}"


    def account_text(self, outputs: Mapping[str, str | bytes], secrets: Mapping[str, str]) -> None:
        """Records the secrets leaked into ``outputs``, then asserts there are none.

        ``outputs`` maps where each text came from (``stderr of train.py``, ``MLflow tags``) to the text;
        ``secrets`` maps a name for each planted secret to its value. Every (secret, output) pair with the
        value in the output is one leak; the assertion names them, never the values.
        """
        assert outputs and secrets, "nothing was checked"
        leaks = sorted(f"{name} in {where}" for where, text in outputs.items() for name, value in secrets.items()
                       if (value.encode() if isinstance(text, bytes) else value) in text)
        self._case.leaked += len(leaks)
        assert not leaks, f"{len(leaks)} secrets leaked: {leaks}"


def _last_per_step(history: Iterable[Any]) -> list[float]:
    by_step: dict[int, Any] = {}
    for metric in sorted(history, key=lambda m: (m.step, m.timestamp)):
        by_step[metric.step] = metric
    return [by_step[step].value for step in sorted(by_step)]


@pytest.fixture
def ledger(request: pytest.FixtureRequest) -> Ledger:
    return Ledger(_SUITE.case(request.node))


def _in_suite(item: pytest.Item) -> bool:
    return Path(str(item.path)).is_relative_to(_SUITE_DIR) or item.get_closest_marker("reliability") is not None


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects: ``pytest -m reliability tests`` runs every case
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _in_suite(item):
            item.add_marker("reliability")
            _SUITE.case(item)


def pytest_collection_finish(session: pytest.Session) -> None:
    """``RELIABILITY_CASES_JSON=FILE``: every collected case (node id, expected) as JSON, for the test that
    compares the docs' table with the suite (``pytest --collect-only -m reliability tests``)."""
    dump = os.environ.get("RELIABILITY_CASES_JSON")
    if dump:
        import json

        Path(dump).write_text(json.dumps([[c.nodeid, c.expected] for c in _SUITE.cases.values()], indent=0))


def table_rows(table: str) -> dict[tuple[str, str], tuple[str, int, int]]:
    """(area, case) -> (expected, passed, variants) of each row of a case table as ``_table`` writes it."""
    import re

    rows = {}
    for line in table.splitlines():
        found = re.fullmatch(r"\| (.+?) \| `(.+?)` \| (.*) \| (\d+)/(\d+)\b.*\|", line.strip())
        if found:
            area, case, expected, passed, variants = found.groups()
            rows[(area, case)] = (expected, int(passed), int(variants))
    return rows


def cases_table(cases: list[tuple[str, str]]) -> str:
    """The table ``_table`` writes for (node id, expected) cases that have not run."""
    return _table([_Case(nodeid, expected) for nodeid, expected in cases])


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    case = _SUITE.cases.get(report.nodeid)
    if case is None:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        case.outcome = "skipped" if report.skipped else ("passed" if report.passed else "FAILED")
    elif report.when == "teardown" and report.failed:
        case.outcome = "FAILED"


def _table(cases: list[_Case]) -> str:
    """One row per test function; a parametrized case counts its variants (e.g. 42 bad config values)."""
    groups: dict[tuple[str, str], list[_Case]] = {}
    for case in cases:
        path, name = case.nodeid.split("::", 1)
        groups.setdefault((Path(path).stem.removeprefix("test_"), name.split("[", 1)[0]), []).append(case)
    rows = ["| area | case | expected | passed |", "|---|---|---|---|"]
    for (module, name), members in groups.items():
        passed = sum(c.outcome == "passed" for c in members)
        not_run = sum(c.outcome in ("not run", "skipped") for c in members)
        result = f"{passed}/{len(members)}" + (" **FAILED**" if passed + not_run < len(members) else "") + (
            f" ({not_run} not run)" if not_run else "")
        rows.append(f"| {module.replace('_', ' ')} | `{name.removeprefix('test_')}` | {members[0].expected} | {result} |")
    return "\n".join(rows) + "\n"


def _summary(cases: list[_Case]) -> str:
    tried = [c for c in cases if c.outcome not in ("not run", "skipped")]
    passed = sum(c.outcome == "passed" for c in cases)
    failed = sum(c.outcome == "FAILED" for c in cases)
    return (f"cases tried: {len(tried)}, passed: {passed}, failed: {failed}, not run: {len(cases) - len(tried)}, "
            f"samples lost: {sum(c.lost for c in cases)}, samples duplicated: {sum(c.duplicated for c in cases)}, "
            f"secrets leaked: {sum(c.leaked for c in cases)}\n"
            f"commit: {_commit()}")


def _commit() -> str:
    """The commit the cases ran on, ``+ uncommitted changes`` when the tree differs from it."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    git = lambda *args: subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)  # noqa: E731
    head = git("rev-parse", "--short=12", "HEAD")
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")


REPORT_BEGIN, REPORT_END = "<!-- reliability-cases:begin -->", "<!-- reliability-cases:end -->"


def with_report(page: str, summary: str, table: str) -> str | None:
    """``page`` with the summary line (as a code block) and the case table between the markers, replacing
    what was there; None when the page has no markers."""
    start, end = page.find(REPORT_BEGIN), page.find(REPORT_END)
    if start < 0 or end < start:
        return None
    block = f"```\n{summary}\n```\n\n{table}"
    return page[: start + len(REPORT_BEGIN)] + "\n" + block + page[end:]


def write_report(report: str, cases: list[_Case]) -> str:
    """Writes (or prints, for ``-``) the case table where ``RELIABILITY_REPORT`` says; returns what was done."""
    table = _table(cases)
    if report == "-":
        return table
    path = Path(report)
    page = path.read_text() if path.is_file() else ""
    updated = with_report(page, _summary(cases), table)
    path.write_text(table if updated is None else updated)
    return f"case table written to {report}" + ("" if updated is None else " (between its markers)")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001
    cases = list(_SUITE.cases.values())  # collected but not run (deselected, skipped) shown as such
    if all(c.outcome == "not run" for c in cases):
        return
    terminalreporter.section("reliability summary")
    terminalreporter.write_line(_summary(cases))
    report = os.environ.get("RELIABILITY_REPORT")
    if report:
        for line in write_report(report, cases).rstrip("\n").splitlines():
            terminalreporter.write_line(line)


