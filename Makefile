# Set-up and everyday commands. Everything runs inside .venv, made on first use.
#   make edit   - install, then edit an example image with the embedded default model (offline)
#   make test   - install with the test tools, then run the test suite
# TORCH picks the PyTorch build: the default is the CPU build; on a GPU machine use e.g.
#   make edit TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
# and IMAGE, TEXT, MODEL, OUT change the edit.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
IMAGE ?= examples/large-red-circle-top-left.png
TEXT ?= a large blue circle at the top left
OUT ?= imagic-out
BIN := $(VENV)/bin

.PHONY: install edit test lint clean

$(BIN)/imagic: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e '.[test]'
	touch $(BIN)/imagic

install: $(BIN)/imagic

edit: install
	$(BIN)/imagic edit $(IMAGE) "$(TEXT)" $(if $(MODEL),--model $(MODEL)) --out $(OUT)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests scripts benchmarks

clean:
	rm -rf $(VENV) imagic-out .pytest_cache
