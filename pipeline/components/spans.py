"""Spans in ML Metadata: which spans passed validation, the previous one to compare with, the training window.

A span passed validation when a DataGate execution that consumed its statistics and examples completed
(or was served from cache). The two resolver strategies read that from ML Metadata, never from folder
listings, so a blocked span is neither a drift baseline nor training data. The Trainer's executor
(pipeline/components/trainer_executor.py) hands each training file's span to `run_fn`, which weights older spans down.

Vertex Pipelines compiles only TFX's built-in resolver strategies, so these run with the local
orchestrator; see create_pipeline.
"""

import logging
from typing import Dict, List, Optional, Tuple

from ml_metadata import metadata_store
from ml_metadata.proto import metadata_store_pb2
from tfx import types
from tfx import v1 as tfx
from tfx.types import artifact_utils
from tfx.utils import path_utils

from models.signatures import SCORE_SIGNATURE
from pipeline.artifacts import span_of
from pipeline.metadata import mlmd

PASSED = (metadata_store_pb2.Execution.COMPLETE, metadata_store_pb2.Execution.CACHED)


def validated(
    reader: mlmd.Store, pipeline_name: str, gate_id: str
) -> List[Tuple[metadata_store_pb2.Artifact, metadata_store_pb2.Artifact]]:
    """(examples, statistics) of each span that passed the gate, oldest gate run first."""
    passed = []
    for execution in reader.node_executions(pipeline_name, gate_id):
        inputs = reader.inputs(execution)
        if execution.last_known_state in PASSED and inputs.get("examples") and inputs.get("statistics"):
            passed.append((inputs["examples"][0], inputs["statistics"][0]))
    return passed


def _as_tfx(store: metadata_store.MetadataStore, artifacts: List[metadata_store_pb2.Artifact]) -> List[types.Artifact]:
    if not artifacts:
        return []
    artifact_type = store.get_artifact_types_by_id([artifacts[0].type_id])[0]
    return artifact_utils.deserialize_artifacts(artifact_type, artifacts)


def previous_span(
    current: metadata_store_pb2.Artifact, candidates: List[metadata_store_pb2.Artifact]
) -> Optional[metadata_store_pb2.Artifact]:
    """The newest validated earlier span; for a re-ingested span, the version validated before it."""
    others = [a for a in candidates if a.id != current.id]
    earlier = [a for a in others if span_of(a) < span_of(current)]
    if earlier:
        return max(earlier, key=lambda a: (span_of(a), a.id))
    same = [a for a in others if span_of(a) == span_of(current) and a.id < current.id]
    return max(same, key=lambda a: a.id) if same else None


def window(
    current: metadata_store_pb2.Artifact, candidates: List[metadata_store_pb2.Artifact], spans: int
) -> List[metadata_store_pb2.Artifact]:
    """The newest version of each of the last `spans` validated spans up to the current one, oldest first."""
    newest: Dict[int, metadata_store_pb2.Artifact] = {}
    for artifact in candidates + [current]:
        if span_of(artifact) <= span_of(current) and (
            span_of(artifact) not in newest or artifact.id > newest[span_of(artifact)].id
        ):
            newest[span_of(artifact)] = artifact
    newest[span_of(current)] = current
    return [newest[span] for span in sorted(newest)[-spans:]]


class PreviousValidatedSpan(tfx.dsl.experimental.ResolverStrategy):
    """Resolves this run's `examples` and `statistics` to those of the previous validated span, or nothing."""

    def __init__(self, pipeline_name: str, gate_id: str):
        self._pipeline_name = pipeline_name
        self._gate_id = gate_id

    def resolve_artifacts(
        self, store: metadata_store.MetadataStore, input_dict: Dict[str, List[types.Artifact]]
    ) -> Dict[str, List[types.Artifact]]:
        current = input_dict["examples"][0].mlmd_artifact
        passed = validated(mlmd.Store(store), self._pipeline_name, self._gate_id)
        found = previous_span(current, [examples for examples, _ in passed])
        statistics = next((stats for examples, stats in passed if found and examples.id == found.id), None)
        if found is None or statistics is None:
            return {"examples": [], "statistics": []}
        return {"examples": _as_tfx(store, [found]), "statistics": _as_tfx(store, [statistics])}


class ValidatedSpanWindow(tfx.dsl.experimental.ResolverStrategy):
    """Resolves `examples` (this run's, already validated) to the last `spans` validated spans."""

    def __init__(self, pipeline_name: str, gate_id: str, spans: int):
        self._pipeline_name = pipeline_name
        self._gate_id = gate_id
        self._spans = spans

    def resolve_artifacts(
        self, store: metadata_store.MetadataStore, input_dict: Dict[str, List[types.Artifact]]
    ) -> Dict[str, List[types.Artifact]]:
        current = input_dict["examples"][0].mlmd_artifact
        candidates = [examples for examples, _ in validated(mlmd.Store(store), self._pipeline_name, self._gate_id)]
        return {"examples": _as_tfx(store, window(current, candidates, self._spans))}


def has_signature(model: types.Artifact, signature: str) -> bool:
    """Whether a Model artifact's SavedModel has `signature` (read from its saved_model.pb, not loaded).

    A model whose folder can't be read (deleted to save disk) has none.
    """
    from tensorflow.python.saved_model import loader_impl

    try:
        saved_model = loader_impl.parse_saved_model(path_utils.serving_model_path(model.uri))
    except OSError as error:
        logging.warning("model %d can't be a baseline: %s", model.id, error)
        return False
    return any(signature in graph.signature_def for graph in saved_model.meta_graphs)


class LatestBlessedScorableModel(tfx.dsl.experimental.LatestBlessedModelStrategy):
    """TFX's latest blessed model, among those the Evaluator can score: with the `SCORE_SIGNATURE` signature.

    Models blessed before the serving contract lack it, and TFMA looks the candidate's signature up in the
    baseline too: such a baseline would fail every run. The first run after the upgrade has no baseline.
    Blessed models are read newest first, each SavedModel's signatures only until one qualifies.
    """

    def resolve_artifacts(
        self, store: metadata_store.MetadataStore, input_dict: Dict[str, List[types.Artifact]]
    ) -> Optional[Dict[str, List[types.Artifact]]]:
        model_key = next(
            (
                key
                for key, artifacts in input_dict.items()
                if artifacts and isinstance(artifacts[0], tfx.types.standard_artifacts.Model)
            ),
            None,
        )
        blessed = {
            blessing.get_int_custom_property("current_model_id")
            for key, artifacts in input_dict.items()
            if key != model_key
            for blessing in artifacts
            if blessing.get_int_custom_property("blessed") == 1
        }
        for model in sorted(input_dict.get(model_key) or [], key=lambda a: a.id, reverse=True):
            if model.id in blessed and has_signature(model, SCORE_SIGNATURE):
                return super().resolve_artifacts(store, {**input_dict, model_key: [model]})
        return {key: [] for key in input_dict}
