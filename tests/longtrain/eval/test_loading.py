"""Tokenizer backends and the RoPE-vs-config check of model loading."""
from __future__ import annotations

import pytest
import torch

from longtrain.eval.loading import EvalLoadError, check_rotary_matches_config, load_tokenizer, rope_settings

from tests.support.models import tiny_llama
from tests.support.text import stdlib_text


def _hf_tokenizer_folder(folder, bos: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [bos] if bos else []
    tok.train_from_iterator(stdlib_text(50_000).splitlines(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("bos", ["<s>", None])
def test_transformers_tokenizer_backend(tmp_path, bos):
    tok = load_tokenizer(_hf_tokenizer_folder(tmp_path, bos))
    assert tok.kind == "hf"  # tokenizer.json through the `tokenizers` library, as data prep reads it
    text = "The pass key is 40712. Remember it."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    if bos:
        assert tok.bos_id is not None and tok.bos_id not in ids  # never added implicitly
    else:
        assert tok.bos_id is None  # e.g. Qwen2: no BOS to add


def test_sentencepiece_backend(stdlib_spm):
    tok = load_tokenizer(stdlib_spm)  # a tokenizer.model file given directly
    assert tok.kind == "sentencepiece" and tok.bos_id == 1 and len(tok.sha256) == 64
    assert tok.decode(tok.encode("def f(x): return 40712")) == "def f(x): return 40712"


def test_rotary_that_differs_from_config_is_refused():
    model = tiny_llama(300, rope={"rope_type": "default", "rope_theta": 500000.0})
    check_rotary_matches_config(model, "ok")  # as built from its config
    assert rope_settings(model.config) == {
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "max_position_embeddings": 128}
    rotary = model.model.rotary_emb
    rotary.inv_freq = rotary.inv_freq * 0.5  # a base change applied without updating the config
    with pytest.raises(EvalLoadError, match="inv_freq differs from what config.rope_parameters"):
        check_rotary_matches_config(model, "changed")
    assert rotary.inv_freq.dtype == torch.float32


_HUB_SCRIPT = r'''
import json, sys
from longtrain.eval.loading import EvalLoadError, load_eval_model

model = load_eval_model("longtrain-test/tiny")
print(json.dumps({"kind": model.tokenizer.kind, "bos": model.tokenizer.bos_id, "file": str(model.tokenizer.file),
                  "ids": model.tokenizer.encode("def f(x): return 40712")}))
try:
    load_eval_model("longtrain-test/not-cached")
except EvalLoadError as exc:
    print(json.dumps({"error": str(exc)}))
'''


def test_hub_name_reads_the_cached_tokenizer_files(tmp_path):
    """A Hub name (here: a model in a Hugging Face cache laid out as huggingface_hub writes it, offline)
    gets its tokenizer from the cached snapshot, loaded by data prep's loader like any folder."""
    import json
    import os
    import subprocess
    import sys

    from tests.support import env

    built = tmp_path / "built"
    tiny_llama(400).save_pretrained(built)
    _hf_tokenizer_folder(built, "<s>")
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--longtrain-test--tiny"
    snapshot, blobs = repo / "snapshots" / revision, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(built.iterdir())):  # snapshot files are links to blobs, as in a real cache
        f.rename(blobs / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    proc = subprocess.run([sys.executable, "-c", _HUB_SCRIPT], capture_output=True, text=True, timeout=300,
                          env=env.child_env(HF_HUB_CACHE=str(tmp_path / "hub"), PYTHONPATH=str(env.REPO_ROOT)))
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 2, proc.stderr[-3000:]
    got, failed = lines
    want = load_tokenizer(snapshot)
    assert want.bos_id is not None  # read from the snapshot's tokenizer_config.json, not beside the blob
    assert got == {"kind": "hf", "bos": want.bos_id, "file": str(want.file), "ids": want.encode("def f(x): return 40712")}
    assert failed["error"].startswith("MODEL longtrain-test/not-cached: cannot load it as a HF causal LM")
