"""The study from the shipped base (``--from-base launch/quickstart_base``): which RoPE methods keep retrieval.

Every method continues the same pretrained base (L = 128, base 10k) in the quickstart's last stage
(its 512 = 4L stage, configs/study/from_base.yaml; 200 of its 350 steps x 2048 tokens by default) on the quickstart's data (the
stdlib's top-level modules at weight 0.5 plus synthetic copy and key-value documents, prepared with
the base's tokenizer); dynamic NTK is the base itself with a dynamic RoPE in its config (no
training). All are evaluated on the quickstart's held-out packages:
perplexity at 128 and 512, repeat-copy gain at d = 96 (0.75 L) and 480 (3.75 L), key-value retrieval
at 128 and 512, one ``longtrain eval`` per model. Outputs under the work dir: ``report_from_base.md``, ``from_base_results.json``,
``study_from_base.png``.
"""
from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from benchmarks.study.evaluation import model_mtime  # noqa: E402
from benchmarks.study.recipe import BASE_L, STUDY_CONFIGS, rope_override  # noqa: E402
from benchmarks.study.runner import Runner, finished_step  # noqa: E402
from benchmarks.study.variants import variant_is_current, write_rope_variant  # noqa: E402

CONFIG = STUDY_CONFIGS / "from_base.yaml"
LONG = 512
TRAINED = {"pi-4": {"type": "linear", "factor": 4, "theta": 10000},
           "yarn-4": {"type": "yarn", "factor": 4, "theta": 10000},
           "abf-1e6": {"type": "default", "theta": 1000000}}   # the quickstart's method
TRAINING_FREE = {"dynamic-ntk-4": {"type": "dynamic", "factor": 4, "theta": 10000}}
HELD_OUT = ("email", "json", "http", "logging")  # the quickstart's held-out stdlib packages
COPY_D = (96, 480)
# Retrieval is kept at 4L when both probes stay at the quickstart's goals (issue 15).
KEEP_GAIN, KEEP_KV = 1.0, 0.8


