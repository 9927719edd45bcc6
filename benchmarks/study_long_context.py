"""The long-context study of issue 6 (docs/long_context_study.md), reproducible by one command.

Does the staged RoPE recipe work? A ~1.1M-parameter Llama is trained from scratch at L = 128
with base 10k, then extended with equal steps and tokens by several methods (ABF, NTK-aware, PI,
YaRN, plus controls); held-out perplexity by position shows what each method does within L and
beyond it. Everything runs through longtrain's own command line, as a user would:

    longtrain tokenizer -> longtrain prepare -> longtrain train -> longtrain export -> longtrain eval

The recipe is data: ``configs/study/recipe.yaml`` (model, base stage, extension stage) and
``configs/study/methods.yaml`` (each method = overrides of the extension stage). Every method
resumes from the same stage-0 checkpoint (``longtrain train --resume``), so all share the base
weights and optimizer state and differ only in stage 1.

Usage (from the repository root; 131 minutes measured on 2 CPU cores shared with other jobs):

    .venv/bin/python benchmarks/study_long_context.py [--work-dir runs/study] [--seeds 0 1]

Re-running continues where it stopped: finished steps are skipped and interrupted training resumes
from its last checkpoint. Outputs under --work-dir: ``report.md`` (tables and goal checks),
``study_results.json`` (every number), ``study_*.png`` (plots), ``timings.json``, ``logs/``.
``--quick`` shrinks everything (steps, corpus) to check the plumbing in a few minutes;
``--dry-run`` prints the commands without running them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
STUDY_CONFIGS = REPO / "configs" / "study"
SHARED_DATA = Path(os.environ.get("LONGTRAIN_SHARED_DATA", REPO.parent / "shared" / "data"))
TRAIN_BOOKS = ("pride_and_prejudice.txt", "frankenstein.txt", "tinyshakespeare.txt", "botchan.txt")
WIKITEXT = "wikitext2_valid.jsonl"
BASE_L = 128  # the pretraining length of recipe.yaml (checked against it in load_study)


# --------------------------------------------------------------------------------------------
# Corpus: what is trained on and what is held out (whole documents, never trained on).


def heldout_code(name: str) -> bool:
    """A stdlib module is held out when sha256(file name) % 8 == 0: stable across Python versions
    for the files they share (~15 of the ~170 top-level modules, ~100k tokens)."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 8 == 0


def heldout_article(index: int) -> bool:
    """WikiText-2 validation articles 0, 5, 10, ... (12 of 60, ~68k tokens) are held out."""
    return index % 5 == 0


