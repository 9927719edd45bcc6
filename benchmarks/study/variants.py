"""Training-free variants: the exported base model with another RoPE in its config.json.

Each variant is a model folder that ``longtrain eval`` loads like any export; only ``config.json``
differs from the base's. Its parameters come from ``longtrain.rope.rope_parameters`` (what a
training stage would set), so a variant and a trained method with the same RoPE get the same
frequencies.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from longtrain.export import legacy_rope_keys
from longtrain.rope import rope_parameters


def write_rope_variant(src: Path, dst: Path, rope: dict, original_max: int) -> Path:
    """Copy an exported HF folder and set another RoPE in its config (both the transformers 5.x
    ``rope_parameters`` form and the 4.x ``rope_theta``/``rope_scaling`` form, DESIGN.md section 3).

    ``max_position_embeddings`` stays the trained length: dynamic NTK rescales only beyond it.
    """
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


def variant_is_current(folder: Path, rope: dict, original_max: int, newer_than: float) -> bool:
    """A variant written after ``newer_than`` (the export's time) with this RoPE. Otherwise it is
    rewritten, and evaluated again since its config.json is then newer than the results."""
    config = folder / "config.json"
    if not config.is_file() or config.stat().st_mtime <= newer_than:
        return False
    want = rope_parameters(rope, original_max_position_embeddings=original_max)
    return json.loads(config.read_text(encoding="utf-8")).get("rope_parameters") == want
