# The two commands of the README, plus a few for developers.
#   make run    set everything up (first time only) and run the pipeline on the bundled data
#   make test   set everything up (first time only) and run the whole test suite
SHELL := /bin/bash
PYTHON_VERSION := $(shell cat .python-version)
PYTHON_MINOR := $(basename $(PYTHON_VERSION))
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
export TF_USE_LEGACY_KERAS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONWARNINGS := ignore::FutureWarning
# make test's worker processes (pytest-xdist): one per CPU, at most 4; tests sharing a pipeline run share a worker.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: run test test-fast lint mariadb chromium report-screenshot wrk metadata simulate watch simulate-loop validate-serving serve predict predict-batch bench-predict bench-tflite bench-serving soak-serving vertex bench quality schema-draft data clean

run: $(VENV)/.installed
	$(PY) runner_local.py $(ARGS)

test: $(VENV)/.installed lint mariadb chromium wrk
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder $(ARGS)

# The unit tests: everything but the end-to-end tests marked slow.
test-fast: $(VENV)/.installed
	$(PY) -m pytest tests -m "not slow" -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder $(ARGS)

# Ruff's lint and format checks (pyproject.toml); `$(VENV)/bin/ruff format .` and `ruff check --fix .` mend most.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# A MySQL-compatible server for the ML Metadata tests (they start a private one on a free port).
mariadb:
	@command -v mariadbd >/dev/null 2>&1 || PATH="$$PATH:/usr/sbin" command -v mariadbd >/dev/null 2>&1 || \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing mariadb-server for the ML Metadata tests"; \
	    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mariadb-server) >/dev/null \
	      || echo "note: could not install mariadb-server, so its test is skipped (and fails under CI=true)"; \
	  else echo "note: mariadb-server is not installed, so its test is skipped, or fails under CI=true (apt-get install mariadb-server)"; fi

# Headless Chromium, in which the report tests open the reports (Debian's package; without it they are skipped).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing chromium for the report tests"; \
	    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null \
	      || echo "note: could not install chromium, so the report tests are skipped (and fail under CI=true)"; \
	  else echo "note: chromium is not installed, so the report tests are skipped, or fail under CI=true (apt-get install chromium)"; fi

# docs/report.png, the picture of a report in docs/validation-and-spans.md: ARGS=REPORT, or the newest report
# (a run on the bundled data first if there is none).
report-screenshot: $(VENV)/.installed chromium
	@[ -n "$(ARGS)" ] || ls outputs/reports/run-*.html >/dev/null 2>&1 || $(PY) runner_local.py
	$(PY) -m pipeline.reports.browser screenshot --output docs/report.png $(ARGS)

# What the pipeline recorded in ML Metadata (docs/metadata.md): make metadata ARGS="runs"
metadata: $(VENV)/.installed
	$(PY) -m pipeline.metadata.metadata_cli $(ARGS)

# A year of arriving spans through the pipeline (docs/validation-and-spans.md): make simulate ARGS="--spans 6"
simulate: $(VENV)/.installed
	$(PY) -m babyweight_cli simulate $(ARGS)

# The loop that runs itself (docs/watch.md): new spans start runs; served requests and live outcomes are checked
#   make watch ARGS="--experiment-file experiment.yaml"      make watch ARGS=--once
watch: $(VENV)/.installed
	$(PY) -m babyweight_cli watch $(ARGS)

# Monthly spans, served traffic and late outcomes from the real export through the watcher, with three problems;
# prints what it caught and when (docs/watch.md): make simulate-loop ARGS="--clean-months 3"
simulate-loop: $(VENV)/.installed
	$(PY) -m watch.simulate_loop $(ARGS)

# Serving requests (CSV or JSON lines) against the schema and the training data: make validate-serving ARGS=FILE
validate-serving: $(VENV)/.installed
	$(PY) -m babyweight_cli validate-serving $(ARGS)

# The prediction server over the pushed models (docs/serving.md): make serve ARGS="--port 8501 --workers 2"
serve: $(VENV)/.installed
	$(PY) -m babyweight_cli serve $(ARGS)

