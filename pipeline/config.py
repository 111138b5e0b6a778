"""One frozen configuration object per run: a profile file, then environment, then command-line overrides.

Any setting can come from the environment as BABYWEIGHT_<SETTING> (e.g. BABYWEIGHT_GCP_PROJECT), which
the profile file's value yields to and a --set flag overrides.
"""

import dataclasses
import glob
import json
import os
import pathlib
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import yaml

from models.distribution import STRATEGIES
from pipeline.components.checks import CHECKS

PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
PROFILES_DIR = PROJECT_ROOT / "pipeline" / "profiles"
ENV_PREFIX = "BABYWEIGHT_"
ORCHESTRATORS = ("local", "vertex")
SPAN_FOLDER = re.compile(r"span-(\d+)$")
SPAN_PATTERN = "span-{SPAN}/*.csv"


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range; the message says which and where to set it."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything a run needs; built by `load_config`, passed down, never read from globals."""

    profile: str
    pipeline_name: str
    data_dir: str  # folder of CSV files in the natality table's 31-column schema, or of span-N/ folders of them
    input_pattern: str  # glob of the CSV files inside data_dir; auto: span-{SPAN}/*.csv if there are spans, else *.csv
    output_dir: str  # pipeline root, metadata store, pushed models and logs all go under here
    schema_dir: str  # curated schema (schema.pbtxt) imported by ImportSchemaGen
    train_hash_buckets: int  # train/eval split of ExampleGen by hash, e.g. 4:1
    eval_hash_buckets: int
    enable_cache: bool
    beam_runner: str  # DirectRunner (portable, FnApiRunner) or BundleBasedDirectRunner
    beam_direct_running_mode: str  # DirectRunner's mode: in_memory, multi_threading or multi_processing
    beam_direct_num_workers: int  # 0 = one per CPU
    # From this many input rows, the steps that gain from worker processes (parallel_steps) run Beam's
    # multi_processing mode (parallel_beam_args); 0 = never (docs/speed.md).
    beam_parallel_rows: int
    strategy: str  # distribution strategy of the Trainer: one of models.distribution.STRATEGIES
    train_epochs: int  # passes over the training split...
    min_train_steps: int  # ...but at least this many steps, so that small data sets converge too
    batch_size: int  # per replica: the global batch is this times the strategy's replicas
    learning_rate: float
    hidden_units: Tuple[int, ...]
    embedding_dim: int
    mask_rate: float  # share of training rows that lose some optional features (models/masking.py)
    seed: int  # the Trainer's random seed: the same data, code and config give the same model
    eval_rmse_threshold: float  # pounds: a model whose eval RMSE is above this is not blessed
    eval_mae_threshold: float  # pounds: a model whose eval MAE is above this is not blessed
    eval_rmse_max_increase: float  # pounds: a model this much worse than the blessed baseline is not blessed
    prediction_shift_threshold: float  # pounds: a move of the mean prediction since the previous run is reported
    training_window_spans: int  # Transform and Trainer read the last this many validated spans
    recency_half_life_spans: float  # a span this many spans older weighs half as much in training (0 = equal)
    warning_checks: Tuple[
        str, ...
    ]  # checks (pipeline/components/checks.py) whose anomalies warn; all others stop the run
    min_imputed_presence: float  # a feature the model imputes blocks a span only in fewer training rows than this
    min_drift_rows: int  # drift blocks only when both spans' train splits have at least this many rows
    infra_eval_requests: int  # eval rows the infra validator sends the served candidate, one per request
    infra_max_memory_mb: float  # MiB: a server process that peaks above this does not get the infra blessing
    infra_max_p99_ms: float  # ms: nor one whose single-row requests' p99 is above this
    infra_load_timeout_seconds: float  # nor one that has not loaded the model after this long
    # The span a run reads, with a span-{SPAN} pattern: -1 = the newest (`babyweight watch` runs each in turn)
    input_span: int = -1
    # `babyweight watch` (docs/watch.md): new spans start runs; served requests and live outcomes are checked
    watch_poll_seconds: float = 10  # how often it looks for new spans (a span's run starts within one look)
    watch_settle_seconds: float = 5  # a span's files must be this long unchanged to be complete (or have _SUCCESS)
    watch_interval_seconds: float = 300  # how often it checks the served requests and the live outcomes
    watch_window_requests: int = 2500  # served requests in a window of the skew and drift checks
    watch_false_alarm_rate: float = 1e-6  # a feature is judged only once its window is big enough for this rate
    watch_retry_seconds: float = 60  # a crashed run is retried after this, doubling each time (at most an hour)
    watch_max_attempts: int = 5  # ...this many times in all; then an alert
    decay_rmse_margin: float = 0.1  # pounds: a version decays when its live RMSE is above its eval RMSE plus this
    decay_alpha: float = 0.001  # ...with this chance of saying so on noise alone
    decay_min_outcomes: int = 200  # a version's live outcomes are judged from this many
    decay_window_outcomes: int = 1000  # its newest outcomes judged
    orchestrator: str = "local"  # local: LocalDagRunner here; vertex: Vertex Pipelines, Dataflow, Vertex AI
    # A local run starts each step when the steps it depends on are done, this many at once (pipeline/runner.py);
    # 1: one at a time, with TFX's LocalDagRunner
    steps_at_once: int = 2
    # The Evaluator's metrics: batched (pipeline/components/evaluation/batched.py, TFMA's outputs and blessing) or
    # tfma (TFMA's own row-by-row evaluation); an EvalConfig the batched one can't compute is TFMA's either way
    evaluator_engine: str = "batched"
    # TFX's Tuner before the Trainer, which then trains with the best values it found (models/tuning.py): locally
    # KerasTuner's Bayesian optimization, on Vertex Vertex AI Vizier with parallel trials
    tuning: bool = False
    tuner_trials: int = 12  # trials of the search, the profile's own settings first
    tuner_parallel_trials: int = 1  # Vertex: trials at once (the tuning job's workers); locally always 1
    # A folder (or gs:// one) of unlabelled CSV files in the table's schema that each run's blessed model predicts
    # with TFX's BulkInferrer; '' = no such step
    bulk_inference_dir: str = ""
    tpu_address: str = ""  # strategy tpu: the TPU to connect to ('' = the training job's own)
    # Google Cloud, for the vertex orchestrator
    gcp_project: str = ""
    gcp_region: str = ""
    gcs_bucket: str = ""  # gs://bucket[/prefix]: pipeline root and Dataflow's temp and staging files
    service_account: str = ""  # runs the pipeline, Dataflow and training jobs ('' = the default one)
    pipeline_image: str = ""  # container image with this package installed (see Dockerfile)
    bigquery_table: str = "bigquery-public-data.samples.natality"
    bigquery_row_limit: int = 0  # rows per split read from BigQuery (0 = all), for cheap trial runs
    dataflow_machine_type: str = "n1-standard-4"
    dataflow_max_workers: int = 8
    trainer_machine_type: str = "n1-standard-8"
    trainer_accelerator_type: str = ""  # e.g. NVIDIA_TESLA_T4 (strategy mirrored) or TPU_V3 (strategy tpu)
    trainer_accelerator_count: int = 0
    trainer_replica_count: int = 1  # workers of the training job (strategy multi_worker_mirrored for > 1)
    vertex_endpoint_name: str = "babyweight"
    serving_machine_type: str = "n1-standard-2"
    serving_image: str = ""  # this project's serving image (serving/Dockerfile), pushed to Artifact Registry
    serving_min_replicas: int = 1  # the endpoint's replicas: Vertex autoscales between these two
    serving_max_replicas: int = 3
    serving_log_table: str = ""  # bq://PROJECT.DATASET.TABLE of request-response logging ('' = PROJECT.NAME_serving...)
    serving_log_sampling_rate: float = 1.0  # share of requests logged
    # Vertex Pipelines schedule of the pipeline (runner_dataflow.py --schedule), cron in UTC ('' = none)
    vertex_schedule_cron: str = ""
    vertex_monitoring_interval_hours: int = 1  # Vertex AI Model Monitoring's interval (its minimum is 1 h)
    vertex_monitoring_emails: Tuple[str, ...] = ()  # who Model Monitoring e-mails its alerts to

    @property
    def pipeline_root(self) -> str:
        if self.orchestrator == "vertex":
            return f"{self.gcs_bucket.rstrip('/')}/{self.pipeline_name}/pipeline_root"
        return str(pathlib.Path(self.output_dir) / "pipeline")

    @property
    def schema_path(self) -> str:
        return str(pathlib.Path(self.schema_dir) / "schema.pbtxt")

    @property
    def metadata_path(self) -> str:
        return str(pathlib.Path(self.output_dir) / "metadata.sqlite")

    @property
    def serving_dir(self) -> str:
        return str(pathlib.Path(self.output_dir) / "serving_model")

    @property
    def log_path(self) -> str:
        return str(pathlib.Path(self.output_dir) / "run.log")

    def beam_pipeline_args(self) -> List[str]:
        """Beam options of the Beam-based components: Dataflow for vertex, the DirectRunner locally."""
        if self.orchestrator == "vertex":
            bucket = self.gcs_bucket.rstrip("/")
            args = [
                "--runner=DataflowRunner",
                f"--project={self.gcp_project}",
                f"--region={self.gcp_region}",
                f"--temp_location={bucket}/{self.pipeline_name}/dataflow/tmp",
                f"--staging_location={bucket}/{self.pipeline_name}/dataflow/staging",
                f"--machine_type={self.dataflow_machine_type}",
                f"--max_num_workers={self.dataflow_max_workers}",
                # Workers run the pipeline image, which has this package and its pinned dependencies.
                f"--sdk_container_image={self.pipeline_image}",
                "--experiments=use_runner_v2",
            ]
            return args + ([f"--service_account_email={self.service_account}"] if self.service_account else [])
        return [
            f"--runner={self.beam_runner}",
            # This package is what Beam workers need; naming it also stops TFX from building an sdist
            # of itself for every Beam component (about 2 s each), which local runners never use.
            f"--setup_file={PROJECT_ROOT / 'setup.py'}",
            f"--direct_running_mode={self.beam_direct_running_mode}",
            f"--direct_num_workers={self.beam_direct_num_workers}",
        ]


