"""The babyweight TFX pipeline as an installable package.

Transform and Trainer reference `models.preprocessing.preprocessing_fn` and `models.model.run_fn` by
dotted path, so the same installed package runs locally, on Dataflow workers and in Vertex containers.
Versions are pinned in constraints.txt: pip install -c constraints.txt -e '.[test]'.
"""

import pathlib

import setuptools

# The prediction server's own dependencies, listed once for the project and for its image (serving/Dockerfile).
SERVING_REQUIRES = [
    line.strip()
    for line in (pathlib.Path(__file__).parent / "serving" / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setuptools.setup(
    name="babyweight-tfx",
    version="0.1.0",
    description="Production TFX pipeline predicting a newborn's birth weight from US natality data",
    python_requires=">=3.10,<3.11",
    packages=setuptools.find_packages(
        include=["pipeline", "pipeline.*", "models", "models.*", "serving", "serving.*", "data", "watch"]
    ),
    package_data={"pipeline": ["profiles/*.yaml"]},
    py_modules=["runner_local", "runner_dataflow", "babyweight_cli"],
    install_requires=[
        "tfx[kfp]",
        "apache-beam[gcp]",
        "tensorflow",
        "tf-keras",
        "keras-tuner",  # the Tuner's search (models/tuning.py)
        "google-cloud-aiplatform",  # Vertex AI: Vizier (models/vizier.py), Pipelines jobs (runner_dataflow.py)
        "tensorflow-transform",
        "tensorflow-data-validation",
        "tensorflow-model-analysis",
        "ml-metadata",
        "pandas",
        "pyyaml",
        "scikit-learn",  # the reference trees beside every model (pipeline/components/baseline.py)
        "psutil",  # the served candidate's memory (pipeline/components/infra_validator.py)
        "matplotlib",  # the plots of the run reports and the history page (pipeline/reports/plots.py)
        "urllib3",  # `babyweight predict --url`: kept-alive connections, retries (serving/clients/client.py)
        "tqdm",  # its progress bar on a terminal
        "pillow",  # the README's screenshot of a report, reduced to a few colours (pipeline/reports/browser.py)
    ]
    + SERVING_REQUIRES,
    extras_require={"test": ["pytest", "pytest-xdist", "ruff"]},  # ruff: lint and format (pyproject.toml)
    entry_points={
        "console_scripts": [
            "babyweight-local=runner_local:main",
            "babyweight-vertex=runner_dataflow:main",
            "babyweight=babyweight_cli:main",  # babyweight metadata|simulate|validate-serving|serve|predict ...
        ]
    },
)
