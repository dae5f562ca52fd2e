"""One split of a CVDF Kinetics release, end to end: list, download and extract the parts in parallel,
apply Kinetics-400's replacements, write the annotation CSV, report.

The output folder `out` ends up as `preprocessing kinetics` reads it:

    out/annotations/{split}.csv        the split's annotations (and train.csv, whose labels fix the
                                       class indices of every split)
    out/{split}/{part}/...             the videos of each part, one folder a part
    out/_download/                     the downloader's own state: part lists, archives being
                                       fetched (.part), staging folders, one record a part

One folder a part is what makes a run resumable and a kill harmless: a part's folder appears (by a
rename) only once the whole part is extracted, and its existence means "done", so a rerun fetches
and extracts only the parts without one, continuing a half-fetched archive where it stopped. Archives
are deleted once extracted (`keep_archives` keeps them): the release is hundreds of GB, and keeping
both copies doubles that.
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
import shutil
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import requests
from tqdm import tqdm

from core.errors import one_line
from core.redact import redact_url
from preprocessing import __version__
from preprocessing.download.annotations import file_list_to_csv, write_atomically
from preprocessing.download.extract import ArchiveError, Extracted, extract_part
from preprocessing.download.fetch import FetchConfig, FetchError, fetch
from preprocessing.download.release import (DEFAULT_BASE_URL, SPLITS, Release, check_base_url, parse_part_list,
                                            part_name, part_stem)  # fmt: skip

log = logging.getLogger(__name__)
STATE_DIR = "_download"


@dataclass(frozen=True)
class DownloadJob:
    """What to download and where. `jobs`: parts fetched and extracted at the same time."""

    release: Release
    split: str
    out: str
    base_url: str = DEFAULT_BASE_URL
    jobs: int = 4
    progress: bool = True
    keep_archives: bool = False
    fetch: FetchConfig = field(default_factory=FetchConfig)


@dataclass
class DownloadReport:
    """What a run did. `failed`: one line per part that is not extracted (a rerun retries it);
    `refused`: members not extracted, by reason (listed in each part's record)."""

    out: str
    split: str
    parts: int = 0
    already_done: int = 0
    extracted: int = 0
    files: int = 0
    refused: Counter = field(default_factory=Counter)
    replaced: int = 0
    failed: list[str] = field(default_factory=list)
    replacement_error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and self.replacement_error is None

    def summary(self) -> list[str]:
        parts = f"{self.parts} part{'' if self.parts == 1 else 's'}"
        lines = [f"{self.split}: {parts} = {self.already_done} already done + {self.extracted} extracted "
                 f"+ {len(self.failed)} failed; {self.files} files written"
                 + (f", {self.replaced} replaced by the release's replacements" if self.replaced else "")]
        if self.refused:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.refused.most_common())
            lines.append(f"refused members (not extracted): {reasons}; listed in "
                         f"{os.path.join(self.out, STATE_DIR, self.split, 'records')}")  # fmt: skip
        lines += [f"FAILED {line}" for line in self.failed]
        if self.replacement_error:
            lines.append(f"FAILED replacements: {self.replacement_error}")
        return lines


def run_download(job: DownloadJob) -> DownloadReport:
    """Download and extract one split (see the module docstring). ValueError for bad input found
    before the parts are fetched (URL, split, part list, annotations); part failures are in the report."""
    if job.split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {job.split!r}")
    base_url = check_base_url(job.base_url)
    state = os.path.join(job.out, STATE_DIR, job.split)
    os.makedirs(state, exist_ok=True)
    sessions = _Sessions()
    list_url = job.release.part_list_url(base_url, job.split)
    list_path = os.path.join(state, part_name(list_url))
    _fetch_small(sessions.get(), list_url, list_path, job.fetch)
    with open(list_path, encoding="utf-8", errors="replace") as f:
        urls = parse_part_list(f.read(), redact_url(list_url))
    write_annotations(job, base_url, sessions.get())
    report = DownloadReport(job.out, job.split, parts=len(urls))
    plan = _plan_parts(urls)
    with tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{job.release.name} {job.split}",
              disable=not job.progress, dynamic_ncols=True) as bar:  # fmt: skip
        _run_parts(job, plan, state, sessions, report, _Bar(bar))
    if job.release.replacement:
        try:
            report.replaced = apply_replacements(job, base_url, sessions.get())
        except ValueError as exc:
            report.replacement_error = str(exc)
    return report


