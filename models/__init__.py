"""Features, preprocessing and model of the babyweight pipeline."""

import os

# TFX 1.16 wants Keras 2: tf.keras must resolve to tf-keras in every process that imports the model
# (local runs, Beam workers, Vertex containers). It must be set before TensorFlow is first imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
