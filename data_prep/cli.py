"""Thin entry points: ``longtrain prepare | inspect | tokenizer`` (argparse -> library call).

Each ``*_main(argv)`` returns an exit code (longtrain.errors, README "Exit codes"): 0 on success, 2 for
bad input or a command-line usage error (printed as one line, no traceback), 130 when interrupted
(nothing is written to the output folder then).
"""
from __future__ import annotations

import argparse

from longtrain.errors import run_command


def _run(prog: str, parser: argparse.ArgumentParser, argv: list[str], action) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse printed it already
        return int(exc.code or 0)
    return run_command(prog, lambda: action(args), "interrupted; nothing was written to the output folder")


def _input_args(p: argparse.ArgumentParser, weights: bool = True) -> None:
    p.add_argument("--input", action="append", required=True, metavar="PATH[:WEIGHT]" if weights else "PATH",
                   help="a .jsonl/.ndjson, .parquet or plain text file (one document per file; JSONL and text "
                        "may be compressed: .gz, .bz2, .xz, .zst), a "
                        "datasets folder (save_to_disk), a folder (all files below it) or a quoted glob "
                        "such as 'src/**/*.py'. Repeat for several sources."
                        + (" WEIGHT scales a source by tokens: 2.0 = every document twice, 0.5 = a "
                           "deterministic half of its tokens." if weights else ""))
    p.add_argument("--text-field", default="text", help="JSONL field / column holding the text (default: text)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad documents (invalid JSON, missing field, non-UTF-8, empty, binary, too large, the "
                        "rest of a truncated or damaged compressed file), "
                        "count them by reason and report them, instead of stopping at the first")
    p.add_argument("--max-doc-bytes", type=int, default=64 << 20,
                   help="largest document (or JSONL line) read, in bytes; larger ones are bad input "
                        "(default: 64 MiB)")


def prepare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="longtrain prepare",
        description="Tokenize corpora and pack or slide-window-chunk them into rows of --seq-len tokens "
                    "(a datasets folder per split plus meta.json and stats.png).")
    _input_args(p)
    p.add_argument("--tokenizer", required=True,
                   help="SentencePiece .model file, HF tokenizer.json, or a folder holding one")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per row")
    p.add_argument("--strategy", default="best-fit", choices=["concat", "best-fit", "slide-window"],
                   help="how documents become rows (default: best-fit); see docs/data_prep.md")
    p.add_argument("--stride", type=int, help="slide-window: tokens between window starts, 1..seq-len "
                                              "(default: seq-len // 2)")
    p.add_argument("--out", required=True, help="output folder (written only when complete)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="fraction of documents (whole documents) for the validation split (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split and the weights")
    p.add_argument("--num-proc", type=int, default=1, help="tokenizer worker processes (default: 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds a prepared dataset and nothing else (other files: refused)")
    p.add_argument("--id-field", help="JSONL field / column with a document id: the validation split and the "
                                      "weights then follow the id, not the document's position")
    p.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="prepend BOS to every document (default: yes when the tokenizer has one)")
    p.add_argument("--add-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="append EOS to every document (default: yes)")
    p.add_argument("--min-tokens", type=int, help="drop documents with fewer tokens (counted)")
    p.add_argument("--max-tokens", type=int, help="drop documents with more tokens (counted)")
    p.add_argument("--truncate-long", action="store_true",
                   help="with --max-tokens: truncate longer documents instead of dropping them (counted)")
    p.add_argument("--pack-buffer-tokens", type=int,
                   help="best-fit buffer, in tokens (default: max(2**20, 16 * seq-len)); more packs tighter")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not write stats.png")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


# Each command imports its module after parsing: `--help` and argument errors answer at once, and a
# command loads only what it uses (datasets and pyarrow take seconds to import).
def prepare_main(argv: list[str]) -> int:
    def action(args):
        from data_prep.prepare import PrepareConfig, prepare
        from data_prep.sources import parse_input_spec

        cfg = PrepareConfig(
            inputs=[parse_input_spec(s) for s in args.input], tokenizer=args.tokenizer, seq_len=args.seq_len,
            out=args.out, strategy=args.strategy, stride=args.stride, val_fraction=args.val_fraction,
            seed=args.seed, num_proc=args.num_proc, skip_bad=args.skip_bad, overwrite=args.overwrite,
            text_field=args.text_field, id_field=args.id_field, add_bos=args.add_bos, add_eos=args.add_eos,
            min_tokens=args.min_tokens, max_tokens=args.max_tokens, truncate_long=args.truncate_long,
            max_doc_bytes=args.max_doc_bytes, pack_buffer_tokens=args.pack_buffer_tokens, plot=args.plot,
            progress=args.progress)
        prepare(cfg)

    return _run("longtrain prepare", prepare_parser(), argv, action)


def inspect_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="longtrain inspect",
                                description="Print a prepared dataset's summary and decode one row, with its "
                                            "segments and which tokens are training targets.")
    p.add_argument("dir", help="a folder written by longtrain prepare")
    p.add_argument("--row", type=int, default=0, help="row to decode (default: 0)")
    p.add_argument("--split", default="train", help="train or validation (default: train)")
    p.add_argument("--chars", type=int, default=300,
                   help="show this many characters at each end of a segment; 0 shows all (default: 300)")
    p.add_argument("--tokens", type=int, default=0, help="also list the first N tokens of each segment")
    p.add_argument("--tokenizer", help="decode with this tokenizer instead of the one in meta.json")
    p.add_argument("--verify", action="store_true",
                   help="check every file's sha256 against meta.json (by default only the split's file sizes)")

    def action(args):
        from data_prep.inspect_dataset import inspect_dataset

        inspect_dataset(args.dir, args.row, args.split, args.chars, args.tokens, args.tokenizer, verify=args.verify)

    return _run("longtrain inspect", p, argv, action)


def tokenizer_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="longtrain tokenizer",
                                description="Train a SentencePiece tokenizer (byte fallback; unk 0, bos 1, eos 2, "
                                            "pad 3) on a sample of a corpus; writes OUT/tokenizer.model.")
    _input_args(p, weights=False)
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size (>= 300)")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"], help="default: bpe")
    p.add_argument("--out", required=True, help="output folder for tokenizer.model")
    p.add_argument("--max-chars", type=int, default=10_000_000,
                   help="characters sampled for training (default: 10M, a few seconds)")
    p.add_argument("--seed", type=int, default=0, help="seed of the line sample")
    p.add_argument("--num-threads", type=int, default=1, help="SentencePiece trainer threads")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/tokenizer.model")

    def action(args):
        from data_prep.sources import parse_input_spec
        from data_prep.train_tokenizer import TokenizerConfig, train_tokenizer

        cfg = TokenizerConfig(
            inputs=[parse_input_spec(s) for s in args.input], vocab_size=args.vocab_size, out=args.out,
            model_type=args.model_type, max_chars=args.max_chars, seed=args.seed, text_field=args.text_field,
            skip_bad=args.skip_bad, overwrite=args.overwrite, max_doc_bytes=args.max_doc_bytes,
            num_threads=args.num_threads)
        train_tokenizer(cfg)

    return _run("longtrain tokenizer", p, argv, action)
