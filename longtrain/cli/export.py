"""``longtrain export CHECKPOINT OUT``: a checkpoint -> a verified Hugging Face folder (docs/export.md)."""
from __future__ import annotations

import argparse
import sys

from longtrain.errors import EXIT_VERIFY_FAILED, report, run_command

DESCRIPTION = """\
Export a longtrain checkpoint to a Hugging Face model folder: safetensors shards, config.json with
the RoPE setting of the stage reached (rope_parameters for transformers 5.x and rope_theta /
rope_scaling for 4.4x), tokenizer files, generation_config.json and a model card (README.md).
The folder is written next to OUT under a hidden name and renamed into place only when complete
(and verified): a failed export never leaves a folder at OUT.

CHECKPOINT is a run folder (newest complete checkpoint that verifies, or --tag), its checkpoints/
folder, or one checkpoints/step_XXXXXXXX folder. ZeRO 0-3 checkpoints, with or without optimizer
offload. The checkpoint is verified first: every file's size and sha256 against the manifest
recorded at save; a damaged one is named and not exported.

Memory (CPU RAM; no GPU is used): the fp32 model once, 4 bytes per parameter (7B: ~28 GB), while
DeepSpeed's fp32 partitions are memory-mapped from the checkpoint (up to 4 bytes per parameter more
of page cache, which the OS can drop), plus one output shard. --verify then casts the model to the
export dtype and loads the export: ~6 bytes per parameter at the peak for bf16/fp16 (7B: ~42 GB),
~8 for fp32. Measured peak RSS, 123M-parameter Llama: 1.35 GB (bf16) / 1.68 GB (fp32) with
--verify, of which 0.27 GB is the imports. Use --no-verify where this does not fit (unchecked).

Exit codes: 0 exported (and verified), 1 verification failed (nothing written), 2 bad input.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longtrain export", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="run folder, checkpoints/ folder or step_XXXXXXXX folder")
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--tag", help="checkpoint of a run folder to export: step_00000040 or 40 "
                                      "(default: the newest complete one)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                        help="weights dtype (default bf16: half the size of fp32, fp32's exponent range so no "
                             "overflow, what training computes in by default; fp32 for bit-exact weights)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors file, e.g. 5GB, 500MB (default 5GB); more files get an index")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="load the export with from_pretrained and compare logits, weights, RoPE and config "
                             "with the checkpoint's model (default on)")
    parser.add_argument("--verify-rows", type=int, default=2, help="sample rows for --verify (default 2)")
    parser.add_argument("--verify-tokens", type=int, default=256,
                        help="tokens per sample row, at the end of the stage's context (default 256)")
    parser.add_argument("--check-hashes", action=argparse.BooleanOptionalAction, default=True,
                        help="check the checkpoint's files against the sha256 recorded when it was saved, before "
                             "anything is read (default on; sizes are always checked)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it holds an earlier export (only on success); a folder with other "
                             "files is refused")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("longtrain export", lambda: _export(args))


def _log(text: str) -> None:
    print(text, flush=True)


def _export(args: argparse.Namespace) -> int:
    # Imported after parsing: torch, deepspeed and transformers take seconds to import.
    from longtrain.export import VerificationError, export_checkpoint

    try:
        result = export_checkpoint(
            args.checkpoint, args.out, tag=args.tag, dtype=args.dtype, max_shard_size=args.max_shard_size,
            verify=args.verify, overwrite=args.overwrite, verify_rows=args.verify_rows,
            verify_tokens=args.verify_tokens, progress=not args.no_progress,
            check_hashes=args.check_hashes, log=_log)
    except VerificationError as exc:  # a UserError too, but its own exit code
        report("longtrain export", str(exc))
        return EXIT_VERIFY_FAILED
    _log(f"exported {result.tag_dir.name} (step {result.global_step}, {result.n_params:,} parameters, "
         f"{result.dtype}) to {result.out} in {result.seconds:.1f} s: {', '.join(result.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
