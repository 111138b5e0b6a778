"""ML Metadata as TFX writes it: pipeline runs, the steps of a run, artifacts and the events between them.

The run summary, the benchmark and `babyweight metadata` all read the store through this one module.
"""

import contextlib
import dataclasses
import fcntl
import json
import pathlib
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from ml_metadata import metadata_store
from ml_metadata.proto import metadata_store_pb2

INPUT_EVENTS = (metadata_store_pb2.Event.INPUT, metadata_store_pb2.Event.DECLARED_INPUT)
OUTPUT_EVENTS = (metadata_store_pb2.Event.OUTPUT, metadata_store_pb2.Event.DECLARED_OUTPUT)
STATES = {value: name.lower() for name, value in metadata_store_pb2.Execution.State.items()}


class MetadataError(RuntimeError):
    """A store, run or artifact that isn't there; the message says what exists instead."""


def value_of(value: metadata_store_pb2.Value) -> Any:
    kind = value.WhichOneof("value")
    if kind == "struct_value":
        return json.loads(json.dumps(dict(value.struct_value)))
    return getattr(value, kind) if kind else None


@dataclasses.dataclass
class StepRecord:
    """One component's execution in a run."""

    node_id: str
    state: str  # complete, cached, failed, running, ...
    seconds: float
    started: float  # seconds since the epoch: when the execution was registered, and last updated (its end)
    ended: float
    outputs: Dict[str, List[metadata_store_pb2.Artifact]]  # by output key
    inputs: Dict[str, List[metadata_store_pb2.Artifact]]  # by input key


class Store:
    """ML Metadata read by TFX's own conventions: run and node contexts, typed artifacts, events."""

    def __init__(self, store: metadata_store.MetadataStore):
        self._store = store
        self._types = {t.id: t.name for t in store.get_artifact_types()}
        self._execution_types = {t.id: t.name for t in store.get_execution_types()}
        self._context_types = {t.id: t.name for t in store.get_context_types()}

    def runs(self) -> List[metadata_store_pb2.Context]:
        runs = self._store.get_contexts_by_type("pipeline_run")
        return sorted(runs, key=lambda run: (run.create_time_since_epoch, run.id))

    def run(self, run_ref: str) -> metadata_store_pb2.Context:
        runs = self.runs()
        if not runs:
            raise MetadataError("the store has no pipeline runs yet (make run writes one)")
        if run_ref.lstrip("-").isdigit() and int(run_ref) < 0 and -int(run_ref) <= len(runs):
            return runs[int(run_ref)]
        for run in runs:
            if run.name == run_ref:
                return run
        raise MetadataError(f"unknown run {run_ref!r}; runs: {', '.join(run.name for run in runs)}")

    def run_times(self, run: metadata_store_pb2.Context) -> Tuple[int, float]:
        """When a run's first step started (ms since the epoch) and the seconds until its last step ended."""
        executions = self.executions(run)
        start = min((e.create_time_since_epoch for e in executions), default=run.create_time_since_epoch)
        end = max((e.last_update_time_since_epoch for e in executions), default=start)
        return start, round((end - start) / 1000, 1)

    def interrupted(self, run: metadata_store_pb2.Context, sqlite_path: Optional[str]) -> bool:
        """Whether a run whose steps ML Metadata records as running was interrupted: no process runs the pipeline on
        the SQLite store at `sqlite_path` (runner_alive), or a later run has started on it (local runs of one store
        follow each other). On a MySQL store (`sqlite_path` None), where runs may overlap, this can't be told."""
        if sqlite_path is None:
            return False
        return runner_alive(sqlite_path) is False or run.id != self.runs()[-1].id

    def run_status(self, run: metadata_store_pb2.Context, sqlite_path: Optional[str]) -> str:
        """failed, interrupted, running or complete (`interrupted`'s `sqlite_path`)."""
        states = [STATES.get(e.last_known_state, "unknown") for e in self.executions(run)]
        if "failed" in states:
            return "failed"
        if "running" in states:
            return "interrupted" if self.interrupted(run, sqlite_path) else "running"
        return "complete"

    def node_of(self, execution: metadata_store_pb2.Execution) -> str:
        for context in self._store.get_contexts_by_execution(execution.id):
            if self._context_types[context.type_id] == "node":
                return context.name.split(".", 1)[-1]
        return self._execution_types.get(execution.type_id, "?").rsplit(".", 1)[-1]

    def run_of(self, execution: metadata_store_pb2.Execution) -> str:
        for context in self._store.get_contexts_by_execution(execution.id):
            if self._context_types[context.type_id] == "pipeline_run":
                return context.name
        return ""

    def executions(self, run: metadata_store_pb2.Context) -> List[metadata_store_pb2.Execution]:
        executions = self._store.get_executions_by_context(run.id)
        return sorted(executions, key=lambda e: (e.create_time_since_epoch, e.id))

    def events(self, execution_ids: Iterable[int] = (), artifact_ids: Iterable[int] = ()):
        if execution_ids:
            return self._store.get_events_by_execution_ids(list(execution_ids))
        return self._store.get_events_by_artifact_ids(list(artifact_ids))

    def artifact(self, artifact_id: str) -> metadata_store_pb2.Artifact:
        found = self._store.get_artifacts_by_id([int(artifact_id)]) if str(artifact_id).isdigit() else []
        if not found:
            ids = sorted(a.id for a in self._store.get_artifacts())
            known = f"artifacts {ids[0]}-{ids[-1]}" if ids else "no artifacts"
            raise MetadataError(
                f"unknown artifact {artifact_id!r}; the store has {known} (babyweight metadata artifacts lists them)"
            )
        return found[0]

    def artifacts_by_uri(self, uri: str) -> List[metadata_store_pb2.Artifact]:
        return self._store.get_artifacts_by_uri(uri)

    def artifacts(self) -> List[metadata_store_pb2.Artifact]:
        return sorted(self._store.get_artifacts(), key=lambda a: a.id)

    def executions_by_id(self, ids: Iterable[int]) -> List[metadata_store_pb2.Execution]:
        return self._store.get_executions_by_id(list(ids))

    def artifacts_by_id(self, ids: Iterable[int]) -> List[metadata_store_pb2.Artifact]:
        return self._store.get_artifacts_by_id(list(ids))

    def type_name(self, artifact: metadata_store_pb2.Artifact) -> str:
        return self._types.get(artifact.type_id, "?")

    def producer(self, artifact: metadata_store_pb2.Artifact) -> Optional[metadata_store_pb2.Execution]:
        outputs = [e for e in self.events(artifact_ids=[artifact.id]) if e.type in OUTPUT_EVENTS]
        if not outputs:
            return None
        return min(self.executions_by_id([e.execution_id for e in outputs]), key=lambda e: e.id)

    def describe(self, artifact: metadata_store_pb2.Artifact) -> Dict[str, Any]:
        producer = self.producer(artifact)
        properties = {k: value_of(v) for k, v in artifact.properties.items()}
        properties.update(
            {
                k: value_of(v)
                for k, v in artifact.custom_properties.items()
                if k not in ("tfx_version", "is_external", "state")
            }
        )
        return {
            "id": artifact.id,
            "type": self.type_name(artifact),
            "producer": self.node_of(producer) if producer else None,
            "uri": artifact.uri,
            "properties": properties,
        }

    def outputs(self, execution: metadata_store_pb2.Execution) -> Dict[str, List[metadata_store_pb2.Artifact]]:
        """An execution's output artifacts by output key."""
        return self._artifacts_by_key(execution, OUTPUT_EVENTS)

    def inputs(self, execution: metadata_store_pb2.Execution) -> Dict[str, List[metadata_store_pb2.Artifact]]:
        """An execution's input artifacts by input key."""
        return self._artifacts_by_key(execution, INPUT_EVENTS)

    def _artifacts_by_key(
        self, execution: metadata_store_pb2.Execution, event_types: Iterable[int]
    ) -> Dict[str, List[metadata_store_pb2.Artifact]]:
        events = [e for e in self.events(execution_ids=[execution.id]) if e.type in event_types]
        artifacts = {a.id: a for a in self.artifacts_by_id([e.artifact_id for e in events])}
        by_key: Dict[str, List[metadata_store_pb2.Artifact]] = {}
        for event in events:
            key = next((step.key for step in event.path.steps if step.HasField("key")), "")
            by_key.setdefault(key, []).append(artifacts[event.artifact_id])
        return by_key

    def node_executions(self, pipeline_name: str, node_id: str) -> List[metadata_store_pb2.Execution]:
        """Every execution of one pipeline node, across runs, oldest first."""
        context = self._store.get_context_by_type_and_name("node", f"{pipeline_name}.{node_id}")
        return sorted(self._store.get_executions_by_context(context.id), key=lambda e: e.id) if context else []

    def steps(self, run: metadata_store_pb2.Context) -> List[StepRecord]:
        """The executions of a run, in the order they started, with their output artifacts."""
        return [
            StepRecord(
                node_id=self.node_of(execution),
                state=STATES.get(execution.last_known_state, "unknown"),
                seconds=round((execution.last_update_time_since_epoch - execution.create_time_since_epoch) / 1000, 1),
                started=execution.create_time_since_epoch / 1000,
                ended=execution.last_update_time_since_epoch / 1000,
                outputs=self.outputs(execution),
                inputs=self.inputs(execution),
            )
            for execution in self.executions(run)
        ]