@dataclass(frozen=True)
class _Part:
    url: str
    name: str  # local archive name
    stem: str  # its folder under out/{split}/


def _plan_parts(urls: list[str]) -> list[_Part]:
    """Local names for the parts; two URLs with the same last segment get distinct folders."""
    seen: Counter = Counter()
    plan = []
    for url in urls:
        name = part_name(url)
        stem = part_stem(name)
        seen[stem] += 1
        if seen[stem] > 1:
            stem = f"{stem}_{seen[stem]}"
            name = f"{stem}.tar.gz"
        plan.append(_Part(url, name, stem))
    return plan


def _run_parts(job: DownloadJob, plan: list[_Part], state: str, sessions: _Sessions, report: DownloadReport,
               bar: _Bar) -> None:  # fmt: skip
    videos = os.path.join(job.out, job.split)
    os.makedirs(videos, exist_ok=True)
    todo = []
    for part in plan:
        if os.path.isdir(os.path.join(videos, part.stem)):
            report.already_done += 1
            _count_record(state, part, videos, report)
        else:
            todo.append(part)
    shutil.rmtree(os.path.join(state, "staging"), ignore_errors=True)  # what a killed run was extracting
    bar.parts(report.already_done, len(plan))
    if not todo:
        return
    pool = ThreadPoolExecutor(max_workers=job.jobs, thread_name_prefix="download")
    futures = {pool.submit(_one_part, job, part, state, videos, sessions, bar): part for part in todo}
    try:
        _collect(futures, report, bar, len(plan))
    except BaseException:  # Ctrl-C: stop the other downloads at their next chunk instead of finishing them
        bar.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()


def _collect(futures: dict, report: DownloadReport, bar: _Bar, parts: int) -> None:
    for future in as_completed(futures):
        part = futures[future]
        try:
            extracted = future.result()
        except (FetchError, ArchiveError) as exc:
            report.failed.append(f"{part.name}: {exc}")
        except OSError as exc:  # our disk: full, unwritable
            report.failed.append(f"{part.name}: {one_line(exc)}")
        else:
            report.extracted += 1
            report.files += extracted.files
            report.refused.update(_refusal_kind(r.reason) for r in extracted.refused)
        bar.parts(report.already_done + report.extracted + len(report.failed), parts)


def _one_part(job: DownloadJob, part: _Part, state: str, videos: str, sessions: _Sessions, bar: _Bar) -> Extracted:
    archives = os.path.join(state, "parts")
    os.makedirs(archives, exist_ok=True)
    archive = os.path.join(archives, part.name)
    fetch(sessions.get(), part.url, archive, job.fetch, progress=bar.update, announce_total=bar.grow)
    try:
        extracted = extract_part(archive, os.path.join(videos, part.stem), os.path.join(state, "staging", part.stem))
    except ArchiveError:
        os.remove(archive)  # a rerun fetches it again: the copy here may be what is broken
        raise
    _write_record(state, part, extracted)
    if not job.keep_archives:
        os.remove(archive)
    return extracted


def _refusal_kind(reason: str) -> str:
    """What the report counts a refused member under: its reason without the member's particulars
    ("symbolic link (to '/etc')" -> "symbolic link")."""
    return reason.split(" (")[0]


def _write_record(state: str, part: _Part, extracted: Extracted) -> None:
    record = {"part": part.name, "url": redact_url(part.url), "files": extracted.files,
              "refused": [{"member": r.name, "reason": r.reason} for r in extracted.refused],
              "tool_version": __version__}  # fmt: skip
    write_atomically(os.path.join(state, "records", f"{part.stem}.json"), json.dumps(record, indent=1) + "\n")


def _count_record(state: str, part: _Part, videos: str, report: DownloadReport) -> None:
    """Add a finished part's figures to the report; a part whose record a kill lost is counted from disk."""
    path = os.path.join(state, "records", f"{part.stem}.json")
    try:
        with open(path) as f:
            record = json.load(f)
        report.files += int(record["files"])
        report.refused.update(_refusal_kind(r["reason"]) for r in record["refused"])
    except (OSError, ValueError, KeyError, TypeError):
        files = sum(len(names) for _, _, names in os.walk(os.path.join(videos, part.stem)))
        report.files += files
        _write_record(state, part, Extracted(files=files))


