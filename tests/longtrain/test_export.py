"""`longtrain export`, run for real: 2-rank ZeRO-2 / ZeRO-3 training runs (gloo) exported and compared
with the in-training model, RoPE after a base change / linear / YaRN stage, tokenizer files, the
other DeepSpeed layouts (ZeRO-0, BF16_Optimizer, optimizer offload), bad input, transformers 4.46.

"The in-training model" comes from a route independent of the export: the loss the DeepSpeed engine
logged for the step *after* a checkpoint was computed with exactly the checkpoint's weights, on rows
the sample logs name; the export, loaded fresh, must reproduce it with the trainer's own loss module.
The layouts test saves the engine's own logits right after its optimizer step.

Also a script: ``torchrun ... -m tests.longtrain.test_export formats OUT`` (used by the layouts test).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from longtrain import checkpoint
from tests.support import env, models, runs

pytestmark = [pytest.mark.multiproc]


# ------------------------------------------------------------------------------------ runs


def _stages(datasets: dict[int, Path], rope2: dict) -> list[dict]:
    """Stage 1: 64 tokens, base 10k, 2 steps; stage 2: 128 tokens with `rope2`, 3 steps (one row per micro-batch)."""
    return [
        {"name": "s64_base10k", "seq_len": 64, "rope": {"type": "default", "theta": 10000}, "data": str(datasets[64]),
         "steps": 2, "lr": 2e-3, "warmup_steps": 1, "micro_batch_size": 2},
        {"name": f"s128_{rope2['type']}", "seq_len": 128, "rope": rope2, "data": str(datasets[128]), "steps": 3,
         "lr": 1e-3, "micro_batch_size": 1},
    ]


def _two_rank_run(root: Path, datasets, tokenizer, arch: str, zero: int, rope2: dict) -> Path:
    """Checkpoints at steps 2 (stage end), 4 (periodic, mid stage 2) and 5 (end)."""
    config = runs.write_config(root / "run.yaml", _stages(datasets, rope2),
                               {"config": models.tiny_model_config(arch), "tokenizer": str(tokenizer)},
                               {"zero_stage": zero, "checkpoint_every": 4, "keep_checkpoints": 0})
    run_dir = root / "run"
    runs.check(runs.run(runs.torchrun_cmd(2, env.free_port()) + runs.train_args(config, run_dir),
                        log=root / "log.txt"))
    return run_dir


@pytest.fixture(scope="module")
def llama_zero2_run(tmp_path_factory, stdlib_tokenizer, stdlib_datasets) -> Path:
    return _two_rank_run(tmp_path_factory.mktemp("llama_zero2"), stdlib_datasets, stdlib_tokenizer, "llama", 2,
                         {"type": "linear", "factor": 2, "theta": 10000})


@pytest.fixture(scope="module")
def qwen2_zero3_run(tmp_path_factory, stdlib_tokenizer, stdlib_datasets) -> Path:
    return _two_rank_run(tmp_path_factory.mktemp("qwen2_zero3"), stdlib_datasets, stdlib_tokenizer, "qwen2", 3,
                         {"type": "yarn", "factor": 2, "theta": 10000})


# ------------------------------------------------------------------------------------ helpers


def _export(checkpoint_path, out: Path, **kwargs):
    from longtrain.export import export_checkpoint

    lines: list[str] = []
    result = export_checkpoint(checkpoint_path, out, progress=False, log=lines.append, **kwargs)
    return result, "\n".join(lines)


def _load(out: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()


def _step_loss(model, run_dir: Path, step: int) -> float:
    """Loss of optimizer step `step`, recomputed from the rows it read (sample logs) with the trainer's
    own module (document attention, chunked loss). Every stage-2 micro-batch is one row, so the
    engine's forwards were exactly these."""
    from longtrain.attention import register_attention
    from longtrain.batching import make_packed_batch
    from longtrain.data import PreparedDataset
    from longtrain.engine import CausalLMLoss

    resolved = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
    record = next(r for r in runs.metrics(run_dir) if r["step"] == step)
    dataset = PreparedDataset(resolved["stages"][record["stage_index"]]["data"])
    model.set_attn_implementation(register_attention())
    module = CausalLMLoss(model, resolved["train"]["loss_chunk_tokens"])
    total, targets = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for row in runs.rows_per_step(run_dir)[step]:
            batch = make_packed_batch(dataset.rows([row]))
            total += module(batch.input_ids, batch.position_ids, batch.labels, batch.cu_seqlens,
                            batch.max_seqlen).double()
            targets += batch.num_targets
    model.set_attn_implementation("sdpa")
    return total.item() / targets


