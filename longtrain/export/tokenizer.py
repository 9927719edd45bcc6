"""The run's tokenizer in an export: found beside the checkpoints, written as files that transformers
5.x and 4.4x both load, and checked token for token against the tokenizer the training data was
encoded with.

Trap handled (DESIGN.md section 3): 5.x tokenizer configs do not load in 4.x, so the tokenizer is
written as a plain ``PreTrainedTokenizerFast`` over ``tokenizer.json`` with ``tokenizer.model`` alongside.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import transformers
from tokenizers import Tokenizer, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast


from data_prep.errors import DataPrepError
from data_prep.tokenizer import Tokenizer as DataPrepTokenizer, read_special_tokens
from longtrain.export.errors import ExportError
from longtrain.run_dir import TOKENIZER_DIR  # the run folder's tokenizer copy



def tokenizer_source(tag_dir: Path, state: dict[str, Any]) -> Path | None:
    """The run's copy of its tokenizer: beside the checkpoints (the run folder may have moved), else
    the path recorded at training time."""
    for candidate in (tag_dir.parent.parent / TOKENIZER_DIR, state.get("tokenizer")):
        if candidate and Path(candidate).is_dir() and any(Path(candidate).iterdir()):
            return Path(candidate)
    return None


def _load(path: Path) -> DataPrepTokenizer:
    """The run's tokenizer as data prep loaded it to encode the training rows (one loader, one folder
    preference: ``tokenizer.json`` before ``tokenizer.model``)."""
    try:
        return DataPrepTokenizer(path)
    except DataPrepError as exc:
        raise ExportError(f"tokenizer {path}: {exc}") from None


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

    spm_file = source / "tokenizer.model"
    run_tokenizer = _load(source)
    from_spm = run_tokenizer.kind == "sentencepiece"
    tok_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                                  "model_max_length": model_max_length}
    if from_spm:
        with tempfile.TemporaryDirectory() as tmp:  # only the .model: nothing else steers the conversion
            shutil.copy2(spm_file, Path(tmp) / "tokenizer.model")
            backend = AutoTokenizer.from_pretrained(tmp).backend_tokenizer
        specials = run_tokenizer.special_tokens()
        if add_bos and "bos_token" in specials:
            bos = specials["bos_token"]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, backend.token_to_id(bos))])
        backend.save(str(out / "tokenizer.json"))
        # SentencePiece encodes a special token's string inside a text (WikiText's "<unk>") as ordinary
        # pieces, as the training rows hold it; a converted tokenizer.json would match it as the special
        # token. `split_special_tokens` keeps it text in transformers and in data prep's loader alike.
        tok_config["split_special_tokens"] = True
    else:
        shutil.copy2(source / "tokenizer.json", out / "tokenizer.json")
        backend = Tokenizer.from_file(str(out / "tokenizer.json"))
        specials, source_config = read_special_tokens(source)  # as data prep reads them
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


def check_tokenizer(out: Path, source: Path, texts: list[str], fast=None) -> TokenizerCheck:
    """The exported ``tokenizer.json`` (loaded as ``PreTrainedTokenizerFast``, the class its config
    names) encodes like the run's tokenizer as data prep loads it (``data_prep.tokenizer.Tokenizer``: its
    ``tokenizer.json`` through ``tokenizers``, else SentencePiece itself for a ``tokenizer.model``);
    BOS/EOS ids agree. Raises ``ExportError`` otherwise.

    Also reports what ``AutoTokenizer`` does with the folder: transformers 5.x ignores
    ``tokenizer_class`` for some model types (e.g. qwen2, phi3: ``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``)
    and rebuilds that family's own pipeline over our vocabulary, which is wrong for a foreign tokenizer.
    """

    fast = fast or PreTrainedTokenizerFast.from_pretrained(out)  # the caller's, when it loaded it already
    ref = _load(source)  # the tokenizer the training rows were encoded with, loaded the same way
    reference = str(source / "tokenizer.json") if ref.kind == "hf" else f"SentencePiece({source / 'tokenizer.model'})"
    ids = {"bos_token_id": ref.bos_id, "eos_token_id": ref.eos_id}
    compared, auto_differs = 0, False
    auto = AutoTokenizer.from_pretrained(out)
    for text in [TOKENIZER_CHECK_TEXT, *texts]:
        want = ref.encode(text)
        got = fast.encode(text, add_special_tokens=False)
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

    return transformers.__version__
