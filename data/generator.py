"""Deterministic generator of synthetic natality rows in the BigQuery table's own 31-column schema.

The real table (bigquery-public-data.samples.natality) can't be reached offline, so this writes rows
that look like a BigQuery CSV export of it: NULLs as empty fields, booleans as true/false, and the
table's 'unknown' codes as values (99 in weight_gain_pounds and father_age, 99999999 in lmp).
It is calibrated to published facts of the 2001-2008 table (see `Calibration`), and writes in
chunks so that it scales to millions of rows.

    python -m data.generator --rows 20000 --seed 7 --output-dir data/natality
    python -m data.generator --rows 50000 --spans 4 --weight-shift-per-span -0.05 --output-dir /tmp/spans
    python -m data.generator --rows 2000 --spans 2 --corrupt type --output-dir /tmp/spans   # a bad last span
"""

import argparse
import dataclasses
import logging
import pathlib
from typing import Dict, List

import numpy as np
import pandas as pd

from models import features

GRAMS_PER_POUND = 453.59237
CHUNK_ROWS = 250_000
STATES = ("CA", "TX", "NY", "FL", "IL", "PA", "OH", "GA", "MI", "NC", "NJ", "VA", "WA", "AZ", "MA")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Parameters of the synthetic population, set to match the real table's published figures."""

    male_rate: float = 0.512
    plurality_rates: tuple = (0.9655, 0.032, 0.0022, 0.0002, 0.0001)  # singletons, twins, ...
    mother_age_mean: float = 27.4
    mother_age_sd: float = 6.2
    married_rate: float = 0.66
    # Gestation weeks: a term component and a preterm tail, shorter for multiples.
    term_mean: float = 39.3
    term_sd: float = 1.45
    preterm_rate: float = 0.11
    preterm_mean: float = 34.5
    preterm_sd: float = 3.6
    gestation_drop_per_extra_baby: float = 3.3
    # Weight: a logistic growth curve in gestation weeks plus effects, with residual noise.
    growth_max_lb: float = 8.05
    growth_mid_weeks: float = 31.5
    growth_scale_weeks: float = 3.0
    male_effect_lb: float = 0.25
    multiple_effect_lb: float = -0.45  # per extra baby, beyond the shorter gestation
    married_effect_lb: float = 0.12
    parity_effect_lb: float = 0.10  # per earlier birth, up to three
    weight_gain_effect_lb: float = 0.012  # per pound the mother gained, around 30
    mother_age_curvature_lb: float = -0.002  # per squared year away from 28
    residual_sd_lb: float = 0.9
    # NULLs and 'unknown' codes, at rates seen in a real 2003-2008 export.
    weight_null_rate: float = 0.003
    gestation_null_rate: float = 0.009
    weight_gain_null_rate: float = 0.022
    weight_gain_unknown_rate: float = 0.20
    father_age_unknown_rate: float = 0.15
    lmp_unknown_rate: float = 0.05
    ever_born_null_rate: float = 0.074
    apgar_5min_null_rate: float = 0.115
    state_known_rate: float = 0.015
    born_counts_known_rate: float = 0.25


@dataclasses.dataclass(frozen=True)
class Drift:
    """How each span differs from the one before it."""

    weight_shift_per_span: float = 0.0  # pounds added to every birth weight per span
    married_rate_shift_per_span: float = 0.0  # change of the married fraction per span


