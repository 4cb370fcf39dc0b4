#!/usr/bin/env bash
# There, on a lent GPU machine: unpack the packages benchmarks/gpu/pack.sh packed, run the tests
# under the `gpu` marker and the GPU benchmarks, and leave the results under $OUT (the device
# tool brings back at most 8 files): check.log, data_gpu.json, vs_openclip_cuda.json,
# loss_gpu.json. Each step runs only while the time budget (BUDGET_S, default 540 s) allows.
#
#   bash benchmarks/gpu/check.sh           # SKIP_INSTALL=1: use the Python environment as it is
#
# The parts arrive one per call (benchmarks/README.md, "On a lent GPU") and are copied to
# /tmp/clipzero-gpu/parts there, which outlives the calls while the machine stays warm.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/clipzero-gpu/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/check.log") 2>&1
budget=${BUDGET_S:-540}
started=$(date +%s)
left() { echo $((budget - ($(date +%s) - started))); }
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

stage=/tmp/clipzero-gpu
if [ "${SKIP_INSTALL:-0}" != 1 ] && [ ! -d "$stage/site/nvidia/dali" ]; then
  mkdir -p "$stage/parts"
  cp .gpu/MANIFEST .gpu/part-* "$stage/parts/" 2>/dev/null || true
  if ! (cd "$stage/parts" && sha256sum --quiet -c MANIFEST); then
    echo "parts missing or torn in $stage/parts; carry the rest of .gpu/part-* first"; exit 3
  fi
  rm -rf "$stage/site"
  cat "$stage"/parts/part-* | xz -d | tar -x -C "$stage" || exit 4   # the installed packages, as site/
fi
[ "${SKIP_INSTALL:-0}" = 1 ] || export PYTHONPATH="$stage/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
"$python" - <<'PY'
import importlib.metadata as m, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("deepspeed", "nvidia-dali-cuda120", "mosaicml-streaming", "transformers", "timm", "open_clip_torch", "triton"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "missing")
PY

step() {  # step NAME SECONDS_AT_MOST COMMAND...: run it if the budget allows, with a timeout
  local name=$1 most=$2; shift 2
  local have; have=$(left)
  if [ "$have" -lt 30 ]; then echo "== $name: skipped, ${have} s of the budget left"; return; fi
  [ "$have" -lt "$most" ] && most=$have
  echo "== $name (at most ${most} s): $*"
  local t0; t0=$(date +%s)
  timeout "$most" "$@"; local rc=$?
  echo "== $name: exit $rc after $(($(date +%s) - t0)) s"
}

# A test module that fails to import (a package the image lacks) must not stop the others.
step "tests under the gpu marker" 300 "$python" -m pytest -m gpu tests -q -rs -p no:cacheprovider \
  --continue-on-collection-errors
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: the GPU benchmarks are not run"; exit 0
fi
# GPU decode only: the CPU comparison (12 processes) would take most of this step's budget,
# and the JSON is written at the end.
step "DALI decode on the GPU" 150 "$python" benchmarks/data.py --skip wait images --repeats 2 \
  --out "$OUT/data_gpu.json"
step "step against open_clip, bf16" 150 "$python" benchmarks/vs_openclip.py --cases vit-b-32:256 rn50:256 \
  --precision bf16 --rounds 1 --out "$OUT/vs_openclip_cuda.json"
step "loss kernels" 90 "$python" benchmarks/loss_gpu.py --total-budget-s 60 --out "$OUT/loss_gpu.json"
echo "done in $(($(date +%s) - started)) s; results in $OUT"
