#!/usr/bin/env bash
# ONE script for a lent GPU (see the device tool's README): under 8 minutes it prints the card and the
# versions, runs the test suite on CUDA, measures the copy-bandwidth and bf16-matmul ceilings, runs the
# GPU benchmark, writes CSV + markdown under $OUT (default bench/results) and prints the table last.
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root (PYTHONPATH=.)
#   bash bench/gpu_check.sh --dry-run  # here, on the CPU: tiny sizes, Triton interpreter (a test runs this)
#
# Liger-Kernel and Cut Cross-Entropy are taken from .whl/ when bench/fetch_wheels.sh put them there
# (the GPU machine reaches no package registry).
set -uo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = "--dry-run" ] || unset TRITON_INTERPRET  # compiled kernels on the GPU
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=".:${PYTHONPATH:-}"
status=0

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  mkdir -p .whl/site
  "$PY" -m pip install -q --no-deps --no-index --target .whl/site .whl/*.whl >/dev/null 2>&1 || echo "could not unpack .whl/"
  export PYTHONPATH="$PYTHONPATH:.whl/site"
fi

echo "== versions =="
"$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "| device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
PYEOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

echo "== tests =="
if [ $DRY = 1 ]; then
  # A small slice only: the full suite is what calls this dry run.
  TRITON_INTERPRET=1 "$PY" -m pytest tests/test_sequence_logps.py -q -x -k "padded_matches_reference and float32" || status=1
else
  # The kernel tests on CUDA (the trainer's tests are CPU/gloo tests); no C++ CPU build needed there.
  SAFEDPO_NATIVE=0 "$PY" -m pytest tests/test_sequence_logps.py tests/test_safedpo_loss.py tests/test_linear.py tests/test_noncontiguous.py \
    tests/test_linear_loss.py tests/test_loss_family.py tests/test_validation.py -q -x -k "cuda or not torch-cpu" 2>&1 | tail -n 15
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  # In-place backward on a leaf, second / double backward, +inf logits: the CUDA cases only (the rest of
  # that module is about the trainer's files).
  SAFEDPO_NATIVE=0 "$PY" -m pytest tests/test_hardening.py -q -x -k "cuda" 2>&1 | tail -n 5
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

echo "== benchmark =="
if [ $DRY = 1 ]; then
  TRITON_INTERPRET=1 "$PY" -m bench.gpu_bench --dry-run --out "$OUT" || status=1
else
  SAFEDPO_NATIVE=0 "$PY" -m bench.gpu_bench --out "$OUT" || status=1
fi
exit $status