def build_corpus(out: Path, shared: Path, quick: bool) -> dict:
    """Copy the study corpus into ``out/{train,heldout}/{prose,code}``; return the manifest.

    Prose: the four novels and 48 WikiText-2 articles for training, 12 other articles held out.
    Code: the interpreter's top-level standard-library modules (``Lib/*.py``), split by file name.
    ``quick`` keeps a few small documents of each, for a plumbing check.
    """
    corpora = shared / "corpora"
    missing = [n for n in (*TRAIN_BOOKS, WIKITEXT) if not (corpora / n).is_file()]
    if missing:
        raise SystemExit(f"study corpus not found: {', '.join(str(corpora / n) for n in missing)} "
                         "(pass --shared-data or set LONGTRAIN_SHARED_DATA)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dirs = {k: tmp / k for k in ("train/prose", "train/code", "heldout/prose", "heldout/code")}
    for d in dirs.values():
        d.mkdir(parents=True)
    books = TRAIN_BOOKS[3:] if quick else TRAIN_BOOKS  # botchan alone in quick mode
    for name in books:
        shutil.copy(corpora / name, dirs["train/prose"] / name)
    lines = [line for line in (corpora / WIKITEXT).read_text(encoding="utf-8").splitlines() if line.strip()]
    if quick:
        lines = lines[:10]
    train_lines = [line for i, line in enumerate(lines) if not heldout_article(i)]
    held_lines = [line for i, line in enumerate(lines) if heldout_article(i)]
    (dirs["train/prose"] / "wikitext_train.jsonl").write_text("\n".join(train_lines) + "\n", encoding="utf-8")
    (dirs["heldout/prose"] / "wikitext_heldout.jsonl").write_text("\n".join(held_lines) + "\n", encoding="utf-8")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = sorted(stdlib.glob("*.py"))
    if quick:
        modules = [m for m in modules if m.stat().st_size < 40_000][:40]
    split = {"train": [], "heldout": []}
    for path in modules:
        kind = "heldout" if heldout_code(path.name) else "train"
        shutil.copy(path, dirs[f"{kind}/code"] / path.name)
        split[kind].append(path.name)
    manifest = {"python": sys.version.split()[0], "stdlib": str(stdlib), "quick": quick,
                "prose_train": list(books) + [f"{WIKITEXT}: {len(train_lines)} articles"],
                "prose_heldout": [f"{WIKITEXT}: articles {[i for i in range(len(lines)) if heldout_article(i)]}"],
                "code_train": split["train"], "code_heldout": split["heldout"]}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest


# --------------------------------------------------------------------------------------------
# The study plan: recipe.yaml + methods.yaml -> runs, each a list of `longtrain train` overrides.


def load_study(configs: Path = STUDY_CONFIGS) -> tuple[dict, dict]:
    recipe = yaml.safe_load((configs / "recipe.yaml").read_text(encoding="utf-8"))
    methods = yaml.safe_load((configs / "methods.yaml").read_text(encoding="utf-8"))
    base = recipe["stages"][0]
    if base["seq_len"] != BASE_L or recipe["model"]["config"]["max_position_embeddings"] != BASE_L:
        raise SystemExit(f"configs/study/recipe.yaml: the study assumes L = {BASE_L} (stage 0 seq_len and "
                         "model.config.max_position_embeddings)")
    return recipe, methods


def rope_override(rope: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in rope.items()) + "}"


def method_overrides(arm: dict, method: dict, data_dir: Path, seed: int, steps: dict) -> list[str]:
    """Dotted overrides of recipe.yaml for one method and seed (stage 1 = the extension)."""
    seq_len = method.get("seq_len", arm["seq_len"])
    mbs = method.get("micro_batch_size", arm["micro_batch_size"])
    return [f"stages.0.data={data_dir / f'ds{BASE_L}'}", f"stages.0.steps={steps['base']}",
            f"stages.1.data={data_dir / f'ds{seq_len}'}", f"stages.1.seq_len={seq_len}",
            f"stages.1.micro_batch_size={mbs}", f"stages.1.rope={rope_override(method['rope'])}",
            f"stages.1.steps={steps['extend']}", f"train.seed={seed}"]


def plan_runs(methods: dict, seeds: list[int], arms: list[str]) -> list[dict]:
    runs = []
    for arm_name in arms:
        arm = methods["arms"][arm_name]
        for seed in arm.get("seeds", seeds):
            if seed not in seeds:
                continue
            for method in arm["methods"]:
                runs.append({"arm": arm_name, "method": method["name"], "seed": seed,
                             "dir": f"{arm_name}/{method['name']}_s{seed}", "spec": method})
    return runs


def seq_lens_needed(methods: dict, arms: list[str]) -> list[int]:
    lens = {BASE_L, 512}  # recipe.yaml's stage 1 reads ds512 (every stage's dataset is checked at start)
    for arm_name in arms:
        arm = methods["arms"][arm_name]
        lens |= {m.get("seq_len", arm["seq_len"]) for m in arm["methods"]}
    return sorted(lens)


# --------------------------------------------------------------------------------------------
# Running longtrain commands (skipped when their output exists; logs under WORK/logs).


class Runner:
    def __init__(self, work: Path, dry_run: bool, threads: int):
        self.work, self.dry_run = work, dry_run
        self.timings: dict[str, float] = {}
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                        TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        self.env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))

    def longtrain(self, label: str, args: list[str]) -> None:
        cmd = [sys.executable, "-m", "longtrain", *[str(a) for a in args]]
        print(f"[study] {label}: {' '.join(cmd[1:])}", flush=True)
        if self.dry_run:
            return
        log = self.work / "logs" / f"{label.replace('/', '_')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(log, "w", encoding="utf-8") as handle:
            code = subprocess.call(cmd, cwd=REPO, env=self.env, stdout=handle, stderr=subprocess.STDOUT)
        self.timings[label] = round(time.perf_counter() - start, 1)
        if code != 0:
            tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-25:])
            raise SystemExit(f"[study] {label} failed (exit {code}); log {log}:\n{tail}")
        print(f"[study]   done in {self.timings[label]:.0f} s", flush=True)


def finished_step(run_dir: Path) -> int:
    """Global step of the run's latest complete checkpoint (0 if none)."""
    from longtrain.checkpoint import latest_complete, read_state

    tag = latest_complete(run_dir / "checkpoints")
    return int(read_state(tag)["global_step"]) if tag else 0


