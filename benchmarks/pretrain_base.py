"""Pretrain the quickstart's base model (launch/quickstart_base/) from scratch, by one seeded command.

A Llama of a few million parameters is trained at L = 128 tokens, RoPE base 10k, on Python
standard-library code plus synthetic long-dependency documents (``longtrain prepare --input
synthetic:...``), until on held-out packages it copies and retrieves inside L (issue 15: copy gain
>= 1 nat at distance 0.75 L = 96; key-value retrieval >= 80% at 128 tokens). Everything runs
through longtrain's own command line, as a user would:

    longtrain tokenizer -> longtrain prepare -> longtrain train (in chunks) -> longtrain export

The recipe is data: ``configs/pretrain_base.yaml`` (model, optimizer, stages) and the ``DATA``
table below (what each stage's dataset mixes). Training runs in chunks of ``--probe-every`` steps
(``train.stop_after_steps`` + ``--resume auto``, bitwise the same as one run); after each chunk the
newest checkpoint is probed on the held-out packages (``longtrain.eval.probes``) and the figures go
to ``WORK/probes.jsonl`` and the console, so the moment copying appears is on record.

Usage (from the repository root; see launch/quickstart_base/README.md for the time it took):

    .venv/bin/python benchmarks/pretrain_base.py [--work-dir runs/pretrain_base] [--out launch/quickstart_base]

Re-running continues where it stopped (data already prepared is kept, training resumes from its
last checkpoint). ``--quick`` shrinks steps and data to check the plumbing in a few minutes (its
model is not worth shipping: it writes WORK/quick_export, never --out).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.support.env import child_env  # noqa: E402  (after the repository is on the path)

RECIPE = REPO / "configs" / "pretrain_base.yaml"
HELD_OUT = ("email", "json", "http", "logging")  # the quickstart evaluates on these; never trained on
L = 128

# What each stage's dataset mixes: (input, weight) with {code} = the training modules' glob.
# "copy" documents repeat a passage of real code (or random code words) after filler; "kv" ones ask
# at the end for the value of one of several `key = value` lines (data_prep/synthetic.py).
# Stage 0 holds short documents (packed four and more to a row): an induction circuit forms much
# sooner over short contexts (Musat et al. 2025: the time to emergence grows with the square of the
# context length), so the model first learns to copy over at most 32 tokens, then over all of L.
DATA = {
    "warmup": [
        ("synthetic:copy?docs={n}&source={code}&length=32&min_passage=3&max_passage=10&repeats=0&max_distance=1&passage=words", 1.0),
        ("synthetic:copy?docs={n}&source={code}&length=32&min_passage=3&max_passage=10&repeats=0&max_distance=1", 1.0),
        ("synthetic:copy?docs={n}&source={code}&length=32&min_passage=3&max_passage=10&passage=words", 1.0),
        ("synthetic:copy?docs={n}&source={code}&length=32&min_passage=3&max_passage=10", 1.0),
        ("synthetic:kv?docs={n}&source={code}&length=48&keys=2", 1.0),
    ],
    "main": [
        ("{code}", 2.0),
        ("synthetic:copy?docs={n}&source={code}&min_passage=8&max_passage=32", 1.0),
        ("synthetic:copy?docs={half}&source={code}&min_passage=8&max_passage=32&passage=words", 1.0),
        ("synthetic:kv?docs={n}&source={code}&keys=4", 1.0),
    ],
}
DOCS = {"warmup": 15000, "main": 20000}  # documents per synthetic input ({half}: half as many; quick: 1/20)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


class Runner:
    """Runs ``python -m longtrain.cli ...`` with logs under WORK/logs and wall times in timings.json."""

    def __init__(self, work: Path, threads: int):
        self.work = work
        self.timings_file = work / "timings.json"
        self.timings = json.loads(self.timings_file.read_text()) if self.timings_file.exists() else {}
        # Offline, `threads` OMP threads, unbuffered, DeepSpeed's compiled op cached in .venv (~30 s at the
        # first start otherwise): the environment the tests' and the study's subprocesses get.
        self.env = child_env(threads=threads)

    def record(self, label: str, seconds: float) -> None:
        self.timings[label] = round(self.timings.get(label, 0.0) + seconds, 1)
        self.timings_file.write_text(json.dumps(self.timings, indent=1) + "\n")

    def longtrain(self, label: str, args: list) -> None:
        cmd = [sys.executable, "-m", "longtrain.cli", *[str(a) for a in args]]
        print(f"[base] {label}: longtrain {' '.join(cmd[3:])}", flush=True)
        log = self.work / "logs" / f"{label.replace('/', '_').replace(' ', '_')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(log, "a", encoding="utf-8") as handle:
            code = subprocess.call(cmd, cwd=REPO, env=self.env, stdout=handle, stderr=subprocess.STDOUT)
        self.record(label.split(" ")[0], time.perf_counter() - start)
        if code != 0:
            tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-25:])
            raise SystemExit(f"[base] {label} failed (exit {code}); log {log}:\n{tail}")


# ------------------------------------------------------------------------------------------- data
def corpus(work: Path) -> dict:
    """The training modules (top-level ``Lib/*.py``) and the held-out packages, copied into WORK."""
    std = stdlib_dir()
    held = work / "held_out"
    if not held.is_dir():
        tmp = work / "held_out.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for pkg in HELD_OUT:
            for f in sorted((std / pkg).glob("*.py")):
                shutil.copy(f, tmp / f"{pkg}_{f.name}")
        tmp.rename(held)
    return {"python": sys.version.split()[0], "train_glob": str(std / "*.py"), "held_out": str(held),
            "held_out_packages": list(HELD_OUT), "train_modules": len(list(std.glob("*.py")))}


def prepare_data(runner: Runner, work: Path, manifest: dict, quick: bool) -> dict[str, Path]:
    tok = work / "tokenizer" / "tokenizer.model"
    if not tok.exists():
        runner.longtrain("tokenizer", ["tokenizer", "--input", manifest["train_glob"], "--vocab-size", 2048,
                                       "--out", tok.parent, "--skip-bad", "--seed", 0])
    out = {}
    for name, inputs in DATA.items():
        folder = work / "data" / name
        n = DOCS[name] // (20 if quick else 1)
        if not (folder / "meta.json").exists():
            args = ["prepare", "--tokenizer", tok, "--seq-len", L, "--out", folder, "--skip-bad", "--seed", 0,
                    "--overwrite", "--no-progress"]
            for spec, weight in inputs:
                args += ["--input", f"{spec.format(n=n, half=n // 2, code=manifest['train_glob'])}:{weight}"]
            runner.longtrain(f"prepare {name}", args)
        out[name] = folder
    return out


# ------------------------------------------------------------------------------------------- probes
def held_out_stream(manifest: dict, tokenizer: str):
    import numpy as np
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(Path(tokenizer) / "tokenizer.model")
                                    if Path(tokenizer).is_dir() else tokenizer)
    ids = []
    for f in sorted(Path(manifest["held_out"]).glob("*.py")):
        ids += sp.encode(f.read_text(encoding="utf-8"))
    return sp, np.array(ids, dtype=np.int64)


def probe(model, sp, stream, distances, kv_lengths, seed: int = 0, passages: int = 64, trials: int = 20) -> dict:
    """Copy gain by distance and key-value retrieval accuracy by length on the held-out stream."""
    from longtrain.eval.probes import kv_retrieval_accuracy, repeat_copy_gain

    copy = repeat_copy_gain(model, stream, distances, passage=L // 4, passages=passages, seed=seed)
    kv = kv_retrieval_accuracy(model, sp.encode, stream, kv_lengths, trials=trials, seed=seed, prefix=[sp.bos_id()])
    by_length = {}
    for cell in kv:
        by_length.setdefault(cell["length"], []).append(cell["accuracy"])
    return {"copy": {r["distance"]: {k: round(r[k], 3) for k in ("gain", "gain_vs_control", "nll_first", "nll_repeat")}
                     for r in copy},
            "kv": {n: round(sum(a) / len(a), 3) for n, a in by_length.items()}, "kv_cells": kv}


def probe_checkpoint(run_dir: Path, manifest: dict, distances, kv_lengths) -> dict:
    from longtrain.export import load_checkpoint_model

    model, tok = load_checkpoint_model(run_dir)
    sp, stream = held_out_stream(manifest, tok)
    return probe(model, sp, stream, distances, kv_lengths)


# ------------------------------------------------------------------------------------------- training
def finished_step(run_dir: Path) -> int:
    from longtrain.checkpoint import latest_complete, read_state

    tag = latest_complete(run_dir / "checkpoints")
    return int(read_state(tag)["global_step"]) if tag else 0


def train(runner: Runner, work: Path, data: dict[str, Path], manifest: dict, probe_every: int, quick: bool) -> Path:
    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    run_dir = work / "run"
    sets = ["--set", f"model.tokenizer={work / 'tokenizer' / 'tokenizer.model'}"]
    for i, stage in enumerate(recipe["stages"]):
        sets += ["--set", f"stages.{i}.data={data[stage['data']]}"]
        if quick:
            sets += ["--set", f"stages.{i}.steps={max(4, stage['steps'] // 100)}",
                     "--set", f"stages.{i}.warmup_steps=2"]
    total = sum(max(4, s["steps"] // 100) if quick else s["steps"] for s in recipe["stages"])
    log = work / "probes.jsonl"
    while (done := finished_step(run_dir)) < total:
        chunk = min(probe_every, total - done)
        runner.longtrain(f"train {done}-{done + chunk}", [
            "train", "--config", RECIPE, "--run-dir", run_dir, "--resume", "auto", *sets,
            "--set", f"train.stop_after_steps={chunk}"])
        start = time.perf_counter()
        figures = probe_checkpoint(run_dir, manifest, [L // 4, L // 2, 3 * L // 4], [L])
        runner.record("probe", time.perf_counter() - start)
        step = finished_step(run_dir)
        record = {"step": step, "train_s": runner.timings.get("train"), **figures}
        record.pop("kv_cells")
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        copy = "  ".join(f"d={d}: {v['gain']:+.2f} ({v['gain_vs_control']:+.2f})" for d, v in figures["copy"].items())
        print(f"[base] step {step}: copy gain {copy}  kv@{L} {figures['kv'][L]:.2f}", flush=True)
    return run_dir


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="runs/pretrain_base", help="data, run, logs, probes (default: runs/pretrain_base)")
    p.add_argument("--out", default="launch/quickstart_base", help="where the exported model goes")
    p.add_argument("--probe-every", type=int, default=500, help="steps between probes (default 500)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the training process (default 1)")
    p.add_argument("--quick", action="store_true", help="a few steps on little data: checks the plumbing only")
    args = p.parse_args(argv)
    work = (REPO / args.work_dir).resolve() if not Path(args.work_dir).is_absolute() else Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(work, args.threads)
    start = time.perf_counter()
    manifest = corpus(work)
    data = prepare_data(runner, work, manifest, args.quick)
    run_dir = train(runner, work, data, manifest, max(1, args.probe_every // (100 if args.quick else 1)), args.quick)
    out = work / "quick_export" if args.quick else (REPO / args.out).resolve()
    runner.longtrain("export", ["export", run_dir, out, "--dtype", "fp32", "--overwrite", "--no-progress"])
    final = final_figures(out, manifest)
    runner.record("total", time.perf_counter() - start)
    (work / "final.json").write_text(json.dumps({"manifest": manifest, "figures": final,
                                                 "timings": runner.timings}, indent=1) + "\n")
    write_card(out, manifest, work, final, runner.timings, sys.argv[1:] if argv is None else argv)
    print(json.dumps(final["summary"], indent=1))
    return 0


def final_figures(folder: Path, manifest: dict) -> dict:
    """The card's figures: copy gain at distances inside L and at 2-4 L, retrieval at L..4 L."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    sp, stream = held_out_stream(manifest, str(folder))
    distances = [L // 2, 3 * L // 4, 2 * L - L // 4, 3 * L - L // 4, 4 * L - L // 4]  # 64 96 224 352 480
    figures = probe(model, sp, stream, distances, [L, 2 * L, 3 * L, 4 * L], passages=128, trials=40)
    figures["summary"] = {"copy_gain": {d: v["gain"] for d, v in figures["copy"].items()},
                          "copy_gain_vs_control": {d: v["gain_vs_control"] for d, v in figures["copy"].items()},
                          "kv_accuracy": figures["kv"]}
    return figures


def write_card(folder: Path, manifest: dict, work: Path, final: dict, timings: dict, argv) -> None:
    """Append how the model was made to the card `longtrain export` wrote: command, data, time, figures."""
    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    curve = [json.loads(line) for line in (work / "probes.jsonl").read_text().splitlines() if line.strip()]
    hours = timings.get("total", 0) / 3600
    lines = ["", "## How this model was made", "",
             f"`python benchmarks/pretrain_base.py {' '.join(argv)}` (seeded; data prepared and trained with "
             "`longtrain tokenizer`, `longtrain prepare`, `longtrain train`, `longtrain export`), recipe "
             "`configs/pretrain_base.yaml`.", "",
             f"- Time: {hours:.1f} h wall on 2 shared CPU cores, one training process "
             f"({', '.join(f'{k} {v / 60:.0f} min' for k, v in timings.items() if k != 'total')}).",
             f"- Code: the top-level modules of the Python {manifest['python']} standard library "
             f"(`{manifest['train_glob']}`, {manifest['train_modules']} files); held out, never trained on: the "
             f"packages {', '.join(manifest['held_out_packages'])} (the probes below and the quickstart use them).",
             "- Synthetic long-dependency documents (`longtrain prepare --input 'synthetic:...'`, "
             "`data_prep/synthetic.py`):"]
    for name, inputs in DATA.items():
        n = DOCS[name]
        shown = [f"`{spec.replace('&source={code}', '').format(n=n, half=n // 2, code='Lib/*.py')}` x{weight:g}"
                 for spec, weight in inputs]
        lines.append(f"  - `{name}` (source of passages and filler: the same modules): " + ", ".join(shown))
    lines += ["", "| stage | steps | rows x seq_len | lr | data |", "|---|---:|---|---|---|"]
    for st in recipe["stages"]:
        lines.append(f"| {st['name']} | {st['steps']} | {st['micro_batch_size']} x {st['seq_len']} | {st['lr']:g}"
                     f" ({st.get('decay', 'cosine')}) | {st['data']} |")
    lines += ["", "### Probes on the held-out packages during training (`longtrain.eval.probes`)", "",
              "Copy gain = NLL of a 32-token passage's first occurrence minus NLL of its repeat, by start-to-start "
              "distance d (nats per token; in brackets: against the same repeat after a different first passage). "
              f"kv = key-value retrieval accuracy at {L} tokens (4 keys, teacher-forced exact match of the value).", "",
              "| step | " + " | ".join(f"copy d={d}" for d in curve[0]["copy"]) + f" | kv@{L} |",
              "|---:|" + "---:|" * (len(curve[0]["copy"]) + 1)]
    for rec in curve:
        cells = " | ".join(f"{v['gain']:+.2f} ({v['gain_vs_control']:+.2f})" for v in rec["copy"].values())
        lines.append(f"| {rec['step']} | {cells} | {rec['kv'][str(L)] if str(L) in rec['kv'] else rec['kv'][L]:.2f} |")
    summary = final["summary"]
    lines += ["", "### Final figures (held-out packages; inside L = 128 and at 2-4 L)", "",
              "| distance d | " + " | ".join(str(d) for d in summary["copy_gain"]) + " |",
              "|---|" + "---:|" * len(summary["copy_gain"]),
              "| copy gain | " + " | ".join(f"{v:+.2f}" for v in summary["copy_gain"].values()) + " |",
              "| vs control | " + " | ".join(f"{v:+.2f}" for v in summary["copy_gain_vs_control"].values()) + " |", "",
              "| length | " + " | ".join(str(n) for n in summary["kv_accuracy"]) + " |",
              "|---|" + "---:|" * len(summary["kv_accuracy"]),
              "| kv retrieval | " + " | ".join(f"{v:.2f}" for v in summary["kv_accuracy"].values()) + " |", ""]
    card = folder / "README.md"
    card.write_text(card.read_text(encoding="utf-8") + "\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
