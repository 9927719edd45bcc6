"""The study plan: configs/study/recipe.yaml + methods.yaml -> runs, each a list of `longtrain train` overrides.

The recipe is data: ``recipe.yaml`` holds the model, the base stage and the extension stage;
``methods.yaml`` holds each method as overrides of the extension stage, grouped in arms (x4, x16).
Every method resumes from the same stage-0 checkpoint, so all share the base weights and optimizer
state and differ only in stage 1.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from longtrain.errors import UserError

REPO = Path(__file__).resolve().parents[2]
STUDY_CONFIGS = REPO / "configs" / "study"
RECIPE = STUDY_CONFIGS / "recipe.yaml"
BASE_L = 128  # the pretraining length of recipe.yaml (checked against it in load_study)
QUICK_STEPS = {"base": 8, "extend": 4}  # --quick: enough steps for a checkpoint, an export and an eval


def load_study(configs: Path = STUDY_CONFIGS) -> tuple[dict, dict]:
    recipe = yaml.safe_load((configs / "recipe.yaml").read_text(encoding="utf-8"))
    methods = yaml.safe_load((configs / "methods.yaml").read_text(encoding="utf-8"))
    base = recipe["stages"][0]
    if base["seq_len"] != BASE_L or recipe["model"]["config"]["max_position_embeddings"] != BASE_L:
        raise UserError(f"configs/study/recipe.yaml: the study assumes L = {BASE_L} (stage 0 seq_len and "
                         "model.config.max_position_embeddings)")
    return recipe, methods


def study_steps(recipe: dict, quick: bool, base_steps: int | None, extend_steps: int | None) -> dict:
    """Steps of the base stage and of every extension: recipe.yaml's, or --quick's, then the
    command line's overrides."""
    steps = {"base": recipe["stages"][0]["steps"], "extend": recipe["stages"][1]["steps"]}
    if quick:
        steps = dict(QUICK_STEPS)
    steps["base"] = base_steps or steps["base"]
    steps["extend"] = extend_steps or steps["extend"]
    return steps


def rope_override(rope: dict) -> str:
    """A RoPE mapping as one YAML flow value for ``--set stages.1.rope=...``."""
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
    """One run per (arm, seed, method); an arm's own ``seeds`` list narrows the requested seeds."""
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
    """The lengths of the datasets to prepare for these arms."""
    lens = {BASE_L, 512}  # recipe.yaml's stage 1 reads ds512 (every stage's dataset is checked at start)
    for arm_name in arms:
        arm = methods["arms"][arm_name]
        lens |= {m.get("seq_len", arm["seq_len"]) for m in arm["methods"]}
    return sorted(lens)