def _default_inv_freq(theta: float, head_dim: int = 16) -> torch.Tensor:
    # RoFormer's frequencies, computed as transformers does (int64 arange -> float32).
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


def _assert_matches_training(model, run_dir: Path, step: int) -> None:
    """Within fp32 rounding of the loss (here it is bitwise equal); the guard shows that changing one
    of the ~100k weights by 0.05 moves the loss 25x beyond that bound."""
    logged = next(r["loss"] for r in runs.metrics(run_dir) if r["step"] == step)
    assert abs(_step_loss(model, run_dir, step) - logged) <= 1e-7 * logged
    weight = model.model.layers[-1].mlp.down_proj.weight  # deep in the flat order: rank 1's partition
    with torch.no_grad():
        weight[-1, -1] += 0.05
    assert abs(_step_loss(model, run_dir, step) - logged) > 1e-6 * logged
    with torch.no_grad():
        weight[-1, -1] -= 0.05


# ------------------------------------------------------------------------------------ acceptance


@pytest.mark.slow
def test_zero2_llama_two_ranks_export_equals_the_training_model(tmp_path, llama_zero2_run):
    """ZeRO-2, 2 ranks, mid stage 2 (linear RoPE, factor 2): fp32 export == the engine at that step."""
    result, log = _export(llama_zero2_run, tmp_path / "out", tag="4", dtype="fp32")
    verification = result.verification
    assert result.global_step == 4 and verification.passed, log
    assert verification.max_abs_diff <= 1e-5 and verification.same_dtype_max_abs_diff == 0.0
    assert "validation rows of" in verification.source  # real rows, not the random fallback
    model = _load(tmp_path / "out")
    _assert_matches_training(model, llama_zero2_run, 5)
    rotary = model.model.rotary_emb
    assert torch.equal(rotary.inv_freq, _default_inv_freq(10000.0) / 2.0)  # linear: positions / factor
    config = _config(tmp_path / "out")
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and config["rope_theta"] == 10000.0
    assert config["max_position_embeddings"] == 128 and config["torch_dtype"] == config["dtype"] == "float32"


@pytest.mark.slow
def test_zero3_qwen2_two_ranks_export_equals_the_training_model(tmp_path, qwen2_zero3_run):
    """ZeRO-3, 2 ranks, mid stage 2 (YaRN factor 2 over 64): fp32 export == the engine at that step;
    the final checkpoint in the default dtype (bf16) reproduces the checkpoint model cast to bf16."""
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    result, log = _export(qwen2_zero3_run, tmp_path / "out", tag="step_00000004", dtype="fp32")
    assert result.verification.passed and result.verification.max_abs_diff <= 1e-5, log
    assert "YaRN in transformers 4.x" in log  # the 4.x caveat is said
    model = _load(tmp_path / "out")
    _assert_matches_training(model, qwen2_zero3_run, 5)
    # The stage's frequencies, by transformers' own YaRN function on a config built here from the stage.
    stage = Qwen2Config(hidden_size=64, num_attention_heads=4, max_position_embeddings=128, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 64})
    inv_freq, scaling = ROPE_INIT_FUNCTIONS["yarn"](stage, torch.device("cpu"))
    assert torch.equal(model.model.rotary_emb.inv_freq, inv_freq)
    assert model.model.rotary_emb.attention_scaling == scaling != 1.0
    assert not torch.equal(inv_freq, _default_inv_freq(10000.0))  # guard: YaRN changed something
    assert _config(tmp_path / "out")["rope_scaling"] == {
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}

    final, log = _export(qwen2_zero3_run, tmp_path / "final")  # newest complete checkpoint, default bf16
    assert final.global_step == 5 and final.dtype == "bf16" and final.verification.passed, log
    assert final.verification.same_dtype_max_abs_diff == 0.0 and final.verification.max_abs_diff > 0.0
    loaded = _load(tmp_path / "final", dtype="auto")
    assert loaded.dtype == torch.bfloat16 and loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    assert "Qwen2Tokenizer" in log  # transformers 5.x AutoTokenizer's override is reported


