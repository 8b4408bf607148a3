#!/usr/bin/env bash
# One command for a lent GPU: correctness first, then every benchmark, within one 10-minute call.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else benchmarks/results/gpu_<date>
#
# Writes into OUT_DIR: env.txt (device, versions), check_cuda.txt, logits/ (bench_logits.py --out),
# fused_linear/ (fused_linear.{csv,json,txt} + PNG plots), long_context/ (bench_long_context.py, when present),
# and summary.txt (exit status of every step). A failed correctness check stops nothing (every output is worth
# having) but makes the script exit 1. Wheels of the peers (liger-kernel, cut-cross-entropy) in .whl/ are installed
# into /tmp/site first when present (a GPU machine without network). Time limits per step keep the whole under
# ~9.5 minutes: SUITE_FAST=1 drops N = 128k from the fused-linear benchmark; SUITE_ONLY="check fused_linear" (any of
# check, logits, fused_linear, long) runs a subset, e.g. to split the suite over two calls.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=${1:-${OUT:-$ROOT/benchmarks/results/gpu_$(date -u +%Y%m%d_%H%M)}}
mkdir -p "$OUT_DIR"
WHL=""
for d in "$ROOT/.whl" "$ROOT/../../.whl"; do [ -d "$d" ] && ls "$d"/*.whl >/dev/null 2>&1 && WHL=$d && break; done
if [ -n "$WHL" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHL"/*.whl \
    >"$OUT_DIR/pip.txt" 2>&1 || echo "wheel install failed (see pip.txt)"
  export PYTHONPATH="$ROOT:/tmp/site:${PYTHONPATH:-}"
else
  export PYTHONPATH="$ROOT:${PYTHONPATH:-}"
fi
export PYTHONUNBUFFERED=1
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_suite.sh: no CUDA GPU visible (run it on the lent GPU machine; CPU smoke runs: the benchmarks' --quick)" >&2
  exit 2
fi
START=$(date +%s)
status=0
ONLY=" ${SUITE_ONLY:-check logits fused_linear long} "
want() { [[ "$ONLY" == *" $1 "* ]]; }
: >"$OUT_DIR/summary.txt"

step() {  # step NAME SECONDS LOGFILE CMD...
  local name=$1 secs=$2 log=$3; shift 3
  local t0=$(date +%s)
  timeout "$secs" "$@" >"$log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT_DIR/summary.txt"
  tail -n 25 "$log"
  return $rc
}

python3 - >"$OUT_DIR/env.txt" 2>&1 <<'PY'
import datetime, importlib, torch
print("date", datetime.datetime.now(datetime.timezone.utc).isoformat())
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for m in ("torch", "triton", "transformers", "liger_kernel", "cut_cross_entropy"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(m, "not installed:", type(e).__name__)
PY
cat "$OUT_DIR/env.txt"

# 1. correctness (exits 1 on any failure)
if want check; then
  step check_cuda 200 "$OUT_DIR/check_cuda.txt" python3 benchmarks/check_cuda.py || status=1
fi

# 2. benchmarks (each bounded; a step cut short keeps the rows it printed)
if [ "${SUITE_FAST:-0}" = 1 ]; then NS="8192 32768"; else NS="8192 32768 131072"; fi
if want logits && [ -f benchmarks/bench_logits.py ]; then
  mkdir -p "$OUT_DIR/logits"
  # --tune: the fused kernel's launch forms first (each checked against the default form), then every row with the
  # fastest. Added 2026-12-06, its time not yet measured: if the suite runs past one call, split it with SUITE_ONLY
  step bench_logits 180 "$OUT_DIR/logits/bench_logits.txt" python3 benchmarks/bench_logits.py --tune --out "$OUT_DIR/logits"
fi
if want fused_linear; then
  mkdir -p "$OUT_DIR/fused_linear"
  step bench_fused_linear 200 "$OUT_DIR/fused_linear/bench_fused_linear.txt" \
    python3 benchmarks/bench_fused_linear.py --n $NS --d 1536 3584 --reps 2 --slow-max-n 8192 \
    --methods gemm fastupg-chunked fastupg-triton compile liger cce fastupg-chunked-sft fastupg-chunked-2pass \
    fastupg-chunked-1launch --out "$OUT_DIR/fused_linear"
fi
if want long && [ -f benchmarks/bench_long_context.py ]; then
  mkdir -p "$OUT_DIR/long_context"
  left=$(( 570 - ($(date +%s) - START) ))
  [ $left -gt 30 ] && step bench_long_context $left "$OUT_DIR/long_context/bench_long_context.txt" \
    python3 benchmarks/bench_long_context.py --out "$OUT_DIR/long_context/long_context.json"
fi
echo "total $(( $(date +%s) - START ))s, correctness status $status" | tee -a "$OUT_DIR/summary.txt"
exit $status
