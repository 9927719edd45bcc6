"""The study's outputs: ``report.md`` (tables and goal checks), ``study_results.json`` (every number), plots.

Tables show mean ± half the spread over seeds where an arm has several; every number in
docs/long_context_study.md comes from ``study_results.json``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks.study.analysis import arm_numbers, control_ppl, dynamic_trap_check, goal_checks
from benchmarks.study.corpus import HELDOUT_SETS
from benchmarks.study.plots import study_plots
from benchmarks.study.recipe import BASE_L


def _fmt(value: float | None, spread: float | None = None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")


def _pct(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.2f}%" + (f" ± {100 * spread:.2f}" if spread is not None else "")


def _check_value(check: dict) -> str:
    return _pct(check["value"]) if check["unit"] == "%" else _fmt(check["value"], digits=3)


def arm_table(rows: dict, long_len: int) -> list[str]:
    """The markdown table of one arm on one held-out set, one line per row of ``arm_numbers``."""
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


def _base_curve(results: dict, out: dict, md: list[str]) -> None:
    """The base's held-out ppl@L at its checkpoints (did it converge?)."""
    curve = {kind: {m["name"]: m["perplexity"][str(BASE_L)]["ppl"] for m in results[f"curve_{kind}"]["models"]}
             for kind in HELDOUT_SETS}
    out["base_curve"] = curve
    md += ["## Base along its training (perplexity at L)", "", "| checkpoint | " + " | ".join(HELDOUT_SETS) + " |",
           "|---|" + "---:|" * len(HELDOUT_SETS)]
    for name in curve[HELDOUT_SETS[0]]:
        md.append(f"| {name} | " + " | ".join(_fmt(curve[k][name]) for k in HELDOUT_SETS) + " |")


def _arm_section(arm_name: str, arm: dict, runs: list[dict], results: dict, out: dict, md: list[str]) -> None:
    """One arm: per held-out set its table and goal checks, then the dynamic-NTK reset check."""
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
    trap = dynamic_trap_check(results, arm_name)
    if trap:
        out["checks"][f"{arm_name}_dynamic_reset"] = trap
        md += ["", f"Dynamic-NTK reset (trap b): ppl@{BASE_L} evaluated after ppl@{arm['seq_len']}, "
                   f"training-free dynamic vs base: " + ", ".join(f"{k} {v:.2e}" for k, v in trap.items())
               + " (max relative difference; 0 means no stale base leaked)"]


def report(work: Path, methods: dict, arms: list[str], runs: list[dict], results: dict, steps: dict,
           docs_dir: Path | None) -> dict:
    """Write report.md, study_results.json and the plots under ``work`` (plots also into
    ``docs_dir``), print the report; return what study_results.json holds."""
    manifest = json.loads((work / "corpus" / "manifest.json").read_text(encoding="utf-8"))
    out: dict = {"steps": steps, "tokens_per_step": 2048, "manifest": manifest, "arms": {}, "checks": {}}
    md = ["# Long-context study: results", "",
          f"Base: {steps['base']} steps x 2048 tokens at L = {BASE_L}; each extension: {steps['extend']} steps "
          f"x 2048 tokens. Python {manifest['python']} stdlib. Numbers: held-out perplexity (mean ± half the "
          "spread over seeds where there are several).", ""]
    _base_curve(results, out, md)
    for arm_name in arms:
        _arm_section(arm_name, methods["arms"][arm_name], runs, results, out, md)
    plots = study_plots(work, results, methods, arms, steps)
    out["plots"] = {k: str(v) for k, v in plots.items()}
    md += ["", "Plots: " + ", ".join(plots)]
    (work / "study_results.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    (work / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    if docs_dir is not None:
        for name, path in plots.items():
            shutil.copy(path, docs_dir / name)
    print("\n".join(md))
    return out