@pytest.fixture(scope="module")
def baseline_exports(tmp_path_factory, baseline_run) -> dict[str, Path]:
    """The one-process reference run (base 10k -> 1M): step 4 in fp32, step 8 in fp16 in small shards."""
    root = tmp_path_factory.mktemp("baseline_exports")
    _export(baseline_run, root / "step4", tag="4", dtype="fp32")
    _export(baseline_run / "checkpoints", root / "step8", dtype="fp16", max_shard_size="60KB")
    return {"step4": root / "step4", "step8": root / "step8"}


def test_rope_base_change_reproduces_each_stage(baseline_exports):
    step4, step8 = baseline_exports["step4"], baseline_exports["step8"]
    for out, theta, max_pos in ((step4, 1e4, 64), (step8, 1e6, 128)):
        model = _load(out)
        assert torch.equal(model.model.rotary_emb.inv_freq, _default_inv_freq(theta)), out
        config = _config(out)
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == theta
        assert config["rope_scaling"] is None and config["max_position_embeddings"] == max_pos
    index = json.loads((step8 / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((step8 / s).is_file() for s in shards)
    assert "lm_head.weight" not in index["weight_map"]  # tied to the embeddings, stored once
    from safetensors import safe_open

    with safe_open(step8 / shards[0], "pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.float16
    assert _config(step8)["torch_dtype"] == "float16" and _load(step8, "auto").dtype == torch.float16


def test_tokenizer_generation_config_and_model_card(baseline_exports, stdlib_tokenizer):
    import sentencepiece
    from transformers import AutoTokenizer, GenerationConfig

    out = baseline_exports["step8"]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(stdlib_tokenizer))
    assert (out / "tokenizer.model").read_bytes() == stdlib_tokenizer.read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = AutoTokenizer.from_pretrained(out)
    text = Path(json.__file__).read_text()  # real code the tokenizer was not trained on in this form
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    assert tok(text[:300])["input_ids"] == [sp.bos_id(), *sp.encode(text[:300])]  # BOS, as the training rows had
    config, generation = _config(out), GenerationConfig.from_pretrained(out)
    for name, want in (("bos_token_id", sp.bos_id()), ("eos_token_id", sp.eos_id()), ("pad_token_id", sp.pad_id())):
        assert config[name] == getattr(generation, name) == getattr(tok, name) == want, name
    card = (out / "README.md").read_text()
    for expected in ("| 1 | s64_base10k | 64 | default, base 10,000 | 4 | 1,024 |",
                     "| 2 | s128_base1M | 128 | default, base 1,000,000 | 4 |", "from scratch (llama)",
                     "max |logits diff| vs the fp32 checkpoint model", "library_name: transformers"):
        assert expected in card, expected


def test_eval_loads_a_checkpoint_like_its_export(baseline_run, baseline_exports):
    """`longtrain eval` on a checkpoint folder (load_checkpoint_model) == on its fp32 export."""
    from longtrain.eval.loading import load_eval_model

    from_ckpt = load_eval_model(str(baseline_run / "checkpoints" / "step_00000004"), dtype="fp32")
    from_export = load_eval_model(str(baseline_exports["step4"]), dtype="fp32")
    assert from_ckpt.kind == "checkpoint" and from_ckpt.tokenizer.kind == "sentencepiece"
    ids = torch.tensor([from_ckpt.tokenizer.encode("def main():\n    return 40712\n")])
    with torch.no_grad():
        assert torch.equal(from_ckpt.model(ids).logits, from_export.model(ids).logits)
    assert torch.equal(from_ckpt.model.model.rotary_emb.inv_freq, _default_inv_freq(1e4))


def test_sentencepiece_conversion_on_real_tokenizers(tmp_path):
    """transformers' converter, as the export uses it, on tokenizers trained elsewhere (no byte
    fallback, another normaliser), checked token for token on a book."""
    from longtrain.export import check_tokenizer, write_tokenizer
    from tests.support.paths import shared_file

    text = shared_file("corpora", "pride_and_prejudice.txt").read_text(encoding="utf-8")[:100_000]
    for name in ("open_llama_tokenizer.model", "spm_botchan_test_model.model"):
        source, out = tmp_path / name / "src", tmp_path / name / "out"
        source.mkdir(parents=True)
        out.mkdir()
        shutil.copy2(shared_file("tokenizers", name), source / "tokenizer.model")
        info = write_tokenizer(source, out, add_bos=True, model_max_length=4096)
        assert info["from_sentencepiece"] and info["bos_token_id"] == 1 and info["eos_token_id"] == 2
        assert check_tokenizer(out, source, [text]).tokens > 20_000


def test_hf_tokenizer_is_kept_byte_for_byte(tmp_path):
    """A run whose tokenizer is an HF tokenizer.json (e.g. a continued Qwen2): copied as is, its special
    tokens and chat template kept, loadable as PreTrainedTokenizerFast with the same ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from longtrain.export import check_tokenizer, write_tokenizer

    text = Path(json.__file__).parent.joinpath("decoder.py").read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    source, out = tmp_path / "src", tmp_path / "out"
    out.mkdir()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(source)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.update(chat_template="{{ messages[0]['content'] }}", eos_token={"content": "<|endoftext|>"})
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    info = write_tokenizer(source, out, add_bos=True, model_max_length=128)
    assert not info["from_sentencepiece"] and not info["adds_bos"] and info["eos_token_id"] == 0
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert written["chat_template"] == config["chat_template"] and written["eos_token"] == "<|endoftext|>"
    assert check_tokenizer(out, source, [text]).tokens > 1000
    loaded = PreTrainedTokenizerFast.from_pretrained(out)
    assert loaded.encode(text[:200], add_special_tokens=False) == tok.encode(text[:200]).ids


# ------------------------------------------------------------------------------------ bad input


def _cli(*argv: str) -> int:
    from longtrain.cli import main

    return main(["export", *argv, "--no-progress"])


def _no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def _cli_err(capsys, *argv: str) -> str:
    assert _cli(*argv) == 2, argv
    return capsys.readouterr().err


def test_bad_checkpoints_are_refused_clearly(tmp_path, capsys, baseline_run, baseline_exports):
    out = tmp_path / "out"
    run = tmp_path / "run"  # a copy: steps 3, 4 and 6 complete, step 8 cut off mid-write
    shutil.copytree(baseline_run, run)
    (run / "checkpoints" / "step_00000008" / checkpoint.COMPLETE_FILE).unlink()
    complete = sorted(p.name for p in (run / "checkpoints").iterdir() if (p / checkpoint.COMPLETE_FILE).exists())
    assert "step_00000004" in complete and "step_00000008" not in complete
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000008"  # DeepSpeed's pointer
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ((str(tmp_path / "nope"), str(out)), "does not exist"),
        ((str(empty), str(out)), "not a longtrain checkpoint"),
        ((str(baseline_exports["step4"]), str(out)), "looks like an exported Hugging Face folder"),
        ((str(run / "checkpoints" / "step_00000008"), str(out)), "incomplete (no COMPLETE marker"),
        ((str(run), str(out), "--tag", "8"), "incomplete (no COMPLETE marker"),
        ((str(run), str(out), "--tag", "99"), "no checkpoint step_00000099 in"),
        ((str(run), str(out), "--tag", "99"), "complete checkpoints: " + ", ".join(complete)),
        ((str(run), str(out), "--max-shard-size", "lots"), "--max-shard-size 'lots'"),
    ]
    early = run / "checkpoints" / "step_00000009"  # cut off before longtrain_state.json was written
    shutil.copytree(run / "checkpoints" / "step_00000008", early)
    (early / checkpoint.STATE_FILE).unlink()
    cases.append(((str(early), str(out)), "incomplete (no COMPLETE marker"))
    for argv, message in cases:
        assert message in _cli_err(capsys, *argv), argv
        assert not out.exists()
    with pytest.raises(SystemExit):  # argparse's own error for a dtype it does not offer
        _cli(str(run), str(out), "--dtype", "int8")
    # A run folder: the cut-off newest checkpoints are skipped, with a note, and the newest complete
    # one (step 6, in the base-1M stage) exported.
    assert complete[-1] == "step_00000006"
    assert _cli(str(run), str(out), "--dtype", "fp32") == 0
    assert "skipping step_00000008, step_00000009" in capsys.readouterr().out
    assert _config(out)["rope_theta"] == 1e6
    # DeepSpeed's files damaged or missing.
    tag = run / "checkpoints" / "step_00000004"
    optim = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:1000])
    err = _cli_err(capsys, str(tag), str(tmp_path / "o2"))  # found by the manifest before anything is read
    assert f"{tag}: damaged checkpoint: zero_pp_rank_0_mp_rank_00_optim_states.pt: 1000 bytes, " in err
    # Written before manifests (COMPLETE without one): not verifiable, so DeepSpeed's own errors, named.
    record = json.loads((tag / checkpoint.COMPLETE_FILE).read_text())
    del record["manifest"]
    (tag / checkpoint.COMPLETE_FILE).write_text(json.dumps(record))
    assert "DeepSpeed could not consolidate" in _cli_err(capsys, str(tag), str(tmp_path / "o2"))
    optim.unlink()
    assert "ZeRO-2 checkpoint without its *_optim_states.pt" in _cli_err(capsys, str(tag), str(tmp_path / "o2"))
    for states in tag.glob("*_model_states.pt"):
        states.unlink()
    assert "not a DeepSpeed checkpoint" in _cli_err(capsys, str(tag), str(tmp_path / "o2"))
    _no_leftovers(tmp_path)


def test_fp16_overflow_is_refused(tmp_path):
    from longtrain.export import ExportError, write_weights

    tensors = {"a.weight": torch.ones(4, 4), "b.weight": torch.full((2,), 1e5)}  # fp16 max is 65504
    with pytest.raises(ExportError, match="b.weight: values beyond the range of float16"):
        write_weights(tensors, tmp_path, torch.float16, "5GB", progress=False)
    assert write_weights(tensors, tmp_path, torch.bfloat16, "5GB", progress=False) == ["model.safetensors"]


def test_output_folder_rules(tmp_path, capsys, baseline_run):
    tag = str(baseline_run / "checkpoints" / "step_00000004")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    assert "already exists; pass --overwrite" in _cli_err(capsys, tag, str(out))
    assert (out / "old.txt").is_file()
    # --overwrite replaces only an export: a folder with anything else is refused, naming what it holds.
    (out / "notes").mkdir()
    err = _cli_err(capsys, tag, str(out), "--overwrite", "--no-verify")
    assert "replaces only a folder holding a longtrain export, and this one also holds notes/, old.txt" in err
    assert (out / "old.txt").read_text() == "previous export" and (out / "notes").is_dir()
    (out / "old.txt").unlink()
    (out / "notes").rmdir()
    assert _cli(tag, str(out), "--overwrite", "--no-verify") == 0  # an empty folder: nothing to lose
    assert (out / "model.safetensors").is_file()
    assert _cli(tag, str(out), "--overwrite", "--no-verify") == 0  # an export: replaced
    (out / "README.md").write_text("# my own model\n")  # same file names, not written by longtrain export
    assert "no model card written by `longtrain export`" in _cli_err(capsys, tag, str(out), "--overwrite")
    assert (out / "README.md").read_text() == "# my own model\n"
    # Overwriting a folder that holds the checkpoint would delete it (a copy, in case the guard failed).
    shutil.copytree(baseline_run / "checkpoints" / "step_00000004", tmp_path / "run" / "checkpoints" / "step_00000004")
    assert "would delete the checkpoint" in _cli_err(capsys, str(tmp_path / "run"), str(tmp_path / "run"),
                                                     "--overwrite")
    # Unwritable: the parent is a file.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot create its parent folder" in _cli_err(capsys, tag, str(blocker / "out"))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "not writable" in _cli_err(capsys, tag, str(locked / "out"))
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("damage", ["rope_theta", "weight"])
def test_verification_fails_on_a_wrong_folder_and_leaves_nothing(tmp_path, capsys, monkeypatch, baseline_run,
                                                                   damage):
    """Guards against a verification that cannot fail: damage what the export writes."""
    import longtrain.export.api as export  # the module whose names the export steps call

    if damage == "rope_theta":
        real = export.write_config

        def write_config(hf_config, *args):
            hf_config = hf_config.__class__.from_dict(hf_config.to_dict())
            hf_config.rope_parameters = dict(hf_config.rope_parameters, rope_theta=20000.0)
            return real(hf_config, *args)

        monkeypatch.setattr(export, "write_config", write_config)
    else:
        real = export.tensors_to_save

        def tensors_to_save(model):
            tensors = dict(real(model))
            tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.01
            return tensors

        monkeypatch.setattr(export, "tensors_to_save", tensors_to_save)
    out = tmp_path / "out"
    assert _cli(str(baseline_run / "checkpoints" / "step_00000004"), str(out), "--dtype", "fp32") == 1
    captured = capsys.readouterr()
    assert "verification failed" in captured.err and "FAILED" in captured.out
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_help_states_memory():
    result = subprocess.run([sys.executable, "-m", "longtrain.cli", "export", "--help"], capture_output=True,
                            text=True, cwd=env.REPO_ROOT, env=env.child_env(), timeout=60)
    assert result.returncode == 0
    assert "4 bytes per parameter" in result.stdout and "--max-shard-size" in result.stdout


# ------------------------------------------------------------------------------------ layouts


FORMATS = {
    # name: (architecture, train section); ZeRO-1 bf16 runs DeepSpeed's BF16_Optimizer.
    "zero0_fp32": ("llama", {"zero_stage": 0, "precision": "fp32"}),
    "zero1_bf16": ("mistral", {"zero_stage": 1, "precision": "bf16"}),
    "zero2_offload": ("qwen2", {"zero_stage": 2, "precision": "fp32", "offload_optimizer": True,
                                "optimizer": {"impl": "torch"}}),
}


def make_format_checkpoints(out: Path) -> None:
    """One engine per layout in FORMATS (every rank), one optimizer step on a packed batch of random
    rows, then the engine's own logits on a probe and a longtrain checkpoint (checkpoint.save)."""
    import numpy as np
    import torch.distributed as dist

    from longtrain.attention import register_attention
    from longtrain.batching import make_packed_batch
    from longtrain.config import config_from_dict
    from longtrain.ds_config import build_deepspeed_config
    from longtrain.model import load_model
    from longtrain.distributed import init_distributed
    from longtrain.engine import CausalLMLoss, build_engine
    from longtrain.rope import apply_rope, rope_parameters

    init_distributed()
    rng = np.random.default_rng(dist.get_rank())
    rows = [{"input_ids": rng.integers(4, 512, 64), "doc_lens": [40, 24], "loss_mask": np.ones(64, dtype=np.uint8)}
            for _ in range(2)]  # two packed rows of two documents each, different on each rank
    batch = make_packed_batch(rows)
    probe = torch.from_numpy(np.random.default_rng(99).integers(4, 512, (2, 48)))
    for name, (arch, train) in FORMATS.items():
        stage = {"name": "s", "seq_len": 64, "rope": {"type": "default", "theta": 500000}, "data": str(out),
                 "steps": 1, "lr": 1e-2}
        cfg = config_from_dict({"model": {"config": models.tiny_model_config(arch)}, "stages": [stage],
                                "train": train, "deepspeed": {"zero_force_ds_cpu_optimizer": False}})
        model = load_model(cfg.model)
        model.set_attn_implementation(register_attention())
        engine = build_engine(CausalLMLoss(model, 48), build_deepspeed_config(cfg, 2, False), 0.1)
        params = rope_parameters(stage["rope"], original_max_position_embeddings=64)
        apply_rope(model, params, 64)  # after initialize, as the trainer does (bf16 cast inv_freq)
        loss = engine(batch.input_ids, batch.position_ids, batch.labels, batch.cu_seqlens, batch.max_seqlen)
        engine.backward(loss / batch.num_targets)
        engine.step()
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            logits = model(input_ids=probe, use_cache=False).logits.float()
        model.set_attn_implementation(register_attention())
        if dist.get_rank() == 0:
            (out / name).mkdir(parents=True, exist_ok=True)
            torch.save({"probe": probe, "logits": logits}, out / name / "engine_logits.pt")
        state = {"global_step": 1, "stage_index": 0, "step_in_stage": 1, "stage_name": "s", "tokens_seen": 256,
                 "stages": [dict(stage, steps_done=1, tokens=256)], "source_model": f"from scratch ({arch})",
                 "tokenizer": None, "config": cfg.to_dict()}
        checkpoint.save(engine, out / name / "checkpoints", state, model.config, keep_last=0)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def format_checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("formats")
    cmd = [str(runs.BIN / "torchrun"), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(env.free_port()), "-m", "tests.longtrain.test_export", "formats", str(root)]
    runs.check(runs.run(cmd, log=root / "log.txt"))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FORMATS))
