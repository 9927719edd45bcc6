#!/usr/bin/env bash
# The whole longtrain pipeline on CPU, on an embedded default corpus (no download):
#   1. create .venv if missing and install longtrain (torch first: the CPU build);
#   2. train a SentencePiece tokenizer on the Python standard library's sources (real text that is
#      on every machine) and prepare datasets at 128, 256 and 512 tokens;
#   3. train a tiny Llama from scratch at 128 tokens with RoPE base 10k (the "pretrained short
#      model"), then extend it to 256 @ base 100k and 512 @ base 1M (configs/tiny_cpu.yaml), on two
#      processes with the deepspeed launcher; the run is interrupted with SIGTERM (a preemption) in
#      the last stage and resumed with --resume auto;
#   4. export the short model and the extended one to Hugging Face folders (verified);
#   5. evaluate both on held-out standard-library packages at 128 and 512 tokens (perplexity by
#      position, passkey retrieval) and print a table and where the plots are.
#
# usage: bash launch/quickstart.sh [--smoke] [--out DIR]
#   --smoke   a few steps per stage (CI: checks the plumbing in a few minutes, not the quality)
#   --out     output folder (default: quickstart_out)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=quickstart_out
SMOKE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1; shift ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
START=$(date +%s)
say() { printf '\n=== [%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# ---------------------------------------------------------------------------- 1. environment
say "1/5 environment (.venv)"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY=$ROOT/.venv/bin/python
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q torch==2.13.0        # CPU build; an unpinned torch may pull a multi-GB CUDA build
fi
if ! "$PY" -c "import longtrain, deepspeed, transformers, datasets" 2>/dev/null; then
  "$PY" -m pip install -q -e .
fi
LT="$PY -m longtrain.cli"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.venv/torch_extensions}
export OMP_NUM_THREADS=1   # two training processes on two cores
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# ---------------------------------------------------------------------------- 2. data
STDLIB=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
TRAIN_SRC="$STDLIB/*.py"                         # top-level modules: ~4.7 MB of code and docstrings
HELD_OUT=("$STDLIB/email" "$STDLIB/json" "$STDLIB/http" "$STDLIB/logging")   # packages never trained on
say "2/5 tokenizer and data from $TRAIN_SRC"
$LT tokenizer --input "$TRAIN_SRC" --vocab-size 2048 --out "$OUT/tokenizer" --skip-bad --overwrite
for spec in "128 best-fit" "256 slide-window" "512 slide-window"; do
  set -- $spec
  stride=$(( $1 * 3 / 4 ))
  extra=(); [ "$2" = slide-window ] && extra=(--stride "$stride")
  $LT prepare --input "$TRAIN_SRC" --tokenizer "$OUT/tokenizer/tokenizer.model" --seq-len "$1" \
    --strategy "$2" "${extra[@]}" --out "$OUT/data/len$1" --skip-bad --overwrite --no-progress
