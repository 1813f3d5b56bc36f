# make run   - create .venv with the server's run-time packages (first time) and start the server
# make test  - add the test packages to .venv (first time) and run the whole test suite, on
#              SQLite, then on a private PostgreSQL when its server binaries are installed
# make bench - the benchmarks in bench/, figures written to bench/RESULTS.md
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip --quiet --disable-pip-version-check
ARGS   ?=

.PHONY: run test bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.txt
	touch $@

# The packaging tests install p3s into fresh environments without the network: they take the
# run-time packages, and setuptools to build p3s (pyproject.toml), from the wheels kept here.
$(VENV)/.tested: $(VENV)/.installed requirements-test.txt requirements-postgresql.txt
	$(PIP) install -r requirements-test.txt
	$(PIP) wheel -r requirements.txt 'setuptools>=61' -w $(VENV)/wheels
	touch $@

run: $(VENV)/.installed
	$(PY) p3s_server.py $(ARGS)

# The second pass starts its own PostgreSQL cluster (tests/conftest.py). Without the server
# binaries it is skipped, loudly, unless P3S_REQUIRE_POSTGRES is set (CI), which fails.
test: $(VENV)/.tested
	$(PY) -m pytest -q tests
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	    echo '== the test suite again, on PostgreSQL'; \
	    P3S_TEST_DB=postgresql $(PY) -m pytest -q tests; \
	elif [ -n "$$P3S_REQUIRE_POSTGRES" ]; then \
	    echo 'make test: PostgreSQL is required but its server binaries are not installed' >&2; \
	    exit 1; \
	else \
	    echo '*** make test: the PostgreSQL pass was SKIPPED: its server binaries are not' \
	        'installed (Debian: apt-get install postgresql) ***' >&2; \
	fi

bench: $(VENV)/.installed
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) bench/.peers-venv .pytest_cache tests/__pycache__ __pycache__ build *.egg-info