# The Beam steps that ran faster in worker processes at a million rows on 2 cores (docs/speed.md): TFDV's
# statistics and TFMA's per-example evaluation. CsvExampleGen converts on threads of its own, and Transform
# measured the same either way.
def parallel_steps(config: PipelineConfig) -> Tuple[str, ...]:
    """The steps that run in Beam's worker processes on large inputs: StatisticsGen, and TFMA's row-by-row Evaluator
    (the batched one is faster in memory: 15 s against 24 s on 200,000 eval rows with a baseline, 2 cores)."""
    return ("StatisticsGen",) + (("Evaluator",) if config.evaluator_engine == "tfma" else ())


EVALUATOR_ENGINES = ("batched", "tfma")


def parallel_beam_args(config: PipelineConfig, input_rows: int) -> List[str]:
    """Beam options for parallel_steps on `input_rows` rows: from beam_parallel_rows rows, worker processes, as
    many as beam_direct_num_workers says if above 1, else one per CPU this process may use; below, none (the
    pipeline's own options: worker processes cost seconds to start and feed)."""
    if config.orchestrator == "vertex" or not config.beam_parallel_rows or input_rows < config.beam_parallel_rows:
        return []
    workers = config.beam_direct_num_workers if config.beam_direct_num_workers > 1 else len(os.sched_getaffinity(0))
    return ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]


