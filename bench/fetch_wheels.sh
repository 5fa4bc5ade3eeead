#!/usr/bin/env bash
# Run HERE (a machine with PyPI): downloads Liger-Kernel and Cut Cross-Entropy wheels into .whl/, to be
# carried to the lent GPU machine, which reaches no registry (device tool: carry [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
# The versions pyproject's bench and test extras pin (make test's dry run checks our calls into them).
python3 -m pip download --no-deps --dest .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1
ls -l .whl
