#!/usr/bin/env bash
# The whole longtrain pipeline on CPU, on an embedded default corpus (no download). By default it
# starts as users do, from a pretrained short-context model: the shipped base launch/quickstart_base/
# (a 2.2M-parameter Llama at L = 128, RoPE base 10k, trained by benchmarks/pretrain_base.py; its
# README.md is the model card):
#   1. create .venv if missing and install longtrain (torch first: the CPU build);
#   2. prepare datasets at 256 and 512 tokens with the base's tokenizer: the Python standard
#      library's top-level modules mixed with synthetic long-dependency documents (data_prep/synthetic.py);
#   3. extend the base to 256 @ RoPE base 100k, then 512 @ base 1M (configs/quickstart_extend.yaml) on
#      two processes with the deepspeed launcher; the run is interrupted with SIGTERM (a preemption)
#      in the last stage and resumed with --resume auto;
#   4. export the extended model to a Hugging Face folder (verified);
#   5. evaluate the base and the extended model on held-out standard-library packages at 128 and 512
#      tokens: perplexity by position, passkey, repeat-copy gain at 0.75 L and 3.75 L, key-value
#      retrieval at L and 4 L; print the before/after table and where the plots are.
# With --from-scratch it trains the short model itself first (its own tokenizer, 128 @ base 10k,
# then the same two extension stages: configs/tiny_cpu.yaml); that short model does not learn to
# copy in a few minutes, so its probes stay near zero.
#
# usage: bash launch/quickstart.sh [--smoke] [--from-scratch] [--base DIR] [--out DIR]
#   --smoke         a few steps per stage (CI: checks the plumbing in a few minutes, not the quality)
#   --from-scratch  train the short model too instead of starting from the base
#   --base DIR      the pretrained base (default: launch/quickstart_base)
#   --out           output folder (default: quickstart_out)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=quickstart_out
SMOKE=0
SCRATCH=0
BASE=launch/quickstart_base
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1; shift ;;
    --from-scratch) SCRATCH=1; shift ;;
    --base) BASE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$SCRATCH" = 0 ] && [ ! -f "$BASE/config.json" ]; then
  echo "quickstart: no pretrained base at $BASE (config.json missing): train it with" \
       "'python benchmarks/pretrain_base.py' (hours), pass --base DIR, or run with --from-scratch" >&2
  exit 2
fi
[ "$SCRATCH" = 0 ] && BASE=$(cd "$BASE" && pwd)
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
if [ "$SCRATCH" = 1 ]; then
  say "2/5 tokenizer and data from $TRAIN_SRC"
  $LT tokenizer --input "$TRAIN_SRC" --vocab-size 2048 --out "$OUT/tokenizer" --skip-bad --overwrite
  TOK=$OUT/tokenizer/tokenizer.model
  for spec in "128 best-fit" "256 slide-window" "512 slide-window"; do
    set -- $spec
    stride=$(( $1 * 3 / 4 ))
    extra=(); [ "$2" = slide-window ] && extra=(--stride "$stride")
    $LT prepare --input "$TRAIN_SRC" --tokenizer "$TOK" --seq-len "$1" \
      --strategy "$2" "${extra[@]}" --out "$OUT/data/len$1" --skip-bad --overwrite --no-progress
  done
else
  say "2/5 data at 256 and 512 tokens with the base's tokenizer: $TRAIN_SRC and synthetic documents"
  TOK=$BASE/tokenizer.model
  # Per length: the code (WEIGHT 0.5: half of its windows), documents that repeat a passage of code
  # (or of random code words) at distances up to the new length, the same with distances from half
  # the new length up (the far half, where the base never copied: without them the copy gain at
  # 3.75 L stayed at 0.99 nats, with them 1.12: README), and key-value retrieval documents
  # (data_prep/synthetic.py; docs/data_prep.md "Synthetic inputs"). DOCS: documents per synthetic input.
  DOCS=(600 1200); [ "$SMOKE" = 1 ] && DOCS=(20 20)
  for n in 0 1; do
    len=$((256 << n)); docs=${DOCS[$n]}
    syn="docs=$docs&source=$TRAIN_SRC"
    $LT prepare --tokenizer "$TOK" --seq-len "$len" --strategy slide-window --stride $(( len * 3 / 4 )) \
      --input "$TRAIN_SRC:0.5" \
      --input "synthetic:copy?$syn&min_passage=8&max_passage=32" \
      --input "synthetic:copy?docs=$(( docs / 2 ))&source=$TRAIN_SRC&min_passage=8&max_passage=32&passage=words" \
      --input "synthetic:copy?$syn&min_passage=16&max_passage=32&min_distance=$(( len / 2 ))" \
      --input "synthetic:kv?$syn&keys=4" \
      --out "$OUT/data/ext$len" --skip-bad --seed 0 --overwrite --no-progress
  done
