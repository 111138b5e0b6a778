"""Config: one object from a profile file plus overrides, with clear errors."""

import pytest

from pipeline import config as config_lib


def test_local_profile_loads_with_paths_under_the_project():
    config = config_lib.load_config()
    assert config.profile == "local"
    assert config.data_dir == str(config_lib.PROJECT_ROOT / "data" / "natality")
    assert config.metadata_path.endswith("outputs/metadata.sqlite")
    assert "--direct_running_mode=in_memory" in config.beam_pipeline_args()


def test_overrides_are_typed_like_the_field():
    config = config_lib.load_config(
        overrides=config_lib.parse_overrides(
            ["train_epochs=2", "enable_cache=false", "hidden_units=8,4", "learning_rate=0.1", "output_dir=/tmp/x"]
        )
    )
    assert config.train_epochs == 2 and config.enable_cache is False
    assert config.hidden_units == (8, 4) and config.learning_rate == 0.1
    assert config.output_dir == "/tmp/x"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train_epoch": "2"}, "unknown setting(s) train_epoch"),
        (
            {"strategy": "parameter_server"},
            "strategy 'parameter_server' is not one of default, mirrored, multi_worker_mirrored, tpu",
        ),
        ({"orchestrator": "airflow"}, "orchestrator 'airflow' is not one of local, vertex"),
        ({"batch_size": "many"}, "setting 'batch_size': cannot read 'many'"),
        ({"eval_hash_buckets": "0"}, "eval_hash_buckets must be at least 1"),
        ({"warning_checks": "drift,colour"}, "warning_checks: unknown check(s) colour; known: drift, missing"),
        ({"training_window_spans": "0"}, "training_window_spans must be at least 1"),
        ({"recency_half_life_spans": "-1"}, "recency_half_life_spans must be 0 (off) or positive"),
        ({"min_imputed_presence": "1.5"}, "min_imputed_presence must be between 0 and 1, not 1.5"),
        ({"mask_rate": "-0.1"}, "mask_rate must be between 0 and 1, not -0.1"),
        ({"min_drift_rows": "-1"}, "min_drift_rows must be 0 (always a verdict) or positive, not -1"),
        ({"trainer_replica_count": "2"}, "trainer_replica_count 2 needs strategy multi_worker_mirrored, not 'default'"),
    ],
)
def test_bad_settings_say_which_and_where(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_lib.load_config(overrides=overrides)


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(config_lib.ConfigError, match="unknown profile 'cloud'.*known profiles: local"):
        config_lib.load_config("cloud")


def test_set_flag_needs_key_and_value():
    with pytest.raises(config_lib.ConfigError, match="expected KEY=VALUE"):
        config_lib.parse_overrides(["train_epochs"])


def test_input_pattern_reads_the_newest_span_when_data_comes_in_span_folders(tmp_path):
    assert config_lib.load_config(overrides={"data_dir": str(tmp_path)}).input_pattern == "*.csv"
    (tmp_path / "span-1").mkdir()
    (tmp_path / "span-12").mkdir()
    assert config_lib.load_config(overrides={"data_dir": str(tmp_path)}).input_pattern == "span-{SPAN}/*.csv"
    assert (
        config_lib.load_config(overrides={"data_dir": str(tmp_path), "input_pattern": "x/*.csv"}).input_pattern
        == "x/*.csv"
    )


def test_input_span_needs_a_span_pattern_and_a_span_number(tmp_path):
    (tmp_path / "span-3").mkdir()
    assert config_lib.load_config(overrides={"data_dir": str(tmp_path), "input_span": "3"}).input_span == 3
    with pytest.raises(config_lib.ConfigError, match="input_span 3: input_pattern '\\*.csv' has no {SPAN}"):
        config_lib.load_config(overrides={"input_span": "3"})
    with pytest.raises(config_lib.ConfigError, match="input_span must be a span number, or -1"):
        config_lib.load_config(overrides={"data_dir": str(tmp_path), "input_span": "-2"})


def test_warning_checks_come_as_a_list_or_comma_separated():
    assert config_lib.load_config().warning_checks == ()
    assert config_lib.load_config(overrides={"warning_checks": "drift, unexpected"}).warning_checks == (
        "drift",
        "unexpected",
    )


def test_bulk_inference_dir_is_off_by_default_and_needs_csv_files_when_set(tmp_path):
    assert config_lib.load_config().bulk_inference_dir == ""
    with pytest.raises(config_lib.ConfigError, match=f"bulk_inference_dir {tmp_path} holds no CSV file"):
        config_lib.load_config(overrides={"bulk_inference_dir": str(tmp_path)})
    (tmp_path / "births.csv").write_text("mother_age\n30\n")
    assert config_lib.load_config(overrides={"bulk_inference_dir": str(tmp_path)}).bulk_inference_dir == str(tmp_path)
    cloud = config_lib.load_config(overrides={"bulk_inference_dir": "gs://b/unlabelled"})  # read by the workers
    assert cloud.bulk_inference_dir == "gs://b/unlabelled"
