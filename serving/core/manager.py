"""Which versions are live: a source finds them, the version policy picks them, the loader readies them.

As in TF Serving: the folder is polled for version folders (integer names); the policy (latest N, all, or
specific versions, from TF Serving's model_config_list file) says which should be served; a new version is
loaded and warmed up before it takes traffic, and an older one leaves only once the versions that replace it
are available. A request takes a handle to one version (`resolve`) and keeps it to the end, so a version that
is being unloaded finishes the requests it has. A version that fails to load is refused with a log line and its
error in the status; it is tried again when its files change, and after a storage error during its load (as TF
Serving's max_num_load_retries) up to MAX_LOAD_RETRIES times with a backoff, so that a bucket's passing 503 doesn't
keep it out for good.

Storage faults keep what is served (TF Serving's availability-preserving policy): a listing that fails (a bucket
unreachable, a folder unreadable) or comes back empty unloads nothing; a failed poll is logged, counted
(`on_storage_error`) and retried with a backoff that doubles up to MAX_BACKOFF_SECONDS.
"""

import dataclasses
import logging
import os
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from models import features
from serving.core import contract, loader
from serving.model_server.settings import ServerSettings

LOADING, AVAILABLE, UNLOADING, END = "LOADING", "AVAILABLE", "UNLOADING", "END"
STATES = (LOADING, AVAILABLE, UNLOADING, END)
MAX_BACKOFF_SECONDS = 30.0
MAX_LOAD_RETRIES = 5  # a version that failed to load is tried again this many times, files changed or not
LOAD_RETRY_SECONDS = 2.0  # the first retry's wait; it doubles for each, up to MAX_BACKOFF_SECONDS
MIN_POLL_SECONDS = 0.01  # a --poll-seconds of 0 must not spin


class NotFound(LookupError):
    """Unknown model, version or label (HTTP 404)."""


class Unavailable(RuntimeError):
    """Nothing to answer with yet (HTTP 503)."""


class StorageError(OSError):
    """The model folder could not be listed; the message names it and the file system's reason."""


class ConfigFileError(ValueError):
    """The model config file can't be read; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """TF Serving's per-model settings that this server honours."""

    name: str
    base_path: str
    policy: str = "latest"  # latest, all or specific
    num_versions: int = 1  # latest: how many of the newest
    versions: Tuple[int, ...] = ()  # specific: which
    labels: Tuple[Tuple[str, int], ...] = ()

    def aspired(self, candidates: Sequence[int]) -> List[int]:
        """The versions the policy wants served, of those that can be (newest first)."""
        ordered = sorted(candidates, reverse=True)
        if self.policy == "all":
            return ordered
        if self.policy == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[: self.num_versions]


def read_model_config(path: str, name: str, default_base_path: str) -> ModelConfig:
    """The model's entry in a TF Serving model config file (text ModelServerConfig), or the defaults."""
    if not path:
        return ModelConfig(name, default_base_path)
    try:
        with tf.io.gfile.GFile(path) as handle:
            parsed = text_format.Parse(handle.read(), model_server_config_pb2.ModelServerConfig())
    except (OSError, tf.errors.OpError, text_format.ParseError) as error:
        raise ConfigFileError(f"{path}: {error}") from None
    entries = [c for c in parsed.model_config_list.config if c.name == name]
    if not entries:
        raise ConfigFileError(f"{path}: no model named {name!r} in model_config_list")
    entry = entries[0]
    base_path = entry.base_path or default_base_path
    if entry.base_path and not os.path.isabs(entry.base_path) and "://" not in entry.base_path:
        base_path = os.path.join(os.path.dirname(os.path.abspath(path)), entry.base_path)
    choice = entry.model_version_policy.WhichOneof("policy_choice") or "latest"
    policy = entry.model_version_policy
    return ModelConfig(
        name,
        base_path,
        choice,
        num_versions=(policy.latest.num_versions or 1) if choice == "latest" else 1,
        versions=tuple(policy.specific.versions) if choice == "specific" else (),
        labels=tuple(sorted(entry.version_labels.items())),
    )


