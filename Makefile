# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both install exactly the versions in requirements.lock; `make lock` refreshes it, and
# `make test-latest` runs the suite on the newest versions pyproject.toml allows.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
LATEST := .venv-latest
TOOLS  := .venv-tools
UV_VERSION := 0.13.10
# torch comes from the CPU wheel pip finds on this machine (find-links); the lock names its
# local version so that a resolver never picks the multi-GB CUDA build from the registry.
TORCH  := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Material prints a banner about its successor on every docs build
export NO_MKDOCS_2_WARNING := 1

.PHONY: setup test demo docs report lock test-latest bench clean

setup: $(STAMP)

$(STAMP): requirements.lock requirements-presets.lock pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade 'pip>=24'
	$(PIP) install -q --require-hashes -r requirements.lock
	$(PIP) install -q --require-hashes --no-deps -r requirements-presets.lock
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

test: setup
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir site
	$(PY) -m pytest tests --durations=25; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

demo: setup
	$(VENV)/bin/deltatune compare examples/demo-compare-minilm.yaml --overwrite

docs: setup
	$(VENV)/bin/mkdocs build --strict --site-dir site

report: setup
	$(PY) benchmarks/common/report.py

# Re-resolve every package (transitively, exact versions, hashes) from pyproject.toml's ranges.
lock:
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q uv==$(UV_VERSION)
	echo '$(TORCH)+cpu' > $(TOOLS)/torch-cpu.txt
	$(TOOLS)/bin/uv pip compile pyproject.toml --extra test --extra docs --generate-hashes \
	  --python-version 3.11 --find-links /opt/wheels --constraint $(TOOLS)/torch-cpu.txt \
	  --no-header --output-file requirements.lock
	$(TOOLS)/bin/uv pip compile requirements-presets.in --no-deps --generate-hashes \
	  --python-version 3.11 --no-header --output-file requirements-presets.lock

# The newest versions pyproject.toml allows, in a venv of their own: drift found on purpose.
test-latest:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q $(TORCH)
	# everything else at its newest; torch stays on the CPU wheel (the newest torch here is a
	# multi-GB CUDA build, and the CPU wheel is what every machine of this kind trains on)
	echo '$(TORCH)' > $(LATEST)/torch-constraint.txt
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager \
	  --constraint $(LATEST)/torch-constraint.txt -e '.[test,docs]'
	$(LATEST)/bin/pip install -q --upgrade --no-deps -r requirements-presets.in
	$(LATEST)/bin/pip freeze --exclude-editable > $(LATEST)/versions.txt
	$(LATEST)/bin/mkdocs build --strict --quiet --site-dir $(LATEST)/site
	$(LATEST)/bin/python -m pytest tests

bench: setup
	$(PIP) install -q -r benchmarks/requirements.txt
	$(PY) benchmarks/training/run.py

clean:
	rm -rf $(VENV) $(LATEST) $(TOOLS) .pytest_cache site
