# Two commands do everything on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup run test test-fast lint bench clean serve
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $@

run: setup          ## the benchmark on the bundled default: dvc repro under one MLflow parent run
	unlearnops repro

test: setup         ## the whole test suite, every tier (GPU tests skip without CUDA)
	$(PY) -m pytest -q

test-fast: setup    ## the fast tier: everything in-process, no real `dvc repro`, Prefect server or subprocess flow
	$(PY) -m pytest -q -m "not slow"

lint: setup         ## ruff (rules in pyproject.toml); seconds
	$(VENV)/bin/ruff check .

bench: setup        ## speed benchmarks; they print tables
	$(PY) benchmarks/bench_training.py
	$(PY) benchmarks/bench_epsilon.py
	$(PY) benchmarks/interval_coverage.py
	$(PY) benchmarks/gate_error_rates.py
	$(PY) benchmarks/layered_2d.py
	$(PY) benchmarks/muso_linear.py
	$(PY) benchmarks/pipeline_stage_times.py
	$(PY) benchmarks/cost_model.py

clean:              ## remove pipeline outputs (not the venv)
	rm -rf data/split data/prepared evaluation metrics reports mlflow.db mlartifacts
	find models -mindepth 1 -maxdepth 1 ! -name ops -exec rm -rf {} + 2>/dev/null || true   # the deletion flow's work folders (models/ops) stay

serve: setup        ## the deletion-request flow on its schedule (params.yaml ops.schedule); Ctrl-C stops it
	$(PY) flows/deletion.py serve
