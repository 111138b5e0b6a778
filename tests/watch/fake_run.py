"""A fast stand-in for watch/run_span.py: `python -m tests.watch.fake_run` with the same arguments.

What it does is read from its span folder (DATA/span-N/): a file `behaviour` holding ok | blocked | crash | die
(ok when absent) and a file `sleep` holding seconds to run first. A run that goes to its end (ok or blocked)
appends "span N" to OUTPUT/ledger.txt, a crash "span N crashed", each in one write; then the outcome is written
as the real run writes it. `die` ends with exit code 3 and no outcome, as a run that lost its process would.

A run whose watcher was killed goes on until the next watcher is up and has had a moment to look (at most
OUTLIVE_SECONDS): the next watcher's start takes seconds (TensorFlow's import), far longer than a fake run, and
it should find the run still going, as it would a real one.
"""

import argparse
import os
import pathlib
import sys
import time
from typing import List, Optional

from watch.run_span import write_outcome

LEDGER = "ledger.txt"
OUTLIVE_SECONDS = 120.0
LOOK_SECONDS = 1.0  # for the next watcher, once it holds the watcher lock, to make its first pass


def _outlive(watcher: int, output_dir: pathlib.Path) -> None:
    """Returns once the watcher that started this run lives, or another one has been up for LOOK_SECONDS."""
    lock = output_dir / "watch" / "watcher.lock"
    deadline = time.monotonic() + OUTLIVE_SECONDS
    while os.getppid() != watcher and time.monotonic() < deadline:  # orphaned: its watcher was killed
        holder = lock.read_text().strip() if lock.exists() else ""
        if holder and holder != str(watcher):
            time.sleep(LOOK_SECONDS)
            return
        time.sleep(0.1)


def ledger_lines(output_dir: pathlib.Path) -> List[str]:
    """The ledger's lines, in the order the runs wrote them."""
    path = output_dir / LEDGER
    return path.read_text().splitlines() if path.exists() else []


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="local")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--span", type=int, required=True)
    parser.add_argument("--outcome", type=pathlib.Path, required=True)
    parser.add_argument("--lock-fd", type=int)
    args = parser.parse_args(argv)
    settings = dict(pair.split("=", 1) for pair in args.set)
    folder = pathlib.Path(settings["data_dir"]) / f"span-{args.span}"
    behaviour = (folder / "behaviour").read_text().strip() if (folder / "behaviour").exists() else "ok"
    watcher, output_dir = os.getppid(), pathlib.Path(settings["output_dir"])
    if (folder / "sleep").exists():
        time.sleep(float((folder / "sleep").read_text()))
    _outlive(watcher, output_dir)
    if behaviour == "die":
        return 3
    line = f"span {args.span} crashed\n" if behaviour == "crash" else f"span {args.span}\n"
    fd = os.open(output_dir / LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    write_outcome(
        args.outcome,
        {
            "ok": behaviour == "ok",
            "blocked": behaviour == "blocked",
            "crash": "the fake run crashed" if behaviour == "crash" else "",
            "recorded": True,
            "summary": f"span {args.span}: {behaviour}",
        },
    )
    return 0 if behaviour == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
