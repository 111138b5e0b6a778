"""Each strategy name builds its tf.distribute strategy; Mirrored really trains on two logical CPUs."""

import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf

from models import distribution


def test_default_strategy_has_one_replica_and_keeps_the_batch():
    strategy = distribution.select_strategy("default")
    assert strategy.num_replicas_in_sync == 1
    assert distribution.global_batch_size(256, strategy) == 256


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown distribution strategy 'parameter_server'"):
        distribution.select_strategy("parameter_server")


def test_tpu_strategy_resolves_connects_and_initializes_the_tpu(monkeypatch):
    calls = []

    class FakeResolver:
        def __init__(self, tpu):
            calls.append(("resolve", tpu))

    class FakeTPUStrategy:
        num_replicas_in_sync = 8

        def __init__(self, resolver):
            calls.append(("strategy", type(resolver).__name__))

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", FakeResolver)
    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster", lambda r: calls.append(("connect",)))
    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system", lambda r: calls.append(("initialize",)))
    monkeypatch.setattr(tf.distribute, "TPUStrategy", FakeTPUStrategy)
    strategy = distribution.select_strategy("tpu", "grpc://10.0.0.2:8470")
    assert calls == [("resolve", "grpc://10.0.0.2:8470"), ("connect",), ("initialize",), ("strategy", "FakeResolver")]
    assert distribution.global_batch_size(64, strategy) == 512


def _run_with_two_cpus(body: str) -> subprocess.CompletedProcess:
    # Logical devices must be configured before TensorFlow starts, hence a fresh interpreter.
    script = textwrap.dedent("""
        import os
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        import numpy as np
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from models import distribution, model
        from tests.models.test_model import _batch
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_mirrored_strategy_trains_one_step_on_two_logical_cpus():
    result = _run_with_two_cpus("""
        strategy = distribution.select_strategy("mirrored")
        assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
        assert distribution.global_batch_size(32, strategy) == 64
        with strategy.scope():
            keras_model = model.build_keras_model([8], 2, 0.01)
        inputs = _batch(64)
        before = [w.numpy().copy() for w in keras_model.trainable_weights]
        dataset = tf.data.Dataset.from_tensor_slices((inputs, np.full(64, 7.0, np.float32))).batch(64)
        keras_model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0)
        changed = sum(not np.allclose(b, w.numpy()) for b, w in zip(before, keras_model.trainable_weights))
        assert changed > 0
        print("replicas", strategy.num_replicas_in_sync, "changed", changed)
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replicas 2" in result.stdout


@pytest.mark.slow
def test_multi_worker_mirrored_strategy_builds_for_a_single_worker():
    result = _run_with_two_cpus("""
        os.environ.pop("TF_CONFIG", None)
        strategy = distribution.select_strategy("multi_worker_mirrored")
        print("multi-worker", isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "multi-worker True" in result.stdout
