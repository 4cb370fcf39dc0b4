#!/usr/bin/env bash
# Here, where pip reaches the package index: gather every wheel a lent GPU machine lacks for
# benchmarks/gpu/check.sh, install them for the GPU machine's Python, compress that into one
# stream and cut it into parts that the device tool's `run` can carry, one part per call (64 MiB
# a call, the working tree included).
#
#   benchmarks/gpu/pack.sh            # writes .gpu/part-00 ... and .gpu/MANIFEST (git ignores .gpu/)
#
# The GPU image (2026-11) has torch, triton, timm, tensorboard, scikit-learn, pyarrow, pytest,
# but not deepspeed, mosaicml-streaming, open_clip, pydantic or DALI, and transformers 5 where
# we need 4.x. Versions are the ones the CPU development environment runs. DALI's wheel (with
# nvImageCodec, nvJPEG and nvCOMP) is most of it. The calls that carry it are in
# benchmarks/README.md ("On a lent GPU").
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
part_mib=${PART_MIB:-60}
out=.gpu
rm -rf "$out"
mkdir -p "$out/wheels"
binary=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# DeepSpeed ships a source distribution; its build is pure Python (its ops compile at run time)
# but imports torch, hence no build isolation.
"$python" -m pip wheel -q --no-deps --no-build-isolation -w "$out/wheels" deepspeed==0.19.8
"$python" -m pip download -q --no-deps "${binary[@]}" -d "$out/wheels" \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection==0.4.5 \
  mosaicml-streaming==0.13.0 catalogue zstd python-snappy cramjam Brotli \
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 timm==1.0.31 inf-cl==1.2.1 \
  transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 \
  nvidia-dali-cuda120==2.4.0 nvidia-nvimgcodec-cu12==0.9.0.20 nvidia-nvjpeg-cu12==12.4.0.76 \
  nvidia-libnvcomp-cu12==5.3.0.16 'nvidia-cuda-runtime-cu12>=12.4,<13' \
  astunparse==1.6.3 gast==0.7.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0
# Installed here for the GPU machine's Python (3.12), then compressed as files: xz takes the
# libraries to about half of what the wheels' zip does, so fewer calls carry them, and the
# machine only unpacks. DALI's bindings for the other Pythons are left out.
"$python" -m pip install -q --no-deps --no-index "${binary[@]}" --target "$out/site" "$out"/wheels/*.whl
find "$out/site/nvidia/dali" -maxdepth 1 -name 'backend_impl.cpython-*.so' ! -name '*-312-*' -delete
rm -rf "$out/wheels"
echo "installed: $(du -sh "$out/site" | cut -f1); compressing (about 10 minutes on 2 cores)"
tar -cf - -C "$out" site | xz -T0 -9 | split -b "${part_mib}M" -d -a 2 - "$out/part-"
rm -rf "$out/site"
(cd "$out" && sha256sum part-* > MANIFEST)
ls -la "$out"
echo "carry .gpu/MANIFEST and one .gpu/part-NN per call, as benchmarks/README.md says"