def test_other_deepspeed_layouts_equal_the_engine(tmp_path, format_checkpoints, name):
    """ZeRO-0 (module weights), ZeRO-1 bf16 (BF16_Optimizer's partitions), ZeRO-2 with optimizer
    offload: the export computes what the engine computed right after its step."""
    dtype = "bf16" if "bf16" in name else "fp32"
    result, log = _export(format_checkpoints / name, tmp_path / "out", dtype=dtype)
    assert result.verification.passed, log
    assert "no tokenizer copy" in log and not (tmp_path / "out" / "tokenizer.json").exists()
    saved = torch.load(format_checkpoints / name / "engine_logits.pt")
    model = _load(tmp_path / "out", dtype="auto")
    with torch.no_grad():
        logits = model(input_ids=saved["probe"]).logits.float()
    # bf16: the engine's bf16 weights are its fp32 master weights rounded, as the export's are.
    assert (logits - saved["logits"]).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------ transformers 4.46


COMPAT_VENV = env.REPO_ROOT / ".venv" / "compat-tf446"
COMPAT_SCRIPT = r"""
import json, sys, torch, transformers, warnings
from transformers import AutoModelForCausalLM, AutoTokenizer
warnings.simplefilter("ignore")
out = {"version": transformers.__version__}
for path in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor(json.loads(sys.argv[1]))
    with torch.no_grad():
        logits = model(ids).logits
    out[path] = {"rope_theta": model.config.rope_theta, "rope_scaling": model.config.rope_scaling,
                 "inv_freq": model.model.rotary_emb.inv_freq.tolist(), "logits": logits.tolist(),
                 "tokenizer": type(tok).__name__, "encoded": tok("def f(x):\n    return 40712")["input_ids"]}
print("RESULT" + json.dumps(out))
"""


