"""``longtrain train``: run a staged training recipe (launched as-is by deepspeed, torchrun or srun)."""
from __future__ import annotations

import argparse

import yaml

from longtrain.config import load_config
from longtrain.errors import run_command

EPILOG = """exit codes: 0 done or stopped with a checkpoint, 2 bad input / config / damaged checkpoint / run folder
in use / disk full, 3 diverged (non-finite or spiking loss; see train.max_nonfinite_steps)

examples:
  longtrain train --config configs/tiny_cpu.yaml --run-dir runs/tiny
  longtrain train --config configs/tiny_cpu.yaml --run-dir runs/tiny --set stages.1.steps=200 --resume auto
  deepspeed --num_gpus 8 -m longtrain.cli train --config configs/qwen2_7b_4k_to_32k.yaml --run-dir runs/q
  torchrun --nproc_per_node 8 -m longtrain.cli train --config ... --run-dir ...
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longtrain train", description="Continued pretraining through a staged RoPE schedule with DeepSpeed.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run recipe (YAML)")
    parser.add_argument("--run-dir", required=True, help="run folder: resolved config, metrics.jsonl, checkpoints/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. stages.1.steps=200 (repeatable; value parsed as YAML)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="auto: latest complete checkpoint of --run-dir (fresh start if none); "
                             "or a checkpoint / run folder")
    parser.add_argument("--break-lock", action="store_true",
                        help="take over the run folder's lock (train.lock) from a run on another host that you know "
                             "is gone; a live run on this host is never taken over")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return run_command("longtrain train", lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    # Imported after the config is read: torch, deepspeed and transformers take seconds to import,
    # and a config error should not wait for them.
    from longtrain.trainer import train

    return train(cfg, args.run_dir, args.resume, args.break_lock)
