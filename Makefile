# make run   - create .venv from requirements.txt (first time) and start the server
# make test  - the whole test suite
# make bench - the benchmarks in bench/, figures written to bench/RESULTS.md
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: run test bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

run: $(VENV)/.installed
	$(PY) p3s_server.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) bench/.peers-venv .pytest_cache tests/__pycache__ __pycache__
