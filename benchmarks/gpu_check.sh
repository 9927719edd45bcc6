#!/usr/bin/env bash
# The GPU check in one command, on a machine with one GPU, from the repository root:
#   bash benchmarks/gpu_check.sh [OUT]          (OUT: default $OUT, else bench_out/gpu_check)
# 1. torch: the machine's own if it has CUDA (the project's H200 image does, offline), else
#    torch==2.13.0 from PyPI, whose default Linux wheel is a CUDA build.
# 2. longtrain's other needs, never touching torch: the wheels in .whl/ (benchmarks/gpu_wheels.sh, made
#    where PyPI is reachable) into a private folder, else from PyPI. flash-attn is not installed (a source
#    build of 25-60 minutes): the check reports it unavailable and uses torch's own FlashAttention.
# 3. benchmarks/gpu_check.py with its own time caps (about 8 minutes), under a hard timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench_out/gpu_check}}
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/longtrain_site .whl/*.whl
  export PYTHONPATH=/tmp/longtrain_site${PYTHONPATH:+:$PYTHONPATH}
else
  "$PY" -m pip install -q --no-build-isolation "deepspeed>=0.19.8,<0.20" "transformers>=5.24,<6" "datasets>=4,<6" \
    sentencepiece protobuf pyyaml safetensors accelerate
fi
# The project's H200 machines have 128 GiB of RAM that the VM hands out as it is used (MemAvailable starts
# low): the longest-row probe sizes its host offload from this instead (benchmarks/gpu_check.py).
export LONGTRAIN_HOST_GB=${LONGTRAIN_HOST_GB:-100}
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
"$PY" -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
mkdir -p "$OUT"
timeout 560 "$PY" benchmarks/gpu_check.py --out "$OUT"
