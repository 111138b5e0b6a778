"""Distribution strategies of the Trainer, chosen by name from the config.

TensorFlow is imported where a strategy is made, not with the module: the config (pipeline/config.py) checks
names against STRATEGIES, and commands that only read the config need no TensorFlow.
"""

import logging
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker_mirrored", "tpu")


def select_strategy(name: str, tpu_address: str = "") -> "tf.distribute.Strategy":
    """The strategy named in the config.

    default: one device; mirrored: every local GPU (or CPU); multi_worker_mirrored: every worker of a
    Vertex AI custom job (from TF_CONFIG); tpu: the TPU at `tpu_address` ('' = the job's own TPU).
    """
    import tensorflow as tf

    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    elif name == "multi_worker_mirrored":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        strategy = tf.distribute.TPUStrategy(resolver)
    else:
        raise ValueError(f"unknown distribution strategy {name!r}: expected one of {', '.join(STRATEGIES)}")
    logging.info("distribution strategy %s with %d replica(s)", name, strategy.num_replicas_in_sync)
    return strategy


def global_batch_size(per_replica_batch_size: int, strategy: "tf.distribute.Strategy") -> int:
    """The batch the input pipeline must produce: one per-replica batch for every replica in sync."""
    size = per_replica_batch_size * strategy.num_replicas_in_sync
    logging.info("batch size %d per replica, %d in all", per_replica_batch_size, size)
    return size


def is_chief(strategy: "tf.distribute.Strategy") -> bool:
    """Whether this process writes the model and its logs: the only process, or the chief of a multi-worker
    cluster (worker 0 where the cluster names no chief), as TensorFlow's multi-worker guide does."""
    resolver = getattr(strategy, "cluster_resolver", None)
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if not cluster:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (task_type == "worker" and task_id == 0 and "chief" not in cluster)


def write_dir(path: str, strategy: "tf.distribute.Strategy") -> str:
    """Where this process writes what belongs at `path`: `path` on the chief, a temporary folder of its own
    on the other workers (they must write too: saving under MultiWorkerMirroredStrategy is collective)."""
    if is_chief(strategy):
        return path
    return tempfile.mkdtemp(prefix=f"babyweight-worker-{strategy.cluster_resolver.task_id}-")
