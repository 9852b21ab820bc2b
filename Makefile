# Usher: `make up` runs the system locally, `make test` runs every check and test.
# Both create .venv and install what they need; only Python 3.11+ must exist.

VENV    := .venv
PY      := $(VENV)/bin/python
PYTHON  ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
             command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' && { echo $$p; break; }; \
           done)
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: up test lint protos check-protos bench clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11 or newer is needed" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@# checkov pins packaging<24, which pytest 9 cannot share: its own venv.
	@test -x $(VENV)/checkov/bin/checkov || $(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install --quiet -r deploy/tools/checkov-requirements.txt
	@rm -f $(VENV)/.installed-*; touch $@

## Run Redis, the services and a simulated Ollama fleet (or OLLAMA_HOST), then a live demo.
up: $(STAMP)
	$(PY) -m usher.devstack

## Lint, type-check, API checks, then the whole test suite (deploy/ checks included:
## tests/deploy, also alone with scripts/validate_deploy.sh).
test: lint
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/buf lint
	./scripts/buf_breaking.sh
	./scripts/gen_protos.sh --check

## Regenerate the committed Python stubs from proto/.
protos: $(STAMP)
	./scripts/gen_protos.sh

## Benchmarks: print figures as JSON lines (not run by `make test`).
bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
