#!/usr/bin/env bash
# Wheels the GPU machines' image lacks, for `bash benchmarks/gpu_check.sh` there (no registry reachable).
# Run here, on a machine with PyPI, from the repository root; writes .whl/ (git-ignored; carry it).
#   bash benchmarks/gpu_wheels.sh [--with-pyarrow]
# The image (its own python3 3.12 with a CUDA torch, transformers 5.17, tokenizers 0.23, safetensors,
# sentencepiece, accelerate, numpy, pandas, psutil, ninja, einops, msgpack, py-cpuinfo, xxhash, pyarrow of
# unknown version; /work/.library/device/KINDS.md) lacks DeepSpeed and its pydantic/hjson, datasets and
# its dill/multiprocess, and has an older transformers. Versions are the ones this project tests
# (setup.py, DESIGN.md section 3). datasets 5.2 needs pyarrow >= 24: --with-pyarrow adds it (~45 MB of
# the 64 MiB a call may carry) for an image whose pyarrow is older; only the export section needs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p .whl
TARGET=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl)
PKGS=(transformers==5.24.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
      hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
      regex==2026.11.19)
if [ "${1:-}" = "--with-pyarrow" ]; then PKGS+=(pyarrow==26.0.1); fi
"$PY" -m pip download -q "${TARGET[@]}" "${PKGS[@]}"
# DeepSpeed ships a source archive only: build its (pure Python, no prebuilt ops) wheel here; the GPU
# machine JIT-builds nothing (torch's fused AdamW, no DeepSpeed op) and picks its accelerator at run time.
if ! ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
fi
du -sh .whl && ls .whl
