"""The model files of an export: safetensors shards in the export dtype, ``config.json`` and
``generation_config.json``.

Trap handled (DESIGN.md section 3): transformers 5.x writes only ``rope_parameters`` and 4.4x then
silently loads base 10000, so ``config.json`` also gets ``rope_theta`` and ``rope_scaling``.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import GenerationConfig

from longtrain.export.errors import ExportError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def tensors_to_save(model) -> dict[str, torch.Tensor]:
    """The model's state dict without tied aliases (``lm_head.weight`` when tied to the embeddings):
    the first name of each shared parameter is kept, as ``save_pretrained`` does."""
    unique = {name for name, _ in model.named_parameters()}
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - unique
    return {k: v for k, v in model.state_dict().items() if k not in aliases}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_weights(tensors: dict[str, torch.Tensor], out: Path, dtype: torch.dtype, max_shard_size: int | str,
                  progress: bool = True) -> list[str]:
    """safetensors shards in ``dtype`` (one tensor converted at a time), plus
    ``model.safetensors.index.json`` when there is more than one. Returns the file names."""

    # Plan on meta tensors of the output dtype, so shard sizes are those of the files written.
    planned = {k: torch.empty(v.shape, dtype=dtype if v.is_floating_point() else v.dtype, device="meta")
               for k, v in tensors.items()}
    try:
        plan = split_torch_state_dict_into_shards(planned, filename_pattern="model{suffix}.safetensors",
                                                  max_shard_size=max_shard_size)
    except ValueError as exc:
        raise ExportError(f"--max-shard-size {max_shard_size!r}: {exc} (examples: 5GB, 500MB, 2000000000)") from None
    for filename, names in tqdm(plan.filename_to_tensors.items(), desc="writing shards", unit="shard",
                                disable=not progress):
        shard = {}
        for name in names:
            source = tensors[name]
            value = source.to(dtype) if source.is_floating_point() else source
            if not torch.isfinite(value).all() and torch.isfinite(source).all():
                raise ExportError(f"{name}: values beyond the range of {str(dtype).replace('torch.', '')} (max |w| = "
                                  f"{source.abs().max().item():.4g}); export with --dtype bf16 or fp32")
            shard[name] = value.contiguous()
        save_file(shard, out / filename, metadata={"format": "pt"})
        os.chmod(out / filename, 0o666 & ~_umask())  # safetensors creates its files owner-only (0600)
    files = list(plan.filename_to_tensors)
    if plan.is_sharded:
        index = {"metadata": dict(plan.metadata), "weight_map": dict(plan.tensor_to_filename)}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append("model.safetensors.index.json")
    return files


def legacy_rope_keys(rope_params: dict[str, Any]) -> dict[str, Any]:
    """``rope_theta`` + ``rope_scaling`` as transformers 4.4x reads them (null scaling for default).

    transformers 5.x reads these keys too: a non-null ``rope_scaling`` replaces ``rope_parameters``
    and ``rope_theta`` fills its base (``convert_rope_params_to_dict``), which gives the same dict.
    """
    out: dict[str, Any] = {"rope_theta": rope_params["rope_theta"]}
    scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    out["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    if scaling.get("rope_type") == "longrope" and "original_max_position_embeddings" in scaling:
        # 4.4x's LongRoPE reads the pretraining length from the top level (Phi-3's layout).
        out["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    return out


def yarn_compat_note(rope_params: dict[str, Any], max_position_embeddings: int) -> str | None:
    """What transformers 4.x makes of a YaRN ``rope_scaling`` (read in the 4.46 and 4.51 sources and
    checked by running them): 4.46 takes YaRN's correction range from ``max_position_embeddings``;
    4.51 takes it from ``original_max_position_embeddings`` but replaces ``factor`` by
    ``max_position_embeddings / original_max_position_embeddings``."""
    if rope_params.get("rope_type") != "yarn":
        return None
    original, factor = rope_params["original_max_position_embeddings"], float(rope_params["factor"])
    note = (f"YaRN in transformers 4.x: 4.46 and older compute the frequencies from max_position_embeddings "
            f"({max_position_embeddings}) instead of original_max_position_embeddings ({original}), so they differ "
            f"from training")
    implied = max_position_embeddings / original
    if abs(implied - factor) > 1e-9:
        note += (f"; 4.51 replaces factor {factor:g} by max_position_embeddings / original_max_position_embeddings "
                 f"= {implied:g}; load with transformers 5.x")
    else:
        note += "; load with transformers >= 4.51 or 5.x"
    return note


def write_config(hf_config, model_cls_name: str, dtype: torch.dtype, token_ids: dict[str, int | None],
                 out: Path) -> dict[str, Any]:
    """``config.json``: the checkpoint's HF config for inference (cache on), the export dtype as both
    ``dtype`` and ``torch_dtype``, token ids of the exported tokenizer, and RoPE in both forms."""

    config = copy.deepcopy(hf_config)
    config.use_cache = True  # training turned the KV cache off; generation wants it
    config.architectures = [model_cls_name]
    for key, value in token_ids.items():
        if value is not None:
            setattr(config, key, value)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        config.save_pretrained(tmp)
        data = json.loads((Path(tmp) / "config.json").read_text(encoding="utf-8"))
    name = str(dtype).replace("torch.", "")
    data.update(dtype=name, torch_dtype=name, **legacy_rope_keys(dict(config.rope_parameters)))
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return data


def write_generation_config(out: Path, token_ids: dict[str, int | None]) -> None:

    GenerationConfig(**{k: v for k, v in token_ids.items() if v is not None}).save_pretrained(out)