def list_versions(base_path: str) -> Dict[int, str]:
    """Version folders (integer names) under base_path, or base_path itself if it holds a SavedModel; none if
    base_path does not exist (yet). Raises StorageError if it can't be listed (tf.io.gfile.isdir would say False)."""
    if tf.io.gfile.exists(os.path.join(base_path, "saved_model.pb")):  # one version, e.g. Vertex's AIP_STORAGE_URI
        name = os.path.basename(base_path.rstrip("/"))
        return {int(name) if name.isdigit() else 1: base_path}
    try:
        names = tf.io.gfile.listdir(base_path)
    except tf.errors.NotFoundError:
        if tf.io.gfile.exists(base_path):  # there but not a folder
            raise StorageError(f"the model folder {base_path} is not a folder") from None
        return {}
    except tf.errors.OpError as error:
        raise StorageError(f"can't list the model folder {base_path}: {error.message}") from error
    return {
        int(name.rstrip("/")): os.path.join(base_path, name.rstrip("/")) for name in names if name.rstrip("/").isdigit()
    }


def files_fingerprint(path: str) -> Tuple[Tuple[str, int], ...]:
    """The version folder's files and sizes: a failed version is retried when this changes (a copy finished)."""
    found = []
    for folder, _, files in tf.io.gfile.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            try:
                found.append((full, tf.io.gfile.stat(full).length))
            except tf.errors.NotFoundError:  # gone since the listing (a copy in progress)
                continue
    return tuple(sorted(found))


@dataclasses.dataclass
class VersionState:
    state: str
    error: str = ""


