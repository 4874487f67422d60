# Set-up and checks. Both targets bootstrap everything they need on a fresh machine.
#   make demo   -> .venv, install mtmm, train on the embedded dataset, print the run folder and test metrics
#   make test   -> .venv, install mtmm[dev], run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision first, pinned to a range the local wheel cache can satisfy; then mtmm itself.
TORCH := "torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1"

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/mtmm-train

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) *.egg-info
