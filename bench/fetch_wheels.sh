#!/usr/bin/env bash
# Run HERE (a machine with PyPI): downloads Liger-Kernel, Cut Cross-Entropy and pytest-xdist wheels into .whl/, to be
# carried to the lent GPU machine, which reaches no registry (device tool: carry [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
# name==version as requirements-lock.txt pins it: the versions make test (and the dry run's calls into them) passed with.
pin() {
    local line
    line=$(grep -i -E "^$1==" requirements-lock.txt) || { echo "fetch_wheels.sh: $1 is not in requirements-lock.txt" >&2; exit 1; }
    echo "$line"
}
python3 -m pip download --no-deps --dest .whl "$(pin liger-kernel)" "$(pin cut-cross-entropy)"
# pytest-xdist (and execnet, its one dependency): the kernel tests compile about a hundred Triton
# specializations on a cold cache; eight workers keep that inside the tests stage's time limit.
python3 -m pip download --no-deps --dest .whl "$(pin pytest-xdist)" "$(pin execnet)"
ls -l .whl
