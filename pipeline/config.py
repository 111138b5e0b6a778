"""One frozen configuration object per run: a profile file plus command-line overrides."""
import dataclasses
import pathlib
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import yaml

PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
PROFILES_DIR = PROJECT_ROOT / "pipeline" / "profiles"
STRATEGIES = ("default", "mirrored")


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range; the message says which and where to set it."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything a run needs; built by `load_config`, passed down, never read from globals."""

    profile: str
    pipeline_name: str
    data_dir: str  # folder of CSV files in the natality table's 31-column schema
    input_pattern: str  # glob of the CSV files inside data_dir
    output_dir: str  # pipeline root, metadata store, pushed models and logs all go under here
    schema_dir: str  # curated schema (schema.pbtxt) imported by ImportSchemaGen
    train_hash_buckets: int  # train/eval split of ExampleGen by hash, e.g. 4:1
    eval_hash_buckets: int
    enable_cache: bool
    beam_runner: str  # DirectRunner (portable, FnApiRunner) or BundleBasedDirectRunner
    beam_direct_running_mode: str  # DirectRunner's mode: in_memory, multi_threading or multi_processing
    beam_direct_num_workers: int  # 0 = one per CPU
    strategy: str  # distribution strategy of the Trainer: one of STRATEGIES
    train_epochs: int  # passes over the training split...
    min_train_steps: int  # ...but at least this many steps, so that small data sets converge too
    batch_size: int  # global batch size
    learning_rate: float
    hidden_units: Tuple[int, ...]
    embedding_dim: int
    eval_rmse_threshold: float  # pounds: a model whose eval RMSE is above this is not blessed
    eval_mae_threshold: float  # pounds: a model whose eval MAE is above this is not blessed
    eval_rmse_max_increase: float  # pounds: a model this much worse than the blessed baseline is not blessed
    block_on_anomalies: bool  # stop the run before Transform when validation finds anomalies

    @property
    def pipeline_root(self) -> str:
        return str(pathlib.Path(self.output_dir) / "pipeline")

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
        """Beam's DirectRunner options for the Beam-based components."""
        return [
            f"--runner={self.beam_runner}",
            # This package is what Beam workers need; naming it also stops TFX from building an sdist
            # of itself for every Beam component (about 2 s each), which local runners never use.
            f"--setup_file={PROJECT_ROOT / 'setup.py'}",
            f"--direct_running_mode={self.beam_direct_running_mode}",
            f"--direct_num_workers={self.beam_direct_num_workers}",
        ]


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
        if field_type == Tuple[int, ...]:
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            return tuple(int(item) for item in items)
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


def load_config(profile: str = "local", overrides: Optional[Mapping[str, Any]] = None) -> PipelineConfig:
    """Builds the run's config from pipeline/profiles/<profile>.yaml, then applies `overrides`."""
    profile_path = PROFILES_DIR / f"{profile}.yaml"
    if not profile_path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown profile {profile!r}: no {profile_path}; known profiles: {', '.join(known)}")
    values = yaml.safe_load(profile_path.read_text()) or {}
    values.update(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(PipelineConfig) if f.name != "profile"}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} (from {profile_path} or --set); "
                          f"known: {', '.join(sorted(fields))}")
    missing = sorted(set(fields) - set(values))
    if missing:
        raise ConfigError(f"setting(s) {', '.join(missing)} missing: set them in {profile_path} or with --set")
    typed = {name: _coerce(name, fields[name].type, value) for name, value in values.items()}
    for key in ("data_dir", "output_dir", "schema_dir"):
        path = pathlib.Path(typed[key]).expanduser()
        typed[key] = str(path if path.is_absolute() else (PROJECT_ROOT / path))
    config = PipelineConfig(profile=profile, **typed)
    _check(config, profile_path)
    return config


def _check(config: PipelineConfig, profile_path: pathlib.Path) -> None:
    """Rejects values that would only fail later, deep inside a component."""
    if config.strategy not in STRATEGIES:
        raise ConfigError(f"strategy {config.strategy!r} is not one of {', '.join(STRATEGIES)} "
                          f"(set it in {profile_path} or with --set strategy=...)")
    if config.beam_direct_running_mode not in ("in_memory", "multi_threading", "multi_processing"):
        raise ConfigError(f"beam_direct_running_mode {config.beam_direct_running_mode!r} is not "
                          "in_memory, multi_threading or multi_processing")
    for name in ("train_hash_buckets", "eval_hash_buckets", "batch_size"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1, not {getattr(config, name)}")
    if config.train_epochs <= 0:
        raise ConfigError(f"train_epochs must be positive, not {config.train_epochs}")
