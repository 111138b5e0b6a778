"""The schema (schema/schema.pbtxt), as the server reads it: the one definition of the features' domains."""

import functools
import pathlib
from typing import Tuple

from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2

from models import features

SCHEMA_FILE = pathlib.Path(__file__).resolve().parents[2] / "schema" / "schema.pbtxt"


@functools.lru_cache(maxsize=None)
def load(path: str = str(SCHEMA_FILE)) -> schema_pb2.Schema:
    return text_format.Parse(pathlib.Path(path).read_text(), schema_pb2.Schema())


def label_domain(path: str = str(SCHEMA_FILE)) -> Tuple[float, float]:
    """The label's float_domain (min, max): an outcome outside it is no birth weight."""
    feature = next(f for f in load(path).feature if f.name == features.LABEL.name)
    return feature.float_domain.min, feature.float_domain.max
