# `make run`: the studio on http://127.0.0.1:7860.  `make test`: the whole suite.
# Each does its own set-up first (scripts/setup.sh: system packages, .venv, Python packages).
VENV := .venv
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: setup run test bench clean

setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/studio serve --host $(HOST) --port $(PORT)

test:
	@WITH_BROWSER=1 bash scripts/setup.sh
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
