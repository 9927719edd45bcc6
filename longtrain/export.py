"""Export a longtrain checkpoint to a Hugging Face model folder, and verify it (docs/export.md).

Steps (``export_checkpoint``): pick a complete checkpoint tag folder; consolidate the fp32 weights
with DeepSpeed's own ``deepspeed.utils.zero_to_fp32`` (ZeRO 1/2/3, with or without optimizer offload;
ZeRO-0 and DeepSpeed's BF16_Optimizer are read from the same files by the lower-level functions);
rebuild the HF model from the checkpoint's ``hf_config/`` (the stage's RoPE); write safetensors shards
in the export dtype, a ``config.json`` carrying RoPE in both forms, tokenizer files, a generation
config and a model card into a temporary sibling folder; verify that folder by loading it with
``from_pretrained``; rename it into place. A failed step leaves no folder at the output path.

Traps handled (DESIGN.md section 3): transformers 5.x writes only ``rope_parameters`` and 4.4x then
silently loads base 10000, so ``config.json`` also gets ``rope_theta`` and ``rope_scaling``;
``inv_freq`` is a non-persistent buffer, so the loaded model's frequencies are checked against the
stage's; 5.x tokenizer configs do not load in 4.x, so the tokenizer is written as a plain
``PreTrainedTokenizerFast`` over ``tokenizer.json`` with ``tokenizer.model`` alongside.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from longtrain import checkpoint

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PREFIX = "hf_model."  # longtrain.trainer.CausalLMLoss holds the HF model as `hf_model`
TOKENIZER_DIR = "tokenizer"
# Logits of the export loaded in its own dtype vs the fp32 checkpoint model, relative to the largest
# |logit| of the reference (at least 1). bf16 keeps 8 significant bits, fp16 11, and the rounding
# compounds over layers: random 20M-70M-parameter Llamas show up to 5% (bf16) and 0.6% (fp16), trained
# models with activation outliers more (docs/export.md). These bounds only flag a broken export (NaN,
# inf, fp16 overflow, wrong weights: errors of order 100%); exactness is checked separately and
# without tolerance (same dtype, same weights, same logits).
NATIVE_RTOL = {torch.float32: 1e-6, torch.bfloat16: 0.25, torch.float16: 0.1}
FP32_ATOL = 1e-5  # absolute bound for fp32 exports (the acceptance bound)


class ExportError(ValueError):
    """A checkpoint or output that cannot be exported; the message says which path and what to do."""


# ------------------------------------------------------------------------------------ selection


def _tag_of(tag: str) -> str:
    """``step_00000008`` or ``8`` -> ``step_00000008``."""
    return checkpoint.tag_for(int(tag)) if tag.isdigit() else tag


def select_checkpoint(path: str | Path, tag: str | None = None, log: Callable[[str], None] = print) -> Path:
    """The complete tag folder to export: ``path`` itself (a tag folder), or in a run folder /
    ``checkpoints/`` folder the tag ``tag`` or else the newest complete one."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"CHECKPOINT {path}: does not exist")
    if not path.is_dir():
        raise ExportError(f"CHECKPOINT {path}: is a file; pass a run folder, its checkpoints/ folder or a "
                          f"step_XXXXXXXX checkpoint folder")
    is_tag = ((path / checkpoint.STATE_FILE).exists() or (path / checkpoint.COMPLETE_FILE).exists()
              or (path.name.startswith("step_") and path.name[5:].isdigit()))
    if is_tag:
        if tag is not None and _tag_of(tag) != path.name:
            raise ExportError(f"--tag {tag}: CHECKPOINT {path} is already one checkpoint ({path.name}); pass its run "
                              f"folder to choose another tag")
        tag_dir = path
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        done = checkpoint.complete_checkpoints(root)
        names = [d.name for d in done]
        if tag is not None:
            tag_dir = root / _tag_of(tag)
            if not tag_dir.is_dir():
                raise ExportError(f"--tag {tag}: no checkpoint {tag_dir.name} in {root}; complete checkpoints: "
                                  f"{', '.join(names) or 'none'}")
        elif done:
            tag_dir = done[-1]
            newer = sorted(p.name for p in root.glob("step_*") if p.is_dir() and p.name > tag_dir.name)
            if newer:
                log(f"note: skipping {', '.join(newer)} (no {checkpoint.COMPLETE_FILE} marker: cut off while being "
                    f"written); exporting {tag_dir.name}")
        else:
            hint = " (it looks like an exported Hugging Face folder)" if (path / "config.json").is_file() else ""
            raise ExportError(f"CHECKPOINT {path}: not a longtrain checkpoint{hint}: expected a run folder, its "
                              f"checkpoints/ folder or a step_XXXXXXXX folder with {checkpoint.STATE_FILE} and "
                              f"{checkpoint.COMPLETE_FILE}")
    if not checkpoint.is_complete(tag_dir):
        raise ExportError(f"{tag_dir}: checkpoint is incomplete (no {checkpoint.COMPLETE_FILE} marker: it was cut off "
                          f"while being written); export an earlier one (--tag)")
    if not any(tag_dir.glob("*_model_states.pt")):
        raise ExportError(f"{tag_dir}: not a DeepSpeed checkpoint (no *_model_states.pt file); the DeepSpeed files "
                          f"of this checkpoint are missing")
    if not (tag_dir / checkpoint.HF_CONFIG_DIR / "config.json").is_file():
        raise ExportError(f"{tag_dir}: no {checkpoint.HF_CONFIG_DIR}/config.json (the model config at this step); "
                          f"was it written by `longtrain train`?")
    return tag_dir