def train_base(runner: Runner, recipe_path: Path, data_dir: Path, steps: dict) -> Path:
    run_dir = runner.work / "runs" / "base"
    if runner.dry_run or finished_step(run_dir) < steps["base"]:
        # stop_after_steps ends the run at the end of stage 0, with its checkpoint (the one every
        # method resumes from); checkpoints every quarter give the held-out loss curve of the base.
        every = max(1, steps["base"] // 4)
        runner.longtrain("train base", [
            "train", "--config", recipe_path, "--run-dir", run_dir, "--resume", "auto",
            "--set", f"stages.0.data={data_dir / f'ds{BASE_L}'}", "--set", f"stages.0.steps={steps['base']}",
            "--set", f"stages.1.data={data_dir / 'ds512'}", "--set", f"train.stop_after_steps={steps['base']}",
            "--set", f"train.checkpoint_every={every}", "--set", "train.keep_checkpoints=0",
            "--set", f"train.log_every={max(1, steps['base'] // 40)}"])
    return run_dir


def train_method(runner: Runner, recipe_path: Path, base_ckpt: Path, run: dict, arm: dict,
                 data_dir: Path, steps: dict) -> Path:
    run_dir = runner.work / "runs" / run["dir"]
    done = 0 if runner.dry_run else finished_step(run_dir)
    if done >= steps["base"] + steps["extend"]:
        return run_dir
    resume = "auto" if done > steps["base"] else base_ckpt
    args = ["train", "--config", recipe_path, "--run-dir", run_dir, "--resume", resume]
    for item in method_overrides(arm, run["spec"], data_dir, run["seed"], steps):
        args += ["--set", item]
    args += ["--set", f"train.log_every={max(1, steps['extend'] // 10)}"]
    runner.longtrain(f"train {run['dir']}", args)
    return run_dir


# --------------------------------------------------------------------------------------------
# Training-free variants: the exported base model with another RoPE in its config.json.


def write_rope_variant(src: Path, dst: Path, rope: dict, original_max: int) -> Path:
    """Copy an exported HF folder and set another RoPE in its config (both the transformers 5.x
    ``rope_parameters`` form and the 4.x ``rope_theta``/``rope_scaling`` form, DESIGN.md section 3).

    ``max_position_embeddings`` stays the trained length: dynamic NTK rescales only beyond it.
    Parameters come from ``longtrain.rope.rope_parameters`` (what a training stage would set).
    """
    from longtrain.export import legacy_rope_keys
    from longtrain.rope import rope_parameters

    params = rope_parameters(rope, original_max_position_embeddings=original_max)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    config.update(rope_parameters=params, **legacy_rope_keys(params))  # as `longtrain export` writes them
    config["max_position_embeddings"] = original_max
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


# --------------------------------------------------------------------------------------------
# Numbers from eval's results.json: perplexity over position ranges, from the buckets.


def range_ppl(entry: dict, start: int, end: int) -> float | None:
    """Token-weighted perplexity over positions [start, end) from eval buckets (which must tile it)."""
    nll = tokens = 0.0
    for b in entry["buckets"]:
        if b["start"] >= start and b["end"] <= end and b["ppl"] is not None and b["tokens"]:
            nll += math.log(b["ppl"]) * b["tokens"]
            tokens += b["tokens"]
        elif b["start"] < end and b["end"] > start and not (b["start"] >= start and b["end"] <= end):
            raise ValueError(f"bucket [{b['start']}, {b['end']}) straddles [{start}, {end}): use --bucket-size "
                             f"dividing {start} and {end}")
    return math.exp(nll / tokens) if tokens else None


def model_numbers(model: dict, long_len: int, short: int = BASE_L, starved: int = BASE_L // 4) -> dict:
    """The numbers the study reports for one evaluated model (``None`` where a length is missing)."""
    ppl = model["perplexity"]
    out: dict = {"ppl_L": ppl.get(str(short), {}).get("ppl")}
    long = ppl.get(str(long_len))
    if long:
        out.update(ppl_long=long["ppl"], within=range_ppl(long, starved, short),
                   beyond=range_ppl(long, short, long_len), first=range_ppl(long, 0, starved))
        out["ratio"] = out["beyond"] / out["within"] if out["beyond"] and out["within"] else None
    return out


def mean_spread(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return sum(values) / len(values), (max(values) - min(values)) / 2 if len(values) > 1 else None


# --------------------------------------------------------------------------------------------
# Evaluation: `longtrain export` the base, write the training-free variants, `longtrain eval`.

HELDOUT_SETS = ("code", "prose")
BUCKET = 32  # divides L/4 = 32, L = 128 and every eval length: range_ppl needs whole buckets


def _model_mtime(path: Path) -> float:
    """When a model to evaluate last changed: its newest complete checkpoint, or its config.json."""
    from longtrain.checkpoint import COMPLETE_FILE, latest_complete

    tag = latest_complete(path / "checkpoints") if (path / "checkpoints").is_dir() else path
    for marker in (tag / COMPLETE_FILE if tag else None, path / "config.json"):
        if marker is not None and marker.is_file():
            return marker.stat().st_mtime
    return float("inf")  # unknown: evaluate again


def _variant_current(folder: Path, export: Path, rope: dict) -> bool:
    """A training-free variant written after the export, with this RoPE (else it is rewritten, and
    evaluated again since its config.json is then newer than the results)."""
    from longtrain.rope import rope_parameters

    config = folder / "config.json"
    if not config.is_file() or config.stat().st_mtime <= _model_mtime(export):
        return False
    want = rope_parameters(rope, original_max_position_embeddings=BASE_L)
    return json.loads(config.read_text(encoding="utf-8")).get("rope_parameters") == want


def eval_call(runner: Runner, label: str, out: Path, models: list[tuple[str, Path]], data: Path,
              lengths: list[int]) -> dict | None:
    """One `longtrain eval` over several models; skipped when a finished results.json has the same
    models and lengths and is newer than every model (a retrained model is evaluated again)."""
    names = [n for n, _ in models]
    done = out / "results.json"
    if not runner.dry_run and done.is_file():
        old = json.loads(done.read_text(encoding="utf-8"))
        fresh = all(_model_mtime(Path(p)) < done.stat().st_mtime for _, p in models)
        if fresh and "files" in old and [m["name"] for m in old["models"]] == names \
                and old["settings"]["lengths"] == lengths:
            return old
    args = ["eval", *[p for _, p in models], "--names", *names, "--data", data, "--lengths", *lengths,
            "--bucket-size", BUCKET, "--passkey-trials", 0, "--no-progress", "--out", out]
    runner.longtrain(label, args)
    return None if runner.dry_run else json.loads(done.read_text(encoding="utf-8"))


def evaluate(runner: Runner, work: Path, methods: dict, arms: list[str], runs: list[dict],
             base_dir: Path, steps: dict) -> dict:
    """All eval calls; returns {call name: results.json}."""
    from longtrain.checkpoint import tag_for

    base_ckpt = base_dir / "checkpoints" / tag_for(steps["base"])
    export = work / "export" / "base"
    if runner.dry_run or not (export / "config.json").is_file():
        runner.longtrain("export base", ["export", base_ckpt, export, "--dtype", "fp32", "--overwrite",
                                         "--no-progress"])
    results = {}
    heldout = work / "corpus" / "heldout"
    # Held-out perplexity at L of the base along its training (is it converged?).
    every = max(1, steps["base"] // 4)
    curve = [(f"base@{s}", base_dir / "checkpoints" / tag_for(s)) for s in range(every, steps["base"] + 1, every)]
    for kind in HELDOUT_SETS:
        results[f"curve_{kind}"] = eval_call(runner, f"eval curve {kind}", work / "eval" / f"curve_{kind}",
                                             curve, heldout / kind, [BASE_L])
    for arm_name in arms:
        arm = methods["arms"][arm_name]
        models = [("base-128", export)]
        for tf in arm.get("training_free", []):
            folder = work / "export" / "training_free" / f"{arm_name}_{tf['name']}"
            if not runner.dry_run and not _variant_current(folder, export, tf["rope"]):
                write_rope_variant(export, folder, tf["rope"], BASE_L)
            models.append((f"{tf['name']} (no training)", folder))
        models += [(f"{r['method']} s{r['seed']}", work / "runs" / r["dir"]) for r in runs if r["arm"] == arm_name]
        for kind in HELDOUT_SETS:
            results[f"{arm_name}_{kind}"] = eval_call(
                runner, f"eval {arm_name} {kind}", work / "eval" / f"{arm_name}_{kind}", models, heldout / kind,
                list(arm["eval_lengths"]))
    return results


# --------------------------------------------------------------------------------------------
# Report: tables, goal checks and plots from the eval results.


def _fmt(value: float | None, spread: float | None = None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")


def _pct(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.2f}%" + (f" ± {100 * spread:.2f}" if spread is not None else "")


def control_ppl(results: dict, runs: list[dict], kind: str) -> dict[int, float]:
    """ppl@L of the control (control-128: continued at L, base 10k) per seed, on one held-out set.

    The control lives in the 4x arm; the other arms share its base, steps and tokens, and evaluate
    ppl@L on the same windows, so their regression at L is measured against it too."""
    out = {}
    for r in runs:
        if r["method"] == "control-128":
            for m in results[f"{r['arm']}_{kind}"]["models"]:
                if m["name"] == f"control-128 s{r['seed']}":
                    out[r["seed"]] = m["perplexity"][str(BASE_L)]["ppl"]
    return out


def arm_numbers(res: dict, arm: dict, arm_runs: list[dict], control: dict[int, float]) -> dict:
    """{row name: {metric: (mean, spread over seeds)}} for the base, the training-free variants and
    each method (its seeds aggregated).

    ``regression``: mean ppl@L of the method over mean ppl@L of the control, minus 1; its spread is
    half the range over every (method seed, control seed) pair. Seeds are not paired: a seed is a
    data order, and the control reads another dataset (rows of 128), so seed i of both is no closer
    a match than any other pair."""
    by_name = {m["name"]: model_numbers(m, arm["seq_len"]) for m in res["models"]}
    method_models = {f"{r['method']} s{r['seed']}" for r in arm_runs}
    rows: dict[str, dict] = {n: {k: (v, None) for k, v in nums.items()}
                             for n, nums in by_name.items() if n not in method_models}
    for method in dict.fromkeys(r["method"] for r in arm_runs):
        mine = [r for r in arm_runs if r["method"] == method]
        seeds = [by_name[f"{method} s{r['seed']}"] for r in mine]
        rows[method] = {k: mean_spread([s.get(k) for s in seeds]) for k in {k for s in seeds for k in s}}
        rows[method]["seeds"] = len(seeds)
        ppl_l = [by_name[f"{method} s{r['seed']}"]["ppl_L"] for r in mine]
        if control:
            ratios = [p / c - 1 for p in ppl_l for c in control.values()]
            spread = (max(ratios) - min(ratios)) / 2 if len(ratios) > 1 else None
            rows[method]["regression"] = (mean_spread(ppl_l)[0] / mean_spread(list(control.values()))[0] - 1, spread)
    return rows


def arm_table(rows: dict, long_len: int) -> list[str]:
    lines = [f"| model | ppl@{BASE_L} | regression@{BASE_L} vs control | ppl@{long_len} | "
             f"ppl [0,{BASE_L // 4}) | ppl [{BASE_L // 4},{BASE_L}) | ppl [{BASE_L},{long_len}) | "
             f"[{BASE_L},{long_len}) / [{BASE_L // 4},{BASE_L}) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        get = lambda k: r.get(k, (None, None))  # noqa: E731
        lines.append(f"| {name} | {_fmt(*get('ppl_L'))} | {_pct(*get('regression'))} | {_fmt(*get('ppl_long'))} "
                     f"| {_fmt(*get('first'))} | {_fmt(*get('within'))} | {_fmt(*get('beyond'))} "
                     f"| {_fmt(*get('ratio'), digits=3)} |")
    return lines


def goal_checks(rows: dict, arm_runs: list[dict], long_len: int) -> list[dict]:
    """The issue's goals, per method, on one held-out set (means over seeds). ``value`` is a ratio
    (``unit`` "x") or a relative change (``unit`` "%")."""
    checks = []
    for method in dict.fromkeys(r["method"] for r in arm_runs):
        if method == "control-128":
            continue
        ratio = rows[method]["ratio"][0]
        checks.append({"goal": f"ppl [{BASE_L},{long_len}) / ppl [{BASE_L // 4},{BASE_L}) <= 1", "method": method,
                       "value": ratio, "unit": "x", "met": ratio is not None and ratio <= 1.0})
        reg = rows[method].get("regression", (None, None))[0]
        checks.append({"goal": f"regression at {BASE_L} <= 2%", "method": method, "value": reg, "unit": "%",
                       "met": reg is not None and reg <= 0.02})
    abf = [m for m in rows if m.startswith("abf")]
    pi = [m for m in rows if m.startswith("pi-") and "(no training)" not in m]
    if abf and pi:
        a, p = rows[abf[0]]["ppl_long"][0], rows[pi[0]]["ppl_long"][0]
        checks.append({"goal": f"ABF ppl@{long_len} <= PI ppl@{long_len}", "method": f"{abf[0]} vs {pi[0]}",
                       "value": a / p - 1 if a and p else None, "unit": "%",
                       "met": a is not None and p is not None and a <= p})
    return checks


def _check_value(check: dict) -> str:
    return _pct(check["value"]) if check["unit"] == "%" else _fmt(check["value"], digits=3)


def _curve(entry: dict, width: int) -> tuple[list[float], list[float]]:
    """Bucket perplexities merged to ``width`` positions (token-weighted), as (centres, ppl)."""
    merged: dict[int, list[float]] = {}
    for b in entry["buckets"]:
        if b["ppl"] is not None and b["tokens"]:
            acc = merged.setdefault(b["start"] // width, [0.0, 0.0])
            acc[0] += math.log(b["ppl"]) * b["tokens"]
            acc[1] += b["tokens"]
    keys = sorted(merged)
    return [(k + 0.5) * width for k in keys], [math.exp(merged[k][0] / merged[k][1]) for k in keys]


def _seed_mean_curve(entries: list[dict], width: int) -> tuple[list[float], list[float]]:
    curves = [_curve(e, width) for e in entries]
    xs = curves[0][0]
    ys = [math.exp(sum(math.log(c[1][i]) for c in curves) / len(curves)) for i in range(len(xs))]
    return xs, ys


# One colour per method family in every plot (trained and training-free alike).
COLORS = {"base10k": "C1", "abf": "C2", "ntk": "C3", "pi": "C4", "yarn": "C5", "dynamic": "C0", "control": "C7"}


def _style(label: str) -> dict:
    if label == "base-128":
        return {"color": "0.4", "ls": "--"}
    return {"color": COLORS.get(label.split("-")[0], "C9")}


def _arm_groups(results: dict, arm_name: str, kind: str, length: int, select) -> dict[str, list[dict]]:
    """{plot label: [eval entries at ``length``, one per seed]} for the models ``select`` keeps."""
    groups: dict[str, list[dict]] = {}
    for m in results[f"{arm_name}_{kind}"]["models"]:
        label = select(m["name"])
        if label and str(length) in m["perplexity"]:
            groups.setdefault(label, []).append(m["perplexity"][str(length)])
    return groups


def plot_arm(path: Path, results: dict, arm_name: str, length: int, select, title: str, width: int,
             relative_to: str | None = None) -> Path:
    """Perplexity by position at ``length``, one column per held-out set, seeds averaged (geometric).
    With ``relative_to``, a second row shows each curve relative to that model's (in %), where
    differences of a few percent that the log scale hides are visible."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    rows = 2 if relative_to else 1
    fig = Figure(figsize=(11, 3.9 * rows), layout="constrained")
    axes = fig.subplots(rows, len(HELDOUT_SETS), squeeze=False)
    for col, kind in enumerate(HELDOUT_SETS):
        groups = _arm_groups(results, arm_name, kind, length, select)
        curves = {label: _seed_mean_curve(entries, width) for label, entries in groups.items()}
        ax = axes[0, col]
        for label, (xs, ys) in curves.items():
            style = _style(label)
            ax.plot(xs, ys, marker="o", ms=2.5, lw=1.3, label=label, **style)
            if relative_to and relative_to in curves and label != "base-128":
                ref = curves[relative_to][1]
                axes[1, col].plot(xs, [100 * (y / r - 1) for y, r in zip(ys, ref)], marker="o", ms=2.5,
                                  lw=1.3, label=label, **style)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "2358" else ""))
        ax.set_ylabel("held-out perplexity")
        ax.set_title(f"{title}: held-out {kind}", fontsize=10)
        if relative_to:
            axes[1, col].axhline(0, color="k", lw=0.8)
            axes[1, col].set_ylabel(f"% vs {relative_to}")
        for a in axes[:, col]:
            a.axvline(BASE_L, color="k", ls=":", lw=1)
            a.set_xlabel(f"position (bucket of {width}); dotted: L = {BASE_L}")
            a.grid(alpha=0.3, which="both")
            a.legend(fontsize=7)
    fig.savefig(path, dpi=80)
    return path


def plot_base(path: Path, work: Path, results: dict) -> Path:
    """Training loss of the base (stage 0) and held-out perplexity at L at its checkpoints."""
    from matplotlib.figure import Figure

    records = [json.loads(line) for line in (work / "runs" / "base" / "metrics.jsonl").read_text().splitlines()]
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    k = max(1, len(losses) // 100)
    smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1]) for i in range(len(losses))]
    ax1.plot(steps, smooth, lw=1.2)
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"training loss (moving mean of {k + 1})")
    ax1.set_title(f"base: training loss at L = {BASE_L}", fontsize=10)
    ax1.grid(alpha=0.3)
    for kind in HELDOUT_SETS:
        pts = [(int(m["name"].split("@")[1]), m["perplexity"][str(BASE_L)]["ppl"])
               for m in results[f"curve_{kind}"]["models"]]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"held-out {kind}")
    ax2.set_xlabel("step")
    ax2.set_ylabel(f"perplexity at {BASE_L}")
    ax2.set_title("base: held-out perplexity along training", fontsize=10)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.savefig(path, dpi=90)
    return path


def report(work: Path, methods: dict, arms: list[str], runs: list[dict], results: dict, steps: dict,
           docs_dir: Path | None) -> dict:
    manifest = json.loads((work / "corpus" / "manifest.json").read_text(encoding="utf-8"))
    out: dict = {"steps": steps, "tokens_per_step": 2048, "manifest": manifest, "arms": {}, "checks": {}}
    md = ["# Long-context study: results", "",
          f"Base: {steps['base']} steps x 2048 tokens at L = {BASE_L}; each extension: {steps['extend']} steps "
          f"x 2048 tokens. Python {manifest['python']} stdlib. Numbers: held-out perplexity (mean ± half the "
          "spread over seeds where there are several).", ""]
    curve = {kind: {m["name"]: m["perplexity"][str(BASE_L)]["ppl"] for m in results[f"curve_{kind}"]["models"]}
             for kind in HELDOUT_SETS}
    out["base_curve"] = curve
    md += ["## Base along its training (perplexity at L)", "", "| checkpoint | " + " | ".join(HELDOUT_SETS) + " |",
           "|---|" + "---:|" * len(HELDOUT_SETS)]
    for name in curve[HELDOUT_SETS[0]]:
        md.append(f"| {name} | " + " | ".join(_fmt(curve[k][name]) for k in HELDOUT_SETS) + " |")
    for arm_name in arms:
        arm = methods["arms"][arm_name]
        arm_runs = [r for r in runs if r["arm"] == arm_name]
        out["arms"][arm_name] = {}
        for kind in HELDOUT_SETS:
            rows = arm_numbers(results[f"{arm_name}_{kind}"], arm, arm_runs, control_ppl(results, runs, kind))
            out["arms"][arm_name][kind] = rows
            md += ["", f"## Arm {arm_name} (L = {BASE_L} -> {arm['seq_len']}), held-out {kind}", ""]
            md += arm_table(rows, arm["seq_len"])
            checks = goal_checks(rows, arm_runs, arm["seq_len"])
            out["checks"][f"{arm_name}_{kind}"] = checks
            md += ["", "| goal | method | value | met |", "|---|---|---:|---|"]
            md += [f"| {c['goal']} | {c['method']} | {_check_value(c)} | {'yes' if c['met'] else 'NO'} |"
                   for c in checks]
        trap = _dynamic_trap_check(results, arm_name)
        if trap:
            out["checks"][f"{arm_name}_dynamic_reset"] = trap
            md += ["", f"Dynamic-NTK reset (trap b): ppl@{BASE_L} evaluated after ppl@{arm['seq_len']}, "
                       f"training-free dynamic vs base: " + ", ".join(f"{k} {v:.2e}" for k, v in trap.items())
                   + " (max relative difference; 0 means no stale base leaked)"]
    plots = {"study_base.png": plot_base(work / "study_base.png", work, results)}
    if "x4" in arms:
        plots["study_before.png"] = plot_arm(
            work / "study_before.png", results, "x4", methods["arms"]["x4"]["seq_len"],
            lambda n: n if (n == "base-128" or "(no training)" in n) else None, "before extension (no training)", 32)
        plots["study_after_x4.png"] = plot_arm(
            work / "study_after_x4.png", results, "x4", methods["arms"]["x4"]["seq_len"],
            lambda n: n if n == "base-128" else (n.rsplit(" s", 1)[0] if "(no training)" not in n
                                                 and not n.startswith("control") else None),
            f"after {steps['extend']} steps at 4L", 32, relative_to="base10k-512")
    if "x16" in arms:
        plots["study_x16.png"] = plot_arm(
            work / "study_x16.png", results, "x16", methods["arms"]["x16"]["seq_len"],
            lambda n: n if n == "base-128" else (n.rsplit(" s", 1)[0] if "(no training)" not in n else None),
            f"after {steps['extend']} steps at 16L", 128, relative_to="base10k-2048")
    out["plots"] = {k: str(v) for k, v in plots.items()}
    md += ["", "Plots: " + ", ".join(plots)]
    (work / "study_results.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    (work / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    if docs_dir is not None:
        for name, path in plots.items():
            shutil.copy(path, docs_dir / name)
    print("\n".join(md))
    return out


def _dynamic_trap_check(results: dict, arm_name: str) -> dict:
    """Max relative difference of ppl@L between training-free dynamic NTK and the base (must be ~0:
    dynamic NTK changes nothing up to L, unless a stale enlarged base leaked from the longer length)."""
    diffs = {}
    for kind in HELDOUT_SETS:
        models = {m["name"]: m for m in results[f"{arm_name}_{kind}"]["models"]}
        dyn = [n for n in models if n.startswith("dynamic") and "(no training)" in n]
        if dyn and "base-128" in models:
            a = models[dyn[0]]["perplexity"][str(BASE_L)]["ppl"]
            b = models["base-128"]["perplexity"][str(BASE_L)]["ppl"]
            diffs[kind] = abs(a / b - 1)
    return diffs


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default=str(REPO / "runs" / "study"), help="everything the study writes")
    p.add_argument("--shared-data", default=str(SHARED_DATA), help="the shared data folder (corpora/)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="extension seeds (data order)")
    p.add_argument("--arms", nargs="+", default=["x4", "x16"], help="arms of methods.yaml to run")
    p.add_argument("--base-steps", type=int, help="override stage 0 steps (default: recipe.yaml)")
    p.add_argument("--extend-steps", type=int, help="override stage 1 steps (default: recipe.yaml)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                   help="OMP threads per process (1 is fastest on a busy 2-core machine)")
    p.add_argument("--quick", action="store_true", help="tiny corpus and steps: checks the plumbing only")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--docs-dir", help="also copy the plots here (the repository's docs/)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir).resolve()
    recipe, methods = load_study()
    steps = {"base": recipe["stages"][0]["steps"], "extend": recipe["stages"][1]["steps"]}
    if args.quick:
        steps = {"base": 8, "extend": 4}
        args.seeds = args.seeds[:1]
    steps["base"] = args.base_steps or steps["base"]
    steps["extend"] = args.extend_steps or steps["extend"]
    unknown = [a for a in args.arms if a not in methods["arms"]]
    if unknown:
        raise SystemExit(f"--arms {unknown}: methods.yaml has {sorted(methods['arms'])}")
    runner = Runner(work, args.dry_run, args.threads)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    corpus = work / "corpus"
    if not (corpus / "manifest.json").is_file() and not args.dry_run:
        build_corpus(corpus, Path(args.shared_data), args.quick)
    tok_dir = work / "tokenizer"
    if args.dry_run or not (tok_dir / "tokenizer.model").is_file():
        runner.longtrain("tokenizer", ["tokenizer", "--input", corpus / "train", "--vocab-size",
                                       recipe["model"]["config"]["vocab_size"], "--out", tok_dir, "--overwrite"])
    data_dir = work / "data"
    for seq_len in seq_lens_needed(methods, args.arms):
        out = data_dir / f"ds{seq_len}"
        if args.dry_run or not (out / "meta.json").is_file():
            runner.longtrain(f"prepare {seq_len}", [
                "prepare", "--input", corpus / "train" / "prose", "--input", corpus / "train" / "code",
                "--tokenizer", tok_dir, "--seq-len", seq_len, "--out", out, "--overwrite", "--no-progress"])

    recipe_path = STUDY_CONFIGS / "recipe.yaml"
    base_dir = train_base(runner, recipe_path, data_dir, steps)
    from longtrain.checkpoint import tag_for

    base_ckpt = base_dir / "checkpoints" / tag_for(steps["base"])
    runs = plan_runs(methods, args.seeds, args.arms)
    for run in runs:
        train_method(runner, recipe_path, base_ckpt, run, methods["arms"][run["arm"]], data_dir, steps)

    results = evaluate(runner, work, methods, args.arms, runs, base_dir, steps)
    if not args.dry_run:
        report(work, methods, args.arms, runs, results, steps, Path(args.docs_dir) if args.docs_dir else None)
    total = time.perf_counter() - start
    if not args.dry_run:  # seconds per command; a re-run that skipped finished commands keeps their times
        path = work / "timings.json"
        timings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        timings.update(runner.timings)
        timings["invocations_s"] = timings.get("invocations_s", []) + [round(total, 1)]
        path.write_text(json.dumps(timings, indent=1) + "\n", encoding="utf-8")
    print(f"[study] finished in {total / 60:.1f} min; report: {work / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
