# Set-up and the two main jobs. Every path installs the pinned CPU torch first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Tests, CI and the demo read corpora from ../shared/data when it is there; otherwise the
# product downloads them into ~/.cache/microsweep.
export MICROSWEEP_DATA ?= $(abspath $(wildcard ../shared/data))
DEMO_DB ?= demo.db

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	rm -f $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm
	$(BIN)/microsweep run examples/shakespeare.py --name demo --trials 30 --workers 2 \
		--seed 0 --storage sqlite:///$(DEMO_DB)
	$(BIN)/microsweep status --name demo --storage sqlite:///$(DEMO_DB)
	$(BIN)/microsweep report --name demo --storage sqlite:///$(DEMO_DB) -o demo-report.html
	@echo ""
	@echo "The commands above are $(BIN)/microsweep ('source $(VENV)/bin/activate' puts it on"
	@echo "PATH); the corpus folder is remembered in the cache, so they need no MICROSWEEP_DATA."
	@echo "Open demo-report.html in a browser."

lint: install
	$(BIN)/ruff check microsweep tests benchmarks examples

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) *.db *.db-wal *.db-shm demo-report.html