# ------------------------------------------------------------------------------------ consolidation


def consolidate_state_dict(tag_dir: Path, log: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """fp32 weights of the HF model saved in a DeepSpeed tag folder, names without ``hf_model.``.

    ZeRO 1/2/3 go through ``get_fp32_state_dict_from_zero_checkpoint`` (DESIGN.md section 3: exact,
    tied embeddings included). Two layouts it refuses are read with its lower-level functions:
    ZeRO-0 (weights only in the model states file) and DeepSpeed's BF16_Optimizer (bf16 with ZeRO-0/1:
    the same partitioned fp32 groups as ZeRO-1/2, but without the ``zero_stage`` key it looks for).
    """
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, SINGLE_PARTITION_OF_FP32_GROUPS, ZERO_STAGE
    from deepspeed.utils import zero_to_fp32

    optim_files = sorted(tag_dir.glob("*_optim_states.pt"), key=lambda p: zero_to_fp32.natural_keys(p.name))
    try:
        if not optim_files:
            raw = _zero0_state_dict(tag_dir, log)
        else:
            head = torch.load(optim_files[0], map_location="cpu", mmap=True, weights_only=False)
            opt = head.get(OPTIMIZER_STATE_DICT, {})
            if ZERO_STAGE in opt:
                raw = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
            elif SINGLE_PARTITION_OF_FP32_GROUPS in opt:
                raw = _bf16_optimizer_state_dict(tag_dir, optim_files)
            else:
                raise ExportError(f"{optim_files[0]}: unknown DeepSpeed optimizer state layout (keys {sorted(opt)})")
    except ExportError:
        raise
    except Exception as exc:  # torch.load / DeepSpeed raise many types for a missing or damaged file
        raise ExportError(f"{tag_dir}: DeepSpeed could not consolidate this checkpoint ({type(exc).__name__}: "
                          f"{exc}); a file may be missing or damaged, export an earlier checkpoint (--tag)") from exc
    bad = sorted(k for k in raw if not k.startswith(PREFIX))
    if bad:
        raise ExportError(f"{tag_dir}: parameter names without the {PREFIX!r} prefix ({bad[:3]}); not a checkpoint "
                          f"of longtrain's trainer")
    return {k[len(PREFIX):]: v for k, v in raw.items()}


def _zero0_state_dict(tag_dir: Path, log: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """ZeRO disabled: the module's own weights are in ``mp_rank_00_model_states.pt``."""
    path = tag_dir / "mp_rank_00_model_states.pt"
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)  # mmap: skip the optimizer state
    stage = int(((state.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
    if stage > 0:  # ZeRO keeps the fp32 weights only in the optimizer state files
        raise ExportError(f"{tag_dir}: a ZeRO-{stage} checkpoint without its *_optim_states.pt files (they hold the "
                          f"fp32 weights); the checkpoint is damaged, export an earlier one (--tag)")
    module = state.get("module")
    if not isinstance(module, dict) or not module:
        raise ExportError(f"{path}: no module weights in this DeepSpeed model states file")
    dtypes = {v.dtype for v in module.values() if v.is_floating_point()}
    if dtypes != {torch.float32}:
        # fp16 without ZeRO keeps its fp32 master copy inside FP16_Optimizer's flat groups, which
        # name no parameters; the 16-bit weights are the ones the training forward used.
        log(f"note: ZeRO-0 checkpoint with {sorted(map(str, dtypes))} weights: exporting the 16-bit training "
            f"weights (the fp32 master copy of this layout is not readable by name)")
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def _bf16_optimizer_state_dict(tag_dir: Path, optim_files: list[Path]) -> dict[str, torch.Tensor]:
    """BF16_Optimizer (``bf16_zero_pp_rank_*``): ZeRO-1/2's flat fp32 partitions, merged by DeepSpeed's
    own ZeRO-2 code (``_get_fp32_state_dict_from_zero2_checkpoint`` checks the sizes add up)."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARTITION_COUNT, SINGLE_PARTITION_OF_FP32_GROUPS
    from deepspeed.utils import zero_to_fp32

    model_files = zero_to_fp32.get_model_state_files(str(tag_dir))
    model_states = zero_to_fp32.parse_model_states(model_files)
    states = [torch.load(f, map_location="cpu", mmap=True, weights_only=False)[OPTIMIZER_STATE_DICT]
              for f in optim_files]
    counts = states[0][PARTITION_COUNT]
    world = max(counts) if isinstance(counts, (list, tuple)) else int(counts)
    if world != len(optim_files):
        raise ExportError(f"{tag_dir}: {len(optim_files)} optimizer state files for {world} ranks; a rank's file "
                          f"is missing")
    groups = [s[SINGLE_PARTITION_OF_FP32_GROUPS] for s in states]
    merged = zero_to_fp32._get_fp32_state_dict_from_zero2_checkpoint(world, groups, model_states, False)
    return zero_to_fp32.to_torch_tensor(merged)


# ------------------------------------------------------------------------------------ model


def read_hf_config(tag_dir: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(tag_dir / checkpoint.HF_CONFIG_DIR)
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"{tag_dir / checkpoint.HF_CONFIG_DIR}: cannot read the HF config ({exc})") from None


def read_state(tag_dir: Path) -> dict[str, Any]:
    try:
        return checkpoint.read_state(tag_dir)
    except checkpoint.CheckpointError:
        raise
    except (OSError, ValueError) as exc:
        raise ExportError(f"{tag_dir / checkpoint.STATE_FILE}: unreadable ({exc})") from None


def build_model(hf_config, state_dict: dict[str, torch.Tensor], where: Path):
    """fp32 HF causal LM on CPU from a config and consolidated weights (no copy: the model's
    parameters share the state dict's storage). Every weight must be present and fit."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    except KeyError:
        raise ExportError(f"{where}: no causal LM class for model_type {hf_config.model_type!r}") from None
    # from_pretrained(None, state_dict=...) is transformers' own path for "config + my weights":
    # meta-device init, weight tying, buffers built from the config (inv_freq from rope_parameters).
    model, info = model_cls.from_pretrained(None, config=hf_config, state_dict=state_dict, dtype=torch.float32,
                                            attn_implementation="sdpa", output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if v and k != "error_msgs"}
    if problems or info.get("error_msgs"):
        raise ExportError(f"{where}: the consolidated weights do not fit the checkpoint's HF config "
                          f"({problems or info['error_msgs']})")
    return model.eval()


def stage_rope(tag_dir: Path, state: dict[str, Any], hf_config) -> tuple[dict[str, Any], int]:
    """The RoPE parameters and max_position_embeddings of the stage the checkpoint reached, from the
    stage's own setting in ``longtrain_state.json``; refuses an ``hf_config`` that disagrees."""
    from longtrain.rope import rope_parameters

    stages = state.get("stages") or []
    index = int(state.get("stage_index", len(stages) - 1))
    if not 0 <= index < len(stages):
        raise ExportError(f"{tag_dir}/{checkpoint.STATE_FILE}: stage_index {index} but {len(stages)} stage records")
    saved = dict(hf_config.rope_parameters)
    original = saved.get("original_max_position_embeddings", hf_config.max_position_embeddings)
    try:
        params = rope_parameters(stages[index]["rope"], original_max_position_embeddings=original)
    except (KeyError, ValueError) as exc:
        raise ExportError(f"{tag_dir}/{checkpoint.STATE_FILE}: stage {index} has no valid rope setting "
                          f"({exc})") from None
    differ = {k: (v, saved.get(k)) for k, v in params.items() if saved.get(k) != v}
    if differ:
        raise ExportError(f"{tag_dir}: hf_config/config.json rope_parameters {saved} disagree with stage "
                          f"{stages[index].get('name')!r} ({stages[index]['rope']}): {differ}")
    return params, int(hf_config.max_position_embeddings)


def tokenizer_source(tag_dir: Path, state: dict[str, Any]) -> Path | None:
    """The run's copy of its tokenizer: beside the checkpoints (the run folder may have moved), else
    the path recorded at training time."""
    for candidate in (tag_dir.parent.parent / TOKENIZER_DIR, state.get("tokenizer")):
        if candidate and Path(candidate).is_dir() and any(Path(candidate).iterdir()):
            return Path(candidate)
    return None


def load_checkpoint_model(path: str | Path, tag: str | None = None, require_tokenizer: bool = True):
    """``(model, tokenizer_path)``: the fp32 HF model of a checkpoint (tag folder, or run folder /
    ``checkpoints/`` folder: the newest complete checkpoint) on CPU in eval mode, its config carrying
    the stage's RoPE, and the run's tokenizer folder. Used by ``longtrain eval``."""
    tag_dir = select_checkpoint(path, tag, log=lambda _msg: None)
    state = read_state(tag_dir)
    tok = tokenizer_source(tag_dir, state)
    if tok is None and require_tokenizer:
        raise ExportError(f"{tag_dir}: the run has no tokenizer copy ({tag_dir.parent.parent / TOKENIZER_DIR} is "
                          f"missing or empty); put the run's tokenizer files there")
    hf_config = read_hf_config(tag_dir)
    stage_rope(tag_dir, state, hf_config)
    model = build_model(hf_config, consolidate_state_dict(tag_dir, log=lambda _msg: None), tag_dir)
    return model, (str(tok) if tok is not None else None)


# ------------------------------------------------------------------------------------ files


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
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

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
    import copy

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


def _spm_specials(spm_file: Path) -> dict[str, str]:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_file))
    names = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id(), "pad_token": sp.pad_id()}
    return {name: sp.id_to_piece(i) for name, i in names.items() if i >= 0}


def _hf_specials(source: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Special tokens named in ``tokenizer_config.json`` (a string or ``{"content": ...}``), as data
    prep reads them, and that config."""
    path = source / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    specials = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str):
            specials[name] = token
    return specials, config


def write_tokenizer(source: Path, out: Path, add_bos: bool, model_max_length: int) -> dict[str, Any]:
    """Tokenizer files that transformers 5.x and 4.4x both load (DESIGN.md section 3): ``tokenizer.json``
    with ``tokenizer_class: PreTrainedTokenizerFast``, and ``tokenizer.model`` copied alongside.

    An HF tokenizer's ``tokenizer.json`` is copied as is: it is the file data prep tokenized with
    (it prefers it over ``tokenizer.model``). A SentencePiece-only tokenizer is converted by
    transformers' own converter (``AutoTokenizer`` on a folder holding only the ``.model`` builds it
    with ``SpmConverter.build_tokenizer_from_spm_proto``, which follows the model's normaliser and
    pieces), checked token for token against SentencePiece by ``check_tokenizer``; ``add_bos`` then
    makes ``tokenizer(text)`` start with BOS, as the training rows did (the dataset's ``add_bos``).
    """
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    spm_file = source / "tokenizer.model"
    from_spm = not (source / "tokenizer.json").is_file()
    if from_spm and not spm_file.is_file():
        raise ExportError(f"tokenizer {source}: neither tokenizer.json nor tokenizer.model")
    tok_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                                  "model_max_length": model_max_length}
    if from_spm:
        with tempfile.TemporaryDirectory() as tmp:  # only the .model: nothing else steers the conversion
            shutil.copy2(spm_file, Path(tmp) / "tokenizer.model")
            backend = AutoTokenizer.from_pretrained(tmp).backend_tokenizer
        specials = _spm_specials(spm_file)
        if add_bos and "bos_token" in specials:
            bos = specials["bos_token"]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, backend.token_to_id(bos))])
        backend.save(str(out / "tokenizer.json"))
    else:
        shutil.copy2(source / "tokenizer.json", out / "tokenizer.json")
        backend = Tokenizer.from_file(str(out / "tokenizer.json"))
        specials, source_config = _hf_specials(source)
        if source_config.get("chat_template"):  # an instruct model's chat template stays with it
            tok_config["chat_template"] = source_config["chat_template"]
    tok_config.update(specials)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    if spm_file.is_file():
        shutil.copy2(spm_file, out / "tokenizer.model")
    ids = {f"{name[:-6]}_token_id": backend.token_to_id(token) for name, token in specials.items()}
    return {"from_sentencepiece": from_spm, "adds_bos": bool(from_spm and add_bos and "bos_token" in specials),
            "specials": specials, **ids}


TOKENIZER_CHECK_TEXT = ("Hello  world!\n\tdef f(x):\n        return x ** 2  # 40712 \u00fcn\u00efc\u00f6d\u00e9 "
                        "\u65e5\u672c\u8a9e \U0001f642 end ")


@dataclasses.dataclass
class TokenizerCheck:
    tokens: int                 # tokens compared with the reference tokenizer
    reference: str              # what the export was compared with
    auto_class: str             # the class AutoTokenizer (this transformers) picks for the folder
    auto_warning: str | None    # set when AutoTokenizer tokenizes differently from tokenizer.json


def check_tokenizer(out: Path, source: Path, texts: list[str]) -> TokenizerCheck:
    """The exported ``tokenizer.json`` (loaded as ``PreTrainedTokenizerFast``, the class its config
    names) encodes like the run's tokenizer (SentencePiece itself for a ``tokenizer.model``, else its
    ``tokenizer.json`` through ``tokenizers``, as data prep does); BOS/EOS ids agree. Raises
    ``ExportError`` otherwise.

    Also reports what ``AutoTokenizer`` does with the folder: transformers 5.x ignores
    ``tokenizer_class`` for some model types (e.g. qwen2, phi3: ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``)
    and rebuilds that family's own pipeline over our vocabulary, which is wrong for a foreign tokenizer.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast.from_pretrained(out)
    if (source / "tokenizer.json").is_file():  # the file data prep encoded with, through `tokenizers`
        from tokenizers import Tokenizer

        ref = Tokenizer.from_file(str(source / "tokenizer.json"))
        encode, reference = (lambda t: ref.encode(t, add_special_tokens=False).ids), str(source / "tokenizer.json")
        specials = _hf_specials(source)[0]
        ids = {f"{k[:-6]}_token_id": ref.token_to_id(specials[k]) for k in ("bos_token", "eos_token") if k in specials}
    else:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
        encode, reference = sp.encode, f"SentencePiece({source / 'tokenizer.model'})"
        ids = {"bos_token_id": sp.bos_id() if sp.bos_id() >= 0 else None,
               "eos_token_id": sp.eos_id() if sp.eos_id() >= 0 else None}
    compared, auto_differs = 0, False
    auto = AutoTokenizer.from_pretrained(out)
    for text in [TOKENIZER_CHECK_TEXT, *texts]:
        want, got = encode(text), fast.encode(text, add_special_tokens=False)
        if want != got:
            first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            raise ExportError(f"tokenizer check: the exported tokenizer.json encodes {text[:40]!r} differently from "
                              f"{reference} from token {first} ({want[first:first + 5]} vs {got[first:first + 5]})")
        auto_differs |= auto.encode(text, add_special_tokens=False) != got
        compared += len(want)
    for name, want_id in ids.items():
        if want_id is not None and getattr(fast, name) != want_id:
            raise ExportError(f"tokenizer check: {name} is {getattr(fast, name)} but {reference} says {want_id}")
    warning = None
    if auto_differs:
        warning = (f"transformers {_transformers_version()} AutoTokenizer loads this folder as {type(auto).__name__} "
                   f"(it overrides tokenizer_class for this model type), which tokenizes differently; load the "
                   f"tokenizer with PreTrainedTokenizerFast.from_pretrained(...) (transformers 4.x's AutoTokenizer "
                   f"does that)")
    return TokenizerCheck(compared, reference, type(auto).__name__, warning)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def write_generation_config(out: Path, token_ids: dict[str, int | None]) -> None:
    from transformers import GenerationConfig

    GenerationConfig(**{k: v for k, v in token_ids.items() if v is not None}).save_pretrained(out)


# ------------------------------------------------------------------------------------ verification


class VerificationError(ExportError):
    """The written folder does not reproduce the checkpoint's model (exit code 1 in the CLI)."""


@dataclasses.dataclass
class Verification:
    source: str                    # where the sample rows came from
    rows: int
    tokens: int                    # per row; positions are the last `tokens` of the stage's context
    max_abs_diff: float            # logits: export in its dtype vs the fp32 checkpoint model
    max_abs_logit: float           # largest |logit| of the fp32 checkpoint model
    tolerance: float
    same_dtype_max_abs_diff: float  # logits: export vs the checkpoint model cast to the export dtype
    weights_equal: bool            # every tensor == the consolidated fp32 weight rounded to the dtype
    rope_equal: bool               # inv_freq (fp32) and attention scaling == the stage's
    config_diff: dict[str, Any]    # model-shape keys that differ from the checkpoint's HF config
    legacy_rope_ok: bool           # config.json's rope_theta / rope_scaling say what rope_parameters say

    @property
    def passed(self) -> bool:
        return (self.weights_equal and self.rope_equal and not self.config_diff and self.legacy_rope_ok
                and self.same_dtype_max_abs_diff <= FP32_ATOL and self.max_abs_diff <= self.tolerance)

    def lines(self) -> list[str]:
        ok = lambda flag: "ok" if flag else "FAILED"  # noqa: E731
        native_ok, same_ok = self.max_abs_diff <= self.tolerance, self.same_dtype_max_abs_diff <= FP32_ATOL
        return [
            f"verify: {self.rows} x {self.tokens} tokens ({self.source})",
            f"verify: max |logits diff| vs the fp32 checkpoint model: {self.max_abs_diff:.3g} (tolerance "
            f"{self.tolerance:.3g}; largest |logit| {self.max_abs_logit:.3g}) {ok(native_ok)}",
            f"verify: max |logits diff| vs the checkpoint model in the export dtype: "
            f"{self.same_dtype_max_abs_diff:.3g} {ok(same_ok)}",
            f"verify: weights equal the consolidated checkpoint: {ok(self.weights_equal)}; RoPE inv_freq equals the "
            f"stage's: {ok(self.rope_equal)}; config: {ok(not self.config_diff)}"
            + (f" {self.config_diff}" if self.config_diff else "") + f"; 4.x RoPE keys: {ok(self.legacy_rope_ok)}",
        ]


def sample_inputs(state: dict[str, Any], vocab_size: int, context: int, rows: int, tokens: int,
                  log: Callable[[str], None] = print) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(input_ids, position_ids, source)``, both ``(rows, L)`` with ``L = min(tokens, context)``: the
    first rows of the checkpoint stage's dataset (validation split if any), else deterministic random
    ids. Positions are the *last* L of the context, where a RoPE mistake shows most."""
    import numpy as np

    length = max(1, min(tokens, context))
    stage = (state.get("stages") or [{}])[int(state.get("stage_index", 0))]
    data = stage.get("data")
    ids, source = None, "deterministic random ids"
    if data:
        try:
            from longtrain.data import PreparedDataset

            split = "validation" if (Path(data) / "validation").is_dir() else "train"
            dataset = PreparedDataset(data, split)
            batch = dataset.rows(list(range(min(rows, len(dataset)))))
            ids = torch.from_numpy(np.stack([r["input_ids"][:length] for r in batch]).astype(np.int64))
            if int(ids.max()) >= vocab_size:
                raise ValueError(f"token id {int(ids.max())} >= vocab size {vocab_size}")
            source = f"{len(batch)} {split} rows of {data}"
        except Exception as exc:  # any reason: the fallback is announced and still checks the export
            log(f"note: verifying on random ids: the stage's dataset {data} is not readable ({exc})")
            ids = None
    if ids is None:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab_size, (rows, length), generator=generator)
    positions = torch.arange(context - ids.shape[1], context).expand(ids.shape[0], -1)
    return ids, positions, source


@torch.no_grad()
def _hidden(model, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(R, L) ids -> (R, L, E) last hidden states (logits are formed chunk by chunk from these)."""
    return model.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state


@torch.no_grad()
def _logits_diff(head, hidden, ref_head, ref_hidden, chunk: int = 64) -> tuple[float, float]:
    """(max |logits - ref logits|, max |ref logits|), never holding (R, L, vocab) logits in full."""
    diff, scale = 0.0, 0.0
    for start in range(0, hidden.shape[1], chunk):
        got = head(hidden[:, start:start + chunk]).float()  # (R, chunk, V)
        want = ref_head(ref_hidden[:, start:start + chunk]).float()
        delta = (got - want).abs()
        diff = max(diff, float(delta.max()) if torch.isfinite(delta).all() else float("inf"))
        scale = max(scale, float(want.abs().max()))
    return diff, scale


def _rotary(model):
    return model.model.rotary_emb


# Keys of the HF config that may differ between the checkpoint and the export by design.
_CONFIG_KEYS_CHANGED = {"use_cache", "dtype", "torch_dtype", "architectures", "bos_token_id", "eos_token_id",
                        "pad_token_id", "transformers_version", "_name_or_path", "rope_theta", "rope_scaling",
                        "original_max_position_embeddings"}


@torch.no_grad()
def verify_export(out: Path, reference, dtype: torch.dtype, rope: tuple[dict[str, Any], int],
                  ids: torch.Tensor, positions: torch.Tensor, source: str) -> Verification:
    """Load ``out`` with ``AutoModelForCausalLM.from_pretrained`` (dtype from its config) and compare it
    with ``reference``: the fp32 checkpoint model with the stage's RoPE applied, which is cast to
    ``dtype`` in place first (its fp32 hidden states and head are kept), so that at most the export
    and one 16-bit copy of the model are held besides (memory: see the CLI help)."""
    import copy

    from transformers import AutoModelForCausalLM

    from longtrain.rope import apply_rope

    ref_hidden, ref_head = _hidden(reference, ids, positions), copy.deepcopy(reference.lm_head)  # fp32
    if dtype != torch.float32:
        reference.to(dtype)  # the same rounding as the written weights (Tensor.to, round to nearest even)
        apply_rope(reference, *rope)  # .to() cast inv_freq too: the stage's fp32 frequencies again
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto", attn_implementation="sdpa").eval()
    if loaded.dtype != dtype:
        raise VerificationError(f"{out}: loads as {loaded.dtype}, expected {dtype} (config.json dtype)")
    ref_state = reference.state_dict()
    weights_equal = all(name in ref_state and torch.equal(value, ref_state[name])
                        for name, value in loaded.state_dict().items())
    ref_rot, got_rot = _rotary(reference), _rotary(loaded)
    rope_equal = (got_rot.inv_freq.dtype == torch.float32 and torch.equal(got_rot.inv_freq, ref_rot.inv_freq)
                  and got_rot.attention_scaling == ref_rot.attention_scaling)
    want_cfg, got_cfg = reference.config.to_dict(), loaded.config.to_dict()
    config_diff = {k: (v, got_cfg.get(k)) for k, v in want_cfg.items()
                   if k not in _CONFIG_KEYS_CHANGED and not k.startswith("_") and got_cfg.get(k) != v}
    # transformers 5.x ignores rope_theta when rope_parameters has one: check the 4.x keys by reading them.
    written = json.loads((out / "config.json").read_text(encoding="utf-8"))
    written_rope = written.get("rope_parameters") or {}
    legacy_ok = (all(written_rope.get(k) == v for k, v in rope[0].items())
                 and all(written.get(k, "missing") == v for k, v in legacy_rope_keys(written_rope).items()))

    hidden = _hidden(loaded, ids, positions)  # (R, L, E)
    diff, scale = _logits_diff(loaded.lm_head, hidden, ref_head, ref_hidden)
    tolerance = FP32_ATOL if dtype == torch.float32 else NATIVE_RTOL[dtype] * max(1.0, scale)
    same = diff if dtype == torch.float32 else _logits_diff(loaded.lm_head, hidden, reference.lm_head,
                                                            _hidden(reference, ids, positions))[0]
    return Verification(source, ids.shape[0], ids.shape[1], diff, scale, tolerance, same, weights_equal,
                        rope_equal, config_diff, legacy_ok)


# ------------------------------------------------------------------------------------ model card


def _rope_text(rope: dict[str, Any]) -> str:
    rope = dict(rope)
    kind = rope.pop("type", rope.pop("rope_type", "default"))
    theta = rope.pop("theta", rope.pop("rope_theta", None))
    extra = ", ".join(f"{k}={f'[{len(v)} factors]' if isinstance(v, list) else v}" for k, v in sorted(rope.items()))
    base = f"{theta:,.0f}" if isinstance(theta, (int, float)) and float(theta).is_integer() else f"{theta}"
    return f"{kind}, base {base}" + (f", {extra}" if extra else "")


def model_card(out_name: str, tag_dir: Path, state: dict[str, Any], hf_config, dtype: str, n_params: int,
               tokenizer: dict[str, Any] | None, verification: Verification | None, notes: list[str]) -> str:
    stages = state.get("stages") or []
    index = int(state.get("stage_index", len(stages) - 1))
    planned = (state.get("config") or {}).get("stages") or []
    source = state.get("source_model") or "unknown"
    rows = [f"| {i + 1} | {s.get('name')} | {s.get('seq_len')} | {_rope_text(s.get('rope', {}))} | "
            f"{s.get('steps_done', 0)} | {int(s.get('tokens', 0)):,} |" for i, s in enumerate(stages)]
    rows += [f"| {i + 1} | {s.get('name')} | {s.get('seq_len')} | {_rope_text(s.get('rope', {}))} | not reached "
             f"| 0 |" for i, s in enumerate(planned) if i >= len(stages)]
    rope = dict(hf_config.rope_parameters)
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- longtrain",
             "- long-context", "---", ""]
    lines = front + [
        f"# {out_name}", "",
        f"Exported by `longtrain export` from checkpoint `{tag_dir.name}` (global step {state.get('global_step')}, "
        f"{int(state.get('tokens_seen', 0)):,} tokens seen; stage {index + 1} of {max(len(planned), len(stages))}, "
        f"`{state.get('stage_name')}`).", "",
        f"- Source model: {source}",
        f"- Architecture: {hf_config.model_type}, {n_params:,} parameters, weights in {dtype}",
        f"- Context: `max_position_embeddings` {hf_config.max_position_embeddings}; RoPE {_rope_text(rope)}",
        "- Tokenizer: " + ("none recorded by the run" if tokenizer is None else
                           ("converted from SentencePiece `tokenizer.model` (kept alongside)"
                            if tokenizer["from_sentencepiece"] else "the run's Hugging Face tokenizer")
                           + ("; `tokenizer(text)` prepends BOS as the training rows did" if tokenizer["adds_bos"]
                              else "")),
        "", "## Training stages", "", "| # | stage | seq_len | RoPE | steps done | tokens |",
        "|---|---|---|---|---|---|", *rows, "", "## Verification", "",
    ]
    if verification is None:
        lines.append("Not verified (`--no-verify`).")
    else:
        lines += [f"- {line.removeprefix('verify: ')}" for line in verification.lines()]
    lines += [
        "", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("{out_name}", dtype="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{out_name}")', "```", "",
        "`config.json` carries RoPE both as `rope_parameters` (transformers 5.x) and as `rope_theta` + "
        "`rope_scaling` (transformers 4.4x), so both load the frequencies this model was trained with.", "",
    ]
    lines += [f"Note: {note}.\n" for note in notes]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ orchestration


@dataclasses.dataclass
class ExportResult:
    out: Path
    tag_dir: Path
    global_step: int
    dtype: str
    files: list[str]
    n_params: int
    verification: Verification | None
    seconds: float


def _check_output(out: Path, tag_dir: Path, overwrite: bool) -> None:
    """Refuse early (before minutes of consolidation) what cannot end well."""
    target = out.resolve()
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ExportError(f"OUT {out}: already exists; pass --overwrite to replace it, or choose another folder")
        if not out.is_dir() or out.is_symlink():
            raise ExportError(f"OUT {out}: exists and is not a folder; remove it yourself")
        if target == tag_dir.resolve() or target in tag_dir.resolve().parents:
            raise ExportError(f"OUT {out}: --overwrite would delete the checkpoint {tag_dir} (it is inside OUT)")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"OUT {out}: cannot create its parent folder {parent} ({exc.strerror or exc})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"OUT {out}: its folder {parent} is not writable")


def _make_staging(out: Path) -> Path:
    """A hidden sibling of OUT (same file system, so the final rename is atomic), created with the
    usual permissions (``tempfile.mkdtemp`` would make the export private to its owner)."""
    staging = out.resolve().parent / f".{out.name}.partial-{os.getpid()}-{time.time_ns()}"
    try:
        staging.mkdir()
    except OSError as exc:
        raise ExportError(f"OUT {out}: cannot write in {staging.parent} ({exc.strerror or exc})") from None
    return staging


def _move_into_place(staging: Path, out: Path, overwrite: bool) -> None:
    target = out.resolve() if out.exists() else out.absolute()
    if not out.exists():
        os.rename(staging, target)
        return
    if not overwrite:  # appeared while we worked
        raise ExportError(f"OUT {out}: appeared while exporting; pass --overwrite to replace it")
    old = target.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
    os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def _dataset_adds_bos(state: dict[str, Any]) -> bool:
    stage = (state.get("stages") or [{}])[int(state.get("stage_index", 0))]
    try:
        meta = json.loads((Path(stage["data"]) / "meta.json").read_text(encoding="utf-8"))
        return bool(meta.get("add_bos", False))
    except (KeyError, TypeError, OSError, ValueError):
        return False


@dataclasses.dataclass
class ExportOptions:
    dtype: str = "bf16"
    max_shard_size: int | str = "5GB"
    verify: bool = True
    verify_rows: int = 2
    verify_tokens: int = 256
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ExportError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.verify_rows < 1 or self.verify_tokens < 1:
            raise ExportError("--verify-rows and --verify-tokens must be >= 1")
        from huggingface_hub import split_torch_state_dict_into_shards

        try:  # parses the size now, not after minutes of consolidation
            split_torch_state_dict_into_shards({}, max_shard_size=self.max_shard_size)
        except ValueError as exc:
            raise ExportError(f"--max-shard-size {self.max_shard_size!r}: {exc} (examples: 5GB, 500MB)") from None


def export_checkpoint(checkpoint_path: str | Path, out: str | Path, *, tag: str | None = None,
                      overwrite: bool = False, log: Callable[[str], None] = print, **options) -> ExportResult:
    """Export one checkpoint to ``out``; ``options`` are the fields of ``ExportOptions``. Raises
    ``ExportError`` for bad input and ``VerificationError`` when the written folder does not reproduce
    the checkpoint's model; in both cases nothing is left at ``out`` (an existing ``out`` is only
    replaced on success)."""
    from tqdm.auto import tqdm

    opts = ExportOptions(**options)
    start = time.monotonic()
    out = Path(out)

    def say(text: str) -> None:  # printed above the progress bars, not through them
        with tqdm.external_write_mode():
            log(text)

    tag_dir = select_checkpoint(checkpoint_path, tag, say)
    _check_output(out, tag_dir, overwrite)
    staging = _make_staging(out)
    try:
        result = _export_into(staging, out.name, tag_dir, opts, say)
        _move_into_place(staging, out, overwrite)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(f"OUT {out}: writing failed ({exc}); nothing was left at {out}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dataclasses.replace(result, out=out, seconds=time.monotonic() - start)


def _export_into(staging: Path, out_name: str, tag_dir: Path, opts: ExportOptions,
                 log: Callable[[str], None]) -> ExportResult:
    """Every file of the export, written into ``staging``; verified when asked."""
    from tqdm.auto import tqdm

    from longtrain.rope import apply_rope

    state = read_state(tag_dir)
    hf_config = read_hf_config(tag_dir)
    rope = stage_rope(tag_dir, state, hf_config)
    log(f"exporting {tag_dir} (global step {state.get('global_step')}, stage {state.get('stage_name')!r}) as "
        f"{opts.dtype}")
    if yarn_compat_note(*rope):
        log(f"note: {yarn_compat_note(*rope)}")
    with tqdm(total=4, desc="export", unit="step", disable=not opts.progress) as bar:
        bar.set_postfix_str("consolidating")
        model = build_model(hf_config, consolidate_state_dict(tag_dir, log), tag_dir)
        apply_rope(model, *rope)  # the stage's frequencies from the stage's own setting, not only the config
        n_params = sum(p.numel() for p in model.parameters())
        bar.update()
        bar.set_postfix_str("writing weights")
        files = write_weights(tensors_to_save(model), staging, DTYPES[opts.dtype], opts.max_shard_size, opts.progress)
        bar.update()
        bar.set_postfix_str("tokenizer and config")
        ids, positions, source = sample_inputs(state, hf_config.vocab_size, rope[1], opts.verify_rows,
                                               opts.verify_tokens, log)
        tok_info, tok_source = _write_tokenizer_of_run(staging, tag_dir, state, rope[1], log)
        token_ids = {k: getattr(hf_config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        if tok_info is not None:
            token_ids = {k: tok_info.get(k) for k in token_ids}
        write_config(hf_config, type(model).__name__, DTYPES[opts.dtype], token_ids, staging)
        write_generation_config(staging, token_ids)
        tok_check = _check_tokenizer_of_run(staging, tok_source, ids, log) if tok_source is not None else None
        bar.update()
        verification = None
        if opts.verify:
            bar.set_postfix_str("verifying")
            verification = verify_export(staging, model, DTYPES[opts.dtype], rope, ids, positions, source)
            for line in verification.lines():
                log(line)
        bar.update()
    notes = [n for n in (yarn_compat_note(*rope), tok_check and tok_check.auto_warning) if n]
    card = model_card(out_name, tag_dir, state, hf_config, opts.dtype, n_params, tok_info, verification, notes)
    (staging / "README.md").write_text(card, encoding="utf-8")
    if verification is not None and not verification.passed:
        raise VerificationError(f"verification failed (see above); nothing was written. Re-run with --no-verify to "
                                f"keep the folder for inspection")
    return ExportResult(staging, tag_dir, int(state.get("global_step", 0)), opts.dtype, files, n_params,
                        verification, 0.0)


def _write_tokenizer_of_run(staging: Path, tag_dir: Path, state: dict[str, Any], context: int,
                            log: Callable[[str], None]) -> tuple[dict[str, Any] | None, Path | None]:
    source = tokenizer_source(tag_dir, state)
    if source is None:
        log(f"warning: the run has no tokenizer copy ({tag_dir.parent.parent / TOKENIZER_DIR}); exporting without "
            f"tokenizer files")
        return None, None
    return write_tokenizer(source, staging, _dataset_adds_bos(state), context), source


def _check_tokenizer_of_run(staging: Path, source: Path, ids: torch.Tensor,
                            log: Callable[[str], None]) -> TokenizerCheck:
    """After config.json is written: AutoTokenizer's choice depends on its model_type."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast.from_pretrained(staging)
    texts = [fast.decode([int(i) for i in row], skip_special_tokens=True) for row in ids]
    check = check_tokenizer(staging, source, texts)
    log(f"tokenizer: {check.tokens:,} tokens encode as {check.reference} does")
    if check.auto_warning:
        log(f"warning: {check.auto_warning}")
    return check
