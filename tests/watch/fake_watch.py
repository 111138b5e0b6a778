"""`babyweight watch` with the fast fake run (tests/watch/fake_run.py) as its child.

python -m tests.watch.fake_watch --data-dir DATA --output-dir OUT [--once] ...
"""

import sys

import watch.runs
from watch import cli

watch.runs.CHILD_MODULE = "tests.watch.fake_run"

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
