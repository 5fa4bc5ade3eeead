# Set-up is part of every target: each creates/updates .venv and installs what it needs.
# CPU install path: torch is pinned (requirements-cpu.txt) so pip takes the CPU build, not a multi-GB CUDA one.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: test test-latest test-image lock train bench docs clean native

# The test extras (TRL 1.16, transformers 5.2x) need Python 3.11; say so before pip fails to resolve them.
$(PYTHON):
	@$(PY) -c 'import sys; sys.exit("make test / make train need Python >= 3.11 (TRL >= 1.16 does); this is " + sys.version.split()[0] + ": run PY=python3.11 make ..." if sys.version_info < (3, 11) else 0)'
	$(PY) -m venv $(VENV)

# Every package of the CPU set-up at the version the suite last passed with (requirements-lock.txt,
# written by `make lock`); pyproject.toml keeps the ranges that people who install the library get.
LOCK := requirements-lock.txt
$(VENV)/.test-deps: pyproject.toml requirements-cpu.txt $(LOCK) | $(PYTHON)
	$(PIP) install -q -c $(LOCK) -r requirements-cpu.txt
	$(PIP) install -q -c $(LOCK) -e '.[test]'
	touch $@

# Build the C++ CPU kernels up front: a broken build fails here instead of silently falling back.
native: $(VENV)/.test-deps
	$(PYTHON) -c "import sys; from safedpo_kernels import native; ok = native.load(); print('native kernels:', native.build_info()); sys.exit(0 if ok else 1)"

# The linter first (ruff, configured in pyproject.toml), the docs built strictly (a broken link or API
# reference fails), then the suite on two workers (pytest-xdist: tests/conftest.py gives each worker, and
# the processes it starts, one thread; the multi-process tests share one xdist group, one at a time).
PYTEST_ARGS ?= -n 2 --dist loadgroup
test: native
	$(PYTHON) -m ruff check .
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict --quiet --site-dir $(VENV)/site-check
	TRITON_INTERPRET=1 $(PYTHON) -m pytest tests $(PYTEST_ARGS)

# The documentation site (MkDocs, Material, mkdocstrings' API reference from the docstrings): site/.
docs: $(VENV)/.test-deps
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict

# The same suite against the newest releases pyproject admits (torch stays at the CPU build's pin) in its
# own venv: upstream drift shows here before it reaches a user. docs/versions.md says when to run it.
LATEST := .venv-latest
$(LATEST)/bin/python:
	$(PY) -m venv $(LATEST)

test-latest: | $(LATEST)/bin/python
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -r requirements-cpu.txt -e '.[test]'
	$(LATEST)/bin/python -c "import sys; from safedpo_kernels import native; sys.exit(0 if native.load() else 1)"
	$(LATEST)/bin/python -m ruff check .
	NO_MKDOCS_2_WARNING=1 $(LATEST)/bin/python -m mkdocs build --strict --quiet --site-dir $(LATEST)/site-check
	TRITON_INTERPRET=1 $(LATEST)/bin/python -m pytest tests $(PYTEST_ARGS)

# The same suite on the lent GPU machines' Python stack (Python 3.12, torch 2.11, triton 3.6, transformers
# 5.17, accelerate 1.15: the device tool's KINDS.md), here on the CPU, in its own venv: the check before
# a GPU run (the suite includes gpu_check.sh's dry run), and the torch floor users on that stack have.
# PyPI has no CPU build of torch 2.11: its CUDA build (about 5 GB in the venv) runs on the CPU. numpy < 2.4
# only for triton 3.6's interpreter, which the image (numpy 2.5, compiled kernels) does not use.
IMAGE := .venv-image
IMAGE_PY ?= python3.12
IMAGE_PINS := torch==2.11.0 triton==3.6.0 transformers==5.17.0 accelerate==1.15.0 huggingface-hub==1.33.0 \
	tokenizers==0.23.2 safetensors==0.8.0 'numpy<2.4'
$(IMAGE)/bin/python:
	@$(IMAGE_PY) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' 2>/dev/null || { \
	  echo "make test-image needs the GPU image's Python 3.12: IMAGE_PY=/path/to/python3.12 make test-image"; exit 1; }
	$(IMAGE_PY) -m venv $(IMAGE)

test-image: | $(IMAGE)/bin/python
	$(IMAGE)/bin/python -m pip install -q $(IMAGE_PINS) -e '.[test]'
	$(IMAGE)/bin/python -c "import sys; from safedpo_kernels import native; sys.exit(0 if native.load() else 1)"
	TRITON_INTERPRET=1 $(IMAGE)/bin/python -m pytest tests $(PYTEST_ARGS)

# Refresh the lock: the versions of .venv-latest once the suite has passed there.
lock: test-latest
	{ echo "# The CPU set-up of make test / make train: the versions the suite passed with (make test-latest)."; \
	  echo "# Written by 'make lock' on $$(date -u +%Y-%m-%d), Python $$($(LATEST)/bin/python -c 'import platform; print(platform.python_version())'); do not edit by hand."; \
	  $(LATEST)/bin/python -m pip freeze --exclude-editable | sed -e 's/+cpu$$//' \
	  | awk -F'==' '{ n = tolower($$1); gsub(/[-_.]+/, "-", n); print n "==" $$2 }' | LC_ALL=C sort; } > $(LOCK)

# The main job: the embedded toy safety task, SFT then SafeDPO on three seeds, ending with a table
# (runs/experiments/). ISA=avx2 (or avx512, default) computes as a machine with that instruction set does.
train: native
	$(PYTHON) -m safedpo experiment default --seeds 0,1,2 $(if $(ISA),--isa $(ISA))

# The CPU benchmark suite (about 17 minutes on 2 AVX2 cores): bench/results/<machine>-<date>.csv/.md/.png
$(VENV)/.bench-deps: $(VENV)/.test-deps
	$(PIP) install -q -e '.[bench]'
	touch $@

bench: native $(VENV)/.bench-deps
	$(PYTHON) -m bench.suite
	$(PYTHON) -m bench.parallel_scale

clean:
	rm -rf $(VENV) $(LATEST) $(IMAGE) .pytest_cache .benchmarks site
