"""``export_checkpoint`` and ``load_checkpoint_model``: the steps of an export, in order (docs/export.md).

``export_checkpoint``: pick a complete checkpoint tag folder that verifies against its manifest
(sizes and sha256 of every file) and rebuild its fp32 model
(``consolidate``); write safetensors shards in the export dtype, ``config.json``, a generation config
(``files``), tokenizer files (``tokenizer``) and a model card (``card``) into a temporary sibling
folder; verify that folder by loading it with ``from_pretrained`` (``verify``); rename it into place
(``output``). A failed step leaves no folder at the output path.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from longtrain.export.card import model_card
from longtrain.export.consolidate import (build_model, consolidate_state_dict, current_stage, read_hf_config,
                                          read_state, select_checkpoint, stage_rope)
from longtrain.export.errors import ExportError, VerificationError
from longtrain.export.files import (DTYPES, tensors_to_save, write_config, write_generation_config, write_weights,
                                    yarn_compat_note)
from longtrain.export.output import check_output, make_staging, move_into_place
from longtrain.export.tokenizer import (TOKENIZER_DIR, TokenizerCheck, check_tokenizer, tokenizer_source,
                                        write_tokenizer)
from longtrain.export.verify import Verification, sample_inputs, verify_export
from longtrain.rope import apply_rope


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


@dataclasses.dataclass
class ExportOptions:
    dtype: str = "bf16"
    max_shard_size: int | str = "5GB"
    verify: bool = True
    verify_rows: int = 2
    verify_tokens: int = 256
    progress: bool = True
    check_hashes: bool = True
    """Check the checkpoint's files against the sha256 recorded at save (their sizes are always checked)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ExportError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.verify_rows < 1 or self.verify_tokens < 1:
            raise ExportError("--verify-rows and --verify-tokens must be >= 1")

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

    opts = ExportOptions(**options)
    start = time.monotonic()
    out = Path(out)

    def say(text: str) -> None:  # printed above the progress bars, not through them
        with tqdm.external_write_mode():
            log(text)

    tag_dir = select_checkpoint(checkpoint_path, tag, say, opts.check_hashes)
    check_output(out, tag_dir, overwrite)
    staging = make_staging(out)
    try:
        result = _export_into(staging, out.name, tag_dir, opts, say)
        move_into_place(staging, out, overwrite)
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

    state = read_state(tag_dir)
    hf_config = read_hf_config(tag_dir)
    rope = stage_rope(tag_dir, state, hf_config)
    log(f"exporting {tag_dir} (global step {state.get('global_step')}, stage {state.get('stage_name')!r}) as "
        f"{opts.dtype}")
    yarn_note = yarn_compat_note(*rope)
    if yarn_note:
        log(f"note: {yarn_note}")
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
    notes = [n for n in (yarn_note, tok_check and tok_check.auto_warning) if n]
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

    fast = PreTrainedTokenizerFast.from_pretrained(staging)
    texts = [fast.decode([int(i) for i in row], skip_special_tokens=True) for row in ids]
    check = check_tokenizer(staging, source, texts, fast)
    log(f"tokenizer: {check.tokens:,} tokens encode as {check.reference} does")
    if check.auto_warning:
        log(f"warning: {check.auto_warning}")
    return check


def _dataset_adds_bos(state: dict[str, Any]) -> bool:
    _, stage = current_stage(state)
    try:
        meta = json.loads((Path(stage["data"]) / "meta.json").read_text(encoding="utf-8"))
        return bool(meta.get("add_bos", False))
    except (KeyError, TypeError, OSError, ValueError):
        return False


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