def _compat_python() -> Path:
    """A venv with transformers 4.46 over this venv's torch (built once, cached under .venv/)."""
    python = COMPAT_VENV / "bin" / "python"
    probe = [str(python), "-c", "import transformers, torch; assert transformers.__version__.startswith('4.46')"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    shutil.rmtree(COMPAT_VENV, ignore_errors=True)
    base = Path(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([str(base), "-m", "venv", str(COMPAT_VENV)], check=True, capture_output=True)
    site = next(COMPAT_VENV.glob("lib/python*/site-packages"))
    import sysconfig

    # torch, numpy, ... come from this venv, after the compat venv's own packages (a .pth appends to sys.path).
    (site / "zz_longtrain_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    try:
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              "--timeout", "30", "--retries", "1", "transformers==4.46.*"],
                             capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pip = None
    if pip is None or pip.returncode != 0 or subprocess.run(probe, capture_output=True).returncode != 0:
        shutil.rmtree(COMPAT_VENV, ignore_errors=True)
        detail = "timed out" if pip is None else (pip.stderr or pip.stdout)[-500:]
        pytest.skip(f"cannot install transformers==4.46.* from the package registry (offline?): {detail}")
    return python


@pytest.mark.online
@pytest.mark.slow
def test_exports_load_in_transformers_4_46(tmp_path, baseline_exports, llama_zero2_run):
    """transformers 4.46 reads rope_theta / rope_scaling (not rope_parameters): the same exports give
    the same frequencies, logits and tokenizer there as in 5.x."""
    python = _compat_python()
    exports = {"base_1M_fp16": baseline_exports["step8"], "base_10k_fp32": baseline_exports["step4"]}
    _export(llama_zero2_run, tmp_path / "linear", tag="4", dtype="fp32")
    exports["linear"] = tmp_path / "linear"
    ids = [[1, 400, 401, 402, 403, 5, 6, 7, 8, 9, 10, 11, 12]]
    proc = subprocess.run([str(python), "-c", COMPAT_SCRIPT, json.dumps(ids), *map(str, exports.values())],
                          capture_output=True, text=True, timeout=300, env=env.child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    old = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert old["version"].startswith("4.46")
    from transformers import AutoTokenizer

    for name, out in exports.items():
        got, config = old[str(out)], _config(out)
        model = _load(out)
        assert got["rope_theta"] == config["rope_parameters"]["rope_theta"], name
        assert torch.equal(torch.tensor(got["inv_freq"]), model.model.rotary_emb.inv_freq), name
        with torch.no_grad():
            want = model(torch.tensor(ids)).logits
        assert (torch.tensor(got["logits"]) - want).abs().max().item() <= 1e-5, name
        assert got["tokenizer"] == "PreTrainedTokenizerFast"
        assert got["encoded"] == AutoTokenizer.from_pretrained(out)("def f(x):\n    return 40712")["input_ids"]
        assert got["encoded"][0] == 1  # BOS added in 4.46 too
    assert old[str(exports["linear"])]["rope_scaling"]["factor"] == 2.0


if __name__ == "__main__":
    if sys.argv[1:2] == ["formats"]:
        make_format_checkpoints(Path(sys.argv[2]))
    else:
        sys.exit("usage: python -m tests.longtrain.test_export formats OUT")
