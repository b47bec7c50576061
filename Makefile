# ucofia-jax front door (README "Quick start"):
#   make demo    set up .venv from the lock on first use, then run the CPU demo
#   make test    the same set-up, then the test suite (CI's .ci/run calls exactly this)
# Variables (override on the command line, e.g. make test PYTEST_ARGS='-m "not slow"'):
#   VENV         the virtualenv to create and use                     (.venv)
#   PYTHON       the interpreter that creates it                     (python3)
#   WORKDIR      the demo's workdir: outputs, checkpoints, report    (workdir/demo)
#   PYTEST_ARGS  extra pytest arguments                               (none)
# POSIX make syntax only (checked with GNU make 4.3).

.POSIX:

VENV = .venv
PYTHON = python3
WORKDIR = workdir/demo
PYTEST_ARGS =

# Set-up stamp: (re)install when the lock or setup.py is newer than the last install.
STAMP = $(VENV)/.ucofia-installed

help:
	@echo 'make demo    set up $(VENV) from requirements-lock.txt (first use), run the CPU demo'
	@echo '             (output in $(WORKDIR), report at $(WORKDIR)/report/index.html)'
	@echo 'make test    set up $(VENV) likewise, run the tests: python -m pytest -q $$PYTEST_ARGS'
	@echo 'make lint    style only: ruff format --check . and ruff check .'
	@echo 'make setup   only create/update $(VENV)'
	@echo 'variables:   VENV, PYTHON, WORKDIR, PYTEST_ARGS (make VAR=value target; see the Makefile header)'

setup: $(STAMP)

# Reuses an existing $(VENV); the stamp is written only after every step succeeded.
$(STAMP): requirements-lock.txt setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements-lock.txt
	$(VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m ucofia_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

.PHONY: help setup demo test lint
