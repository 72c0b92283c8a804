# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv and install the project into it first; pip's wheel cache lives outside the repo.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

$(STAMP): setup.cfg pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e '.[convert,test]'
	touch $(STAMP)

.PHONY: install demo test lint system-deps
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/llamasys demo

system-deps:
	bash scripts/system-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --check --no-cache .

test: $(STAMP) system-deps lint
	$(BIN)/pytest
