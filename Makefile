# Set-up is part of every target: each creates/updates .venv and installs what it needs.
# CPU install path: torch is pinned (requirements-cpu.txt) so pip takes the CPU build, not a multi-GB CUDA one.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: test train bench clean native

# The test extras (TRL 1.16, transformers 5.2x) need Python 3.11; say so before pip fails to resolve them.
$(PYTHON):
	@$(PY) -c 'import sys; sys.exit("make test / make train need Python >= 3.11 (TRL >= 1.16 does); this is " + sys.version.split()[0] + ": run PY=python3.11 make ..." if sys.version_info < (3, 11) else 0)'
	$(PY) -m venv $(VENV)

$(VENV)/.test-deps: pyproject.toml requirements-cpu.txt | $(PYTHON)
	$(PIP) install -q -r requirements-cpu.txt
	$(PIP) install -q -e '.[test]'
	touch $@

# Build the C++ CPU kernels up front: a broken build fails here instead of silently falling back.
native: $(VENV)/.test-deps
	$(PYTHON) -c "import sys; from safedpo_kernels import native; ok = native.load(); print('native kernels:', native.build_info()); sys.exit(0 if ok else 1)"

# The linter first (ruff, configured in pyproject.toml), then the suite.
test: native
	$(PYTHON) -m ruff check .
	TRITON_INTERPRET=1 $(PYTHON) -m pytest tests -q

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
	rm -rf $(VENV) .pytest_cache .benchmarks
