# bioplaus — the commands a researcher runs. `make test` and `make sweep` each set up
# everything they need on a fresh clone (they depend on the venv stamp).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=
SWEEP_DIR ?= runs/sweeps/local
# `make sweep CLUSTER=auto` (or CLUSTER=host:port) submits to a running Ray cluster instead of the
# embedded local Ray; see cluster/README.md.
CLUSTER ?=
# In the development sandbox the real data mirror sits beside the checkout; elsewhere the data root
# is $BIOPLAUS_DATA or ~/.cache/bioplaus/data (files are downloaded there).
ifeq ($(BIOPLAUS_DATA),)
ifneq ($(wildcard ../shared/data/SHA256SUMS),)
export BIOPLAUS_DATA := $(abspath ../shared/data)
endif
endif

.PHONY: setup test test-load train sweep report bench study bench-gpu lint clean

setup: $(STAMP)

# Re-install only when the project metadata changes; an editable install picks up code edits.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The suite on two pytest-xdist workers, a test module to a worker (tests/conftest.py says in which order):
# a sweep test waits on process starts and Ray much of its time, and the other worker computes meanwhile.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: $(STAMP)
	$(PYTEST) $(ARGS)

# The same suite with two CPU-bound processes beside it (started and stopped by .ci/under-load): no verdict
# may depend on how busy the machine is.
test-load: $(STAMP)
	PYTHON=$(BIN)/python .ci/under-load $(PYTEST) $(ARGS)

train: $(STAMP)
	$(BIN)/bioplaus train $(ARGS)

sweep: $(STAMP)
	$(BIN)/bioplaus sweep $(if $(CLUSTER),ray.address=$(CLUSTER)) $(ARGS)

report: $(STAMP)
	$(BIN)/bioplaus report $(SWEEP_DIR) $(ARGS)

bench: $(STAMP)
	$(BIN)/bioplaus bench $(ARGS)

# The published comparison (docs/results/): the study preset at equal epochs and at equal compute, each
# resumable (a rerun finishes a cut-off sweep), then the report of both into docs/results (its Parquet
# tables stay out of git). About 5 h of wall time on a shared 2-core CPU (docs/results); ARGS go to both sweeps.
# The compute sweep skips the brain step: the report takes brain scores from the first sweep only, and `brain`
# is not part of a sweep's configuration, so `bioplaus brain runs/sweeps/study-compute` can add them later.
study: $(STAMP)
	$(BIN)/bioplaus sweep preset=study $(if $(CLUSTER),ray.address=$(CLUSTER)) $(ARGS)
	$(BIN)/bioplaus sweep preset=study budget.kind=compute name=study-compute brain=false $(if $(CLUSTER),ray.address=$(CLUSTER)) $(ARGS)
	$(BIN)/bioplaus report runs/sweeps/study --compare runs/sweeps/study-compute --out docs/results

# The one-step GPU bench (docs/benchmarks.md, "GPU bench"): results in $(OUT). It needs no .venv: on a bare
# GPU machine it runs with python3 and the wheels carried in .whl (cluster/bench-gpu.sh).
OUT ?= runs/bench-gpu
bench-gpu:
	PYTHON=$(if $(wildcard $(BIN)/python),$(BIN)/python,python3) bash cluster/bench-gpu.sh $(OUT) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
