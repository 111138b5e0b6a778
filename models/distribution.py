"""Distribution strategies of the Trainer, chosen by name from the config."""
import logging

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker_mirrored", "tpu")


def select_strategy(name: str, tpu_address: str = "") -> tf.distribute.Strategy:
    """The strategy named in the config.

    default: one device; mirrored: every local GPU (or CPU); multi_worker_mirrored: every worker of a
    Vertex AI custom job (from TF_CONFIG); tpu: the TPU at `tpu_address` ('' = the job's own TPU).
    """
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


def global_batch_size(per_replica_batch_size: int, strategy: tf.distribute.Strategy) -> int:
    """The batch the input pipeline must produce: one per-replica batch for every replica in sync."""
    size = per_replica_batch_size * strategy.num_replicas_in_sync
    logging.info("batch size %d per replica, %d in all", per_replica_batch_size, size)
    return size
