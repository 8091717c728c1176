# `make demo` / `make test` work on a fresh machine with only Python: they create .venv,
# install torch first (pinned so the local 2.13.0 CPU wheel serves), then alignkit.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test test-slow test-all bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/alignkit demo

test: venv
	$(BIN)/python -m pytest -q -x --timeout 900

test-slow: venv
	$(BIN)/python -m pytest -q -m slow --timeout 3600

test-all: venv
	$(BIN)/python -m pytest -q -m "slow or not slow" --timeout 3600

bench: venv
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs build *.egg-info
