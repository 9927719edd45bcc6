"""The long-context study of issue 6 (docs/long_context_study.md), reproducible by one command.

Everything runs through longtrain's own command line, as a user would:

    longtrain tokenizer -> longtrain prepare -> longtrain train -> longtrain export -> longtrain eval

Usage (from the repository root; 131 minutes measured on 2 CPU cores shared with other jobs):

    .venv/bin/python -m benchmarks.study [--work-dir runs/study] [--seeds 0 1]

Re-running continues where it stopped: finished steps are skipped and interrupted training resumes
from its last checkpoint. Outputs under --work-dir: ``report.md`` (tables and goal checks),
``study_results.json`` (every number), ``study_*.png`` (plots), ``timings.json``, ``logs/``.
``--quick`` shrinks everything (steps, corpus) to check the plumbing in a few minutes;
``--dry-run`` prints the commands without running them.

``--from-base launch/quickstart_base`` runs the study from the shipped pretrained base instead
(benchmarks/study/from_base.py): ABF, PI and YaRN each extend it to 512 (200 steps, or
``--extend-steps``), dynamic NTK without training, all with the quickstart's retrieval probes;
default work dir ``runs/study_from_base``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.study.corpus import SHARED_DATA
from benchmarks.study.evaluation import evaluate
from benchmarks.study.from_base import run_from_base
from benchmarks.study.recipe import RECIPE, REPO, load_study, plan_runs, study_steps
from benchmarks.study.report import report
from benchmarks.study.runner import Runner, prepare_data, train_base, train_method
from longtrain.checkpoint import tag_for
from longtrain.errors import UserError, run_command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", help="everything the study writes (default: runs/study, or "
                   "runs/study_from_base with --from-base)")
    p.add_argument("--from-base", metavar="DIR", help="start from this pretrained HF base (e.g. "
                   "launch/quickstart_base): every method extends it to 512, probed for retrieval")
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
    """Bad input (an option, a missing corpus or base) is one line on stderr and exit 2, as for longtrain's
    own commands (longtrain.errors); a failed step exits 1 with its log's tail (runner.Runner)."""
    return run_command("python -m benchmarks.study", lambda: run_study(parse_args(argv)))


def run_study(args: argparse.Namespace) -> int:
    if args.from_base:
        return main_from_base(args)
    work = Path(args.work_dir or REPO / "runs" / "study").resolve()
    docs_dir = make_docs_dir(args)
    recipe, methods = load_study()
    steps = study_steps(recipe, args.quick, args.base_steps, args.extend_steps)
    if args.quick:
        args.seeds = args.seeds[:1]
    unknown = [a for a in args.arms if a not in methods["arms"]]
    if unknown:
        raise UserError(f"--arms {unknown}: methods.yaml has {sorted(methods['arms'])}")
    runner = Runner(work, args.dry_run, args.threads)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    data_dir = prepare_data(runner, recipe, methods, args.arms, Path(args.shared_data), args.quick)
    base_dir = train_base(runner, RECIPE, data_dir, steps)
    base_ckpt = base_dir / "checkpoints" / tag_for(steps["base"])
    runs = plan_runs(methods, args.seeds, args.arms)
    for run in runs:
        train_method(runner, RECIPE, base_ckpt, run, methods["arms"][run["arm"]], data_dir, steps)

    results = evaluate(runner, methods, args.arms, runs, base_dir, steps)
    if not args.dry_run:
        report(work, methods, args.arms, runs, results, steps, docs_dir)
    total = time.perf_counter() - start
    if not args.dry_run:
        write_timings(work / "timings.json", runner.timings, total)
    print(f"[study] finished in {total / 60:.1f} min; report: {work / 'report.md'}")
    return 0


def main_from_base(args: argparse.Namespace) -> int:
    base = Path(args.from_base).resolve()
    if not (base / "config.json").is_file() or not (base / "tokenizer.model").is_file():
        raise UserError(f"--from-base {base}: not a model folder with config.json and tokenizer.model")
    work = Path(args.work_dir or REPO / "runs" / "study_from_base").resolve()
    docs_dir = make_docs_dir(args)
    runner = Runner(work, args.dry_run, args.threads)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # 200 of the quickstart's 350 steps at 512: three trainings fit in ~30 min on 2 busy cores.
    steps = args.extend_steps or (4 if args.quick else 200)
    run_from_base(runner, base, steps, args.quick, docs_dir)
    total = time.perf_counter() - start
    if not args.dry_run:
        write_timings(work / "timings.json", runner.timings, total)
    print(f"[study] finished in {total / 60:.1f} min; report: {work / 'report_from_base.md'}")
    return 0


def make_docs_dir(args: argparse.Namespace) -> Path | None:
    """--docs-dir, created now: a path that cannot be a folder fails before the study's minutes of work,
    not at its end when the plots are copied."""
    if not args.docs_dir:
        return None
    path = Path(args.docs_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--docs-dir {path}: cannot create it ({e.strerror}); pass a folder path")
    return path


def write_timings(path: Path, timings: dict[str, float], total: float) -> None:
    """Seconds per command, merged into earlier runs' file: a re-run that skipped finished commands
    keeps their times; every invocation's total is appended."""
    merged = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    merged.update(timings)
    merged["invocations_s"] = merged.get("invocations_s", []) + [round(total, 1)]
    path.write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")
