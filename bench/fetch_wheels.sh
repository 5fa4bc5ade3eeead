#!/usr/bin/env bash
# Run HERE (a machine with PyPI): downloads Liger-Kernel, Cut Cross-Entropy, TRL (with datasets, and what
# datasets needs that the GPU image lacks) and pytest-xdist wheels into .whl/, to be carried to the lent
# GPU machine, which reaches no registry (device tool: carry [".whl"]; 64 MiB with the working tree).
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
# TRL: its fused LM head is a peer row of bench/gpu_bench.py, its DPOTrainer a peer of the trainers stage.
# The image (Python 3.12, torch 2.11, transformers 5.17, accelerate 1.15; KINDS.md lists its packages)
# has pandas, pyarrow, xxhash, psutil, jinja2 and huggingface-hub; it lacks datasets, dill and
# multiprocess. Wheels for CPython 3.12 (multiprocess has one per Python version).
python3 -m pip download --no-deps --dest .whl --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "$(pin trl)" "$(pin datasets)" "$(pin dill)" "$(pin multiprocess)"
ls -l .whl
