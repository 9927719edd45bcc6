"""`longtrain eval --wandb PROJECT[/NAME]`: the summary table as a W&B Table, the plots as images.

The table is the Markdown summary that `longtrain eval` prints and writes to summary.md, parsed back
into columns, so whatever that table shows (perplexity, passkey, probes) reaches W&B unchanged.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from longtrain.eval.errors import EvalError
from longtrain.eval.report import markdown_table


def check_wandb(spec: str | None) -> tuple[str, str | None] | None:
    """``(project, name)`` of ``--wandb PROJECT[/NAME]``, None without it; an EvalError before any model
    is evaluated when wandb is not installed."""
    if spec is None:
        return None
    project, _, name = spec.partition("/")
    if not project:
        raise EvalError(f"--wandb {spec!r}: expected PROJECT or PROJECT/NAME")
    if importlib.util.find_spec("wandb") is None:
        raise EvalError("--wandb: the wandb package is not installed (pip install 'longtrain[wandb]')")
    return project, name or None


def table_rows(markdown: str) -> tuple[list[str], list[list]]:
    """Columns and rows of a Markdown table (numbers as floats, ``-`` as None)."""
    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    def value(text: str):
        if text == "-":
            return None
        try:
            return float(text)
        except ValueError:
            return text

    lines = [line for line in markdown.splitlines() if line.strip().startswith("|")]
    return cells(lines[0]), [[value(c) for c in cells(line)] for line in lines[2:]]


def log_eval(results: dict, out_dir: str | Path, project: str, name: str | None, mode: str | None = None) -> str:
    """One W&B run: the settings as its config, ``eval/summary`` (Table), ``eval/<plot>`` (Image) and
    results.json as a run file. Returns the run's local folder."""
    # Imported here: wandb is an optional extra (check_wandb said it is installed).
    import wandb

    out = Path(out_dir)
    run = wandb.init(project=project, name=name or out.resolve().name, mode=mode, job_type="eval",
                     config=results.get("settings", {}), dir=os.environ.get("WANDB_DIR") or str(out))
    columns, rows = table_rows(markdown_table(results))
    logged = {"eval/summary": wandb.Table(columns=columns, data=rows)}
    for key, path in results.get("files", {}).items():
        if str(path).endswith(".png"):
            logged[f"eval/{key}"] = wandb.Image(str(path))
    run.log(logged)
    if (out / "results.json").is_file():
        run.save(str(out / "results.json"), base_path=str(out), policy="now")
    folder = run.dir
    run.finish()
    return folder
