#!/usr/bin/env bash
# There, on a lent GPU machine, in one call of under 8 minutes on one H100: unpack the packages
# benchmarks/gpu/pack.sh packed, then, each part only while the time budget (BUDGET_S, default
# 450 s, the unpacking included) allows, and each with a timeout of its own:
#   tests under the gpu marker, the kernels' files aside                 at most  90 s
#   the kernels against their references (Triton on CUDA vs fp64)               60 s
#   bf16 training: vit-b-32, 50 steps, JPEGs decoded on the GPU (train_bf16.py) 120 s
#   one training step against open_clip's, bf16 (vs_openclip.py)                90 s
# and, with what is left, the loss kernels' speed (loss_gpu.py, 60 s) and DALI's GPU decode
# (data.py, 60 s). Ends with a summary: one line per part (exit status, seconds, its figure:
# pytest's counts, samples/s, the JSON it wrote). Under $OUT only check.log and 4 JSON
# files (the device tool brings back at most 8): train_bf16_gpu.json, vs_openclip_cuda.json,
# loss_gpu.json, data_gpu.json; the training run itself stays in /tmp/clipzero-gpu/train-bf16.
#
#   bash benchmarks/gpu/check.sh           # SKIP_INSTALL=1: use the Python environment as it is
#
# The parts arrive one per call (benchmarks/README.md, "On a lent GPU") and are copied to
# /tmp/clipzero-gpu/parts there, which outlives the calls while the machine stays warm.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/clipzero-gpu/out}
stage=/tmp/clipzero-gpu
mkdir -p "$OUT" "$stage/logs"
exec 3>&1 4>&2
exec > >(tee -a "$OUT/check.log") 2>&1
tee_pid=$!
budget=${BUDGET_S:-450}
started=$(date +%s)
left() { echo $((budget - ($(date +%s) - started))); }
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

summary=()   # one line per part: name, exit status, seconds, its figure
part() {     # part NAME STATUS SECONDS FIGURE
  summary+=("$(printf '%-34s %-14s %4s s  %s' "$1" "$2" "$3" "$4")")
}
finish() {
  echo "== summary (budget ${budget} s, ${SECONDS} s in all; results in $OUT)"
  local line
  for line in "${summary[@]}"; do echo "$line"; done
  exec 1>&3 2>&4   # close tee's pipe, and let it finish check.log before the call ends
  wait "$tee_pid" 2>/dev/null
}
trap finish EXIT

pytest_counts() {  # pytest's outcome lines in LOG (one per pytest run), summed
  awk '/^=* *no tests ran/ { ran = 1 }
       /^=* *[0-9]+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)/ && / in [0-9.]+s/ {
         ran = 1
         for (i = 1; i < NF; i++) if ($i ~ /^[0-9]+$/) { w = $(i + 1); sub(/[,=]+$/, "", w); n[w] += $i }
       }
       END {
         if (!ran) { print "no pytest summary (cut off?)"; exit }
         printf "%d passed, %d failed, %d skipped", n["passed"], n["failed"], n["skipped"]
         if (n["error"] + n["errors"]) printf ", %d errors", n["error"] + n["errors"]
         print ""
       }' "$1"
}

