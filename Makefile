# One entry point for people and CI. `make demo` and `make test` are the README's two commands.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml uv.lock | sha256sum | cut -c1-12)
PYTEST_ARGS ?=
# The suite runs in this many pytest processes (pytest-xdist), one test file per process at a
# time: most of a test's time is spent waiting on servers it started, so two share 2 cores.
PYTEST_WORKERS ?= 2
# The uv that installs from (and writes) uv.lock; bump it with the lock, not apart.
UV_VERSION := 0.13.9
UV := $(VENV)/bin/uv
# uv sync installs into this venv; --inexact keeps uv itself, which the lock does not list.
SYNC := UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --inexact --extra dev

.PHONY: install demo test check fmt lock upgrade bench-gateway bench-model-server bench-weights mutation

# Installs exactly what uv.lock pins (--locked: refuse a lock that no longer matches
# pyproject.toml, rather than resolving something CI never ran).
$(STAMP): pyproject.toml uv.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(SYNC) --locked -q
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# After editing dependencies in pyproject.toml: re-resolve, keeping every pin that still fits.
lock:
	test -x $(UV) || $(MAKE) install
	$(UV) lock
	$(MAKE) test

# Move every dependency to the newest versions pyproject.toml allows, then run the suite.
upgrade:
	test -x $(UV) || $(MAKE) install
	$(UV) lock --upgrade
	$(MAKE) test

demo: install
	$(VENV)/bin/kingpost server --push examples/echo-server

test: install
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

check: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

fmt: install
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

bench-gateway: install
	$(PY) bench/gateway.py

bench-model-server: install
	$(PY) bench/model_server.py

bench-weights: install
	$(PY) bench/weights.py

# Mutation testing of the pure decision modules against their own unit tests (minutes, CPU
# heavy, not part of `make test`). One module: `make mutation MUTATION="plan --jobs 1"`.
mutation: install
	$(PY) bench/mutation.py $(MUTATION)