class Manager:
    """Keeps the aspired versions loaded and hands out one per request."""

    def __init__(
        self,
        settings: ServerSettings,
        default_base_path: str,
        traffic_head: Callable[[], Sequence[features.InstanceKey]] = lambda: (),
        on_change: Callable[[], None] = lambda: None,
        on_storage_error: Callable[[], None] = lambda: None,
    ):
        self.settings = settings
        self._default_base_path = default_base_path
        self._traffic_head = traffic_head
        self._on_change = on_change  # after a poll that loaded or unloaded versions
        self._changed = False
        self._on_storage_error = on_storage_error
        self.config = read_model_config(settings.model_config_file, settings.model_name, default_base_path)
        self._config_stamp = self._stamp()
        self.available: Dict[int, loader.LoadedVersion] = {}  # replaced whole, never changed in place
        self.states: Dict[int, VersionState] = {}
        self._failed: Dict[int, Tuple] = {}  # version -> its files when it failed
        self._attempts: Dict[int, Tuple[int, float]] = {}  # version -> (failed loads in a row, when to try again)
        self._lite_tried: Dict[int, Optional[Tuple[int, int]]] = {}  # version -> its TFLite file when last tried
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # Choosing a version for a request

    def resolve(self, version: Optional[int] = None, label: Optional[str] = None) -> loader.LoadedVersion:
        """The version a request asked for (a number, a label, or the newest available): its handle."""
        available = self.available
        if label is not None:
            labels = dict(self.config.labels)
            if label not in labels:
                raise NotFound(
                    f"model {self.config.name!r} has no label {contract.shown(label)}"
                    + (f" (labels: {', '.join(sorted(labels))})" if labels else "")
                )
            version = labels[label]
        if version is not None:
            if version in available:
                return available[version]
            state = self.states.get(version)
            if state is None and label is not None:
                raise NotFound(
                    f"label {label!r} points to version {version}, which is not served (serving: "
                    f"{', '.join(map(str, sorted(available, reverse=True))) or 'none'})"
                )
            if state is None:
                raise NotFound(
                    f"model {self.config.name!r} has no version {version} (serving: "
                    f"{', '.join(map(str, sorted(available, reverse=True))) or 'none'})"
                )
            raise Unavailable(
                f"version {version} of {self.config.name!r} is {state.state}"
                + (f": {state.error}" if state.error else "")
            )
        if not available:
            raise Unavailable(
                f"no version of {self.config.name!r} is available yet in {self.config.base_path}" + self._why_none()
            )
        return available[max(available)]

    def _why_none(self) -> str:
        states = dict(self.states)  # the poll thread changes it
        loading = [v for v, s in states.items() if s.state == LOADING]
        failed = [f"{v}: {s.error}" for v, s in states.items() if s.error]
        return (f" (loading {loading})" if loading else "") + (f" (failed: {'; '.join(failed)})" if failed else "")

    def status(self, version: Optional[int] = None, label: Optional[str] = None) -> List[Dict]:
        """TF Serving's model_version_status list."""
        states = dict(self.states)  # the poll thread changes it
        if label is not None or version is not None:
            version = self.resolve_number(version, label)
            if version not in states:
                raise NotFound(f"model {self.config.name!r} has no version {version}")
            versions = [version]
        else:
            versions = sorted(states, reverse=True)
        return [
            {
                "version": str(v),
                "state": states[v].state,
                "status": {"error_code": "UNKNOWN" if states[v].error else "OK", "error_message": states[v].error},
            }
            for v in versions
        ]

    def resolve_number(self, version: Optional[int], label: Optional[str]) -> int:
        if label is not None:
            labels = dict(self.config.labels)
            if label not in labels:
                raise NotFound(f"model {self.config.name!r} has no label {contract.shown(label)}")
            return labels[label]
        return version

    # Keeping the aspired versions loaded

    def _stamp(self) -> Optional[Tuple]:
        path = self.settings.model_config_file
        if not path or not tf.io.gfile.exists(path):
            return None
        stat = tf.io.gfile.stat(path)
        return stat.mtime_nsec, stat.length

    def _reload_config(self) -> None:
        stamp = self._stamp()
        if stamp == self._config_stamp:
            return
        self._config_stamp = stamp
        try:
            self.config = read_model_config(
                self.settings.model_config_file, self.settings.model_name, self._default_base_path
            )
            logging.info("model config reloaded from %s: %s", self.settings.model_config_file, self.config)
        except ConfigFileError as error:
            logging.error("keeping the previous model config: %s", error)

    def poll_once(self) -> None:
        """One look at the config file and the folder; loads and unloads to match the policy; then `on_change`
        once if anything was loaded or unloaded (a push is a load and an unload: one pause, not two)."""
        self._changed = False
        try:
            self._poll()
        finally:
            if self._changed:
                self._on_change()

    def _poll(self) -> None:
        self._reload_config()
        found = list_versions(self.config.base_path)
        if not found and self.available:
            # An empty or missing folder is as likely a storage fault (a bucket not mounted) as an intent.
            raise StorageError(
                f"no version found under {self.config.base_path}; still serving {sorted(self.available)}"
            )
        for version, fingerprint in list(self._failed.items()):
            failures, retry_at = self._attempts.get(version, (0, float("inf")))
            if version in found and files_fingerprint(found[version]) != fingerprint:
                del self._failed[version]  # its files changed (a copy finished): try it again
                self._attempts.pop(version, None)
            elif failures <= MAX_LOAD_RETRIES and time.monotonic() >= retry_at:
                del self._failed[version]  # a retry: the storage may have failed, not the files
        while True:  # a version that fails to load gives its place to the next one the policy would take
            aspired = self.config.aspired([v for v in found if v not in self._failed])
            pending = [v for v in aspired if v not in self.available]
            if not pending or self._stop.is_set():
                break
            self._load(pending[0], found[pending[0]])
        ready = [v for v in aspired if v in self.available]
        # A version leaves for one that is available, or when the policy wants none of the listed versions (a
        # `specific` policy naming others); not when the ones it wants all failed to load: the old ones stay.
        if ready or not self.config.aspired(list(found)):
            for version in [v for v in self.available if v not in aspired]:
                self._unload(version)
        for version in [v for v in list(self.states) if v not in found and v not in self.available]:
            del self.states[version]  # deleted from the folder: forgotten
            self._failed.pop(version, None)
            self._attempts.pop(version, None)
        if self.settings.prefer_tflite_model:
            self._prefer_tflite()

    def _prefer_tflite(self) -> None:
        """The versions their SavedModel answers whose TFLite file appeared or changed since it was last tried (the
        pipeline writes it after the push: a running server often loads the version first) are tried again, and
        answered by their TFLite model from then on where it agrees (loader.lite_version)."""
        for version, loaded in list(self.available.items()):
            if loaded.runtime != loader.TENSORFLOW:
                continue
            stamp = _file_stamp(loader.lite_file(loaded.path))
            if stamp is None or self._lite_tried.get(version) == stamp:
                continue
            self._lite_tried[version] = stamp
            upgraded = loader.lite_version(loaded)
            if upgraded is not None and version in self.available:
                self.available = {**self.available, version: upgraded}
                logging.info("version %d: its TFLite model answers the model calls from now on", version)

    def _load(self, version: int, path: str) -> None:
        self.states[version] = VersionState(LOADING)
        try:
            loaded = loader.load(
                path,
                version,
                self.settings.cache_head_size,
                self.settings.cache_capacity,
                self.settings.cache_admit_after,
                self.settings.cache_max_bytes,
                self._traffic_head(),
                self.settings.prefer_tflite_model,
            )
        except loader.LoadError as error:
            # A storage error is tried again (MAX_LOAD_RETRIES times, the wait doubling); a version whose files are
            # wrong only when they change.
            failures = self._attempts.get(version, (0, 0.0))[0] + 1 if error.transient else MAX_LOAD_RETRIES + 1
            wait = min(LOAD_RETRY_SECONDS * 2 ** (failures - 1), MAX_BACKOFF_SECONDS)
            self._attempts[version] = (failures, time.monotonic() + wait)
            retry = (
                f"tried again in {wait:g} s (retry {failures} of {MAX_LOAD_RETRIES})"
                if failures <= MAX_LOAD_RETRIES
                else "tried again when its files change"
            )
            logging.error("refused: %s; %s; still serving %s", error, retry, sorted(self.available) or "nothing")
            if error.transient:
                self._on_storage_error()
            self.states[version] = VersionState(END, str(error))
            try:
                self._failed[version] = files_fingerprint(path) if tf.io.gfile.exists(path) else ()
            except tf.errors.OpError:  # the storage down: a fingerprint nothing matches, the retry's wait still holds
                self._failed[version] = ("unreadable",)
            return
        self._attempts.pop(version, None)
        self._lite_tried[version] = _file_stamp(loader.lite_file(path))  # tried at the load, where it was there
        self.available = {**self.available, version: loaded}
        self.states[version] = VersionState(AVAILABLE)
        logging.info(
            "version %d is available (%.1f s to load; %d predictions precomputed; model calls: %s)",
            version,
            loaded.seconds_to_load,
            loaded.table.head_size,
            loaded.runtime,
        )
        self._changed = True

    def _unload(self, version: int) -> None:
        self._lite_tried.pop(version, None)
        self.states[version] = VersionState(UNLOADING)
        self.available = {v: loaded for v, loaded in self.available.items() if v != version}
        # Requests holding this version keep it alive until they finish; then Python frees it.
        self.states[version] = VersionState(END)
        logging.info("version %d unloaded", version)
        self._changed = True

    def start(self) -> None:
        """Polls in a background thread until `stop`."""

        def run() -> None:
            failures = 0
            while not self._stop.is_set():
                try:
                    self.poll_once()
                    failures = 0
                except Exception as error:  # a poll that fails (storage unreachable) must not stop the next one
                    failures += 1
                    wait = self.backoff(failures)
                    if isinstance(error, (StorageError, tf.errors.OpError)):
                        self._on_storage_error()
                        logging.error("%s; polling again in %.1f s", error, wait)
                    else:
                        logging.exception("polling %s failed; polling again in %.1f s", self.config.base_path, wait)
                self._stop.wait(self.backoff(failures))

        self._thread = threading.Thread(target=run, name="version-manager", daemon=True)
        self._thread.start()

    def backoff(self, failures: int) -> float:
        """Seconds to the next poll after this many failed polls in a row."""
        first = max(self.settings.poll_seconds, MIN_POLL_SECONDS)
        return min(first * 2 ** min(failures, 16), max(MAX_BACKOFF_SECONDS, first))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def _file_stamp(path: str) -> Optional[Tuple[int, int]]:
    """A file's length and modification time, None where it is not there (or can't be read now)."""
    try:
        stat = tf.io.gfile.stat(path)
    except tf.errors.OpError:
        return None
    return stat.length, stat.mtime_nsec
