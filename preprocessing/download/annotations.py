"""The release's annotation files -> `annotations/{split}.csv`, the CSV `preprocessing kinetics` reads.

Kinetics-400 and -700-2020 ship CSVs (`label,youtube_id,time_start,time_end,split[,is_cc]`) that are
used as they are. Kinetics-600's train and val annotations are `.txt` files that CVDF added back
because its CSVs miss videos it hosts (the CSVs are marked "incomplete" in its README): they list the
clips of the per-class parts, one path a line, `{label}/{youtube_id}_{start:06d}_{end:06d}.mp4`, the
class being the folder the clip sits in. Each line becomes a CSV row with the label, the id and the
times read from the file name. CVDF documents neither file, so this shape is inferred from its parts
(per-class archives of `{youtube_id}_{start:06d}_{end:06d}.mp4` clips); `{clip}.mp4 {label}` lines
are read too. A line of any other shape is counted, reported and left out, never guessed, and a file
without one usable line is refused with its first lines quoted: a different format shows up as an
error, not as a silently empty split. A `.txt` that is a CSV already (a header with `youtube_id`) is
kept as it is.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import re
from dataclasses import dataclass

from core.media import VIDEO_SUFFIXES

CSV_COLUMNS = ("label", "youtube_id", "time_start", "time_end", "split")
_CLIP = re.compile(r"^(?P<id>.+)_(?P<start>\d+)_(?P<end>\d+)$")
# the end of the clip path in a line: a video suffix followed by the end of the line or a separator
_PATH_END = re.compile(r"^(.*?(?:%s))(?=$|[\s,])" % "|".join(re.escape(s) for s in VIDEO_SUFFIXES), re.IGNORECASE)


@dataclass(frozen=True)
class Converted:
    """`rows`: CSV rows written; `skipped`: lines that named no labelled clip (their first few in
    `examples`)."""

    rows: int
    skipped: int
    examples: tuple[str, ...] = ()


def file_list_to_csv(text: str, split: str, source: str) -> tuple[str, Converted]:
    """A Kinetics-600 `.txt` annotation file -> (CSV text, what was converted). ValueError if no line
    names a labelled clip (the file is not what the release ships there)."""
    if "youtube_id" in text.split("\n", 1)[0]:
        rows = sum(1 for _ in csv.DictReader(io.StringIO(text)))
        return text, Converted(rows, 0)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    rows, skipped, examples = 0, 0, []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        row = _clip_row(line, split)
        if row is None:
            skipped += 1
            if len(examples) < 3:
                examples.append(line[:120])
            continue
        writer.writerow(row)
        rows += 1
    if not rows:
        raise ValueError(f"{source}: no line is a '{{label}}/{{youtube_id}}_{{start}}_{{end}}.mp4' clip path "
                         f"(first lines: {examples})")  # fmt: skip
    return out.getvalue(), Converted(rows, skipped, tuple(examples))


def _clip_row(line: str, split: str) -> list[str] | None:
    """`{label}/{clip}.mp4` -> a CSV row; also `{clip}.mp4 {label}` (a label after the path, separated
    by blanks, a comma or a tab), in case a copy of the list carries the label beside the path."""
    found = _PATH_END.search(line)
    if found is None:
        return None
    path, rest = line[: found.end(1)].replace("\\", "/"), line[found.end(1):].strip(" \t,")
    folder, name = posixpath.split(posixpath.normpath(path))
    match = _CLIP.match(posixpath.splitext(name)[0])
    label = rest if rest and not rest.isdigit() else posixpath.basename(folder).strip()
    if not match or label in ("", ".", ".."):
        return None
    return [label, match["id"], str(int(match["start"])), str(int(match["end"])), split]


def write_atomically(path: str, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: a reader never sees half a CSV."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    staging = f"{path}.tmp"
    with open(staging, "w", newline="") as f:
        f.write(text)
    os.replace(staging, path)
