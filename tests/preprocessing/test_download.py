"""`python -m preprocessing download` end to end against a CVDF-layout mirror served on 127.0.0.1.

The mirror is generated here: real small .tar.gz parts holding real H.264 clips from
preprocessing.synth, the `k*_path.txt` lists (absolute URLs of this server), the annotation files
(Kinetics-600's `.txt` file lists among them) and Kinetics-400's replacement archive. The server
honours Range requests and can throttle, drop connections mid-body and answer 503, so resume and
retries are exercised for real. Nothing but 127.0.0.1 is contacted: proxies are switched off.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from preprocessing import cli
from preprocessing.download.annotations import file_list_to_csv
from preprocessing.download.extract import ArchiveError, extract_part
from preprocessing.download.release import parse_part_list
from preprocessing.synth import SynthKinetics, synth_kinetics
from tests.preprocessing.shard_helpers import REPO, cli_env, read_manifest, read_rejects, run_cli

FAST = ["--no-progress", "--backoff", "0.02", "--retries", "4", "--timeout", "5"]
CORRUPTED = 0  # index (in sorted order) of the train clip the mirror ships corrupted, and replaces


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests honours *_PROXY variables: with one set, a request for 127.0.0.1 could leave the machine."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")


# ---- the mirror and its server ---------------------------------------------------------------


class Mirror(ThreadingHTTPServer):
    """Serves `root` with Range support. `throttle`: bytes per second; `drops[path]`: responses of that
    path still to be cut off halfway; `errors[path]`: 503s still to answer; `requests`: (path, Range)."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.throttle: float | None = None
        self.drops: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.ignore_range: set[str] = set()  # paths answered 200 (whole file) whatever Range asks
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Mirror

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = unquote(self.path.split("?")[0])
        with self.server.lock:
            self.server.requests.append((path, self.headers.get("Range")))
            fail = self.server.errors.get(path, 0) > 0
            drop = self.server.drops.get(path, 0) > 0
            if fail:
                self.server.errors[path] -= 1
            elif drop:
                self.server.drops[path] -= 1
        file = (self.server.root / path.lstrip("/")).resolve()
        if fail:
            self.send_error(503)
            return
        if not file.is_file() or self.server.root.resolve() not in file.parents:
            self.send_error(404)
            return
        data = file.read_bytes()
        start = 0
        if self.headers.get("Range") and path not in self.server.ignore_range:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if drop:  # half the body, then the connection goes
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        step = 2048
        for i in range(0, len(body), step):
            self.wfile.write(body[i:i + step])
            if self.server.throttle:
                time.sleep(step / self.server.throttle)