done
HELD_DIR="$OUT/held_out"
rm -rf "$HELD_DIR"; mkdir -p "$HELD_DIR"
for pkg in "${HELD_OUT[@]}"; do
  for f in "$pkg"/*.py; do cp "$f" "$HELD_DIR/$(basename "$pkg")_$(basename "$f")"; done
done

# ---------------------------------------------------------------------------- 3. train
RUN="$OUT/run"
SETS=(--set "model.tokenizer=$OUT/tokenizer/tokenizer.model")
for n in 0 1 2; do
  len=$((128 << n))
  SETS+=(--set "stages.$n.data=$OUT/data/len$len")
done
STEPS=(800 120 160)
if [ "$SMOKE" = 1 ]; then
  STEPS=(12 4 8)
  SETS+=(--set stages.0.warmup_steps=2 --set stages.1.warmup_steps=1 --set stages.2.warmup_steps=1 --set train.log_every=2)
fi
for n in 0 1 2; do SETS+=(--set "stages.$n.steps=${STEPS[$n]}"); done
TOTAL=$(( STEPS[0] + STEPS[1] + STEPS[2] ))
INTERRUPT_AT=$(( STEPS[0] + STEPS[1] + STEPS[2] / 2 ))
rm -rf "$RUN"
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# The README's launcher: deepspeed with 2 local processes (launch/train.sh execs it, keeping the pid).
TRAIN=(bash launch/train.sh configs/tiny_cpu.yaml "$RUN" --nproc 2)
say "3/5 training $TOTAL steps on 2 processes (deepspeed launcher); SIGTERM at step $INTERRUPT_AT, then resume"
# setsid: the launcher and both ranks form one process group, signalled together below.
setsid "${TRAIN[@]}" --master-port "$(free_port)" -- "${SETS[@]}" > "$OUT/train_part1.log" 2>&1 &
TRAIN_PID=$!
"$PY" - "$RUN/metrics.jsonl" "$INTERRUPT_AT" "$TRAIN_PID" <<'EOF'
import json, os, sys, time
path, step, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
last = 0
while True:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"training exited before step {step}; see the log")
    if os.path.exists(path):
        for line in open(path).read().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec["step"] > last and (rec["step"] % 50 == 0 or rec["step"] >= step):
                last = rec["step"]
                print(f"  step {rec['step']:4d} [{rec['stage']}] loss {rec['loss']:.3f} "
                      f"seq {rec['seq_len']} rope {rec['rope_theta']:g} {rec['tokens_per_s']:.0f} tok/s", flush=True)
            if rec["step"] >= step:
                sys.exit(0)
    time.sleep(0.2)
EOF
# A preemption: SIGTERM to every process of the job. Each rank finishes its step, the ranks agree,
# save a checkpoint and exit 0 (the deepspeed launcher gives them 30 s before SIGKILL).
kill -TERM -- "-$TRAIN_PID"
wait "$TRAIN_PID" || true
while kill -0 -- "-$TRAIN_PID" 2>/dev/null; do sleep 0.2; done
if ! grep -q "stopping after" "$OUT/train_part1.log"; then
  echo "training did not stop cleanly; see $OUT/train_part1.log" >&2; tail -30 "$OUT/train_part1.log" >&2; exit 1
fi
grep -E "stopping after|checkpoint saved" "$OUT/train_part1.log" | tail -2 | sed 's/^/  /'
say "resuming from the latest complete checkpoint (--resume auto)"
"${TRAIN[@]}" --master-port "$(free_port)" -- "${SETS[@]}" --resume auto > "$OUT/train_part2.log" 2>&1 \
  || { echo "resumed training failed; see $OUT/train_part2.log" >&2; tail -30 "$OUT/train_part2.log" >&2; exit 1; }
grep -E "resumed from|training done" "$OUT/train_part2.log" | sed 's/^/  /'

# ---------------------------------------------------------------------------- 4. export
say "4/5 export the short model (end of stage 1) and the extended one (end of stage 3)"
SHORT_CKPT=$(printf '%s/checkpoints/step_%08d' "$RUN" "${STEPS[0]}")
$LT export "$SHORT_CKPT" "$OUT/export_short_128" --dtype fp32 --overwrite --no-progress
$LT export "$RUN" "$OUT/export_extended_512" --dtype fp32 --overwrite --no-progress

# ---------------------------------------------------------------------------- 5. evaluate
say "5/5 evaluate on held-out standard-library packages (never trained on)"
EVAL_ARGS=(--lengths 128 512 --passkey-lengths 128 512 --passkey-trials 4 --max-tokens 60000)
[ "$SMOKE" = 1 ] && EVAL_ARGS=(--lengths 128 512 --passkey-lengths 512 --passkey-depths 0.5 --passkey-trials 1 --max-tokens 2048)
$LT eval "$OUT/export_short_128" "$OUT/export_extended_512" --names short-128@10k extended-512@1M \
  --data "$HELD_DIR" "${EVAL_ARGS[@]}" --out "$OUT/eval" --no-progress | tee "$OUT/eval_table.md"

say "done in $(( $(date +%s) - START )) s"
cat <<EOF
  metrics per step     $RUN/metrics.jsonl
  checkpoints          $RUN/checkpoints/
  exported models      $OUT/export_short_128  $OUT/export_extended_512
  evaluation results   $OUT/eval/results.json
  plots                $OUT/eval/ppl_by_position.png  $OUT/eval/passkey.png
  data statistics      $OUT/data/len128/stats.png
EOF