# Predictions for a CSV or JSON-lines file from a server: make predict ARGS="--url http://127.0.0.1:8501 FILE"
predict: $(VENV)/.installed
	$(PY) -m babyweight_cli predict $(ARGS)

# Predictions for CSV files in one Beam pipeline (docs/batch-and-streaming.md):
#   make predict-batch ARGS="--input 'data/natality/*.csv' --output outputs/predictions/run"
predict-batch: $(VENV)/.installed
	$(PY) -m babyweight_cli predict-batch $(ARGS)

# predict-batch on a million generated rows beside the server and the bare signature (docs/batch-and-streaming.md)
bench-predict: $(VENV)/.installed
	$(PY) -m serving.bench.predict_bench $(ARGS)

# The newest version as SavedModel, TFLite float32 and float16 on the same rows (docs/on-device.md):
#   ARGS="--input ../shared/data/natality/bq_export_31col.csv"
bench-tflite: $(VENV)/.installed
	$(PY) -m serving.bench.device_bench $(ARGS)

# The server under wrk's load beside the references (docs/serving.md, Serving benchmark): ARGS="--seconds 10"
bench-serving: $(VENV)/.installed wrk
	$(PY) -m serving.bench.server_bench $(ARGS)

# The server left running under wrk's load: hostile requests, 20 pushes, log and model folder faults (docs/serving.md,
# Soak): ARGS="--pushes 5"
soak-serving: $(VENV)/.installed wrk
	$(PY) -m serving.bench.soak $(ARGS)

# wrk, the HTTP load generator of the serving benchmark and soak, and of the soak's test (Debian's package).
wrk:
	@command -v wrk >/dev/null 2>&1 || \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing wrk for the serving benchmark"; \
	    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk) >/dev/null \
	      || echo "note: could not install wrk"; \
	  else echo "note: wrk is not installed (apt-get install wrk)"; fi

# Compiles the pipeline for Vertex Pipelines (docs/cloud.md); ARGS="--submit --wait" runs it.
vertex: $(VENV)/.installed
	$(PY) runner_dataflow.py $(ARGS)

bench: $(VENV)/.installed
	$(PY) -m pipeline.commands.bench $(ARGS)

# Model quality on the real export and the course samples in ../shared (docs/model-quality.md): ARGS="--ablations"
quality: $(VENV)/.installed
	$(PY) -m pipeline.commands.quality $(ARGS)

schema-draft: $(VENV)/.installed
	$(PY) -m pipeline.commands.schema_draft $(ARGS)

# Regenerates the bundled data set (deterministic: the same seed gives the same file).
data: $(VENV)/.installed
	$(PY) -m data.generator --rows 20000 --seed 7 --output-dir data/natality

# The virtualenv: Python $(PYTHON_VERSION) from .python-version, every package pinned by constraints.txt.
$(VENV)/.installed: setup.py constraints.txt .python-version
	@python=$$(for candidate in "$$(pyenv root 2>/dev/null)/versions/$(PYTHON_VERSION)/bin/python" \
	            python$(PYTHON_MINOR) python3 python; do \
	      command -v "$$candidate" >/dev/null 2>&1 && \
	      "$$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != tuple(map(int, "$(PYTHON_MINOR)".split("."))))' \
	      2>/dev/null && { command -v "$$candidate"; break; }; done); \
	if [ -z "$$python" ]; then \
	  echo "error: Python $(PYTHON_MINOR) is needed (TFX 1.16 supports Python 3.9-3.10) and none was found." >&2; \
	  echo "Install it, e.g. 'pyenv install $(PYTHON_VERSION)' or 'apt-get install python$(PYTHON_MINOR) python$(PYTHON_MINOR)-venv'," >&2; \
	  echo "then run make again." >&2; exit 1; fi; \
	echo "creating $(VENV) with $$python"; \
	rm -rf $(VENV) && "$$python" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

clean:
	rm -rf outputs
