"""Spans arriving in the data folder: which are there, which are complete, and what their files are now.

A span is the pipeline's span-{SPAN} folder (pipeline/config.py). It is complete when it holds a _SUCCESS file
(what Hadoop, Spark and Dataflow jobs write last; an export script can too), or else when nothing in its folder
has changed for watch_settle_seconds, nothing has a temporary name (a copy or download in progress), and each CSV
file ends with a whole line: a file still being copied is not a span yet. Other hidden files (.DS_Store) are
left out of its files, not waited for.
"""

import dataclasses
import fnmatch
import hashlib
import pathlib
import time
from typing import List, Optional

from pipeline.config import PipelineConfig

MARKER = "_SUCCESS"
# names of files being written: rsync's .name.XXXXXX, gsutil's .gstmp, curl/wget/browsers' .part, Hadoop's
TEMPORARY = ("*.tmp", "*.part", "*.partial", "*.crdownload", "*._COPYING_", "*.gstmp", "*.filepart", ".*.??????")


@dataclasses.dataclass(frozen=True)
class Span:
    number: int
    folder: pathlib.Path
    complete: bool
    fingerprint: str  # names, sizes and modification times of its files: a change means new data
    why_waiting: str = ""


def _folder_pattern(config: PipelineConfig) -> Optional[str]:
    first = config.input_pattern.split("/")[0]
    return first if "{SPAN}" in first else None


def found(config: PipelineConfig, now: Optional[float] = None) -> List[Span]:
    """The data folder's spans, in order, each said complete or not (and why not)."""
    pattern = _folder_pattern(config)
    data_dir = pathlib.Path(config.data_dir)
    if pattern is None or not data_dir.is_dir():
        return []
    prefix, _, suffix = pattern.partition("{SPAN}")
    spans = []
    for folder in data_dir.iterdir():
        middle = folder.name[len(prefix) : len(folder.name) - len(suffix) or None]
        if folder.is_dir() and folder.name.startswith(prefix) and folder.name.endswith(suffix) and middle.isdigit():
            spans.append(_span(config, int(middle), folder, time.time() if now is None else now))
    return sorted(spans, key=lambda span: span.number)


def _span(config: PipelineConfig, number: int, folder: pathlib.Path, now: float) -> Span:
    file_glob = config.input_pattern.split("/", 1)[1] if "/" in config.input_pattern else "*.csv"
    try:
        files = sorted(p for p in folder.glob(file_glob) if p.is_file() and not fnmatch.fnmatch(p.name, ".*"))
        entries = {p: p.stat() for p in folder.iterdir()}
        stats = {path: path.stat() for path in files}
    except FileNotFoundError:  # renamed or removed while looked at (a copy's temporary file): look again later
        return Span(number, folder, False, "", "a file changed while it was listed")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{stats[path].st_size}\0{stats[path].st_mtime_ns}\n".encode())
    fingerprint = digest.hexdigest()[:16]
    if (folder / MARKER).exists():
        return Span(number, folder, bool(files), fingerprint, "" if files else f"{MARKER} but no {file_glob} file")
    temporary = sorted(p.name for p in entries if any(fnmatch.fnmatch(p.name, t) for t in TEMPORARY))
    if temporary:
        return Span(number, folder, False, fingerprint, f"a file is still being written: {temporary[0]}")
    if not files:
        return Span(number, folder, False, fingerprint, f"no {file_glob} file yet")
    # ctime, not mtime: a copy that keeps the source's times (cp -p, shutil.copy2) still moves ctime; every entry,
    # not only the CSV files, so a download beside a finished file holds the span back
    newest = max([folder.stat().st_ctime] + [max(s.st_ctime, s.st_mtime) for s in entries.values()])
    if now - newest < config.watch_settle_seconds:
        return Span(
            number,
            folder,
            False,
            fingerprint,
            f"changed within watch_settle_seconds ({config.watch_settle_seconds:g} s)",
        )
    for path in files:
        if stats[path].st_size and not _ends_with_newline(path):  # reported; complete once the line is
            return Span(number, folder, False, fingerprint, f"{path.name} ends in the middle of a line")
    return Span(number, folder, True, fingerprint)


def _ends_with_newline(path: pathlib.Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1) in (b"\n", b"\r")
