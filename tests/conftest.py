"""Shared fixtures: paths of the team's real natality samples and small generated data sets."""
import os
import pathlib

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_NATALITY = PROJECT_ROOT.parent / "shared" / "data" / "natality"


@pytest.fixture(scope="session")
def real_export_csv() -> pathlib.Path:
    """The team's real 31-column BigQuery export (16,000 rows); tests using it skip only if it is absent."""
    path = SHARED_NATALITY / "bq_export_31col.csv"
    if not path.is_file():
        pytest.skip(f"real natality export not found at {path}")
    return path