fi
HELD_DIR="$OUT/held_out"
rm -rf "$HELD_DIR"; mkdir -p "$HELD_DIR"
for pkg in "${HELD_OUT[@]}"; do
  for f in "$pkg"/*.py; do cp "$f" "$HELD_DIR/$(basename "$pkg")_$(basename "$f")"; done
done

# ---------------------------------------------------------------------------- 3. train
RUN="$OUT/run"
SETS=(--set "model.tokenizer=$TOK")
if [ "$SCRATCH" = 1 ]; then
  CONFIG=configs/tiny_cpu.yaml
  for n in 0 1 2; do SETS+=(--set "stages.$n.data=$OUT/data/len$((128 << n))"); done
  STEPS=(800 120 160)
  [ "$SMOKE" = 1 ] && STEPS=(12 4 8)
else
  CONFIG=configs/quickstart_extend.yaml
  SETS+=(--set "model.name_or_path=$BASE")
  for n in 0 1; do SETS+=(--set "stages.$n.data=$OUT/data/ext$((256 << n))"); done
  STEPS=(100 350)
  [ "$SMOKE" = 1 ] && STEPS=(4 8)
fi
NST=${#STEPS[@]}
if [ "$SMOKE" = 1 ]; then
  for ((n = 0; n < NST; n++)); do SETS+=(--set "stages.$n.warmup_steps=$(( n == 0 && SCRATCH == 1 ? 2 : 1 ))"); done
  SETS+=(--set train.log_every=2)
fi
TOTAL=0
for ((n = 0; n < NST; n++)); do SETS+=(--set "stages.$n.steps=${STEPS[$n]}"); TOTAL=$(( TOTAL + STEPS[n] )); done
INTERRUPT_AT=$(( TOTAL - STEPS[NST - 1] / 2 ))
rm -rf "$RUN"
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# The README's launcher: deepspeed with 2 local processes (launch/train.sh execs it, keeping the pid).
TRAIN=(bash launch/train.sh "$CONFIG" "$RUN" --nproc 2)
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
if [ "$SCRATCH" = 1 ]; then
  say "4/5 export the short model (end of stage 1) and the extended one (end of stage 3)"
  SHORT=$OUT/export_short_128; SHORT_NAME=short-128@10k
  $LT export "$(printf '%s/checkpoints/step_%08d' "$RUN" "${STEPS[0]}")" "$SHORT" --dtype fp32 --overwrite --no-progress
else
  say "4/5 export the extended model (the base is already a Hugging Face folder)"
  SHORT=$BASE; SHORT_NAME=base-128@10k
fi
$LT export "$RUN" "$OUT/export_extended_512" --dtype fp32 --overwrite --no-progress

# ---------------------------------------------------------------------------- 5. evaluate
say "5/5 evaluate on held-out standard-library packages (never trained on)"
# Copy gain at the distances whose sequences fill 128 and 512 tokens (96 = 0.75 L, 480 = 3.75 L with
# 32-token passages), key-value retrieval at 128 = L and 512 = 4 L, passkey, perplexity by position.
EVAL_ARGS=(--lengths 128 512 --passkey-lengths 128 512 --passkey-trials 4 --max-tokens 60000
           --copy-passages 128 --kv-lengths 128 512 --kv-trials 40)
[ "$SMOKE" = 1 ] && EVAL_ARGS=(--lengths 128 512 --passkey-lengths 512 --passkey-depths 0.5 --passkey-trials 1
                               --max-tokens 2048 --copy-passages 2 --kv-depths 0.5 --kv-trials 1)
$LT eval "$SHORT" "$OUT/export_extended_512" --names "$SHORT_NAME" extended-512@1M \
  --data "$HELD_DIR" "${EVAL_ARGS[@]}" --seed 0 --out "$OUT/eval" --no-progress | tee "$OUT/eval_table.md"

say "done in $(( $(date +%s) - START )) s"
cat <<EOF
  metrics per step     $RUN/metrics.jsonl
  checkpoints          $RUN/checkpoints/
  exported models      $SHORT  $OUT/export_extended_512
  evaluation results   $OUT/eval/results.json
  plots                $OUT/eval/ppl_by_position.png  $OUT/eval/passkey.png  $OUT/eval/probes.png
  data statistics      $OUT/data/
EOF
