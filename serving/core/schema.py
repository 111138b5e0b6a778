"""The schema (schema/schema.pbtxt), as the server reads it: the one definition of the features' domains."""

import functools
import pathlib
from typing import Dict, FrozenSet, Tuple

from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2

from models import features

SCHEMA_FILE = pathlib.Path(__file__).resolve().parents[2] / "schema" / "schema.pbtxt"


@functools.lru_cache(maxsize=None)
def load(path: str = str(SCHEMA_FILE)) -> schema_pb2.Schema:
    return text_format.Parse(pathlib.Path(path).read_text(), schema_pb2.Schema())


def domain(feature: schema_pb2.Feature) -> Tuple[float, float]:
    """A numeric feature's (min, max) as the schema writes them: its float_domain's are float32 in the proto
    (0.2 reads 0.20000000298), so they are taken back to the decimals written."""
    if feature.HasField("int_domain"):
        return feature.int_domain.min, feature.int_domain.max
    return float(f"{feature.float_domain.min:.7g}"), float(f"{feature.float_domain.max:.7g}")


def label_domain(path: str = str(SCHEMA_FILE)) -> Tuple[float, float]:
    """The label's domain (min, max): an outcome outside it is no birth weight."""
    return domain(next(f for f in load(path).feature if f.name == features.LABEL.name))


@functools.lru_cache(maxsize=None)
def string_domains(path: str = str(SCHEMA_FILE)) -> Dict[str, FrozenSet[str]]:
    """Each text feature's values where the schema lists them (a string_domain): any other value is one it never saw."""
    return {f.name: frozenset(f.string_domain.value) for f in load(path).feature if f.HasField("string_domain")}
