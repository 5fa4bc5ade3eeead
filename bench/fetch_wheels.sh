#!/usr/bin/env bash
# Run HERE (a machine with PyPI): downloads Liger-Kernel, Cut Cross-Entropy and pytest-xdist wheels into .whl/, to be
# carried to the lent GPU machine, which reaches no registry (device tool: carry [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
# The versions pyproject's bench and test extras pin (make test's dry run checks our calls into them).
python3 -m pip download --no-deps --dest .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1
# pytest-xdist (and execnet, its one dependency): the kernel tests compile about a hundred Triton
# specializations on a cold cache; eight workers keep that inside the tests stage's time limit.
python3 -m pip download --no-deps --dest .whl pytest-xdist==3.8.0 execnet==2.1.2
ls -l .whl