def _coerce(name: str, field_type: Any, value: Any) -> Any:
    """Converts a profile or command-line value to the field's type, or says why it can't."""
    try:
        if field_type is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
        if field_type is int:
            return int(value)
        if field_type is float:
            return float(value)
        if field_type is str:
            return str(value)
        if field_type in (Tuple[int, ...], Tuple[str, ...]):
            item_type = int if field_type == Tuple[int, ...] else str
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            return tuple(item_type(str(item).strip()) for item in items if str(item).strip())
    except ValueError:
        raise ConfigError(f"setting {name!r}: cannot read {value!r} as {field_type}") from None
    raise ConfigError(f"setting {name!r}: unsupported type {field_type}")


def parse_overrides(pairs: Iterable[str]) -> Dict[str, str]:
    """Turns ['key=value', ...] from --set flags into a dict."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE")
        overrides[key.strip()] = value.strip()
    return overrides


def _profile_values(profile_path: pathlib.Path) -> Dict[str, Any]:
    """A profile's settings; `extends: NAME` starts from another profile's, so that each is written once."""
    values = yaml.safe_load(profile_path.read_text()) or {}
    base = values.pop("extends", None)
    if base is None:
        return values
    base_path = PROFILES_DIR / f"{base}.yaml"
    if not base_path.is_file():
        raise ConfigError(f"{profile_path} extends unknown profile {base!r}")
    return {**_profile_values(base_path), **values}


def load_config(profile: str = "local", overrides: Optional[Mapping[str, Any]] = None) -> PipelineConfig:
    """Builds the run's config from pipeline/profiles/<profile>.yaml, then applies `overrides`."""
    profile_path = PROFILES_DIR / f"{profile}.yaml"
    if not profile_path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown profile {profile!r}: no {profile_path}; known profiles: {', '.join(known)}")
    values = _profile_values(profile_path)
    fields = {f.name: f for f in dataclasses.fields(PipelineConfig) if f.name != "profile"}
    values.update(
        {name: os.environ[ENV_PREFIX + name.upper()] for name in fields if ENV_PREFIX + name.upper() in os.environ}
    )
    values.update(overrides or {})
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)} (from {profile_path} or --set); "
            f"known: {', '.join(sorted(fields))}"
        )
    required = {name for name, f in fields.items() if f.default is dataclasses.MISSING}
    missing = sorted(required - set(values))
    if missing:
        raise ConfigError(f"setting(s) {', '.join(missing)} missing: set them in {profile_path} or with --set")
    typed = {name: _coerce(name, fields[name].type, value) for name, value in values.items()}
    for key in ("data_dir", "output_dir", "schema_dir"):
        path = pathlib.Path(typed[key]).expanduser()
        typed[key] = str(path if path.is_absolute() else (PROJECT_ROOT / path))
    bulk = typed.get("bulk_inference_dir", "")
    if bulk and "://" not in bulk:
        path = pathlib.Path(bulk).expanduser()
        typed["bulk_inference_dir"] = str(path if path.is_absolute() else (PROJECT_ROOT / path))
    if typed["input_pattern"] == "auto":
        typed["input_pattern"] = _input_pattern(pathlib.Path(typed["data_dir"]))
    config = PipelineConfig(profile=profile, **typed)
    _check(config, profile_path)
    return config


