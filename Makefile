# `make demo` and `make test` create (or reuse) the virtual environment .venv and install tidpo into it.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch on a machine without a GPU; on a GPU machine override, e.g. TORCH="torch==2.13.0".
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.tidpo-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tidpo train

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf $(VENV) runs build *.egg-info
