# Two commands for a newcomer (see README.md):
#   make run    set everything up, then a short FedAvg run on MNIST that prints its accuracy
#   make test   set everything up, then the whole test suite
# Both create their own virtual environment in .venv from nothing but python3 (>= 3.10).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export FEDLIB_DATA ?= $(CURDIR)/data

.PHONY: run test setup clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[pinned,test]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/python -m fedlib train --dataset mnist --model 2nn --partition iid --rounds 5 --out runs/quickstart.json

test: setup
	$(BIN)/python -m pytest -n 2

clean:
	rm -rf $(VENV) runs _build
