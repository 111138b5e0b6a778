"""Facts about TFX artifacts that the pipeline's steps share: split names, and an Examples artifact's span.

Kept free of other project imports, so that a step using them (pipeline/cache.py fingerprints what each
step imports) doesn't rerun when unrelated code changes.
"""

from ml_metadata.proto import metadata_store_pb2

TRAIN_SPLIT, EVAL_SPLIT = "train", "eval"
GATE_ID = "DataGate"  # the data gate's node id: what spans, lineage and serving checks look for
TFLITE_MODEL_TYPE = (
    "babyweight.TFLiteModel"  # pipeline/components/tflite_export.py's artifact (namespace.Name, as Vertex wants)
)


def span_of(examples: metadata_store_pb2.Artifact) -> int:
    """The span of an Examples artifact (TFX 1.16's ExampleGen records it as a custom property)."""
    if "span" in examples.custom_properties:
        return examples.custom_properties["span"].int_value
    return examples.properties["span"].int_value
