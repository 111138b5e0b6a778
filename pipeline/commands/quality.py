"""Model quality on real rows: requests with features missing, other samples, and the trees beside the model.

    make quality                                  # the team's real export and the course files in ../shared
    make quality ARGS="--ablations"               # also train one model per optional feature without it
    make quality ARGS="--presence"                # also train models on spans where optional features are rare
    make quality ARGS="--export my.csv --course-dir my_samples/"

Runs the pipeline on a real export (cached when rerun), then scores the pushed model through its
`serving_raw` signature, as a client asks it:
- on the run's eval split (rows a client could send: the required features known), with all features
  and with each optional feature missing; next to gradient-boosted trees fit without that feature and,
  with --ablations, the same model trained without it (the serving contract's goal: within 3%);
- with --presence, models trained where the optional features are rare (each alone and all at once, in a
  share of the training rows), asked with and without them: how rare a feature may be in a span before
  the model answers worse with it than without it (the pipeline's min_imputed_presence);
- on each sample in the course's layouts (data/course.py), with the features the file has, with
  `mother_married` left out or set to "true" (a guess a client might make); next to trees fit on the
  export's training rows with exactly the file's features, trees fit on all model features (the run
  summary's reference, asked with the file's missing columns empty), and the training mean.
"""

import argparse
import dataclasses
import glob
import logging
import pathlib
import shutil
import tempfile
import types
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from data import course
from models import features
from pipeline import config as config_lib
from pipeline.artifacts import span_of
from pipeline.commands import run as run_lib
from pipeline.components import baseline
from pipeline.reports import summary

SHARED_NATALITY = config_lib.PROJECT_ROOT.parent / "shared" / "data" / "natality"
MARRIED = "mother_married"
# --presence: the feature whose share of rows changes most with the year in the real table, and the shares.
PRESENCE_FEATURES = ("ever_born",)
PRESENCE_SHARES = (1.0, 0.3, 0.1, 0.03, 0.0)  # and the config's min_imputed_presence


@dataclasses.dataclass(frozen=True)
class RunArtifacts:
    """What the latest run trained on, evaluated on and pushed, read from ML Metadata."""

    train_files: List[str]  # file patterns of the Trainer's train splits
    eval_files: List[str]  # file patterns of the Evaluator's eval split
    file_spans: Dict[str, int]  # the span of each of those patterns, as the pipeline's Trainer executor gives them
    transform_graph: str
    pushed: Optional[str]  # the pushed SavedModel's folder, None if the run pushed nothing


def run_artifacts(config: config_lib.PipelineConfig) -> RunArtifacts:
    """The latest run's artifacts, from its executions (cached ones included) in ML Metadata."""
    run = summary.latest_run(config)
    if run is None:
        raise ValueError(f"no run in {config.metadata_path}")
    steps = run[1]
    trainer = next(step for step in steps if step.node_id == "Trainer")
    evaluator = next(step for step in steps if step.node_id == "Evaluator")
    pushed = summary.output_of(steps, "Pusher", "pushed_model")

    def patterns(artifacts, split: str) -> List[str]:
        return [f"{artifact.uri}/Split-{split}/*" for artifact in artifacts]

    spans = {
        pattern: span_of(artifact)
        for split, artifacts in (("train", trainer.inputs["examples"]), ("eval", evaluator.inputs["examples"]))
        for artifact, pattern in zip(artifacts, patterns(artifacts, split))
    }
    return RunArtifacts(
        train_files=patterns(trainer.inputs["examples"], "train"),
        eval_files=patterns(evaluator.inputs["examples"], "eval"),
        file_spans=spans,
        transform_graph=trainer.inputs["transform_graph"][0].uri,
        pushed=pushed.custom_properties["pushed_destination"].string_value
        if pushed is not None and pushed.custom_properties["pushed"].int_value == 1
        else None,
    )


def read_rows(patterns: Sequence[str]) -> pd.DataFrame:
    """The model features and label of the examples matching `patterns`."""
    return baseline.read_examples([path for pattern in patterns for path in sorted(glob.glob(pattern))])


