# The pipeline image for Vertex Pipelines, Dataflow workers and Vertex AI training: TFX's own image of
# the pinned TFX release, plus this package. Build and push it (docs/cloud.md):
#   gcloud builds submit --tag REGION-docker.pkg.dev/PROJECT/babyweight/pipeline:TAG .
ARG TFX_VERSION=1.16.0
FROM gcr.io/tfx-oss-public/tfx:${TFX_VERSION}

WORKDIR /pipeline
# TFX 1.16 wants Keras 2 in every process that loads the model.
ENV TF_USE_LEGACY_KERAS=1
COPY constraints.txt setup.py ./
COPY pipeline/ pipeline/
COPY models/ models/
# The InfraValidator serves each candidate with the project's server (python -m serving.model_server.server) in this image.
COPY serving/ serving/
COPY data/__init__.py data/generator.py data/
COPY schema/ schema/
# The entry points setup.py installs (py_modules); the server and runner_local.py import babyweight_cli.
COPY runner_local.py runner_dataflow.py babyweight_cli.py ./
# The image already has TFX and its dependencies; add Keras 2, the TFLite interpreter (the TFLiteExporter checks its
# models with it) and the server's dependencies at the pinned versions, then this package.
RUN pip install --no-cache-dir -c constraints.txt tf-keras psutil tflite-runtime -r serving/requirements.txt \
 && pip install --no-cache-dir --no-deps -e .
