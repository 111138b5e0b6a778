"""What TFX's cache key misses, added to the steps' parameters so that a change reruns what it affects.

TFX keys a step's cache by its inputs, its parameters and its executor's class path. It does not see
- the code behind a class path or a dotted function name (our components, the Trainer's `run_fn`, the
  Transform's `preprocessing_fn`): each step gets a `code_fingerprint` parameter, the hash of the
  project modules it runs and every project module they import;
- the contents of the schema file ImportSchemaGen copies (only its path): `ImportSchemaGen` here adds
  the file's hash, and through the schema artifact every step downstream follows.
"""

import ast
import hashlib
import pathlib
from typing import Iterable, List, Optional, Set

from tfx import types
from tfx.components.schema_gen.import_schema_gen import component as import_schema_gen
from tfx.types import standard_artifacts, standard_component_specs
from tfx.types.component_spec import ExecutionParameter

from pipeline.config import PROJECT_ROOT

PROJECT_PACKAGES = ("data", "models", "pipeline", "serving")
CODE_FINGERPRINT = "code_fingerprint"
SCHEMA_FINGERPRINT = "schema_fingerprint"


def _module_file(name: str, root: pathlib.Path) -> Optional[pathlib.Path]:
    """The source file of a project module or package, None for anything else (a name inside a module)."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported(source: str) -> Iterable[str]:
    """The absolute names a module imports (for `from a import b`: both `a` and `a.b`)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def project_modules(modules: Iterable[str], root: pathlib.Path = PROJECT_ROOT) -> List[pathlib.Path]:
    """The files of `modules` and of every project module they import, transitively, sorted."""
    seen: Set[pathlib.Path] = set()
    queue = list(modules)
    while queue:
        name = queue.pop()
        if name.split(".")[0] not in PROJECT_PACKAGES:
            continue
        path = _module_file(name, root)
        if path is None or path in seen:
            continue
        seen.add(path)
        queue.extend(_imported(path.read_text()))
        parent = name.rpartition(".")[0]
        if parent:
            queue.append(parent)  # a package's __init__ runs before its modules
    return sorted(seen)


def code_fingerprint(*modules: str, root: pathlib.Path = PROJECT_ROOT) -> str:
    """Hash of the sources of `modules` (dotted names) and of the project modules they import."""
    paths = project_modules(modules, root)
    if not paths:
        raise ValueError(f"none of {', '.join(modules)} is a module of this project under {root}")
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def file_fingerprint(path: pathlib.Path) -> str:
    """Hash of a file's contents."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class _ImportSchemaGenSpec(standard_component_specs.ImportSchemaGenSpec):
    PARAMETERS = dict(
        standard_component_specs.ImportSchemaGenSpec.PARAMETERS, **{SCHEMA_FINGERPRINT: ExecutionParameter(type=str)}
    )


class ImportSchemaGen(import_schema_gen.ImportSchemaGen):
    """TFX's ImportSchemaGen (same executor, artifact and node id) whose cache key has the file's contents."""

    SPEC_CLASS = _ImportSchemaGenSpec

    def __init__(self, schema_file: str, schema_fingerprint: str):  # pylint: disable=super-init-not-called
        spec = _ImportSchemaGenSpec(
            schema_file=schema_file,
            schema_fingerprint=schema_fingerprint,
            schema=types.Channel(type=standard_artifacts.Schema),
        )
        super(import_schema_gen.ImportSchemaGen, self).__init__(spec=spec)  # pylint: disable=bad-super-call
