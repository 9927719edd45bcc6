#!/usr/bin/env bash
# Installs what the tests need into .venv (created if missing) and runs the suite.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
# torch first, pinned: an unpinned torch pulled in by a dependency may be a multi-GB CUDA build.
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q torch==2.13.0
fi
# wandb: the W&B tests run offline (tests/longtrain/test_wandb.py, test_mixture.py)
"$VPY" -m pip install -q -e ".[dev,wandb]"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
# DeepSpeed compiles its shm comm op once per machine; keep the build cache inside the checkout's venv.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Build it now, before any test: a trainer that compiles it at start-up holds the compiler's memory
# when the memory plan measures its fixed overhead (tests/longtrain/test_plan.py compares the plan
# with the measured peak), and the first multi-process test would spend its timeout compiling.
"$VPY" -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" >/dev/null 2>&1 \
  || echo "note: DeepSpeed's shm comm op did not build now; the first training process will build it"
exec "$VPY" -m pytest -q "$@" tests
