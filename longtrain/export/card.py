"""The model card (``README.md``) of an export: source model, stages trained, context, tokenizer,
the verification numbers and how to load it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from longtrain.export.consolidate import current_stage
from longtrain.export.verify import Verification


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
    index, _ = current_stage(state, tag_dir)
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
