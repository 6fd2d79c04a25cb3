# One-command set-up and the two entry points of the README (make demo, make test).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Without a CUDA device, pin the CPU build of torch in the same pip command as everything else.
TORCH := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "torch==2.13.0")

.PHONY: setup demo test lint embedded embedded-policy style-classifier benchmark clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH) -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/guardtune demo --out runs/demo --json runs/demo/result.json

lint: setup
	$(BIN)/ruff check guardtune tests benchmarks
	$(BIN)/ruff format --check guardtune tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

# Rebuild the embedded model and digit classifier (about 50 minutes on 2 CPU cores), then its
# policy. The policy's signing key is keys/guardtune-digits.key (made if absent, never committed).
embedded: setup
	$(BIN)/python -m guardtune.digits.build
	$(MAKE) embedded-policy

embedded-policy: setup
	$(BIN)/python -m guardtune.digits.build --policy-only

# Retrain the style classifier that judges legal style tasks (a few minutes on 2 CPU cores).
style-classifier: setup
	$(BIN)/python -m guardtune.digits.style

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
