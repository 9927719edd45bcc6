"""Export a longtrain checkpoint to a Hugging Face model folder, and verify it (docs/export.md).

Steps (``export_checkpoint``, ``api``): pick a complete checkpoint tag folder; consolidate the fp32
weights with DeepSpeed's own ``deepspeed.utils.zero_to_fp32`` and rebuild the HF model from the
checkpoint's ``hf_config/`` with the stage's RoPE (``consolidate``); write safetensors shards in the
export dtype, a ``config.json`` carrying RoPE in both forms and a generation config (``files``),
tokenizer files (``tokenizer``) and a model card (``card``) into a temporary sibling folder; verify
that folder by loading it with ``from_pretrained`` (``verify``); rename it into place (``output``).
A failed step leaves no folder at the output path.

Traps handled (DESIGN.md section 3): transformers 5.x writes only ``rope_parameters`` and 4.4x then
silently loads base 10000, so ``config.json`` also gets ``rope_theta`` and ``rope_scaling``;
``inv_freq`` is a non-persistent buffer, so the loaded model's frequencies are checked against the
stage's; 5.x tokenizer configs do not load in 4.x, so the tokenizer is written as a plain
``PreTrainedTokenizerFast`` over ``tokenizer.json`` with ``tokenizer.model`` alongside.
"""
from longtrain.export.api import ExportOptions, ExportResult, export_checkpoint, load_checkpoint_model
from longtrain.export.card import model_card
from longtrain.export.consolidate import (PREFIX, build_model, consolidate_state_dict, read_hf_config, read_state,
                                          select_checkpoint, stage_rope)
from longtrain.export.errors import ExportError, VerificationError
from longtrain.export.files import (DTYPES, legacy_rope_keys, tensors_to_save, write_config, write_generation_config,
                                    write_weights, yarn_compat_note)
from longtrain.export.tokenizer import (TOKENIZER_CHECK_TEXT, TOKENIZER_DIR, TokenizerCheck, check_tokenizer,
                                        tokenizer_source, write_tokenizer)
from longtrain.export.verify import FP32_ATOL, NATIVE_RTOL, Verification, sample_inputs, verify_export

__all__ = [
    "DTYPES", "ExportError", "ExportOptions", "ExportResult", "FP32_ATOL", "NATIVE_RTOL", "PREFIX",
    "TOKENIZER_CHECK_TEXT", "TOKENIZER_DIR", "TokenizerCheck", "Verification", "VerificationError", "build_model",
    "check_tokenizer", "consolidate_state_dict", "export_checkpoint", "legacy_rope_keys", "load_checkpoint_model",
    "model_card", "read_hf_config", "read_state", "sample_inputs", "select_checkpoint", "stage_rope",
    "tensors_to_save", "tokenizer_source", "verify_export", "write_config", "write_generation_config",
    "write_tokenizer", "write_weights", "yarn_compat_note",
]
