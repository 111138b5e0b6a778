"""`babyweight COMMAND ...`: the project's commands, for the pipeline's runs and for the served model.

    babyweight metadata ...            runs, artifacts and lineage in ML Metadata (pipeline/metadata_cli.py)
    babyweight simulate ...            a year of arriving spans through the pipeline (pipeline/simulate.py)
    babyweight validate-serving FILE   requests or the server's request log against the training data
                                       (pipeline/serving_check.py)
    babyweight serve ...               the prediction server over the pushed models (serving/server.py)
    babyweight predict --url URL FILE  predictions for a CSV or JSON-lines file from a server (serving/client.py),
                   --tflite MODEL FILE or from a TFLite export on this machine, as a device runs it (serving/device.py)
    babyweight experiment ...          outcomes, report, promotion and simulation of an A/B test or bandit
                                       between versions (serving/experiment_cli.py)
    babyweight predict-batch ...       predictions for CSV files in one Beam pipeline (serving/batch.py)
"""
import importlib
import sys
from typing import List, Optional

# command -> the module whose main(argv) runs it; the pipeline and the server stay apart below this dispatch.
COMMANDS = {
    "metadata": "pipeline.metadata_cli",
    "simulate": "pipeline.simulate",
    "validate-serving": "pipeline.serving_check",
    "serve": "serving.server",
    "predict": "serving.client",
    "experiment": "serving.experiment_cli",
    "predict-batch": "serving.batch",
}


def main(argv: Optional[List[str]] = None) -> int:
    """Dispatches to the command's own main."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