def generate_frame(
    rows: int,
    rng: np.random.Generator,
    year: int,
    calibration: Calibration,
    weight_shift: float = 0.0,
    married_rate: float = None,
) -> pd.DataFrame:
    """Draws `rows` synthetic births of one year as a frame with the table's 31 columns."""
    cal = calibration
    married_rate = cal.married_rate if married_rate is None else married_rate

    def nullable(values: np.ndarray, null_rate: float) -> pd.Series:
        series = pd.Series(values).astype("Int64")
        series[rng.random(rows) < null_rate] = pd.NA
        return series

    def with_code(values: np.ndarray, code: int, code_rate: float) -> np.ndarray:
        return np.where(rng.random(rows) < code_rate, code, values)

    is_male = rng.random(rows) < cal.male_rate
    plurality = rng.choice(np.arange(1, 6), size=rows, p=np.array(cal.plurality_rates) / sum(cal.plurality_rates))
    mother_age = np.clip(np.rint(rng.normal(cal.mother_age_mean, cal.mother_age_sd, rows)), 12, 50).astype(int)
    father_age = np.clip(np.rint(mother_age + rng.normal(2.5, 4.0, rows)), 14, 98).astype(int)
    married = rng.random(rows) < np.clip(married_rate - 0.01 * np.clip(22 - mother_age, 0, None), 0, 1)
    ever_born = 1 + np.minimum(rng.poisson(0.32 + 0.02 * np.clip(mother_age - 20, 0, None)), 16)
    weight_gain = np.clip(np.rint(rng.normal(30.5, 13.0, rows)), 1, 98).astype(int)

    preterm = rng.random(rows) < cal.preterm_rate
    gestation = np.where(
        preterm, rng.normal(cal.preterm_mean, cal.preterm_sd, rows), rng.normal(cal.term_mean, cal.term_sd, rows)
    )
    gestation = np.clip(np.rint(gestation - cal.gestation_drop_per_extra_baby * (plurality - 1)), 17, 47).astype(int)

    growth = cal.growth_max_lb / (1 + np.exp(-(gestation - cal.growth_mid_weeks) / cal.growth_scale_weeks))
    mean_lb = (
        growth
        + cal.male_effect_lb * (is_male - 0.5)
        + cal.multiple_effect_lb * (plurality - 1)
        + cal.married_effect_lb * married
        + cal.parity_effect_lb * np.minimum(ever_born - 1, 3)
        + cal.weight_gain_effect_lb * (weight_gain - 30)
        + cal.mother_age_curvature_lb * (mother_age - 28) ** 2
        + weight_shift
    )
    noise = rng.normal(0.0, cal.residual_sd_lb, rows) * np.clip(growth / 7.5, 0.35, 1.0)
    grams = np.clip(np.rint((mean_lb + noise) * GRAMS_PER_POUND), 227, 8165)
    weight_pounds = pd.Series(grams / GRAMS_PER_POUND).round(11)
    weight_pounds[rng.random(rows) < cal.weight_null_rate] = np.nan

    month = rng.integers(1, 13, rows)
    conception_month = (month - 1 - np.rint(gestation / 4.35).astype(int)) % 12 + 1
    lmp_year = year - (conception_month > month)
    lmp = conception_month * 1_000_000 + rng.integers(1, 29, rows) * 10_000 + lmp_year

    def states(known_rate: float) -> pd.Series:
        values = pd.Series(np.array(STATES)[rng.integers(0, len(STATES), rows)], dtype="object")
        values[rng.random(rows) >= known_rate] = None
        return values

    known_counts = rng.random(rows) < cal.born_counts_known_rate
    born_alive_alive = pd.Series(ever_born - 1).astype("Int64").where(known_counts, pd.NA)
    born_alive_dead = pd.Series(rng.binomial(1, 0.02, rows)).astype("Int64").where(known_counts, pd.NA)
    born_dead = pd.Series(rng.poisson(0.25, rows)).astype("Int64").where(known_counts, pd.NA)
    apgar_5min = np.clip(np.rint(rng.normal(9.0, 0.7, rows) - 3 * (gestation < 30)), 0, 10).astype(int)
    empty_int = pd.Series([pd.NA] * rows, dtype="Int64")
    empty_str = pd.Series([None] * rows, dtype="object")

    columns: Dict[str, object] = {
        "source_year": np.full(rows, year),
        "year": np.full(rows, year),
        "month": month,
        "day": empty_int,
        "wday": rng.integers(1, 8, rows),
        "state": states(cal.state_known_rate),
        "is_male": np.where(is_male, "true", "false"),
        "child_race": empty_int,
        "weight_pounds": weight_pounds,
        "plurality": plurality,
        "apgar_1min": empty_int,
        "apgar_5min": nullable(apgar_5min, cal.apgar_5min_null_rate),
        "mother_residence_state": states(cal.state_known_rate),
        "mother_race": empty_int,
        "mother_age": mother_age,
        "gestation_weeks": nullable(gestation, cal.gestation_null_rate),
        "lmp": pd.Series(with_code(lmp, 99999999, cal.lmp_unknown_rate)).map("{:08d}".format),
        "mother_married": np.where(married, "true", "false"),
        "mother_birth_state": states(cal.state_known_rate * 2),
        "cigarette_use": empty_str,
        "cigarettes_per_day": empty_int,
        "alcohol_use": empty_str,
        "drinks_per_week": empty_int,
        "weight_gain_pounds": nullable(
            with_code(weight_gain, 99, cal.weight_gain_unknown_rate), cal.weight_gain_null_rate
        ),
        "born_alive_alive": born_alive_alive,
        "born_alive_dead": born_alive_dead,
        "born_dead": born_dead,
        "ever_born": nullable(ever_born, cal.ever_born_null_rate),
        "father_race": empty_int,
        "father_age": with_code(father_age, 99, cal.father_age_unknown_rate),
        "record_weight": np.ones(rows, dtype=int),
    }
    return pd.DataFrame({name: columns[name] for name in features.COLUMN_NAMES})


