#!/usr/bin/env bash
# CUDA compile check (no GPU needed): a full FORCE_CUDA=1 build of tsvd._C against the
# CUDA 13.0 build of torch 2.14.1, in its own venv, for TORCH_CUDA_ARCH_LIST=9.0.
# A compile error fails the script. Nothing is run on a GPU.
#
#   bash .ci/cuda_compile_check.sh
#
# Environment (all optional):
#   TSVD_CUDA_VENV   venv to create or reuse            (default /work/venv-cuda)
#   CUDA_HOME        toolkit root with bin/nvcc and include/cuda_runtime.h
#                    (default: /usr/local/cuda, else the folder above `which nvcc`)
#   MAX_JOBS         parallel compile jobs              (default 2)
#   TORCH_CUDA_ARCH_LIST                                (default 9.0)
# The tree is copied to a temporary folder first: the checkout (and the tsvd/_C*.so other
# processes use) is never touched.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
t0=$(date +%s)

venv=${TSVD_CUDA_VENV:-/work/venv-cuda}
torch_spec=${TSVD_CUDA_TORCH:-torch==2.14.1}

if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  else
    echo "cuda_compile_check: no nvcc found (set CUDA_HOME)" >&2
    exit 1
  fi
fi
for f in bin/nvcc include/cuda_runtime.h; do
  if [ ! -e "$CUDA_HOME/$f" ]; then
    echo "cuda_compile_check: CUDA_HOME=$CUDA_HOME has no $f" >&2
    exit 1
  fi
done
export CUDA_HOME
echo "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -1))"

# -- the venv (idempotent: reused when it already has a CUDA build of torch) ------------
have_torch() {
  "$venv/bin/python" - <<'EOF' 2>/dev/null
import torch, sys
sys.exit(0 if torch.version.cuda else 1)
EOF
}
if [ ! -x "$venv/bin/python" ] || ! have_torch; then
  echo "== creating $venv with $torch_spec (CUDA build) =="
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
  "$venv/bin/pip" install -q "$torch_spec" numpy setuptools wheel ninja
fi
for mod in setuptools ninja; do
  "$venv/bin/python" -c "import $mod" 2>/dev/null || "$venv/bin/pip" install -q "$mod"
done
"$venv/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
t1=$(date +%s)
echo "== venv ready in $((t1 - t0)) s =="

# -- copy the tree and build ----------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/tsvd-cudacheck.XXXXXX")
trap 'rm -rf "$work"' EXIT
tar -C "$root" --exclude=.git --exclude='*.so' --exclude=build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.whl --exclude=.gl -cf - . | tar -C "$work" -xf -
cd "$work"
if ! ls csrc/cuda/*.cu >/dev/null 2>&1; then
  echo "cuda_compile_check: no csrc/cuda/*.cu in the tree" >&2
  exit 1
fi
export FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
# the CPU flags of the build machine must not matter for a compile check
# the default build is portable (no -march=native; CPU loops per ISA, chosen at run time)
echo "== building tsvd._C (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS) =="
set +e
"$venv/bin/python" setup.py build_ext --inplace > build.log 2>&1
rc=$?
set -e
t2=$(date +%s)
if [ $rc -ne 0 ]; then
  grep -nE "error|Error" build.log | head -40 >&2 || true
  echo "---- last lines of the build log ----" >&2
  tail -40 build.log >&2
  echo "cuda_compile_check: FAILED (build exit $rc) after $((t2 - t1)) s" >&2
  exit 1
fi
so=$(ls tsvd/_C*.so 2>/dev/null | head -1)
if [ -z "$so" ]; then
  echo "cuda_compile_check: the build produced no tsvd/_C*.so" >&2
  exit 1
fi
# The kernels must really be in the library (a silently CPU-only build would pass otherwise).
if ! grep -q "treconstruct_fwd_kernel" "$so"; then
  echo "cuda_compile_check: $so has no CUDA kernels (was the CUDA branch of setup.py taken?)" >&2
  exit 1
fi
nwarn=$(grep -c "warning" build.log || true)
echo "built $(basename "$so") ($(du -h "$so" | cut -f1)), $nwarn warning line(s)"
grep "warning" build.log | cut -c1-240 | head -20 || true
echo "cuda_compile_check: OK, build $((t2 - t1)) s, total $((t2 - t0)) s"
