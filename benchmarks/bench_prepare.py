"""Benchmark ``longtrain prepare`` against Hugging Face's ``run_clm.py`` data pipeline.

In one run, on the same corpus (../shared/data/corpora: four novels and WikiText-2 validation,
~3.5 MB, ~1M tokens) and the same tokenizer (OpenLLaMA's SentencePiece model), this times

- the baseline: ``run_clm.py``'s recipe (``load_dataset`` json/text -> ``Dataset.map`` tokenization
  -> ``Dataset.map(group_texts)`` into blocks of ``seq_len``), saved with ``save_to_disk`` so both
  sides end with a dataset on disk; its tokenize function calls the same SentencePiece model;
- ``longtrain prepare --strategy concat`` and ``--strategy best-fit`` (default options),

all in this process, best of ``--repeats`` runs each (``datasets`` and ``matplotlib`` are
imported before timing, so neither side pays an import). It prints the tokens/s ratio (goal
>= 1.0, while also keeping document boundaries), the rows and padding of best-fit against
concat (goal: best-fit rows <= 1.001 x concat), and the peak RSS of ``prepare`` at 1x and 8x the
corpus, each in a fresh process (goal: 8x <= 1.3 x the 1x peak).

Usage: python benchmarks/bench_prepare.py [--seq-len 2048] [--repeats 3] [--no-rss] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("LONGTRAIN_SHARED_DATA", REPO.parent / "shared" / "data"))
TEXT_FILES = ["pride_and_prejudice.txt", "frankenstein.txt", "tinyshakespeare.txt", "botchan.txt"]
JSONL = "wikitext2_valid.jsonl"


def corpus_files(folder: Path) -> tuple[list[Path], list[Path]]:
    return sorted(folder.glob("*.txt")), sorted(folder.glob("*.jsonl"))


def baseline_run_clm(texts: list[Path], jsonls: list[Path], tokenizer: Path, seq_len: int, out: Path) -> dict:
    """run_clm.py's pipeline (transformers/examples/pytorch/language-modeling/run_clm.py)."""
    import datasets
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    cache = out / "cache"
    parts = [datasets.load_dataset("text", data_files=[str(p) for p in texts], split="train", cache_dir=str(cache)),
             datasets.load_dataset("json", data_files=[str(p) for p in jsonls], split="train",
                                   cache_dir=str(cache)).select_columns(["text"])]
    raw = datasets.concatenate_datasets(parts)

    def tokenize_function(examples):  # run_clm: tokenizer(examples[text_column_name])
        ids = sp.encode(examples["text"])
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}

    tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"])

    def group_texts(examples):  # verbatim from run_clm.py
        concatenated_examples = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated_examples[list(examples.keys())[0]])
        total_length = (total_length // seq_len) * seq_len
        result = {k: [t[i: i + seq_len] for i in range(0, total_length, seq_len)]
                  for k, t in concatenated_examples.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    lm = tokenized.map(group_texts, batched=True)
    lm.save_to_disk(str(out / "saved"))
    return {"rows": len(lm), "tokens": len(lm) * seq_len}


def ours(texts: list[Path], jsonls: list[Path], tokenizer: Path, seq_len: int, out: Path, strategy: str) -> dict:
    from data_prep.prepare import PrepareConfig, prepare
    from data_prep.sources import InputSpec

    cfg = PrepareConfig(inputs=[InputSpec(str(p)) for p in list(texts) + list(jsonls)], tokenizer=str(tokenizer),
                        seq_len=seq_len, out=str(out), strategy=strategy, progress=False)
    meta = prepare(cfg, log=lambda *_: None)
    train = meta["splits"]["train"]
    return {"rows": train["rows"], "tokens": meta["counts"]["tokens_read"], "padding": train["padding_tokens"],
            "lost_targets": train["lost_target_tokens"], "repeated_context": train["repeated_context_tokens"],
            "segments": train["segments"]}


def timed(fns: dict, repeats: int) -> dict:
    """Best wall time and last result of each function; runs interleaved so that load from other
    processes on the machine hits all of them alike."""
    best = {name: (float("inf"), None) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                result = fn(Path(tmp) / "out")
                best[name] = (min(best[name][0], time.perf_counter() - start), result)
    return best


def rss_child(scale: int, strategy: str, seq_len: int) -> dict:
    """Peak RSS (bytes) and counts of a fresh process running prepare on ``scale`` copies of the corpus."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "corpus"
        folder.mkdir()
        for k in range(scale):
            for name in TEXT_FILES + [JSONL]:
                (folder / f"copy{k}_{name}").symlink_to(DATA / "corpora" / name)
        # VmHWM (the peak RSS of this process's own address space) rather than ru_maxrss, which
        # also keeps the peak of the parent it was forked from.
        code = ("import json, sys; sys.path.insert(0, %r); from benchmarks.bench_prepare import *; "
                "t, j = corpus_files(Path(%r)); r = ours(t, j, Path(%r), %d, Path(%r) / 'out', %r); "
                "r['rss'] = peak_rss(); print(json.dumps(r))"
                % (str(REPO), str(folder), str(DATA / "tokenizers" / "open_llama_tokenizer.model"), seq_len, tmp,
                   strategy))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss() -> int:
    """Peak resident memory of this process in bytes (Linux /proc/self/status VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-rss", action="store_true", help="skip the 1x / 8x peak-RSS runs")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    tokenizer = DATA / "tokenizers" / "open_llama_tokenizer.model"
    if not tokenizer.is_file():
        print(f"shared data not found under {DATA} (set LONGTRAIN_SHARED_DATA)", file=sys.stderr)
        return 1
    texts, jsonls = corpus_files(DATA / "corpora")
    import datasets  # noqa: F401  imported before timing: neither side pays it
    import matplotlib  # noqa: F401

    for p_ in texts + jsonls:  # warm the page cache
        p_.read_bytes()
    L = args.seq_len
    runs = timed({"baseline": lambda o: baseline_run_clm(texts, jsonls, tokenizer, L, o),
                  "concat": lambda o: ours(texts, jsonls, tokenizer, L, o, "concat"),
                  "best-fit": lambda o: ours(texts, jsonls, tokenizer, L, o, "best-fit")}, args.repeats)
    (t_base, base), (t_concat, concat), (t_bf, bf) = runs["baseline"], runs["concat"], runs["best-fit"]
    base_tps = base["tokens"] / t_base  # run_clm drops the remainder: count the tokens it kept
    res = {
        "seq_len": L, "corpus_tokens": concat["tokens"],
        "baseline": {"seconds": round(t_base, 2), "tokens_per_s": round(base_tps), "rows": base["rows"]},
        "concat": {"seconds": round(t_concat, 2), "tokens_per_s": round(concat["tokens"] / t_concat), **concat},
        "best_fit": {"seconds": round(t_bf, 2), "tokens_per_s": round(bf["tokens"] / t_bf), **bf},
    }
    res["ratio_tokens_per_s_concat_vs_baseline"] = round(res["concat"]["tokens_per_s"] / base_tps, 3)
    res["ratio_tokens_per_s_best_fit_vs_baseline"] = round(res["best_fit"]["tokens_per_s"] / base_tps, 3)
    res["ratio_rows_best_fit_vs_concat"] = round(bf["rows"] / concat["rows"], 5)
    for name, r in (("concat", concat), ("best_fit", bf)):
        res[name]["padding_percent"] = round(100 * r["padding"] / (r["rows"] * L), 3)
    print(f"corpus: {len(texts) + len(jsonls)} files, {concat['tokens']:,} tokens; seq_len {L}; best of {args.repeats}")
    print(f"{'':22}{'seconds':>9}{'tokens/s':>12}{'rows':>8}{'padding %':>11}")
    print(f"{'run_clm.py baseline':22}{t_base:9.2f}{base_tps:12,.0f}{base['rows']:8}{'(drops rest)':>11}")
    for name, t, r in (("prepare concat", t_concat, concat), ("prepare best-fit", t_bf, bf)):
        print(f"{name:22}{t:9.2f}{r['tokens'] / t:12,.0f}{r['rows']:8}{100 * r['padding'] / (r['rows'] * L):11.3f}")
    print(f"tokens/s vs baseline: concat {res['ratio_tokens_per_s_concat_vs_baseline']:.2f}x, best-fit "
          f"{res['ratio_tokens_per_s_best_fit_vs_baseline']:.2f}x (goal >= 1.0)")
    # Best-fit's floor: pieces of a long document overlap by one token (so no target is lost),
    # so it needs ceil((tokens + overlaps) / seq_len) rows; concat needs ceil(tokens / seq_len).
    floor = -(-(bf["tokens"] + bf["repeated_context"]) // L)
    print(f"rows best-fit / concat: {res['ratio_rows_best_fit_vs_concat']:.4f} (goal <= 1.001); best-fit's floor "
          f"with its {bf['repeated_context']:,} one-token overlaps is {floor} rows")
    if not args.no_rss:
        runs = {}
        for strategy in ("concat", "best-fit"):
            one, eight = rss_child(1, strategy, L), rss_child(8, strategy, L)
            runs[strategy] = eight
            res[f"peak_rss_mib_{strategy}"] = {"1x": round(one["rss"] / 2**20), "8x": round(eight["rss"] / 2**20),
                                               "ratio": round(eight["rss"] / one["rss"], 3)}
            print(f"peak RSS {strategy}: 1x {one['rss'] / 2**20:,.0f} MiB, 8x {eight['rss'] / 2**20:,.0f} MiB, "
                  f"ratio {eight['rss'] / one['rss']:.2f} (goal <= 1.3)")
        ratio8 = runs["best-fit"]["rows"] / runs["concat"]["rows"]
        res["ratio_rows_best_fit_vs_concat_8x"] = round(ratio8, 5)
        print(f"rows at 8x the corpus: best-fit {runs['best-fit']['rows']:,} / concat {runs['concat']['rows']:,} "
              f"= {ratio8:.4f}; best-fit padding {runs['best-fit']['padding']:,} tokens")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
