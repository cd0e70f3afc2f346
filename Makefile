# `make demo` and `make test` set everything up on a fresh clone, then run.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo lint test bench

# pip byte-compiles every file it installs on one core; compileall does the same on all cores (2026-12-06, 2 cores:
# the install 157 s -> 89 s, the compile 40 s). Like pip, it leaves a file this Python cannot compile (torch ships one
# for 3.12) to fail where it is imported. It skips what nothing here imports (the packages' own tests, and pip),
# which Python would compile on first import if anything did.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --no-compile --upgrade pip
	$(VENV)/bin/pip install --quiet --no-compile -e '.[test]'
	$(VENV)/bin/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['tool']['agft']['data-packages'])" \
		| xargs $(VENV)/bin/pip install --quiet --no-compile --no-deps
	$(VENV)/bin/python -m compileall -q -j 0 -x '/(tests?|pip)/' $(VENV)/lib >/dev/null || true
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/agft run

# `make test` lints first: CI (.ci/run) fails on a lint or format error like on a failed test.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two pytest workers (more on a bigger machine): much of a test's time is Ray processes starting and waiting on
# each other, so two workers help even on 2 cores (2026-12-06, fresh clone: pytest 35 min serial, 24.6 min so).
# Three on 2 cores were no faster (2026-12-07, fresh clones an hour apart: pytest 1 773 s against 1 770 s, the CPUs
# 91 % busy) and Ray nodes then missed their start-up deadlines.
test: lint
	$(VENV)/bin/python -m pytest --numprocesses auto --maxprocesses 4 --dist loadgroup

bench: $(STAMP)
	$(VENV)/bin/python bench/spine_budget.py
