"""From a checkpoint to the fp32 HF model it holds: pick a complete tag folder, consolidate its fp32
weights with DeepSpeed's own ``deepspeed.utils.zero_to_fp32`` (ZeRO 1/2/3, with or without optimizer
offload; ZeRO-0 and DeepSpeed's BF16_Optimizer are read from the same files by the lower-level
functions), read its HF config and training state, and rebuild the model with the stage's RoPE.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARTITION_COUNT, SINGLE_PARTITION_OF_FP32_GROUPS, ZERO_STAGE
from deepspeed.utils import zero_to_fp32
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from longtrain import checkpoint
from longtrain.export.errors import ExportError
from longtrain.rope import original_max_position_embeddings, rope_parameters

PREFIX = "hf_model."  # longtrain.trainer.CausalLMLoss holds the HF model as `hf_model`


# ------------------------------------------------------------------------------------ selection


def _tag_of(tag: str) -> str:
    """``step_00000008`` or ``8`` -> ``step_00000008``."""
    return checkpoint.tag_for(int(tag)) if tag.isdigit() else tag


def select_checkpoint(path: str | Path, tag: str | None = None, log: Callable[[str], None] = print,
                      check_hashes: bool = True) -> Path:
    """The complete, verified tag folder to export: ``path`` itself (a tag folder), or in a run folder /
    ``checkpoints/`` folder the tag ``tag`` or else the newest complete one that verifies (damaged
    newer ones are named and skipped). Verification: every file's size and, when ``check_hashes``,
    sha256 against the checkpoint's manifest (``checkpoint.verify``)."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"CHECKPOINT {path}: does not exist")
    if not path.is_dir():
        raise ExportError(f"CHECKPOINT {path}: is a file; pass a run folder, its checkpoints/ folder or a "
                          f"step_XXXXXXXX checkpoint folder")
    newest = None
    if checkpoint.is_tag_dir(path):
        if tag is not None and _tag_of(tag) != path.name:
            raise ExportError(f"--tag {tag}: CHECKPOINT {path} is already one checkpoint ({path.name}); pass its run "
                              f"folder to choose another tag")
        tag_dir = path
    else:
        root = checkpoint.checkpoints_root(path)
        done = checkpoint.complete_checkpoints(root)
        names = [d.name for d in done]
        if tag is not None:
            tag_dir = root / _tag_of(tag)
            if not tag_dir.is_dir():
                raise ExportError(f"--tag {tag}: no checkpoint {tag_dir.name} in {root}; complete checkpoints: "
                                  f"{', '.join(names) or 'none'}")
        elif done:
            tag_dir = newest = done[-1]
            newer = [p.name for p in checkpoint.tag_dirs(root) if p.name > tag_dir.name]
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
    if newest is not None:
        tag_dir = _newest_intact(checkpoint.complete_checkpoints(tag_dir.parent), check_hashes, log)
    else:
        try:
            log(checkpoint.verify(tag_dir, check_hashes).line())
        except checkpoint.CheckpointError as exc:
            raise ExportError(f"{exc}; not exporting it: export an earlier checkpoint (--tag)") from None
    if not any(tag_dir.glob("*_model_states.pt")):
        raise ExportError(f"{tag_dir}: not a DeepSpeed checkpoint (no *_model_states.pt file); the DeepSpeed files "
                          f"of this checkpoint are missing")
    if not (tag_dir / checkpoint.HF_CONFIG_DIR / "config.json").is_file():
        raise ExportError(f"{tag_dir}: no {checkpoint.HF_CONFIG_DIR}/config.json (the model config at this step); "
                          f"was it written by `longtrain train`?")
    return tag_dir


def _newest_intact(done: list[Path], check_hashes: bool, log: Callable[[str], None]) -> Path:
    """The newest of ``done`` that verifies; each damaged one newer than it is named with its reason."""
    damaged = []
    for tag_dir in reversed(done):
        try:
            checked = checkpoint.verify(tag_dir, check_hashes)
        except checkpoint.CheckpointError as exc:
            log(f"note: skipping {exc}")
            damaged.append(tag_dir.name)
            continue
        if damaged:
            log(f"note: exporting {tag_dir.name}, the newest intact checkpoint (damaged: {', '.join(damaged)})")
        log(checked.line())
        return tag_dir
    raise ExportError(f"{done[-1].parent}: every complete checkpoint is damaged ({', '.join(damaged)}; reasons above)")


# ------------------------------------------------------------------------------------ consolidation


def consolidate_state_dict(tag_dir: Path, log: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """fp32 weights of the HF model saved in a DeepSpeed tag folder, names without ``hf_model.``.

    ZeRO 1/2/3 go through ``get_fp32_state_dict_from_zero_checkpoint`` (DESIGN.md section 3: exact,
    tied embeddings included). Two layouts it refuses are read with its lower-level functions:
    ZeRO-0 (weights only in the model states file) and DeepSpeed's BF16_Optimizer (bf16 with ZeRO-0/1:
    the same partitioned fp32 groups as ZeRO-1/2, but without the ``zero_stage`` key it looks for).
    """

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


def current_stage(state: dict[str, Any], tag_dir: Path | None = None) -> tuple[int, dict[str, Any]]:
    """``(index, record)`` of the stage a checkpoint reached, from its ``longtrain_state.json``."""
    stages = state.get("stages") or []
    index = int(state.get("stage_index", len(stages) - 1))
    if not 0 <= index < len(stages):
        where = f"{tag_dir}/{checkpoint.STATE_FILE}" if tag_dir is not None else checkpoint.STATE_FILE
        raise ExportError(f"{where}: stage_index {index} but {len(stages)} stage records")
    return index, stages[index]


def stage_rope(tag_dir: Path, state: dict[str, Any], hf_config) -> tuple[dict[str, Any], int]:
    """The RoPE parameters and max_position_embeddings of the stage the checkpoint reached, from the
    stage's own setting in ``longtrain_state.json``; refuses an ``hf_config`` that disagrees."""

    index, stage = current_stage(state, tag_dir)
    saved = dict(hf_config.rope_parameters)
    original = original_max_position_embeddings(hf_config)
    try:
        params = rope_parameters(stage["rope"], original_max_position_embeddings=original)
    except (KeyError, ValueError) as exc:
        raise ExportError(f"{tag_dir}/{checkpoint.STATE_FILE}: stage {index} has no valid rope setting "
                          f"({exc})") from None
    differ = {k: (v, saved.get(k)) for k, v in params.items() if saved.get(k) != v}
    if differ:
        raise ExportError(f"{tag_dir}: hf_config/config.json rope_parameters {saved} disagree with stage "
                          f"{stage.get('name')!r} ({stage['rope']}): {differ}")
    return params, int(hf_config.max_position_embeddings)
