# Set-up and everyday commands. Everything runs inside .venv, made on first use.
#   make edit   - install, then edit an example image with the shipped ShapesWorld 2 cascade
#                 (offline): the standing cat made to sit
#   make test   - install with the test tools, then run the test suite
# TORCH picks the PyTorch build: by default torch==2.13.0 as pip finds it (from PyPI on Linux,
# the CUDA build); a CPU-only or a given CUDA build, e.g.
#   make edit TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
#   make edit TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
# and IMAGE, TEXT, MODEL, OUT change the edit.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
IMAGE ?= examples/purple-cat-standing.png
TEXT ?= a large purple cat sitting on the right
MODEL ?= imagic:shapes2-128
OUT ?= imagic-out
BIN := $(VENV)/bin

.PHONY: install edit test lint clean FORCE

# The environment is (re)built when pyproject.toml changes or TORCH names another build than the
# one installed (.venv/torch-spec records it); a different build replaces the installed torch.
$(BIN)/imagic: pyproject.toml $(VENV)/torch-spec
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	if [ "$$(cat $(VENV)/torch-installed 2>/dev/null)" != "$(TORCH)" ]; then \
	    $(BIN)/python -m pip uninstall -y -q torch; \
	    $(BIN)/python -m pip install $(TORCH) && echo "$(TORCH)" > $(VENV)/torch-installed; fi
	$(BIN)/python -m pip install -e '.[test]'
	touch $(BIN)/imagic

# rewritten only when TORCH changes, so its time stamp says when that was
$(VENV)/torch-spec: FORCE
	@mkdir -p $(VENV)
	@[ "$$(cat $@ 2>/dev/null)" = "$(TORCH)" ] || echo "$(TORCH)" > $@

FORCE:

install: $(BIN)/imagic

edit: install
	$(BIN)/imagic edit $(IMAGE) "$(TEXT)" $(if $(MODEL),--model $(MODEL)) --out $(OUT)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests scripts benchmarks

clean:
	rm -rf $(VENV) imagic-out .pytest_cache
