#!/usr/bin/env bash
# ONE script for a lent GPU (see the device tool's README): it prints the card and the versions, runs
# the kernel tests on CUDA, checks every backend against float64 at real vocabularies, measures the
# copy-bandwidth and bf16-matmul ceilings and runs the GPU benchmark (Liger-Kernel's DPO case, Cut
# Cross-Entropy and TRL's fused head included), then the trainers side by side (ours, SafeDPOTrainer,
# TRL's DPOTrainer). Each stage has a time limit, and writes under $OUT (default bench/results):
#
#   stage      limit   writes
#   tests      140 s   gpu-tests-<card>-<date>.txt        the pytest summary
#   accuracy    90 s   gpu-accuracy-<card>-<date>.txt     bench/gpu_accuracy.py
#   bench      170 s   gpu-<card>-<date>.csv/.md/.json    bench/gpu_bench.py, the targets last
#   trainers   120 s   trainers-<card>-<date>.md/.json    bench/trainers.py
#   total      520 s   and gpu_check.log (everything printed): 8 files
#
# 520 s is under 9 minutes: the device's 15 include the machine's start and a rerun. The limits are the
# LIMIT_* values below (a test keeps this table, those values and the files written in step).
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root (PYTHONPATH=.)
#   bash bench/gpu_check.sh --dry-run  # here, on the CPU: tiny sizes, Triton interpreter (a test runs this)
#   STAGES="tests bench" bash bench/gpu_check.sh   # a rerun of some stages only
#
# A hang in one stage still leaves the others' results. Liger-Kernel, Cut Cross-Entropy, TRL and
# datasets are taken from .whl/ when bench/fetch_wheels.sh put them there (the GPU machine reaches no
# package registry).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
[ $DRY = 1 ] || unset TRITON_INTERPRET  # compiled kernels on the GPU
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGES=${STAGES:-tests accuracy bench trainers}
LIMIT_TESTS=140
LIMIT_ACCURACY=90
LIMIT_BENCH=170
LIMIT_TRAINERS=120
BENCH_BUDGET_S=${BENCH_BUDGET_S:-140}  # of LIMIT_BENCH: cases that would start later are skipped
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
                   ("transformers", "transformers"), ("accelerate", "accelerate"), ("trl", "trl"),
                   ("datasets", "datasets"), ("pyarrow", "pyarrow"), ("numpy", "numpy"), ("xdist", "pytest-xdist")):
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
    timeout $LIMIT_TESTS "$PY" -m pytest tests/kernels --ignore tests/kernels/test_native.py \
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
    timeout $LIMIT_ACCURACY "$PY" -m bench.gpu_accuracy --out "$OUT" 2>&1 | tee -a "$LOG"
  fi
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if has bench; then
  say "== benchmark =="
  if [ $DRY = 1 ]; then
    TRITON_INTERPRET=1 timeout 300 "$PY" -m bench.gpu_bench --dry-run --out "$OUT" 2>&1 | tee -a "$LOG"
  else
    timeout $LIMIT_BENCH "$PY" -m bench.gpu_bench --out "$OUT" --budget-s "$BENCH_BUDGET_S" 2>&1 | tee -a "$LOG"
  fi
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if has trainers; then
  say "== trainers =="
  # Ours (fused-linear), SafeDPOTrainer (fused-linear) and TRL's DPOTrainer (its fused head) on the same
  # model and data, each in a fresh process; rounds while the budget lasts (the report says how many).
  VARIANTS=ours-linear,safedpo-trainer-linear,trl-dpo
  if [ $DRY = 1 ]; then
    timeout 300 "$PY" -m bench.trainers --device cpu --rounds 1 --steps 4 --pairs 2 --words 20 --variants $VARIANTS \
      --out "$OUT" 2>&1 | grep -v "Writing model shards" | tee -a "$LOG"
  else
    timeout $LIMIT_TRAINERS "$PY" -m bench.trainers --device cuda --rounds 3 --steps 6 --pairs 8 --words 1000 \
      --variants $VARIANTS --budget-s $(( LIMIT_TRAINERS - 15 )) --out "$OUT" 2>&1 | grep -v "Writing model shards" | tee -a "$LOG"
  fi
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
say "== gpu_check status: $status =="
exit $status
