# The Makefile is the interface: the README, CI and developers all call these targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
GEN_DIR := clients/python
PROTOS := $(wildcard proto/fitserve/v1/*.proto)
PYTEST_ARGS ?=

.PHONY: help install run test lint fmt typecheck imports proto check-generated keras-signatures unit integration bench bench-quick soak dashboards dashboards-preview clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml clients/python/pyproject.toml examples/plugins/pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info[:3]; sys.exit(0 if (3, 11, 4) <= v < (3, 13) else "fitserve needs Python 3.11.4+ or 3.12, found %d.%d.%d; run: make PYTHON=python3.12 ..." % v)'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '$(GEN_DIR)[plot,cli]' -e '.[dev]' -e examples/plugins
	touch $(STAMP)

install: $(STAMP)  ## Create .venv and install the server, worker, SDK, example plugins and dev tools

run: $(STAMP)  ## Start the whole stack (Redis, server, worker) on this machine
	$(BIN)/fitserve up

lint: $(STAMP)  ## ruff format check, ruff lint, mypy --strict, import contracts
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

fmt: $(STAMP)  ## Format and fix what ruff can
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

proto: $(STAMP)  ## Regenerate the Python code of the gRPC contract
	$(PY) -m grpc_tools.protoc -I proto \
		--python_out=$(GEN_DIR) --mypy_out=$(GEN_DIR) \
		--grpc_python_out=$(GEN_DIR) --mypy_grpc_out=$(GEN_DIR) \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
		$(PROTOS)

check-generated: $(STAMP)  ## Fail if the committed generated code differs from the .proto files
	@tmp=$$(mktemp -d) && \
	$(PY) -m grpc_tools.protoc -I proto \
		--python_out=$$tmp --mypy_out=$$tmp --grpc_python_out=$$tmp --mypy_grpc_out=$$tmp \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
		$(PROTOS) && \
	diff -r -x __init__.py -x __pycache__ -x '*.typed' $$tmp/fitserve/v1 $(GEN_DIR)/fitserve/v1 \
		|| { echo "generated code is stale: run 'make proto' and commit"; rm -rf $$tmp; exit 1; }; \
	rm -rf $$tmp; echo "generated code is up to date"

keras-signatures: $(STAMP)  ## Regenerate service/domain/keras_signatures.py from the installed Keras
	$(PY) tools/gen_keras_signatures.py
	$(BIN)/ruff format service/domain/keras_signatures.py

test: lint check-generated  ## Lint, then every test (unit, integration, end-to-end)
	$(BIN)/pytest $(PYTEST_ARGS)

unit: $(STAMP)  ## Only the unit tests
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: $(STAMP)  ## Only the integration and end-to-end tests
	$(BIN)/pytest tests/integration tests/e2e $(PYTEST_ARGS)

bench: $(STAMP)  ## Every benchmark of bench/README.md against its references; results in bench/results/
	$(PY) -m bench run

bench-quick: $(STAMP)  ## The reduced benchmark, under 3 minutes
	$(PY) -m bench run --quick

soak: $(STAMP)  ## A bounded soak under random faults (SOAK_SECONDS, default 180); report in bench/results/soak.md
	$(PY) -m bench.soak $(if $(SOAK_SECONDS),--seconds $(SOAK_SECONDS))

dashboards: $(STAMP)  ## Regenerate deploy/grafana/*.json from deploy/dashboards.py
	$(PY) deploy/dashboards.py

PROMETHEUS_URL ?=
dashboards-preview: $(STAMP)  ## PNGs of every dashboard into deploy/preview/: from PROMETHEUS_URL, or from a test stack
ifneq ($(PROMETHEUS_URL),)
	$(PY) deploy/preview.py --prometheus $(PROMETHEUS_URL) $(PREVIEW_ARGS)
else
	FITSERVE_DASHBOARDS_PREVIEW=$(CURDIR)/deploy/preview $(BIN)/pytest -q \
		tests/integration/test_prometheus_scrape.py -k preview $(PYTEST_ARGS)
endif

clean:  ## Remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
