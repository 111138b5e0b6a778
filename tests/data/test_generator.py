"""The synthetic generator: deterministic, in the table's format, calibrated to the published facts."""

import filecmp
import pathlib

import numpy as np
import pandas as pd
import pytest

from data import generator
from models import features

BUNDLED = pathlib.Path(__file__).resolve().parents[2] / "data" / "natality" / "natality.csv"


@pytest.fixture(scope="module")
def sample() -> pd.DataFrame:
    return generator.generate_frame(200_000, np.random.default_rng(11), 2005, generator.Calibration())


def test_same_seed_same_bytes_and_the_bundled_data_is_its_output(tmp_path):
    generator.write(20_000, 7, tmp_path / "a")
    assert filecmp.cmp(tmp_path / "a" / "natality.csv", BUNDLED, shallow=False)
    generator.write(500, 8, tmp_path / "b")
    assert not filecmp.cmp(tmp_path / "b" / "natality.csv", BUNDLED, shallow=False)


def test_written_like_a_bigquery_export(tmp_path):
    path = generator.write(2_000, 3, tmp_path)[0]
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == list(features.COLUMN_NAMES)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert set(frame.is_male) == {"true", "false"}
    assert (frame.day == "").all() and (frame.mother_race == "").all()  # NULL in 2003-2008 exports
    assert frame.lmp.str.fullmatch(r"\d{8}").all()  # MMDDYYYY with leading zero
    assert "99999999" in set(frame.lmp) and "99" in set(frame.father_age)


def test_chunked_writing_gives_the_requested_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(generator, "CHUNK_ROWS", 300)
    frame = pd.read_csv(generator.write(1_000, 5, tmp_path)[0])
    assert len(frame) == 1_000
    assert list(frame.columns) == list(features.COLUMN_NAMES)


def test_weight_matches_published_means(sample):
    weight = sample.weight_pounds.astype(float)
    male = sample.is_male == "true"
    assert weight.mean() == pytest.approx(7.23, abs=0.05)
    assert weight.std() == pytest.approx(1.3, abs=0.05)
    assert weight[male].mean() == pytest.approx(7.35, abs=0.05)
    assert weight[~male].mean() == pytest.approx(7.10, abs=0.05)
    assert weight.isna().mean() == pytest.approx(0.003, abs=0.001)  # a few NULL labels, as in the table


def test_gestation_and_mother_age_match_published_figures(sample):
    weeks = sample.gestation_weeks.dropna().astype(int)
    assert weeks.mean() == pytest.approx(38.6, abs=0.1)
    assert weeks.std() == pytest.approx(2.5, abs=0.1)
    assert weeks.quantile([0.25, 0.5, 0.75]).tolist() == [38, 39, 40]
    assert weeks.min() >= 17 and weeks.max() <= 47
    assert sample.mother_age.mean() == pytest.approx(27.4, abs=0.1)
    assert sample.mother_age.std() == pytest.approx(6.2, abs=0.1)


def test_twins_are_about_three_percent_and_higher_multiples_rare(sample):
    rates = sample.plurality.value_counts(normalize=True)
    assert rates[2] == pytest.approx(0.032, abs=0.003)
    assert rates[rates.index >= 3].sum() < 0.005


def test_weight_rises_with_gestation_and_is_lower_for_multiples(sample):
    weight = sample.weight_pounds.astype(float)
    by_weeks = weight.groupby(pd.cut(sample.gestation_weeks.astype(float), [16, 28, 32, 37, 42, 48])).mean()
    assert by_weeks.is_monotonic_increasing and by_weeks.iloc[-1] - by_weeks.iloc[0] > 5
    term = sample.gestation_weeks.astype(float).between(37, 41)
    assert weight[term & (sample.plurality == 2)].mean() < weight[term & (sample.plurality == 1)].mean() - 0.3


def test_unknown_codes_appear_at_realistic_rates(sample):
    assert (sample.father_age == 99).mean() == pytest.approx(0.15, abs=0.01)
    assert (sample.weight_gain_pounds == 99).mean() == pytest.approx(0.20, abs=0.01)
    assert (sample.lmp == "99999999").mean() == pytest.approx(0.05, abs=0.005)


def test_spans_drift_by_the_configured_shift(tmp_path):
    paths = generator.write(
        20_000,
        1,
        tmp_path,
        spans=3,
        first_year=2004,
        drift=generator.Drift(weight_shift_per_span=-0.2, married_rate_shift_per_span=-0.1),
    )
    assert [p.parent.name for p in paths] == ["span-1", "span-2", "span-3"]
    spans = [pd.read_csv(p) for p in paths]
    assert [int(s.year.iloc[0]) for s in spans] == [2004, 2005, 2006]
    means = [s.weight_pounds.mean() for s in spans]
    assert means[1] - means[0] == pytest.approx(-0.2, abs=0.06)
    assert means[2] - means[0] == pytest.approx(-0.4, abs=0.06)
    married = [s.mother_married.mean() for s in spans]
    assert married[2] - married[0] == pytest.approx(-0.2, abs=0.03)
