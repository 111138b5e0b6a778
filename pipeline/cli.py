"""`babyweight COMMAND ...`: the project's commands for after a run.

    babyweight metadata ...            runs, artifacts and lineage in ML Metadata (pipeline/metadata_cli.py)
    babyweight simulate ...            a year of arriving spans through the pipeline (pipeline/simulate.py)
    babyweight validate-serving FILE   serving requests against the schema and training data (pipeline/serving_check.py)
"""
import sys
from typing import List, Optional

COMMANDS = ("metadata", "simulate", "validate-serving")


def main(argv: Optional[List[str]] = None) -> int:
    """Dispatches to the command's own main."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "metadata":
        from pipeline import metadata_cli
        return metadata_cli.main(rest)
    if command == "simulate":
        from pipeline import simulate
        return simulate.main(rest)
    from pipeline import serving_check
    return serving_check.main(rest)


if __name__ == "__main__":
    sys.exit(main())