def write(
    rows: int,
    seed: int,
    output_dir: pathlib.Path,
    spans: int = 1,
    first_year: int = 2008,
    drift: Drift = Drift(),
    calibration: Calibration = Calibration(),
) -> List[pathlib.Path]:
    """Writes `rows` rows per span as CSV; one span goes to output_dir, several to output_dir/span-N/."""
    written = []
    for span in range(spans):
        span_dir = output_dir if spans == 1 else output_dir / f"span-{span + 1}"
        span_dir.mkdir(parents=True, exist_ok=True)
        path = span_dir / "natality.csv"
        tmp_path = path.with_suffix(".csv.tmp")
        rng = np.random.default_rng([seed, span])
        with tmp_path.open("w", newline="") as out:
            for start in range(0, rows, CHUNK_ROWS):
                frame = generate_frame(
                    min(CHUNK_ROWS, rows - start),
                    rng,
                    first_year + span,
                    calibration,
                    weight_shift=drift.weight_shift_per_span * span,
                    married_rate=calibration.married_rate + drift.married_rate_shift_per_span * span,
                )
                frame.to_csv(out, header=start == 0, index=False, na_rep="", float_format="%.11g")
        tmp_path.replace(path)
        logging.info("wrote %d rows to %s", rows, path)
        written.append(path)
    return written


# Small data bugs of the kinds data validation must catch, one per question it answers.
CORRUPTIONS = {
    "shift": "mother_married written as false for 60% of births (a coding change upstream)",
    "drop_column": "the mother_age column is missing",
    "extra_column": "an unexpected hospital_id column",
    "type": "'unknown' in 5% of the numeric weight_gain_pounds column",
    "presence": "mother_age empty in 70% of rows",
    "domain": "mother_age in months instead of years in 5% of rows",
}


def corrupt(path: pathlib.Path, kind: str, seed: int = 0) -> None:
    """Rewrites the CSV file at `path` with one of CORRUPTIONS."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    rng = np.random.default_rng(seed)

    def some(fraction: float) -> np.ndarray:
        return rng.random(len(frame)) < fraction

    if kind == "shift":
        frame.loc[some(0.6), "mother_married"] = "false"
    elif kind == "drop_column":
        frame = frame.drop(columns=["mother_age"])
    elif kind == "extra_column":
        frame["hospital_id"] = rng.integers(1000, 9999, len(frame)).astype(str)
    elif kind == "type":
        frame.loc[some(0.05), "weight_gain_pounds"] = "unknown"
    elif kind == "presence":
        frame.loc[some(0.7), "mother_age"] = ""
    elif kind == "domain":
        rows = some(0.05)
        frame.loc[rows, "mother_age"] = (frame.loc[rows, "mother_age"].astype(int) * 12).astype(str)
    frame.to_csv(path, index=False)


def main(argv: List[str] = None) -> None:
    """Command line: python -m data.generator --rows N --seed S --output-dir DIR [--spans K ...]."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, required=True, help="rows per span")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--output-dir", type=pathlib.Path, required=True)
    parser.add_argument("--spans", type=int, default=1, help="several spans are written to span-N/ folders")
    parser.add_argument("--first-year", type=int, default=2008, help="year of the first span; each span is a year")
    parser.add_argument("--weight-shift-per-span", type=float, default=0.0, help="pounds added per span")
    parser.add_argument("--married-rate-shift-per-span", type=float, default=0.0)
    parser.add_argument("--corrupt", choices=sorted(CORRUPTIONS), help="corrupt the last span in this one way")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = write(
        args.rows,
        args.seed,
        args.output_dir,
        args.spans,
        args.first_year,
        Drift(args.weight_shift_per_span, args.married_rate_shift_per_span),
    )
    if args.corrupt:
        corrupt(paths[-1], args.corrupt, args.seed)
        print(f"corrupted {paths[-1]}: {CORRUPTIONS[args.corrupt]}")
    print(f"wrote {args.rows} rows to each of {len(paths)} file(s) under {args.output_dir}")


if __name__ == "__main__":
    main()
