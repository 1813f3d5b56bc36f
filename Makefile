# make run   - create .venv with the server's run-time packages (first time) and start the server
# make test  - add the test packages to .venv (first time) and run the whole test suite
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
$(VENV)/.tested: $(VENV)/.installed requirements-test.txt
	$(PIP) install -r requirements-test.txt
	$(PIP) wheel -r requirements.txt 'setuptools>=61' -w $(VENV)/wheels
	touch $@

run: $(VENV)/.installed
	$(PY) p3s_server.py $(ARGS)

test: $(VENV)/.tested
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) bench/.peers-venv .pytest_cache tests/__pycache__ __pycache__ build *.egg-info
