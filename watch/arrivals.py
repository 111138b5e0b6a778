"""Spans arriving in the data folder: which are there, which are complete, and what their files are now.

A span is the pipeline's span-{SPAN} folder (pipeline/config.py). It is complete when it holds a _SUCCESS file
(what Hadoop, Spark and `gsutil` jobs write last), or else when its folder and files have not changed for
watch_settle_seconds, none has a temporary name, and each CSV file ends with a whole line: a file still being
copied is not a span yet.
"""

import dataclasses
import fnmatch
import hashlib
import pathlib
import time
from typing import Dict, List, Optional

from pipeline.config import PipelineConfig

MARKER = "_SUCCESS"
TEMPORARY = (".*", "*.tmp", "*.part", "*.partial", "*.crdownload", "*._COPYING_")


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
    files = sorted(p for p in folder.glob(file_glob) if p.is_file() and not fnmatch.fnmatch(p.name, ".*"))
    entries = sorted(p for p in folder.iterdir())
    digest = hashlib.sha256()
    stats: Dict[pathlib.Path, object] = {}
    for path in files:
        stat = path.stat()
        stats[path] = stat
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    fingerprint = digest.hexdigest()[:16]
    if (folder / MARKER).exists():
        return Span(number, folder, bool(files), fingerprint, "" if files else f"{MARKER} but no {file_glob} file")
    temporary = [p.name for p in entries if any(fnmatch.fnmatch(p.name, t) for t in TEMPORARY)]
    if temporary:
        return Span(number, folder, False, fingerprint, f"a file is still being written: {temporary[0]}")
    if not files:
        return Span(number, folder, False, fingerprint, f"no {file_glob} file yet")
    # ctime, not mtime: a copy that keeps the source's times (cp -p, shutil.copy2) still moves ctime
    newest = max([folder.stat().st_ctime] + [max(s.st_ctime, s.st_mtime) for s in stats.values()])
    if now - newest < config.watch_settle_seconds:
        return Span(number, folder, False, fingerprint, f"changed {now - newest:.0f} s ago")
    for path in files:
        if stats[path].st_size and not _ends_with_newline(path):
            return Span(number, folder, False, fingerprint, f"{path.name} ends in the middle of a line")
    return Span(number, folder, True, fingerprint)


def _ends_with_newline(path: pathlib.Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1) in (b"\n", b"\r")