@pytest.fixture
def serve():
    servers: list[Mirror] = []

    def start(root: Path) -> Mirror:
        server = Mirror(root)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _tar_gz(path: Path, files: dict[str, Path]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, source in files.items():
            tar.add(source, arcname=name)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small real clips in the CVDF flat layout: 2 classes, 3 train + 1 val each."""
    root = tmp_path_factory.mktemp("clips")
    synth_kinetics(SynthKinetics(str(root), classes=2, per_class=3, val_per_class=1, seconds=1, fps=10,
                                 width=64, height=48))  # fmt: skip
    return root


def _write_lists(mirror: Path, folder: str, tag: str, parts: dict[str, list[str]], url: str) -> None:
    for split, names in parts.items():
        lines = [f"{url}/{folder}/{split}/{name}" for name in names]
        (mirror / folder / split).mkdir(parents=True, exist_ok=True)
        (mirror / folder / split / f"k{tag}_{split}_path.txt").write_text("\n".join(lines) + "\n")


def build_k400(clips: Path, mirror: Path, url: str, padding: int = 0) -> None:
    """400/: train in two parts (one clip corrupted), val in one, the CSVs, the replacement archive.
    `padding`: random (incompressible) bytes added to part_0 as a non-video member, to make it slow."""
    train = sorted((clips / "train").iterdir())
    val = sorted((clips / "val").iterdir())
    corrupted = mirror.parent / "corrupted" / train[CORRUPTED].name
    corrupted.parent.mkdir(parents=True, exist_ok=True)
    corrupted.write_bytes(b"\x00not a video" * 200)
    shipped = [corrupted if i == CORRUPTED else p for i, p in enumerate(train)]
    first = {p.name: p for p in shipped[:3]}
    if padding:
        pad = mirror.parent / "padding" / "notes.bin"
        pad.parent.mkdir(parents=True, exist_ok=True)
        pad.write_bytes(random.Random(0).randbytes(padding))
        first[pad.name] = pad
    _tar_gz(mirror / "400/train/part_0.tar.gz", first)
    _tar_gz(mirror / "400/train/part_1.tar.gz", {p.name: p for p in shipped[3:]})
    _tar_gz(mirror / "400/val/part_0.tar.gz", {p.name: p for p in val})
    _tar_gz(mirror / "400/replacement_for_corrupted_k400.tgz",
            {f"replacement_for_corrupted_k400/{train[CORRUPTED].name}": train[CORRUPTED]})
    (mirror / "400/annotations").mkdir(parents=True, exist_ok=True)
    shutil.copy(clips / "annotations/train.csv", mirror / "400/annotations/train.csv")
    shutil.copy(clips / "annotations/validate.csv", mirror / "400/annotations/val.csv")
    _write_lists(mirror, "400", "400", {"train": ["part_0.tar.gz", "part_1.tar.gz"], "val": ["part_0.tar.gz"]}, url)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def _download(*args: str) -> int:
    return cli.main(["download", *args, *FAST])


# ---- cases -----------------------------------------------------------------------------------


def test_clean_run_then_preprocessing_kinetics_shards_it(clips: Path, tmp_path: Path, serve, capsys) -> None:
    server = serve(tmp_path / "mirror")
    build_k400(clips, tmp_path / "mirror", server.url)
    out = tmp_path / "k400"
    for split in ("train", "val"):
        assert _download("kinetics400", "--split", split, "--out", str(out), "--base-url", server.url) == 0
    printed = capsys.readouterr().out
    assert "train: 2 parts = 0 already done + 2 extracted + 0 failed; 6 files written, 1 replaced" in printed
    assert "val: 1 part = 0 already done + 1 extracted + 0 failed; 2 files written" in printed
    # the replacement overwrote the corrupted clip
    train = sorted((clips / "train").iterdir())
    assert (out / "train/part_0" / train[CORRUPTED].name).read_bytes() == train[CORRUPTED].read_bytes()
    assert (out / "annotations/val.csv").read_bytes() == (clips / "annotations/validate.csv").read_bytes()
    assert not list(out.glob("_download/*/parts/*")), "archives are deleted once extracted"

    shards = tmp_path / "shards"
    for split in ("train", "val"):
        run_cli("kinetics", "--csv", str(out / f"annotations/{split}.csv"), "--videos", str(out / split),
                "--out", str(shards), "--workers", "1", "--no-progress")  # fmt: skip
        manifest = read_manifest(shards, split)
        assert manifest["num_samples"] == (6 if split == "train" else 2), manifest
        assert read_rejects(shards, split) == []
    # a rerun finds everything done and fetches no part again
    before = len(server.requests)
    assert _download("kinetics400", "--split", "train", "--out", str(out), "--base-url", server.url) == 0
    assert "2 parts = 2 already done + 0 extracted" in capsys.readouterr().out
    assert not [p for p, _ in server.requests[before:] if p.endswith(".tar.gz")]


def test_interrupted_then_killed_halfway_then_resumed_equals_a_clean_run(clips: Path, tmp_path: Path,
                                                                        serve) -> None:  # fmt: skip
    """Ctrl-C (SIGINT) ends a run in one line with exit status 130; a SIGKILL leaves the `.part`; each
    rerun continues the part with a Range request, and the end result is a clean run's, byte for byte."""
    server = serve(tmp_path / "mirror")
    build_k400(clips, tmp_path / "mirror", server.url, padding=400_000)
    clean = tmp_path / "clean"
    assert _download("kinetics400", "--split", "train", "--out", str(clean), "--base-url", server.url) == 0

    server.throttle = 200_000  # bytes/s: part_0 takes 2 s
    out = tmp_path / "killed"
    partial = out / "_download/train/parts/part_0.tar.gz.part"
    ranges = []
    for sig, at in ((signal.SIGINT, 100_000), (signal.SIGKILL, 250_000)):
        seen = len(server.requests)
        process = subprocess.Popen(
            [sys.executable, "-m", "preprocessing", "download", "kinetics400", "--split", "train", "--out", str(out),
             "--base-url", server.url, "--jobs", "1", *FAST],
            cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not (partial.is_file() and partial.stat().st_size >= at):
            assert process.poll() is None and time.monotonic() < deadline, "the download ended before the signal"
            time.sleep(0.02)
        os.kill(process.pid, sig)
        _, err = process.communicate(timeout=15)
        if sig == signal.SIGINT:
            assert process.returncode == 130 and err.strip().splitlines()[-1].startswith("error: interrupted"), err
            assert "Traceback" not in err
        assert not (out / "train/part_0").exists(), "nothing of an unfinished part is under the video folder"
        ranges += [r for p, r in server.requests[seen:] if p == "/400/train/part_0.tar.gz"]

    server.throttle = None
    seen = len(server.requests)
    assert _download("kinetics400", "--split", "train", "--out", str(out), "--base-url", server.url) == 0
    ranges += [r for p, r in server.requests[seen:] if p == "/400/train/part_0.tar.gz"]
    assert ranges[0] is None and len(ranges) == 3, ranges
    assert all(r.startswith("bytes=") and int(r[6:-1]) >= 65536 for r in ranges[1:]), ranges
    assert _digests(out / "train") == _digests(clean / "train")
    assert (out / "annotations/train.csv").read_bytes() == (clean / "annotations/train.csv").read_bytes()


def test_resume_edge_cases_a_finished_part_file_and_a_server_ignoring_range(clips: Path, tmp_path: Path,
                                                                            serve) -> None:  # fmt: skip
    """A `.part` killed after its last byte is finished by the 416 answer to its range request; a server
    that ignores Range (200) gets the file restarted from zero, not appended to."""
    mirror = tmp_path / "mirror"
    server = serve(mirror)
    build_k400(clips, mirror, server.url)
    out = tmp_path / "k400"
    parts = out / "_download/train/parts"
    parts.mkdir(parents=True)
    (parts / "part_0.tar.gz.part").write_bytes((mirror / "400/train/part_0.tar.gz").read_bytes())
    (parts / "part_1.tar.gz.part").write_bytes(b"stale bytes of another file")
    server.ignore_range = {"/400/train/part_1.tar.gz"}
    assert _download("kinetics400", "--split", "train", "--out", str(out), "--base-url", server.url) == 0
    requests = sorted((p, r) for p, r in server.requests if p.endswith(".tar.gz"))
    assert requests == [("/400/train/part_0.tar.gz", f"bytes={(mirror / '400/train/part_0.tar.gz').stat().st_size}-"),
                        ("/400/train/part_1.tar.gz", "bytes=27-")]  # one request each
    clean = tmp_path / "clean"
    server.ignore_range = set()
    assert _download("kinetics400", "--split", "train", "--out", str(clean), "--base-url", server.url) == 0
    assert _digests(out / "train") == _digests(clean / "train")


def test_dropped_connections_and_5xx_are_retried(clips: Path, tmp_path: Path, serve, capsys) -> None:
    server = serve(tmp_path / "mirror")
    build_k400(clips, tmp_path / "mirror", server.url, padding=400_000)  # so that half a body is some chunks
    server.drops = {"/400/train/part_0.tar.gz": 2, "/400/train/part_1.tar.gz": 1}
    server.errors = {"/400/train/part_1.tar.gz": 2, "/400/train/k400_train_path.txt": 1}
    out = tmp_path / "k400"
    assert _download("kinetics400", "--split", "train", "--out", str(out), "--base-url", server.url) == 0
    assert "2 extracted + 0 failed; 7 files written" in capsys.readouterr().out
    ranges = [r for p, r in server.requests if p == "/400/train/part_0.tar.gz"]
    assert len(ranges) == 3 and ranges[0] is None and all(r and r.startswith("bytes=") for r in ranges[1:])
    assert server.drops == {"/400/train/part_0.tar.gz": 0, "/400/train/part_1.tar.gz": 0}

    # a server that keeps failing: one line per part, exit 1, nothing half-extracted
    server.errors = {"/400/val/part_0.tar.gz": 100}
    assert _download("kinetics400", "--split", "val", "--out", str(out), "--base-url", server.url) == 1
    printed = capsys.readouterr()
    assert "FAILED part_0.tar.gz:" in printed.out and "gave up after 4 tries" in printed.out
    assert "Traceback" not in printed.err and not list((out / "val").iterdir())


def test_truncated_archive_fails_that_part_only(clips: Path, tmp_path: Path, serve, capsys) -> None:
    mirror = tmp_path / "mirror"
    server = serve(mirror)
    build_k400(clips, mirror, server.url)
    part = mirror / "400/train/part_1.tar.gz"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    out = tmp_path / "k400"
    assert _download("kinetics400", "--split", "train", "--out", str(out), "--base-url", server.url) == 1
    printed = capsys.readouterr()
    assert "FAILED part_1.tar.gz: part_1.tar.gz is truncated or corrupt" in printed.out, printed.out
    assert "Traceback" not in printed.err
    assert (out / "train/part_0").is_dir() and not (out / "train/part_1").exists()
    assert not list((out / "_download/train").glob("staging/*")), "no staging folder left"
    assert not (out / "_download/train/parts/part_1.tar.gz").exists(), "the broken copy is dropped for a rerun"
    for junk in (b"not a gzip" * 100, gzip.compress(b"not a tar" * 100)):  # neither gzip nor tar inside
        (tmp_path / "junk.tar.gz").write_bytes(junk)
        with pytest.raises(ArchiveError, match="junk.tar.gz is truncated or corrupt"):
            extract_part(str(tmp_path / "junk.tar.gz"), str(tmp_path / "junk"), str(tmp_path / "staging"))
        assert not (tmp_path / "junk").exists() and not (tmp_path / "staging").exists()


def test_hostile_members_are_refused_and_recorded(clips: Path, tmp_path: Path, serve, capsys) -> None:
    mirror = tmp_path / "mirror"
    server = serve(mirror)
    good = sorted((clips / "val").iterdir())[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    (mirror / "700_2020/val").mkdir(parents=True)
    with tarfile.open(mirror / "700_2020/val/part_0.tar.gz", "w:gz") as tar:
        tar.add(good, arcname=good.name)
        payload = b"evil"

        def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            info.size = len(payload) if kind == tarfile.REGTYPE else 0
            info.devmajor, info.devminor = 1, 3
            tar.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)

        member("../../outside/escaped.mp4")
        member("../../../../../outside/escaped.mp4")  # from the staging folder: up to tmp_path, then outside/
        member(str(outside / "absolute.mp4"))
        member("link.mp4", tarfile.SYMTYPE, str(outside / "target"))
        member("hard.mp4", tarfile.LNKTYPE, good.name)
        member("null", tarfile.CHRTYPE)
        member("disk", tarfile.BLKTYPE)
        member("pipe", tarfile.FIFOTYPE)
        member("._" + good.name)
    (mirror / "700_2020/annotations").mkdir(parents=True)
    shutil.copy(clips / "annotations/validate.csv", mirror / "700_2020/annotations/val.csv")
    shutil.copy(clips / "annotations/train.csv", mirror / "700_2020/annotations/train.csv")
    _write_lists(mirror, "700_2020", "700_2020", {"val": ["part_0.tar.gz"]}, server.url)

    out = tmp_path / "k700"
    assert _download("kinetics700", "--split", "val", "--out", str(out), "--base-url", server.url) == 0
    printed = capsys.readouterr().out
    assert "1 files written" in printed and "refused members (not extracted):" in printed
    assert [p.name for p in (out / "val/part_0").iterdir()] == [good.name]
    assert list(outside.iterdir()) == [] and not list(tmp_path.rglob("escaped*"))
    record = (out / "_download/val/records/part_0.json").read_text()
    for reason in ("path with '..'", "absolute path", "symbolic link", "hard link", "device file", "fifo",
                   "macOS resource-fork"):  # fmt: skip
        assert reason in record, (reason, record)


def test_kinetics600_txt_annotations_and_class_named_parts(clips: Path, tmp_path: Path, serve, capsys) -> None:
    """K600's train/val annotations are `{label}/{clip}.mp4` lists, its parts named after classes (with
    spaces, unescaped in the list); the result is the CSV `preprocessing kinetics` reads."""
    mirror = tmp_path / "mirror"
    server = serve(mirror)
    rows = {split: list(csv.DictReader(open(clips / f"annotations/{name}.csv")))
            for split, name in (("train", "train"), ("val", "validate"))}  # fmt: skip
    parts: dict[str, list[str]] = {}
    for split, table in rows.items():
        by_label: dict[str, dict[str, Path]] = {}
        for row in table:
            clip = f"{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}.mp4"
            by_label.setdefault(row["label"], {})[f"{row['label']}/{clip}"] = clips / split / clip
        lines = [name for files in by_label.values() for name in files]
        (mirror / "600/annotations").mkdir(parents=True, exist_ok=True)
        (mirror / f"600/annotations/{split}.txt").write_text("\n".join(lines) + "\n")
        for label, files in by_label.items():
            _tar_gz(mirror / f"600/{split}/{label}.tar.gz", files)
        parts[split] = [f"{label}.tar.gz" for label in by_label]
    _write_lists(mirror, "600", "600", parts, server.url)
    assert " " in (mirror / "600/val/k600_val_path.txt").read_text()

    out = tmp_path / "k600"
    assert _download("kinetics600", "--split", "val", "--out", str(out), "--base-url", server.url) == 0
    assert "val: 2 parts = 0 already done + 2 extracted + 0 failed; 2 files written" in capsys.readouterr().out
    for split, table in rows.items():
        written = list(csv.DictReader(open(out / f"annotations/{split}.csv")))
        assert sorted((r["label"], r["youtube_id"], r["time_start"], r["time_end"], r["split"]) for r in written) \
            == sorted((r["label"], r["youtube_id"], r["time_start"], r["time_end"], r["split"]) for r in table)
    from preprocessing.kinetics import KineticsSource, discover

    found = discover(KineticsSource(str(out / "annotations/val.csv"), str(out / "val")))
    assert len(found.items) == 2 and found.rejects == [] and len(found.classes) == 2


def test_bad_input_is_one_line(tmp_path: Path, serve, capsys) -> None:
    server = serve(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    cases = [
        (["kinetics400", "--split", "val", "--out", str(tmp_path / "a"), "--base-url", "ftp://user:hunter22@x/"],
         "--base-url must be an http:// or https:// URL"),
        (["kinetics400", "--split", "val", "--out", str(tmp_path / "b"),
          "--base-url", server.url.replace("http://", "http://user:hunter22@")], "HTTP 404"),
        (["kinetics400", "--out", str(tmp_path / "c")], "needs --split"),
    ]
    for args, expected in cases:
        assert _download(*args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and len(err.strip().splitlines()) == 1, err
        assert "hunter22" not in err
    with pytest.raises(ValueError, match="not an http"):
        parse_part_list("file:///etc/passwd\n", "list")
    with pytest.raises(ValueError, match="no line is a"):
        file_list_to_csv("hello\nworld\n", "train", "train.txt")


def test_ssv2_prints_how_to_get_it(tmp_path: Path, capsys) -> None:
    assert cli.main(["download", "ssv2", "--out", str(tmp_path / "none")]) == 0
    printed = capsys.readouterr().out
    assert "developer.qualcomm.com/software/ai-datasets/something-something" in printed
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial/readme.txt").write_text("not yet")
    assert cli.main(["download", "ssv2", "--out", str(tmp_path / "partial")]) == 1
    assert "INCOMPLETE" in capsys.readouterr().out
