"""`longtrain eval`: perplexity by position, passkey retrieval and context probes for one or more models."""
from __future__ import annotations

import argparse
import logging

from longtrain.errors import run_command

EXAMPLE = """example:
  longtrain eval runs/base/export runs/long/export --names base long \\
      --data ../shared/data/corpora/wikitext2_valid.jsonl --lengths 512 2048 --out eval_out
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longtrain eval", epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Perplexity by position, passkey retrieval, repeat-copy gain and "
                                            "key-value retrieval, with plots "
                                            "(docs/evaluation.md).")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="exported HF folder, or a longtrain run / checkpoint folder")
    p.add_argument("--data", nargs="+", required=True,
                   help="held-out documents, read as `longtrain prepare --input` reads them: .jsonl/.ndjson(.gz), "
                        ".parquet or plain text files (one document per file), datasets folders (save_to_disk), "
                        "folders (all files below them) or quoted globs such as 'src/**/*.py'; or one prepared "
                        "dataset folder (with meta.json)")
    p.add_argument("--text-field", default="text", help="JSONL field / column holding the text (default: text)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad documents (invalid JSON, missing field, non-UTF-8, empty, binary, too large) and "
                        "count them in results.json, instead of stopping at the first")
    p.add_argument("--lengths", nargs="+", type=int, help="context lengths (default: max_position_embeddings)")
    p.add_argument("--out", default="eval_out", help="output folder (default: eval_out)")
    p.add_argument("--names", nargs="+", help="a display name per MODEL (default: folder names)")
    p.add_argument("--bucket-size", type=int, help="positions per bucket (default: length // 16)")
    p.add_argument("--stride", type=int, help="sliding-window stride (default: non-overlapping chunks)")
    p.add_argument("--max-tokens", type=int, help="scored tokens per model and length (default: all)")
    p.add_argument("--passkey-lengths", nargs="+", type=int, help="default: --lengths")
    p.add_argument("--passkey-depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--passkey-trials", type=int, default=5, help="per length and depth; 0 skips passkey")
    p.add_argument("--filler", help="an input (as --data) for passkey filler (default: the --data documents)")
    p.add_argument("--copy-distances", nargs="+", type=int,
                   help="repeat-copy probe: start-to-start distances (default: each length minus --copy-passage)")
    p.add_argument("--copy-passage", type=int, default=32, help="tokens per copied passage (default 32)")
    p.add_argument("--copy-passages", type=int, default=32, help="passages per distance; 0 skips (default 32)")
    p.add_argument("--kv-lengths", nargs="+", type=int, help="key-value retrieval prompt lengths (default: --lengths)")
    p.add_argument("--kv-depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--kv-trials", type=int, default=10, help="prompts per length and depth; 0 skips (default 10)")
    p.add_argument("--kv-keys", type=int, default=4, help="key lines per prompt, one asked (default 4)")
    p.add_argument("--seed", type=int, default=0, help="every probe's choices (passages, keys, places) follow it")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--attn-implementation", default="sdpa", help="transformers attention (default sdpa)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per forward (windows batched)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--wandb", metavar="PROJECT[/NAME]",
                   help="also log the summary table and the plots to Weights & Biases (needs the wandb package; "
                        "name default: the --out folder's name; offline: WANDB_MODE=offline)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_command("longtrain eval", lambda: _eval(args))


def _eval(args: argparse.Namespace) -> int:
    # Imported after parsing: torch and transformers take seconds to import.
    from longtrain.eval.report import markdown_table
    from longtrain.eval.runner import EvalConfig, run_eval
    from longtrain.eval.tracking import check_wandb, log_eval

    wandb_run = check_wandb(args.wandb)  # before any model is evaluated

    cfg = EvalConfig(
        lengths=args.lengths, stride=args.stride, bucket_size=args.bucket_size,
        max_tokens=args.max_tokens, passkey_lengths=args.passkey_lengths,
        passkey_depths=tuple(args.passkey_depths), passkey_trials=args.passkey_trials,
        filler=args.filler, copy_distances=args.copy_distances, copy_passage=args.copy_passage,
        copy_passages=args.copy_passages, kv_lengths=args.kv_lengths, kv_depths=tuple(args.kv_depths),
        kv_trials=args.kv_trials, kv_keys=args.kv_keys, text_field=args.text_field, skip_bad=args.skip_bad, seed=args.seed,
        device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation,
        batch_tokens=args.batch_tokens, progress=not args.no_progress)
    results = run_eval(args.models, args.data, args.out, cfg, names=args.names)
    print(markdown_table(results))
    for key, path in results["files"].items():
        print(f"{key}: {path}")
    if wandb_run is not None:
        print(f"wandb: {log_eval(results, args.out, *wandb_run)}")
    return 0
