"""The babyweight TFX pipeline as an installable package.

Transform and Trainer reference `models.preprocessing.preprocessing_fn` and `models.model.run_fn` by
dotted path, so the same installed package runs locally, on Dataflow workers and in Vertex containers.
Versions are pinned in constraints.txt: pip install -c constraints.txt -e '.[test]'.
"""
import setuptools

setuptools.setup(
    name="babyweight-tfx",
    version="0.1.0",
    description="Production TFX pipeline predicting a newborn's birth weight from US natality data",
    python_requires=">=3.10,<3.11",
    packages=setuptools.find_packages(include=["pipeline", "pipeline.*", "models", "models.*", "serving", "serving.*", "data"]),
    package_data={"pipeline": ["profiles/*.yaml"]},
    py_modules=["runner_local", "runner_dataflow", "babyweight_cli"],
    install_requires=[
        "tfx[kfp]",
        "apache-beam[gcp]",
        "tensorflow",
        "tf-keras",
        "tensorflow-transform",
        "tensorflow-data-validation",
        "tensorflow-model-analysis",
        "ml-metadata",
        "pandas",
        "pyyaml",
        "scikit-learn",  # the reference trees beside every model (pipeline/baseline.py)
    ],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": [
        "babyweight-local=runner_local:main",
        "babyweight-vertex=runner_dataflow:main",
        "babyweight=babyweight_cli:main",  # babyweight metadata|simulate|validate-serving|serve|predict ...
    ]},
)
