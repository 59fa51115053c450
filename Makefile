# Two entry points (see README): `make demo` and `make test`. Both create/reuse .venv.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
SHARED_DATA ?= $(abspath ../shared/data)
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# One thread per process: the demo's models are tiny, and on 2 cores more threads only contend
# (the cohort generator already runs 2 processes). demo.py prints its wall and CPU time.
demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=$${MKL_NUM_THREADS:-1} \
	  $(BIN)/python examples/demo.py --out outputs/demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# -v: one line per test as it finishes, with the running percentage; --durations: the slowest;
# -n 2: two pytest-xdist workers (the suite takes ~10 min on 2 cores instead of ~14 serially).
PYTEST := SLIDEFM_SHARED_DATA=$(SHARED_DATA) $(BIN)/python -m pytest -v -n 2 --durations=15

test: $(STAMP) lint
	$(PYTEST) tests

# Everything but the end-to-end tests marked slow (CI still runs them: `make test`).
test-fast: $(STAMP) lint
	$(PYTEST) -m "not slow" tests

bench: $(STAMP)
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b; done

clean:
	rm -rf outputs .pytest_cache .ruff_cache
