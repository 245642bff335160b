# cellssl: the two commands a fresh clone needs (see README).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test

$(BIN)/cellssl: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# --no-compile: Python compiles a module's bytecode when it is first imported instead of all of
	# torch's at install (measured: the install 1 min 33 s instead of ~2 min 20 s on 2 cores)
	$(BIN)/pip install -q --no-compile -e '.[test]'
	touch $(BIN)/cellssl

install: $(BIN)/cellssl

# Main job: pretrain MSBReg on the built-in synthetic smears, then few-shot + linear report.
demo: install
	$(BIN)/cellssl demo --out runs/demo

# Install, lint (ruff: seconds) and run the whole test suite (CPU, a few minutes): one pytest worker
# per core (at most 4; each test file on one worker, so a module's fixtures are built once).
test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q -n auto --maxprocesses 4 --dist loadfile
