# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv and install the project into it first; pip's wheel cache lives outside the repo.
# The project is installed as a wheel (not editable: setuptools warns on every editable install of a flat layout), so
# the stamp depends on the sources too and any change reinstalls it (a few seconds).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SOURCES := $(shell find bench harness mmlu reports locustfiles -type f -not -path '*/__pycache__/*' 2>/dev/null)

$(STAMP): setup.cfg pyproject.toml requirements/constraints.txt $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements/constraints.txt '.[convert,test]'
	rm -rf build
	touch $(STAMP)

.PHONY: install demo test check lint system-deps
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/llamasys demo

system-deps:
	bash scripts/system-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --check --no-cache .

# The inner loop: lint and the unit tests, no llama.cpp build, on every core (pytest-xdist: the unit tests share
# nothing). The integration tests run one at a time: those that measure latency need the cores to themselves.
check: lint
	$(BIN)/pytest tests/unit -q -n auto

test: $(STAMP) system-deps lint
	$(BIN)/pytest