def accepted(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows a client could send: every required feature known."""
    return rows[[not features.missing_required(row) for row in rows.to_dict("records")]].reset_index(drop=True)


def numeric(rows: pd.DataFrame) -> pd.DataFrame:
    """Text columns of numbers (course files, '' for none) as floats with NaN."""
    rows = rows.copy()
    for column in features.FEATURES + (features.LABEL,):
        if column.dtype != "string" and rows[column.name].dtype == object:
            rows[column.name] = pd.to_numeric(rows[column.name].replace("", np.nan))
    return rows


def without(rows: pd.DataFrame, name: str) -> pd.DataFrame:
    """The rows with one feature blanked, as a request that leaves it out."""
    blanked = rows.copy()
    blanked[name] = "" if features.BY_NAME[name].dtype == "string" else np.nan
    return blanked


def predictor(saved_model_dir: str) -> Callable[[pd.DataFrame], np.ndarray]:
    """A SavedModel's `serving_raw` signature as a function of rows."""
    import tensorflow as tf

    signature = tf.saved_model.load(saved_model_dir).signatures["serving_raw"]

    def predict(rows: pd.DataFrame) -> np.ndarray:
        inputs = {
            c.name: tf.constant(rows[c.name].to_numpy().astype(object if c.dtype == "string" else np.float32))
            for c in features.FEATURES
        }
        return signature(**inputs)["predictions"].numpy().ravel()

    return predict


def train_with_presence(
    config: config_lib.PipelineConfig, artifacts: RunArtifacts, presence: Dict[str, float], out_dir: pathlib.Path
) -> str:
    """The run's model trained again (same data, recency weights, transform and seed) with features kept in
    only a share of the rows (models/model.py, PRESENCE_KEY; 0: never seen); its SavedModel."""
    from models import model
    from pipeline.pipeline import model_config

    model.run_fn(
        types.SimpleNamespace(
            custom_config=dict(
                model_config(config), **{model.PRESENCE_KEY: presence, model.FILE_SPANS_KEY: artifacts.file_spans}
            ),
            transform_output=artifacts.transform_graph,
            train_files=artifacts.train_files,
            eval_files=artifacts.eval_files,
            serving_model_dir=str(out_dir / "serving"),
            model_run_dir=str(out_dir / "logs"),
        )
    )
    return str(out_dir / "serving")


def present_features(rows: pd.DataFrame) -> List[features.Column]:
    """The model features that some of the rows have a value of."""
    return [
        c
        for c in features.FEATURES
        if c.name in rows and ((rows[c.name] != "").any() if c.dtype == "string" else rows[c.name].notna().any())
    ]


def _rmse(predict: Callable[[pd.DataFrame], np.ndarray], rows: pd.DataFrame) -> float:
    return baseline.rmse(predict(rows), rows[features.LABEL.name].to_numpy())


def _trees(train: pd.DataFrame, columns: Sequence[features.Column]) -> Callable[[pd.DataFrame], np.ndarray]:
    trees = baseline.fit_trees(train, columns=columns)
    return lambda rows: trees.predict(baseline.tree_inputs(rows, columns))


def eval_split_table(
    config: config_lib.PipelineConfig,
    artifacts: RunArtifacts,
    model: Callable,
    train: pd.DataFrame,
    ablations: bool,
    work: pathlib.Path,
) -> pd.DataFrame:
    """RMSE on the eval split: all features, then each optional feature missing."""
    rows = accepted(read_rows(artifacts.eval_files))
    records = [
        {
            "request": "all features",
            "rows": len(rows),
            "model": _rmse(model, rows),
            "trees": _rmse(_trees(train, features.FEATURES), rows),
        }
    ]
    for column in features.OPTIONAL_FEATURES:
        asked = without(rows, column.name)
        others = [c for c in features.FEATURES if c is not column]
        record = {
            "request": f"without {column.name}",
            "rows": len(rows),
            "model": _rmse(model, asked),
            "trees": _rmse(_trees(train, others), asked),
        }
        if ablations:
            retrained = predictor(train_with_presence(config, artifacts, {column.name: 0.0}, work / column.name))
            record["model trained without it"] = _rmse(retrained, asked)
        records.append(record)
    return pd.DataFrame(records)


def presence_table(
    config: config_lib.PipelineConfig, artifacts: RunArtifacts, shares: Sequence[float], work: pathlib.Path
) -> pd.DataFrame:
    """RMSE on the eval split of models trained with optional features in only a share of the rows."""
    rows = accepted(read_rows(artifacts.eval_files))
    groups = {column.name: [column.name] for column in features.OPTIONAL_FEATURES if column.name in PRESENCE_FEATURES}
    groups["all optional features"] = [column.name for column in features.OPTIONAL_FEATURES]
    records = []
    for label, names in groups.items():
        asked_without = rows
        for name in names:
            asked_without = without(asked_without, name)
        for share in shares:
            folder = work / f"{label}-{share}".replace(" ", "_")
            model = predictor(train_with_presence(config, artifacts, {name: share for name in names}, folder))
            records.append(
                {
                    "rare in training": label,
                    "share of rows": share,
                    "rows": len(rows),
                    "asked with them": _rmse(model, rows),
                    "asked without them": _rmse(model, asked_without),
                }
            )
    return pd.DataFrame(records)


def course_table(course_dir: pathlib.Path, model: Callable, train: pd.DataFrame) -> pd.DataFrame:
    """RMSE on each course-layout sample, with and without mother_married, next to the trees and the mean."""
    everything = _trees(train, features.FEATURES)
    train_mean = train[features.LABEL.name].mean()
    records = []
    paths = sorted(course_dir.glob("course*.csv"))
    if not paths:
        raise ValueError(f"no course*.csv samples in {course_dir}")
    for path in paths:
        rows = numeric(accepted(course.read_course_file(path)))
        has_married = (rows[MARRIED] != "").any()
        variants = {
            "file's features": rows,
            ("without mother_married" if has_married else "mother_married=true"): without(rows, MARRIED)
            if has_married
            else rows.assign(**{MARRIED: "true"}),
        }
        for variant, asked in variants.items():
            own = present_features(asked)
            records.append(
                {
                    "file": path.name,
                    "request": variant,
                    "rows": len(asked),
                    "model": _rmse(model, asked),
                    "trees, file's features": _rmse(_trees(train, own), asked),
                    "trees, all features": _rmse(everything, asked),
                    "training mean": baseline.rmse(
                        np.full(len(asked), train_mean), asked[features.LABEL.name].to_numpy()
                    ),
                }
            )
    return pd.DataFrame(records)


def main(argv=None) -> int:
    """Runs the pipeline on the export, then prints the quality tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=pathlib.Path, default=SHARED_NATALITY / "bq_export_31col.csv")
    parser.add_argument("--course-dir", type=pathlib.Path, default=SHARED_NATALITY)
    parser.add_argument("--output-dir", type=pathlib.Path, default=config_lib.PROJECT_ROOT / "outputs" / "quality")
    parser.add_argument("--ablations", action="store_true", help="train one model per optional feature without it")
    parser.add_argument(
        "--presence",
        action="store_true",
        help="train models with optional features in only a share of the training rows",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if not args.export.is_file():
        parser.error(f"no export at {args.export}")
    if not sorted(args.course_dir.glob("course*.csv")):
        parser.error(f"no course*.csv samples in {args.course_dir}")
    data_dir = args.output_dir / "export"
    data_dir.mkdir(parents=True, exist_ok=True)
    for earlier in data_dir.glob("*.csv"):  # only this export: an earlier one would be read with it
        if earlier.name != args.export.name:
            earlier.unlink()
    shutil.copy2(args.export, data_dir / args.export.name)  # its time too, so that a rerun is cached
    config = config_lib.load_config(
        "local", {"data_dir": str(data_dir), "output_dir": str(args.output_dir), **config_lib.parse_overrides(args.set)}
    )
    run_lib.setup_logging(pathlib.Path(config.log_path), console=False)
    outcome = run_lib.run_local(config)
    if not outcome.ok:
        print(outcome.summary)
        return 1
    artifacts = run_artifacts(config)
    if artifacts.pushed is None:
        print(outcome.summary + "\nThe run pushed no model (not blessed): nothing to score.")
        return 1
    model = predictor(artifacts.pushed)
    train = read_rows(artifacts.train_files)
    pd.set_option("display.width", 200)
    pd.set_option("display.float_format", lambda v: f"{v:.3f}")
    with tempfile.TemporaryDirectory(prefix="babyweight-quality-") as work:
        print(f"RMSE (lb) of model {artifacts.pushed} on the run's eval split ({args.export.name}):")
        print(
            eval_split_table(config, artifacts, model, train, args.ablations, pathlib.Path(work)).to_string(index=False)
        )
        if args.presence:
            print(
                f"\nRMSE (lb) on the same rows of models trained with features in only a share of the rows "
                f"(the pipeline blocks a span below min_imputed_presence = {config.min_imputed_presence}):"
            )
            shares = sorted(set(PRESENCE_SHARES) | {config.min_imputed_presence}, reverse=True)
            print(presence_table(config, artifacts, shares, pathlib.Path(work)).to_string(index=False))
    print(f"\nRMSE (lb) on the samples in {args.course_dir} (rows lacking a required feature left out):")
    print(course_table(args.course_dir, model, train).to_string(index=False))
    logging.info("quality tables printed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