def overlaps(steps: List[StepRecord], min_seconds: float = 0.5) -> List[Tuple[str, str, float]]:
    """The pairs of steps that ran at the same time for at least `min_seconds`, with those seconds, longest first."""
    pairs = []
    for index, first in enumerate(steps):
        for second in steps[index + 1 :]:
            seconds = min(first.ended, second.ended) - max(first.started, second.started)
            if seconds >= min_seconds:
                pairs.append((first.node_id, second.node_id, round(seconds, 1)))
    return sorted(pairs, key=lambda pair: -pair[2])


def open_sqlite(path: str, read_only: bool = True) -> Store:
    """The SQLite store at `path`; MetadataError if there is none."""
    if not pathlib.Path(path).is_file():
        raise MetadataError(f"no ML Metadata store at {path} (make run writes one; or pass --store PATH)")
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = path
    if read_only:
        config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    return Store(metadata_store.MetadataStore(config))


RUNNER_SUFFIX = ".runner"  # metadata.sqlite.runner: locked (shared) by every process running the pipeline on it


def _runner_path(store_path: str) -> pathlib.Path:
    return pathlib.Path(store_path + RUNNER_SUFFIX)


@contextlib.contextmanager
def runner_marker(store_path: str) -> Iterator[None]:
    """Holds a shared lock on the store's runner file while the block runs. The system drops the lock when the
    process ends, however it ends (kill -9, a lost machine), so a held lock means a live run; runs at once share it."""
    path = _runner_path(store_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        yield


def runner_alive(store_path: str) -> Optional[bool]:
    """Whether a process is running the pipeline on the SQLite store at `store_path`: True while one holds the
    runner file's lock, False if none does, None if this can't be told (the file can't be opened for locking)."""
    return lock_held(_runner_path(store_path))


def lock_held(path: pathlib.Path) -> Optional[bool]:
    """Whether a process holds an flock on `path` (False for no file; None if it can't be opened to tell)."""
    if not path.exists():
        return False
    try:
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except OSError:
        return None