step() {  # step NAME SECONDS_AT_MOST JSON|- COMMAND...: run it if the budget allows, with a timeout
  local name=$1 most=$2 json=$3; shift 3
  local have; have=$(left)
  if [ "$have" -lt 30 ]; then
    echo "== $name: skipped, ${have} s of the budget left"; part "$name" skipped - "${have} s of the budget left"
    return
  fi
  [ "$have" -lt "$most" ] && most=$have
  echo "== $name (at most ${most} s): $*"
  local log; log="$stage/logs/$(printf '%s' "$name" | tr -c 'A-Za-z0-9' '-').log"
  [ "$json" = - ] || rm -f "$json"   # a rerun on a warm machine must not report the last call's
  local t0; t0=$(date +%s)
  # STEP_S tells the command its own limit (train_bf16.py and loss_gpu.py stop in time).
  STEP_S=$most timeout -k 10 "$most" "$@" 2>&1 | tee "$log"; local rc=${PIPESTATUS[0]}
  local took=$(($(date +%s) - t0))
  echo "== $name: exit $rc after $took s"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && rc="$rc(time)"
  local figure; figure=$(grep '^figure: ' "$log" | tail -n 1); figure=${figure#figure: }
  [ "$json" = - ] && figure=$(pytest_counts "$log")
  if [ "$json" != - ]; then
    if [ -s "$json" ]; then figure="${figure:+$figure; }$json"; else figure="${figure:+$figure; }no JSON written"; fi
  fi
  part "$name" "exit $rc" "$took" "$figure"
}

t0=$(date +%s)
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
  part install skipped 0 "SKIP_INSTALL=1: the Python environment as it is"
elif [ -d "$stage/site/nvidia/dali" ]; then
  part install "exit 0" 0 "already unpacked in $stage/site"
else
  mkdir -p "$stage/parts"
  cp .gpu/MANIFEST .gpu/part-* "$stage/parts/" 2>/dev/null || true
  if ! (cd "$stage/parts" && sha256sum --quiet -c MANIFEST); then
    echo "parts missing or torn in $stage/parts; carry the rest of .gpu/part-* first"
    part install "exit 3" $(($(date +%s) - t0)) "parts missing or torn in $stage/parts"; exit 3
  fi
  rm -rf "$stage/site"
  if ! cat "$stage"/parts/part-* | xz -d | tar -x -C "$stage"; then   # the installed packages, as site/
    part install "exit 4" $(($(date +%s) - t0)) "unpacking failed"; exit 4
  fi
  part install "exit 0" $(($(date +%s) - t0)) "unpacked into $stage/site ($(du -sh "$stage/site" | cut -f1))"
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

# The kernels' files run in a part of their own (below), so the marker's run leaves them out.
kernel_tests=(tests/unit/test_contrastive_paths.py tests/unit/test_jsd_paths.py tests/unit/test_knn_paths.py
              tests/unit/test_siglip_kernel.py)
# A test module that fails to import (a package the image lacks) must not stop the others.
step "tests under the gpu marker" 90 - "$python" -m pytest -m gpu tests -q -rs -p no:cacheprovider \
  --continue-on-collection-errors "${kernel_tests[@]/#/--ignore=}"
# Triton compiled on CUDA against the fp64 references: the gpu-marked tests of the kernels'
# files (at scale, and the small-shape grids of contrastive_triton_paths.py and
# jsd_knn_triton_paths.py in a fresh process), then SigLIP's small-shape grid, which its file
# runs on CUDA unmarked (a plain CPU process skips it).
step "kernels against their references" 60 - bash -c \
  '"$0" -m pytest -m gpu -q -rs -p no:cacheprovider "$@"; a=$?
   "$0" -m pytest -q -rs -p no:cacheprovider tests/unit/test_siglip_kernel_triton.py; b=$?
   exit $((a ? a : b))' "$python" "${kernel_tests[@]}"
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: the GPU benchmarks are not run"
  part "the GPU parts" skipped - "no CUDA device: training and the benchmarks are not run"
  exit 0
fi
step "bf16 training" 120 "$OUT/train_bf16_gpu.json" "$python" benchmarks/gpu/train_bf16.py \
  --json "$OUT/train_bf16_gpu.json" --data "$stage/jpegs" --run "$stage/train-bf16"
step "step against open_clip, bf16" 90 "$OUT/vs_openclip_cuda.json" "$python" benchmarks/vs_openclip.py \
  --cases vit-b-32:256 rn50:256 --precision bf16 --rounds 1 --out "$OUT/vs_openclip_cuda.json"
# With what is left: loss_gpu.py skips the cases past its own budget and still writes its JSON.
step "loss kernels" 60 "$OUT/loss_gpu.json" bash -c \
  '"$0" benchmarks/loss_gpu.py --total-budget-s $((STEP_S - 25)) --out "$1"' "$python" "$OUT/loss_gpu.json"
# GPU decode only, one repeat: the CPU comparison (12 processes) would take most of the call,
# and the JSON is written at the end.
step "DALI decode on the GPU" 60 "$OUT/data_gpu.json" "$python" benchmarks/data.py --skip wait images \
  --repeats 1 --out "$OUT/data_gpu.json"
