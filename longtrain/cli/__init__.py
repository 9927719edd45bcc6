"""The ``longtrain`` console command: a thin dispatcher to one module per subcommand.

Subcommand modules are imported lazily, so ``longtrain prepare`` never imports torch or
deepspeed (data can be prepared on CPU-only nodes without them).
"""
from __future__ import annotations

import importlib
import sys

from longtrain import __version__

# name -> (module, function, one-line help). Each function takes argv (list[str]) and returns an exit code.
SUBCOMMANDS = {
    "prepare": ("data_prep.cli", "prepare_main", "tokenize, pack / slide-window chunk corpora into a dataset"),
    "inspect": ("data_prep.cli", "inspect_main", "print a prepared dataset's summary and decode a row"),
    "tokenizer": ("data_prep.cli", "tokenizer_main", "train a SentencePiece tokenizer on a corpus"),
    "plan": ("longtrain.cli.plan", "main", "will every stage fit, and how long a step takes, before launching"),
    "train": ("longtrain.cli.train", "main", "train with DeepSpeed through a staged RoPE schedule"),
    "export": ("longtrain.cli.export", "main", "export a checkpoint to a verified Hugging Face folder"),
    "eval": ("longtrain.cli.eval", "main", "perplexity by position and passkey retrieval, with plots"),
}


def _usage() -> str:
    lines = ["usage: longtrain <command> [options]", "", "commands:"]
    for name, (_, _, help_text) in SUBCOMMANDS.items():
        lines.append(f"  {name:<10} {help_text}")
    lines.append("")
    lines.append("Run 'longtrain <command> --help' for a command's options.")
    return "\n".join(lines)


def _strip_local_rank(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` that the deepspeed launcher inserts before the subcommand.

    The same value is in the LOCAL_RANK environment variable, which is what we read.
    """
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        if arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            skip = True
            continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"longtrain {__version__}")
        return 0
    name = argv[0]
    if name not in SUBCOMMANDS:
        print(f"longtrain: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = SUBCOMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    code = func(argv[1:])
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
