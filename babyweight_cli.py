"""`babyweight COMMAND ...`: the project's commands, for the pipeline's runs and for the served model.

Each command is its own module's `main(argv)` (COMMANDS); this dispatch imports only the one asked for, so
a command that needs no TensorFlow (`babyweight metadata`, `babyweight predict --url`) doesn't load it, and
one that does loads it, whenever it first does, with its start-up chatter kept off the console
(`install_quiet_tensorflow`). Only the standard library here: the serving image has no pipeline/.
"""

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import tempfile
import threading
import warnings
from importlib import metadata
from typing import Iterator, List, NamedTuple, Optional

PACKAGE = "babyweight-tfx"


class Command(NamedTuple):
    module: str  # its main(argv) runs the command
    summary: str
    example: str


COMMANDS = {
    "metadata": Command(
        "pipeline.metadata.metadata_cli",
        "runs, steps, artifacts, lineage and contents in ML Metadata",
        "babyweight metadata runs --store outputs/metadata.sqlite",
    ),
    "simulate": Command(
        "pipeline.commands.simulate",
        "a year of arriving spans through the pipeline, one run each",
        "babyweight simulate --spans 6",
    ),
    "validate-serving": Command(
        "pipeline.commands.serving_check",
        "requests or the server's request log against the training data (TFDV)",
        "babyweight validate-serving outputs/serving_logs/",
    ),
    "serve": Command(
        "serving.model_server.server",
        "the prediction server over the pushed models (TF Serving's REST API)",
        "babyweight serve --port 8501",
    ),
    "predict": Command(
        "serving.clients.client",
        "predictions for a CSV or JSON-lines file, from a server or a TFLite file",
        "babyweight predict --url http://127.0.0.1:8501 data/natality/natality.csv",
    ),
    "experiment": Command(
        "serving.experiments.experiment_cli",
        "outcomes, report, promotion and simulation of an A/B test or bandit between versions",
        "babyweight experiment report --experiment-file experiment.yaml",
    ),
    "watch": Command(
        "watch.cli",
        "new spans start runs; served requests and live outcomes are checked for skew, drift and decay",
        "babyweight watch --once",
    ),
    "predict-batch": Command(
        "serving.batch.cli",
        "predictions for files, a table or a Pub/Sub stream in one Beam job",
        "babyweight predict-batch --input 'data/natality/*.csv'",
    ),
}


def usage() -> str:
    """Every command with what it does and an example."""
    lines = ["usage: babyweight COMMAND [ARGS ...]   (babyweight COMMAND --help for its arguments)", "", "commands:"]
    for name, command in COMMANDS.items():
        lines += [f"  {name:<17} {command.summary}", f"  {'':<17}   e.g. {command.example}"]
    lines += ["", "  --version         this project's version and TFX's"]
    return "\n".join(lines)


def versions() -> str:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"babyweight {version(PACKAGE)} (TFX {version('tfx')}, TensorFlow {version('tensorflow')})"


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Holds what C++ libraries write to stderr in the block (TensorFlow's import: CUDA plugins, CPU instructions,
    TensorRT) in a temporary file and writes it out only if the block raises, so that a failed import keeps its
    explanation. Where there is no stderr to redirect, it does nothing."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError):  # no sys.stderr, or fd 2 closed
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Runs the first `import tensorflow` of the process, wherever a command does it, in `quiet_native_stderr`;
    inert after that (it stays in sys.meta_path: removing it could upset another thread's import)."""

    def __init__(self) -> None:
        self.done = False
        self.lock = threading.Lock()

    def find_spec(self, fullname: str, path: object, target: object = None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != "tensorflow" or self.done:
            return None
        with self.lock:
            if self.done:
                return None
            self.done = True  # the real finders below find it; this one steps aside
            spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> object:
        return self.loader.create_module(spec)

    def exec_module(self, module: object) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        with quiet_native_stderr():
            self.loader.exec_module(module)


def quiet_environment() -> None:
    """What the make targets set, for the installed command too: TensorFlow's and the libraries' chatter off."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # TFX 1.16 trains with Keras 2
    # Google's client libraries' notices about the pinned stack (Python 3.10 will get no updates, an older
    # google-cloud-storage): printed on every import, about versions constraints.txt fixes, nothing to act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"google\.")


def install_quiet_tensorflow() -> None:
    """quiet_environment(), and the quiet import of TensorFlow if it isn't loaded yet (the commands, `make bench`)."""
    quiet_environment()
    if "tensorflow" not in sys.modules and not any(isinstance(f, QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, QuietTensorFlowImport())


def main(argv: Optional[List[str]] = None) -> int:
    """Dispatches to the command's own main."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        print(versions())
        return 0
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"babyweight: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    install_quiet_tensorflow()
    return importlib.import_module(COMMANDS[argv[0]].module).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
