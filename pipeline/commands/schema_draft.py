"""Regenerates a draft schema with TFX's SchemaGen, to curate into schema/schema.pbtxt.

    make schema-draft                      # on the bundled data
    make schema-draft ARGS="--data-dir DIR"

SchemaGen infers types, domains and presence from the data it sees; the curated schema adds what
it can't know (unknown codes, domains wider than one sample, the SERVING environment), so compare
the draft with `diff` and carry over only what should change.
"""

import argparse
import logging
import pathlib
import shutil

from tfx import v1 as tfx

from pipeline import config as config_lib
from pipeline.metadata import mlmd
from pipeline.pipeline import example_gen_component


def main() -> None:
    """Runs CsvExampleGen -> StatisticsGen -> SchemaGen locally and copies the inferred schema out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=pathlib.Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = config_lib.parse_overrides(args.set)
    if args.data_dir:
        overrides["data_dir"] = str(args.data_dir.resolve())
    config = config_lib.load_config("local", overrides)
    work_dir = pathlib.Path(config.output_dir) / "schema_draft"
    example_gen = example_gen_component(config)
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = tfx.components.SchemaGen(statistics=statistics_gen.outputs["statistics"], infer_feature_shape=False)
    store = str(work_dir / "metadata.sqlite")
    with mlmd.runner_marker(store):
        tfx.orchestration.LocalDagRunner().run(
            tfx.dsl.Pipeline(
                pipeline_name=f"{config.pipeline_name}-schema-draft",
                pipeline_root=str(work_dir / "pipeline"),
                components=[example_gen, statistics_gen, schema_gen],
                enable_cache=True,
                metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(store),
                beam_pipeline_args=config.beam_pipeline_args(),
            )
        )
    inferred = sorted(
        (work_dir / "pipeline" / "SchemaGen").glob("schema/*/schema.pbtxt"), key=lambda p: int(p.parent.name)
    )[-1]
    draft = work_dir / "schema_draft.pbtxt"
    shutil.copyfile(inferred, draft)
    logging.info("SchemaGen output: %s", inferred)
    print(f"draft schema: {draft}\ncompare: diff {config.schema_path} {draft}")


if __name__ == "__main__":
    main()
