"""The local runner: TFX's LocalDagRunner, with independent steps side by side.

TFX's LocalDagRunner launches one step at a time, in topological order. This runner launches each step, with TFX's
own Launcher (driver, caching, executor, publisher, lineage: unchanged), as soon as every step it depends on is
done, up to `workers` at once, each in a thread of this process (the steps' heavy work, TensorFlow's, Beam's
worker processes', scikit-learn's, leaves Python's lock). ML Metadata calls are serialised: one at a time,
through one lock. A step in `alone` runs with no other beside it (a timing it measures, a seed it sets for the
whole process); a step in `after_all` starts only when every step not downstream of it has succeeded (a push
publishes outside the pipeline: not in a run that fails). A failed step stops its dependants (and the
`after_all` steps) only; the others run on, and the run then raises the failure, as LocalDagRunner does.
Interrupted (Ctrl-C), it starts nothing more and the steps running finish. Which steps overlapped, ML Metadata
tells (`mlmd.overlaps`).
"""

import concurrent.futures
import datetime
import logging
import threading
from typing import Any, Dict, Iterable, Optional, Set

from tfx.dsl.compiler import constants
from tfx.orchestration import metadata
from tfx.orchestration.local import runner_utils
from tfx.orchestration.portable import launcher, runtime_parameter_utils, tfx_runner
from tfx.proto.orchestration import pipeline_pb2

_MLMD_LOCK = threading.RLock()


class _SerialStore:
    """An ML Metadata store whose calls take the runner's lock, one at a time across the steps' threads."""

    def __init__(self, store: Any):
        self._store = store

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)
        if not callable(attribute):
            return attribute

        def serialised(*args, **kwargs):
            with _MLMD_LOCK:
                return attribute(*args, **kwargs)

        return serialised


class _SerialMetadata(metadata.Metadata):
    """TFX's ML Metadata handle, its connection and every call serialised (`_SerialStore`)."""

    def __enter__(self) -> "_SerialMetadata":
        with _MLMD_LOCK:
            super().__enter__()
        return self

    def __exit__(self, *args) -> None:
        with _MLMD_LOCK:
            super().__exit__(*args)

    @property
    def store(self) -> Any:
        return _SerialStore(super().store)


class ParallelDagRunner(tfx_runner.IrBasedRunner):
    """Runs a pipeline locally, independent steps side by side (module docstring)."""

    def __init__(self, workers: int = 2, alone: Iterable[str] = (), after_all: Iterable[str] = ()):
        self.workers = workers
        self.alone = frozenset(alone)
        self.after_all = frozenset(after_all)

    def run_with_ir(self, pipeline: pipeline_pb2.Pipeline, run_options: Optional[pipeline_pb2.RunOptions] = None):
        if run_options is not None:
            raise ValueError("ParallelDagRunner runs whole pipelines: a partial run needs TFX's LocalDagRunner")
        runtime_parameter_utils.substitute_runtime_parameter(
            pipeline, {constants.PIPELINE_RUN_ID_PARAMETER_NAME: datetime.datetime.now().isoformat()}
        )
        deployment_config = runner_utils.extract_local_deployment_config(pipeline)
        connection = deployment_config.metadata_connection_config
        connection_config = getattr(connection, connection.WhichOneof("connection_config"))
        nodes = {
            node.pipeline_node.node_info.id: node.pipeline_node
            for node in pipeline.nodes
            if not node.pipeline_node.execution_options.HasField("skip")
        }
        order = list(nodes)  # topological: the compiler's order

        def launch(node_id: str) -> None:
            logging.info("Component %s is running.", node_id)
            launcher.Launcher(
                pipeline_node=nodes[node_id],
                mlmd_connection=_SerialMetadata(connection_config),
                pipeline_info=pipeline.pipeline_info,
                pipeline_runtime_spec=pipeline.runtime_spec,
                executor_spec=runner_utils.extract_executor_spec(deployment_config, node_id),
                custom_driver_spec=runner_utils.extract_custom_driver_spec(deployment_config, node_id),
            ).launch()
            logging.info("Component %s is finished.", node_id)

        downstream = {node_id: set() for node_id in nodes}  # each step's dependants, direct or not
        for node_id in reversed(order):
            for upstream_id in set(nodes[node_id].upstream_nodes) & set(nodes):
                downstream[upstream_id] |= {node_id} | downstream[node_id]
        needs = {  # the steps each waits for: its upstream ones, and for an `after_all` step every other one
            node_id: set(order) - downstream[node_id] - {node_id}
            if node_id in self.after_all
            else set(nodes[node_id].upstream_nodes) & set(nodes)
            for node_id in order
        }
        done: Set[str] = set()
        stopped: Set[str] = set()  # failed, or waiting for a failed step
        failures: Dict[str, BaseException] = {}
        running: Dict[concurrent.futures.Future, str] = {}
        pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="step")
        try:
            while True:
                for node_id in order:
                    if node_id in done or node_id in stopped or node_id in running.values():
                        continue
                    if needs[node_id] & stopped:
                        stopped.add(node_id)
                        logging.info("Component %s is not run: a step it waits for failed.", node_id)
                        continue
                    if not needs[node_id] <= done:
                        continue
                    if node_id in self.alone and running:
                        break  # it goes next, before any step after it
                    if len(running) < self.workers and not set(running.values()) & self.alone:
                        running[pool.submit(launch, node_id)] = node_id
                if not running:
                    break
                finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    node_id = running.pop(future)
                    if future.exception() is None:
                        done.add(node_id)
                    else:
                        failures[node_id] = future.exception()
                        stopped.add(node_id)
                        logging.error("Component %s failed", node_id, exc_info=future.exception())
        except BaseException:
            logging.error("Run interrupted: starting no more steps; %s finish first", ", ".join(running.values()))
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        if failures:
            raise failures[next(node_id for node_id in order if node_id in failures)]
