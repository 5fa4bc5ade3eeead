#!/usr/bin/env bash
# Run HERE (a machine with PyPI): downloads Liger-Kernel and Cut Cross-Entropy wheels into .whl/, to be
# carried to the lent GPU machine, which reaches no registry (device tool: carry [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --dest .whl liger-kernel cut-cross-entropy
ls -l .whl