def write_annotations(job: DownloadJob, base_url: str, session: requests.Session) -> None:
    """`out/annotations/{split}.csv`, and `train.csv` too for another split: `preprocessing kinetics`
    takes its class indices from the train CSV beside the split's, so every split gets the same ones."""
    folder = os.path.join(job.out, "annotations")
    for split in dict.fromkeys((job.split, "train")):
        target = os.path.join(folder, f"{split}.csv")
        if os.path.isfile(target):
            continue
        url = job.release.annotation_url(base_url, split)
        if split not in job.release.txt_annotations:
            _fetch_small(session, url, target, job.fetch)
            continue
        raw = os.path.join(job.out, STATE_DIR, "annotations", f"{split}.txt")
        _fetch_small(session, url, raw, job.fetch)
        with open(raw, encoding="utf-8", errors="replace") as f:
            text, converted = file_list_to_csv(f.read(), split, redact_url(url))
        if converted.skipped:
            log.warning("download: %s: %d of %d lines name no labelled clip and are left out (e.g. %s)",
                        redact_url(url), converted.skipped, converted.rows + converted.skipped,
                        list(converted.examples))  # fmt: skip
        write_atomically(target, text)


def apply_replacements(job: DownloadJob, base_url: str, session: requests.Session) -> int:
    """Kinetics-400's replacement videos overwrite the split's files of the same name; returns how many
    were replaced. The archive is fetched and extracted once for all splits; a file that already holds
    the replacement's bytes is left alone, so a rerun replaces nothing twice. Each file is replaced by
    a rename, never left half-written."""
    url = job.release.replacement_url(base_url)
    assert url is not None
    root = os.path.join(job.out, STATE_DIR, "replacement")
    archive = os.path.join(root, part_name(url))
    files = os.path.join(root, part_stem(part_name(url)))
    if not os.path.isdir(files):
        os.makedirs(root, exist_ok=True)
        with tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="replacements",
                  disable=not job.progress, dynamic_ncols=True) as bar:  # fmt: skip
            progress = _Bar(bar)
            _fetch_small(session, url, archive, job.fetch, progress)
        try:
            extract_part(archive, files, os.path.join(root, "staging"))
        except ArchiveError as exc:
            os.remove(archive)
            raise ValueError(f"the replacement archive {redact_url(url)}: {exc}") from None
    replacements = {}
    for folder, _, names in os.walk(files):
        for name in names:
            replacements.setdefault(name, os.path.join(folder, name))
    replaced = 0
    for folder, _, names in os.walk(os.path.join(job.out, job.split)):
        for name in names:
            source = replacements.get(name)
            target = os.path.join(folder, name)
            if source is None or filecmp.cmp(source, target, shallow=False):
                continue
            staging = f"{target}.replacing"
            shutil.copyfile(source, staging)
            os.replace(staging, target)
            replaced += 1
    return replaced


def _fetch_small(session: requests.Session, url: str, path: str, config: FetchConfig, bar: _Bar | None = None) -> None:
    """A list, an annotation file or the replacements: a failure here fails the whole run (ValueError)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fetch(session, url, path, config, bar.update if bar else None, bar.grow if bar else None)
    except FetchError as exc:
        raise ValueError(str(exc)) from None


class _Sessions:
    """One requests.Session per thread: a Session is not documented as thread-safe."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers["User-Agent"] = f"mvit-preprocess/{__version__} (+kinetics downloader)"
        return session


class _Bar:
    """The byte progress bar, grown as servers announce sizes, updated from every download thread."""

    def __init__(self, bar: tqdm) -> None:
        self._bar = bar
        self._lock = threading.Lock()
        self.stop = threading.Event()  # set on Ctrl-C: every download ends at its next chunk

    def update(self, n: int) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        with self._lock:
            self._bar.update(n)

    def grow(self, n: int) -> None:
        with self._lock:
            self._bar.total = (self._bar.total or 0) + n
            self._bar.refresh()

    def parts(self, done: int, total: int) -> None:
        with self._lock:
            self._bar.set_postfix_str(f"{done}/{total} parts", refresh=True)