def _input_pattern(data_dir: pathlib.Path) -> str:
    """span-{SPAN}/*.csv when data_dir holds span-N folders (each run reads the newest), else *.csv."""
    has_spans = data_dir.is_dir() and any(SPAN_FOLDER.match(p.name) and p.is_dir() for p in data_dir.iterdir())
    return SPAN_PATTERN if has_spans else "*.csv"


_WATCH_POSITIVE = (
    "watch_poll_seconds",
    "watch_interval_seconds",
    "watch_window_requests",
    "watch_retry_seconds",
    "watch_max_attempts",
    "decay_min_outcomes",
    "decay_window_outcomes",
)


def _check(config: PipelineConfig, profile_path: pathlib.Path) -> None:
    """Rejects values that would only fail later, deep inside a component."""
    if config.strategy not in STRATEGIES:
        raise ConfigError(
            f"strategy {config.strategy!r} is not one of {', '.join(STRATEGIES)} "
            f"(set it in {profile_path} or with --set strategy=...)"
        )
    if config.evaluator_engine not in EVALUATOR_ENGINES:
        raise ConfigError(f"evaluator_engine {config.evaluator_engine!r} is not one of {', '.join(EVALUATOR_ENGINES)}")
    if config.beam_direct_running_mode not in ("in_memory", "multi_threading", "multi_processing"):
        raise ConfigError(
            f"beam_direct_running_mode {config.beam_direct_running_mode!r} is not "
            "in_memory, multi_threading or multi_processing"
        )
    for name in ("train_hash_buckets", "eval_hash_buckets", "batch_size", "steps_at_once"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1, not {getattr(config, name)}")
    if config.beam_parallel_rows < 0:
        raise ConfigError(f"beam_parallel_rows must be 0 (never) or a number of rows, not {config.beam_parallel_rows}")
    unknown_checks = sorted(set(config.warning_checks) - set(CHECKS))
    if unknown_checks:
        raise ConfigError(f"warning_checks: unknown check(s) {', '.join(unknown_checks)}; known: {', '.join(CHECKS)}")
    if config.trainer_replica_count > 1 and config.strategy != "multi_worker_mirrored":
        raise ConfigError(
            f"trainer_replica_count {config.trainer_replica_count} needs strategy "
            f"multi_worker_mirrored, not {config.strategy!r}: other strategies would train a model "
            "per replica, each writing to the same folder"
        )
    if config.min_drift_rows < 0:
        raise ConfigError(f"min_drift_rows must be 0 (always a verdict) or positive, not {config.min_drift_rows}")
    if config.training_window_spans < 1:
        raise ConfigError(f"training_window_spans must be at least 1, not {config.training_window_spans}")
    if config.recency_half_life_spans < 0:
        raise ConfigError(f"recency_half_life_spans must be 0 (off) or positive, not {config.recency_half_life_spans}")
    for name in ("mask_rate", "min_imputed_presence"):
        if not 0 <= getattr(config, name) <= 1:
            raise ConfigError(f"{name} must be between 0 and 1, not {getattr(config, name)}")
    bulk = config.bulk_inference_dir
    if bulk and config.orchestrator == "vertex" and not bulk.startswith("gs://"):
        raise ConfigError(f"bulk_inference_dir {bulk}: Dataflow's workers read it, so it must be a gs:// folder")
    if bulk and "://" not in bulk and not glob.glob(os.path.join(bulk, "*.csv")):
        raise ConfigError(
            f"bulk_inference_dir {bulk} holds no CSV file (*.csv) to predict; set it to a folder of "
            "unlabelled rows in the table's schema, or to '' for no BulkInferrer step"
        )
    for name in ("infra_eval_requests", "infra_max_memory_mb", "infra_max_p99_ms", "infra_load_timeout_seconds"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive, not {getattr(config, name)} (set it in {profile_path})")
    for name in ("tuner_trials", "tuner_parallel_trials"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1, not {getattr(config, name)} (set it in {profile_path})")
    if config.tuner_parallel_trials > 1 and config.orchestrator != "vertex":
        raise ConfigError(
            f"tuner_parallel_trials {config.tuner_parallel_trials}: parallel trials run on Vertex AI "
            "only; a local search runs one trial at a time (set it to 1)"
        )
    if config.train_epochs <= 0:
        raise ConfigError(f"train_epochs must be positive, not {config.train_epochs}")
    for name in _WATCH_POSITIVE:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive, not {getattr(config, name)} (set it in {profile_path})")
    for name in ("watch_false_alarm_rate", "decay_alpha"):
        if not 0 < getattr(config, name) < 0.5:
            raise ConfigError(f"{name} must be a chance between 0 and 0.5, not {getattr(config, name)}")
    if config.input_span < -1:
        raise ConfigError(f"input_span must be a span number, or -1 for the newest, not {config.input_span}")
    if config.input_span >= 0 and "{SPAN}" not in config.input_pattern:
        raise ConfigError(f"input_span {config.input_span}: input_pattern {config.input_pattern!r} has no {{SPAN}}")
    if config.vertex_monitoring_interval_hours < 1:
        raise ConfigError(
            f"vertex_monitoring_interval_hours {config.vertex_monitoring_interval_hours}: Vertex AI Model "
            "Monitoring's shortest interval is 1 hour (babyweight watch checks more often, locally)"
        )
    if config.orchestrator not in ORCHESTRATORS:
        raise ConfigError(
            f"orchestrator {config.orchestrator!r} is not one of {', '.join(ORCHESTRATORS)} (set it in {profile_path})"
        )
    if config.orchestrator == "vertex":
        missing = [
            name
            for name in ("gcp_project", "gcp_region", "gcs_bucket", "pipeline_image", "serving_image")
            if not getattr(config, name)
        ]
        if missing:
            raise ConfigError(
                f"the {config.profile} profile needs {', '.join(missing)}: set "
                + ", ".join(f"{ENV_PREFIX}{name.upper()}" for name in missing)
                + f" in the environment, pass --set {missing[0]}=..., or write them in {profile_path}"
            )
        if config.training_window_spans != 1:
            raise ConfigError(
                "training_window_spans must be 1 on Vertex: its compiler takes only TFX's built-in "
                f"resolvers, not the span window (set it in {profile_path})"
            )
        if not config.gcs_bucket.startswith("gs://"):
            raise ConfigError(f"gcs_bucket {config.gcs_bucket!r} must be a Cloud Storage path like gs://my-bucket")


def write_bench_figures(output_dir: str, name: str, results: Any) -> None:
    """A benchmark's figures as outputs/bench/NAME.json, and where they went."""
    out = pathlib.Path(output_dir) / "bench" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {out}")
