#!/usr/bin/env bash
# One prepared GPU check (docs/gpu.md, "The rule for CUDA work", item 3). On a GPU machine:
#   1. builds tsvd._C with its CUDA kernels against the installed torch
#      (MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation --no-deps -e .),
#   2. runs the CUDA-marked tests (tests/test_cuda.py, tests/test_ext.py),
#   3. runs bench/kernels.py --device cuda --json $OUT/kernels_cuda.json,
#   4. runs a short LoRA-PT training-step benchmark (bench/peft.py --device cuda --quick),
# and writes the logs and JSON into $OUT (at most 8 files, flat):
#   log (everything), build.log, junit.xml, env.json, kernels_cuda.json, peft_cuda.json.
# Budget: under 8 minutes, build included (each step has its own timeout).
#
#   OUT=/tmp/out bash bench/gpu_check.sh            # on the GPU machine
#   OUT=/tmp/out bash bench/gpu_check.sh --dry-run  # anywhere: checks the script's inputs,
#                                                   # prints the commands, runs nothing heavy
# Pure-Python packages the GPU machine lacks (monai, einops, ... for step 4) travel as
# wheels in .whl/ (see bench/README_gpu.md); they are installed into /tmp/site first.
# Exit status: 0 when the build and the tests passed (benchmarks are reported, not gating).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
LOG="$OUT/log"
: > "$LOG"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
status=0

say() { echo "$*" | tee -a "$LOG"; }
# run NAME TIMEOUT CMD...: runs CMD with a timeout, output to the log; returns its status.
run() {
  local name=$1 limit=$2; shift 2
  say "== [$name] $(date -u +%H:%M:%S) (+$(( $(date +%s) - T0 )) s, limit ${limit} s): $*"
  if [ $DRY = 1 ]; then return 0; fi
  local s=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "== [$name] exit $rc after $(( $(date +%s) - s )) s"
  return $rc
}

# -- 0. environment -------------------------------------------------------------------
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  run wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"); export CUDA_HOME
  fi
fi
say "CUDA_HOME=${CUDA_HOME:-unset} OUT=$OUT dry_run=$DRY"
if [ $DRY = 0 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
  "$PY" - "$OUT/env.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, subprocess, sys, datetime, torch
info = {"date_utc": datetime.datetime.utcnow().isoformat(timespec="seconds"),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                memory_gib=round(p.total_memory / 2**30, 1))
try:
    info["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
except Exception as e:  # noqa: BLE001
    info["nvcc"] = repr(e)
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
EOF
fi

# -- 1. build -------------------------------------------------------------------------
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1
if [ $DRY = 1 ]; then
  run build 300 "$PY" -m pip install --no-build-isolation --no-deps -e .
else
  say "== [build] MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST FORCE_CUDA=1"
  bs=$(date +%s)
  timeout --kill-after=10 300 "$PY" -m pip install -v --no-build-isolation --no-deps -e . \
      > "$OUT/build.log" 2>&1
  brc=$?
  say "== [build] exit $brc after $(( $(date +%s) - bs )) s (full log: build.log)"
  grep -E "error|ptxas info|registers|spill" "$OUT/build.log" | head -80 | tee -a "$LOG"
  if [ $brc -ne 0 ]; then tail -60 "$OUT/build.log" | tee -a "$LOG"; status=1; fi
fi
run sanity 60 "$PY" -c "import tsvd, torch; i = tsvd.build_info(); print(i); \
assert i.get('with_cuda'), 'tsvd._C was built without CUDA'; \
assert tsvd.compiled_available('cuda'), 'no CUDA kernels available'" || status=1

# -- 2. tests -------------------------------------------------------------------------
tests=""
for f in tests/test_cuda.py tests/test_ext.py; do [ -f "$f" ] && tests="$tests $f"; done
if [ -n "$tests" ] && [ $DRY = 1 ]; then
  # dry run: the CUDA tests must at least be collected (they skip without a GPU)
  # shellcheck disable=SC2086
  "$PY" -m pytest -m cuda $tests -q --collect-only -p no:cacheprovider 2>&1 | tail -3 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" = 0 ] || { say "test collection failed"; status=1; }
fi
if [ -n "$tests" ]; then
  # shellcheck disable=SC2086
  run tests 200 "$PY" -m pytest -m cuda $tests -q -rfEs -p no:cacheprovider \
      --junitxml="$OUT/junit.xml" || status=1
else
  say "no CUDA test files found"; status=1
fi

# -- 3. kernel benchmark ----------------------------------------------------------------
if [ -f bench/kernels.py ]; then
  # the issue's targets first (treconstruct, fwd+bwd, tsvd), so a cut-short run still has them
  run kernels 200 "$PY" bench/kernels.py --device cuda --json "$OUT/kernels_cuda.json" \
      --ops treconstruct treconstruct_fb tsvd tprod rfft irfft \
      || say "bench/kernels.py failed"
else
  say "bench/kernels.py missing"
fi

# -- 4. LoRA-PT training-step benchmark -------------------------------------------------
if [ -f bench/peft.py ]; then
  run peft 150 "$PY" bench/peft.py --device cuda --presets paper --json "$OUT/peft_cuda.json" \
      --quick --timeout 100 \
      || say "bench/peft.py failed (is MONAI carried in .whl/?)"
else
  say "bench/peft.py missing: no training-step benchmark"
fi

# -- summary (the last lines are what a device call returns) ----------------------------
if [ $DRY = 0 ]; then
  "$PY" - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, sys
out = sys.argv[1]
for name in ("env.json", "kernels_cuda.json", "peft_cuda.json"):
    p = os.path.join(out, name)
    if not os.path.exists(p):
        print(f"{name}: missing"); continue
    try:
        d = json.load(open(p))
    except Exception as e:  # noqa: BLE001
        print(f"{name}: unreadable ({e})"); continue
    rows = d.get("rows") if isinstance(d, dict) else d
    if isinstance(rows, list):
        print(f"{name}: {len(rows)} rows")
        for r in rows[:40]:
            print("  " + "  ".join(f"{k}={r[k]}" for k in list(r)[:9]))
    else:
        print(f"{name}: " + json.dumps(d)[:1500])
EOF
fi
say "gpu_check: status $status, total $(( $(date +%s) - T0 )) s"
exit $status
