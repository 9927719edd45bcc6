#!/usr/bin/env bash
# Launch `longtrain train` the common way: one node or many, deepspeed or torchrun.
#
#   bash launch/train.sh CONFIG RUN_DIR [options] [-- longtrain-train-args...]
#
# options:
#   --nproc N            processes (GPUs) per node (default: all GPUs; 1 on a CPU machine)
#   --launcher L         deepspeed (default) or torchrun
#   --hostfile H         deepspeed hostfile for multi-node (see launch/hostfile.example); the launcher
#                        then starts every node over ssh (pdsh) from this one
#   --nnodes N --node-rank R --master-addr A --master-port P
#                        start this node yourself (no ssh): run the same command on every node with
#                        its own --node-rank (deepspeed --no_ssh, or torchrun's static rendezvous)
# Everything after `--` goes to `longtrain train` (e.g. --resume auto, --set stages.1.steps=10).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,16p' "$0"; exit 2; }
[ $# -ge 2 ] || usage
CONFIG=$1; RUN_DIR=$2; shift 2
NPROC=""; LAUNCHER=deepspeed; HOSTFILE=""; NNODES=1; NODE_RANK=0; MASTER_ADDR=127.0.0.1; MASTER_PORT=29500
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc) NPROC=$2; shift 2 ;;
    --launcher) LAUNCHER=$2; shift 2 ;;
    --hostfile) HOSTFILE=$2; shift 2 ;;
    --nnodes) NNODES=$2; shift 2 ;;
    --node-rank) NODE_RANK=$2; shift 2 ;;
    --master-addr) MASTER_ADDR=$2; shift 2 ;;
    --master-port) MASTER_PORT=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown option: $1" >&2; usage ;;
  esac
done

PY=python3
[ -x .venv/bin/python ] && PY=$PWD/.venv/bin/python
BIN=$(dirname "$PY")
if [ -z "$NPROC" ]; then
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count() or 1)")
fi
# Threads per process: the cores shared out among the processes of this node.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
ARGS=(train --config "$CONFIG" --run-dir "$RUN_DIR" "${EXTRA[@]}")

if [ "$LAUNCHER" = deepspeed ] && [ "$NNODES" -gt 1 ] && [ -z "$HOSTFILE" ]; then
  # Without a hostfile the deepspeed launcher starts a single-node job: each node would train alone.
  echo "--nnodes $NNODES with the deepspeed launcher needs --hostfile (the world's hosts and slots);" \
       "or use --launcher torchrun" >&2
  exit 2
fi

case "$LAUNCHER" in
  deepspeed)
    if [ -n "$HOSTFILE" ] && [ "$NNODES" -gt 1 ]; then
      # One command per node, no ssh: the hostfile gives the world; --node_rank says which node this is.
      exec "$BIN/deepspeed" --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --module longtrain.cli "${ARGS[@]}"
    elif [ -n "$HOSTFILE" ]; then
      exec "$BIN/deepspeed" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        --module longtrain.cli "${ARGS[@]}"
    else
      # --num_gpus is required on CPU machines: without it the CPU "device count" is the NUMA node count.
      exec "$BIN/deepspeed" --num_gpus "$NPROC" --master_port "$MASTER_PORT" --module longtrain.cli "${ARGS[@]}"
    fi ;;
  torchrun)
    exec "$BIN/torchrun" --nnodes "$NNODES" --nproc_per_node "$NPROC" --node_rank "$NODE_RANK" \
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m longtrain.cli "${ARGS[@]}" ;;
  *) echo "unknown launcher: $LAUNCHER (deepspeed or torchrun)" >&2; exit 2 ;;
esac