def prepare(runner: Runner, base: Path, quick: bool) -> tuple[Path, Path]:
    """The quickstart's 512-token dataset (launch/quickstart.sh step 2) and held-out folder."""
    stdlib = sysconfig.get_paths()["stdlib"]
    src, docs = f"{stdlib}/*.py", 40 if quick else 1200
    data = runner.work / "data" / f"ext{LONG}"
    if runner.dry_run or not (data / "meta.json").is_file():
        syn = f"docs={docs}&source={src}"
        runner.longtrain("prepare 512", [
            "prepare", "--tokenizer", base / "tokenizer.model", "--seq-len", LONG, "--strategy", "slide-window",
            "--stride", LONG * 3 // 4, "--input", f"{src}:0.5",
            "--input", f"synthetic:copy?{syn}&min_passage=8&max_passage=32",
            "--input", f"synthetic:copy?docs={docs // 2}&source={src}&min_passage=8&max_passage=32&passage=words",
            "--input", f"synthetic:copy?{syn}&min_passage=16&max_passage=32&min_distance={LONG // 2}",
            "--input", f"synthetic:kv?{syn}&keys=4", "--out", data, "--skip-bad", "--seed", 0, "--overwrite",
            "--no-progress"])
    held = runner.work / "held_out"
    if not runner.dry_run and not held.is_dir():
        tmp = held.with_name("held_out.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for pkg in HELD_OUT:
            for f in sorted((Path(stdlib) / pkg).glob("*.py")):
                shutil.copy(f, tmp / f"{pkg}_{f.name}")
        tmp.rename(held)
    return data, held


def train(runner: Runner, base: Path, data: Path, name: str, rope: dict, steps: int) -> Path:
    """One method: the base continued at 512 with this RoPE (resumes when interrupted)."""
    run_dir = runner.work / "runs" / name
    if not runner.dry_run and finished_step(run_dir) >= steps:
        return run_dir
    runner.longtrain(f"train {name}", [
        "train", "--config", CONFIG, "--run-dir", run_dir, "--resume", "auto",
        "--set", f"model.name_or_path={base}", "--set", f"model.tokenizer={base / 'tokenizer.model'}",
        "--set", f"stages.0.data={data}", "--set", f"stages.0.rope={rope_override(rope)}",
        "--set", f"stages.0.steps={steps}", "--set", f"train.log_every={max(1, steps // 14)}"])
    return run_dir


def probe_args(quick: bool) -> list:
    """The quickstart's probes (launch/quickstart.sh step 5), passkey off."""
    n = (2, 2, 2048) if quick else (128, 40, 60000)
    return ["--lengths", BASE_L, LONG, "--copy-distances", *COPY_D, "--copy-passages", n[0],
            "--kv-lengths", BASE_L, LONG, "--kv-trials", n[1], "--max-tokens", n[2], "--passkey-trials", 0,
            "--seed", 0, "--no-progress"]


def run_from_base(runner: Runner, base: Path, steps: int, quick: bool, docs_dir: Path | None) -> dict | None:
    data, held = prepare(runner, base, quick)
    models = [("base-128", base)]
    for name, rope in TRAINING_FREE.items():
        folder = runner.work / "export" / name
        if not runner.dry_run and not variant_is_current(folder, rope, BASE_L, model_mtime(base)):
            write_rope_variant(base, folder, rope, BASE_L)
        models.append((f"{name} (no training)", folder))
    for name, rope in TRAINED.items():
        models.append((name, train(runner, base, data, name, rope, steps)))
    results = {"models": [m for name, path in models for m in eval_model(runner, name, path, held, quick)]}
    return None if runner.dry_run else write_report(runner.work, results, steps, docs_dir)


def eval_model(runner: Runner, name: str, path: Path, held: Path, quick: bool) -> list[dict]:
    """One `longtrain eval` per model (its models list), skipped while its results.json is newer
    than the model: a re-run evaluates only what changed (probes are seeded per model, so one
    call per model gives the numbers one call over all would)."""
    out = runner.work / "eval" / name.split(" ")[0]
    done = out / "results.json"
    if runner.dry_run or not done.is_file() or model_mtime(path) >= done.stat().st_mtime:
        runner.longtrain(f"eval {name.split(' ')[0]}", ["eval", path, "--names", name, "--data", held, "--out", out,
                                                         *probe_args(quick)])
    return [] if runner.dry_run else json.loads(done.read_text(encoding="utf-8"))["models"]


def method_rows(results: dict) -> dict[str, dict]:
    """Per model: ppl at 128 and 512, copy gain at 96 and 480, kv accuracy at 128 and 512 (mean
    over depths) and whether it keeps retrieval at 4L."""
    rows = {}
    for m in results["models"]:
        gain = {c["distance"]: c["gain"] for c in m.get("copy", [])}
        kv = {int(k): sum(v.values()) / len(v) for k, v in m.get("kv", {}).items()}
        ppl = {int(k): v["ppl"] for k, v in m["perplexity"].items()}
        row = {"ppl_128": ppl.get(BASE_L), "ppl_512": ppl.get(LONG), "copy_96": gain.get(COPY_D[0]),
               "copy_480": gain.get(COPY_D[1]), "kv_128": kv.get(BASE_L), "kv_512": kv.get(LONG)}
        row["keeps_retrieval"] = (row["copy_480"] or -1e9) >= KEEP_GAIN and (row["kv_512"] or 0) >= KEEP_KV
        rows[m["name"]] = row
    return rows


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def write_report(work: Path, results: dict, steps: int, docs_dir: Path | None) -> dict:
    rows = method_rows(results)
    md = ["# Long-context study from the shipped base: which methods keep retrieval", "",
          f"Each trained method: {steps} steps x 2048 tokens at {LONG} from launch/quickstart_base (L = {BASE_L}, "
          "base 10k). Held-out stdlib packages " + "/".join(HELD_OUT) + ".", "",
          f"| model | ppl@{BASE_L} | ppl@{LONG} | copy gain d={COPY_D[0]} | copy gain d={COPY_D[1]} "
          f"| kv@{BASE_L} | kv@{LONG} | keeps retrieval at 4L |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        md.append(f"| {name} | {_f(r['ppl_128'], '.2f')} | {_f(r['ppl_512'], '.2f')} | {_f(r['copy_96'], '+.2f')} "
                  f"| {_f(r['copy_480'], '+.2f')} | {_f(r['kv_128'], '.2f')} | {_f(r['kv_512'], '.2f')} "
                  f"| {'yes' if r['keeps_retrieval'] else 'no'} |")
    md += ["", f"Keeps retrieval: copy gain >= {KEEP_GAIN} nat at d = {COPY_D[1]} and kv >= {KEEP_KV} at {LONG}."]
    plot = work / "study_from_base.png"
    plot_rows(rows, plot)
    out = {"steps": steps, "rows": rows, "plot": str(plot)}
    (work / "from_base_results.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    (work / "report_from_base.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    if docs_dir is not None:
        shutil.copy(plot, docs_dir / plot.name)
    print("\n".join(md))
    return out


def plot_rows(rows: dict[str, dict], path: Path) -> None:
    """Three panels of grouped bars, one bar per model: copy gain, kv accuracy, perplexity."""
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("copy gain (nats/token)", ("copy_96", "copy_480"), (f"d={COPY_D[0]}", f"d={COPY_D[1]}")),
              ("key-value retrieval accuracy", ("kv_128", "kv_512"), (f"{BASE_L}", f"{LONG}")),
              ("perplexity", ("ppl_128", "ppl_512"), (f"@{BASE_L}", f"@{LONG}"))]
    width = 0.8 / len(names)
    for ax, (title, keys, labels) in zip(axes, panels):
        for i, name in enumerate(names):
            vals = [rows[name][k] if rows[name][k] is not None else 0.0 for k in keys]
            ax.bar([j + (i - (len(names) - 1) / 2) * width for j in range(len(keys))], vals, width, label=name)
        ax.set_xticks(range(len(keys)), labels)
        ax.set_title(title)
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"From the shipped base (L = {BASE_L}): extended to {LONG} by each method")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
