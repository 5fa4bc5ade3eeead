#!/usr/bin/env bash
# ONE script for a lent GPU (see the device tool's README): in about 6 minutes at most (8 if every stage hits its limit) it prints the card
# and the versions, runs the kernel tests on CUDA, checks every backend against float64 at real
# vocabularies, measures the copy-bandwidth and bf16-matmul ceilings and runs the GPU benchmark
# (Liger-Kernel's DPO case included), writing under $OUT (default bench/results):
#   gpu_check.log                      everything printed
#   gpu-tests-<card>-<date>.txt        the pytest summary
#   gpu-accuracy-<card>-<date>.txt     bench/gpu_accuracy.py
#   gpu-<card>-<date>.csv/.md/.json    bench/gpu_bench.py, the targets last
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root (PYTHONPATH=.)
#   bash bench/gpu_check.sh --dry-run  # here, on the CPU: tiny sizes, Triton interpreter (a test runs this)
#   STAGES="tests bench" bash bench/gpu_check.sh   # a rerun of some stages only
#
# Each stage has its own time limit, so a hang in one still leaves the others' results. Liger-Kernel and
# Cut Cross-Entropy are taken from .whl/ when bench/fetch_wheels.sh put them there (the GPU machine
# reaches no package registry).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
[ $DRY = 1 ] || unset TRITON_INTERPRET  # compiled kernels on the GPU
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGES=${STAGES:-tests accuracy bench}
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
# The C++ CPU kernels are not what this checks, and a GPU machine need not build them.
[ $DRY = 1 ] || export SAFEDPO_NATIVE=0
LOG="$OUT/gpu_check.log"
: >"$LOG"
status=0
has() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
say() { echo "$@" | tee -a "$LOG"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  # Afresh each time: pip --target leaves a package already there as it is, whatever version .whl/ now holds.
  rm -rf .whl/site && mkdir -p .whl/site
  "$PY" -m pip install -q --no-deps --no-index --target .whl/site .whl/*.whl >/dev/null 2>&1 || say "could not unpack .whl/"
  export PYTHONPATH="$PYTHONPATH:.whl/site"
fi

say "== versions =="
"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG"
import importlib.metadata, importlib.util, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda, "| device:",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
# module -> distribution (Liger-Kernel has no __version__; the distribution's metadata has it)
for name, dist in (("triton", "triton"), ("liger_kernel", "liger-kernel"), ("cut_cross_entropy", "cut-cross-entropy"),
                   ("transformers", "transformers"), ("numpy", "numpy"), ("xdist", "pytest-xdist")):
    if importlib.util.find_spec(name) is None:
        print(name, "not installed")
        continue
    try:
        __import__(name)
        print(name, importlib.metadata.version(dist))
    except Exception as exc:  # a broken optional package is reported, not fatal
        print(name, "fails to import:", exc)
PYEOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee -a "$LOG"
CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu-dry-run')")
DATE=$(date +%F)

if has tests; then
  say "== tests =="
  if [ $DRY = 1 ]; then
    # A small slice only: the full suite is what calls this dry run.
    TRITON_INTERPRET=1 timeout 300 "$PY" -m pytest tests/kernels/test_sequence_logps.py -q -x -k "padded_matches_reference and float32" 2>&1 | tee -a "$LOG"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  else
    # The kernel tests on CUDA (the trainer's tests are CPU/gloo tests), in parallel where pytest-xdist is
    # there; not the C++ CPU backend's build tests, the compile matrix (which runs here, without a GPU) nor
    # the process-group tests (gloo CPU processes: one GPU gives NCCL no second rank).
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
    timeout 150 "$PY" -m pytest tests/kernels --ignore tests/kernels/test_native.py \
      --ignore tests/kernels/test_parallel.py \
      -q -rfE $XDIST -k "not torch-cpu" -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests-$CARD-$DATE.txt" | tee -a "$LOG" | tail -n 40
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  fi
fi

if has accuracy; then
  say "== accuracy against float64 =="
  if [ $DRY = 1 ]; then
    TRITON_INTERPRET=1 timeout 300 "$PY" -m bench.gpu_accuracy --dry-run --out "$OUT" 2>&1 | tee -a "$LOG"
  else
    timeout 100 "$PY" -m bench.gpu_accuracy --out "$OUT" 2>&1 | tee -a "$LOG"
  fi
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if has bench; then
  say "== benchmark =="
  if [ $DRY = 1 ]; then
    TRITON_INTERPRET=1 timeout 300 "$PY" -m bench.gpu_bench --dry-run --out "$OUT" 2>&1 | tee -a "$LOG"
  else
    # Cases that would start after BENCH_BUDGET_S are skipped; the hard limit is for a hang.
    timeout $(( ${BENCH_BUDGET_S:-180} + 60 )) "$PY" -m bench.gpu_bench --out "$OUT" --budget-s "${BENCH_BUDGET_S:-180}" 2>&1 | tee -a "$LOG"
  fi
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
say "== gpu_check status: $status =="
exit $status
