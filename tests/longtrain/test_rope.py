"""RoPE schedule: a model changed in place computes exactly what a freshly built model computes."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from longtrain.rope import ROPE_TYPES, apply_rope, describe_rope, rope_parameters
from tests.support import env, models

ORIG_LEN = 64  # the tiny models' "pretraining" length
TINY = dict(vocab_size=256, max_position_embeddings=ORIG_LEN, tie_word_embeddings=False)
# A schedule as the trainer applies it: ABF steps, then each scaling method (our config form, new length).
SCHEDULE = [
    ({"type": "default", "theta": 10000.0}, ORIG_LEN),
    ({"type": "default", "theta": 500000.0}, 128),
    ({"type": "yarn", "theta": 500000.0, "factor": 4.0, "beta_fast": 32, "beta_slow": 1}, 256),
    ({"type": "linear", "theta": 10000.0, "factor": 4.0}, 256),
    ({"type": "dynamic", "theta": 10000.0, "factor": 4.0}, ORIG_LEN),
    ({"type": "llama3", "theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 512),
    ({"type": "longrope", "theta": 1e4, "short_factor": [1.0] * 8, "long_factor": [1.0, 1.2, 1.5, 2, 2.5, 3, 4, 4],
      "factor": 4.0}, 256),
    # a second LongRoPE stage: transformers caches the long set in a plain attribute, which must not go stale
    ({"type": "longrope", "theta": 1e4, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}, 256),
    ({"type": "yarn", "theta": 1e6, "factor": 2.0, "attention_factor": 1.3, "original_max_position_embeddings": 32},
     64),
]


def _build(arch: str, **overrides):
    return models.tiny_model(arch, **{**TINY, **overrides}).eval()


def _fresh_like(arch: str, model, rope_params: dict, max_len: int):
    """A model built from scratch with this RoPE config, carrying `model`'s weights (fp32)."""
    fresh = _build(arch, rope_parameters=copy.deepcopy(rope_params), max_position_embeddings=max_len)
    missing, unexpected = fresh.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    assert not missing and not unexpected
    return fresh


@pytest.mark.parametrize("arch", sorted(models.ARCHS))
def test_each_transition_matches_a_fresh_model(arch):
    model = _build(arch)
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(1))
    for rope, max_len in SCHEDULE:
        params = rope_parameters(rope, original_max_position_embeddings=ORIG_LEN)
        apply_rope(model, params, max_len)
        fresh = _fresh_like(arch, model, params, max_len)
        ours_rot, ref_rot = model.model.rotary_emb, fresh.model.rotary_emb
        assert ref_rot.rope_type == ours_rot.rope_type == rope["type"]
        torch.testing.assert_close(ours_rot.inv_freq, ref_rot.inv_freq, rtol=0, atol=0)
        torch.testing.assert_close(ours_rot.original_inv_freq, ref_rot.original_inv_freq, rtol=0, atol=0)
        assert ours_rot.attention_scaling == ref_rot.attention_scaling
        assert ours_rot.max_seq_len_cached == ref_rot.max_seq_len_cached == max_len
        assert model.config.rope_parameters == fresh.config.rope_parameters
        assert "rope_theta" not in model.config.to_dict()  # never the stray 4.x key (DESIGN.md section 3)
        with torch.no_grad():  # 96 tokens: beyond ORIG_LEN, so dynamic NTK also scales here
            torch.testing.assert_close(model(ids, use_cache=False).logits, fresh(ids, use_cache=False).logits,
                                       rtol=0, atol=0)


def test_base_change_really_changes_the_model():
    """Guard against a vacuous pass: the schedule's steps give different frequencies and logits."""
    model = _build("llama")
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before, freq_before = model(ids, use_cache=False).logits, model.model.rotary_emb.inv_freq.clone()
        apply_rope(model, rope_parameters({"type": "default", "theta": 1e6}, original_max_position_embeddings=64), 128)
        after = model(ids, use_cache=False).logits
    assert not torch.equal(freq_before, model.model.rotary_emb.inv_freq)
    assert (before - after).abs().max() > 1e-3


@pytest.mark.parametrize("rope", [s[0] for s in SCHEDULE])
def test_frequencies_are_transformers_own(rope):
    params = rope_parameters(rope, original_max_position_embeddings=ORIG_LEN)
    model = _build("llama")
    apply_rope(model, params, 256)
    config = models.tiny_config("llama", **{**TINY, "rope_parameters": copy.deepcopy(params), "max_position_embeddings": 256})
    if rope["type"] == "default":
        expected, scaling = LlamaForCausalLM(config).model.rotary_emb.compute_default_rope_parameters(config)
    else:
        expected, scaling = ROPE_INIT_FUNCTIONS[rope["type"]](config, None)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected, rtol=0, atol=0)
    assert model.model.rotary_emb.attention_scaling == scaling


def test_inv_freq_stays_fp32_after_bf16_cast():
    model = _build("qwen2").to(torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.bfloat16  # the trap this guards against
    params = rope_parameters({"type": "default", "theta": 1e6}, original_max_position_embeddings=ORIG_LEN)
    apply_rope(model, params, 32768)
    rot = model.model.rotary_emb
    assert rot.inv_freq.dtype == rot.original_inv_freq.dtype == torch.float32
    fresh = _fresh_like("qwen2", model, params, 32768)
    torch.testing.assert_close(rot.inv_freq, fresh.model.rotary_emb.inv_freq, rtol=0, atol=0)
    # Why it matters: a bf16 inv_freq at base 1e6 and position 32767 is off by radians.
    pos = torch.tensor(32767.0)
    assert (pos * rot.inv_freq.bfloat16().float() - pos * rot.inv_freq).abs().max() > 1.0
    assert "inv_freq" not in str(list(model.state_dict()))  # still non-persistent
    assert "float32" in describe_rope(model) and "rope_theta=1000000.0" in describe_rope(model)


def test_reapply_resets_dynamic_ntk_state():
    """DESIGN.md 3b trap (b): transformers' dynamic NTK keeps an enlarged base after a long forward."""
    model = _build("llama")
    params = rope_parameters({"type": "dynamic", "theta": 10000.0, "factor": 4.0}, original_max_position_embeddings=64)
    apply_rope(model, params, 64)
    start = model.model.rotary_emb.inv_freq.clone()
    with torch.no_grad():
        model(torch.zeros(1, 200, dtype=torch.long), use_cache=False)
    assert not torch.equal(model.model.rotary_emb.inv_freq, start)  # enlarged: stale for a later short forward
    apply_rope(model, params, 64)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, start, rtol=0, atol=0)
    assert model.model.rotary_emb.max_seq_len_cached == 64


def test_conversion_to_transformers_form():
    assert rope_parameters({"type": "default", "theta": 1e6}, original_max_position_embeddings=4096) == {
        "rope_type": "default", "rope_theta": 1e6}
    assert rope_parameters({"type": "llama3", "theta": 5e5, "factor": 8, "low_freq_factor": 1,
                            "high_freq_factor": 4}, original_max_position_embeddings=8192) == {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    # an explicit original length wins over the argument
    yarn = rope_parameters({"type": "yarn", "theta": 1e4, "factor": 4, "original_max_position_embeddings": 2048},
                           original_max_position_embeddings=4096)
    assert yarn["original_max_position_embeddings"] == 2048 and set(ROPE_TYPES) == {
        "default", "linear", "dynamic", "yarn", "llama3", "longrope"}
    from longtrain import config  # the light copy the YAML is validated against (no transformers import)
    assert config.ROPE_TYPES == ROPE_TYPES


@pytest.mark.parametrize("rope, match", [
    ({"type": "ntk", "theta": 1e4}, r"rope.type 'ntk' is not supported; valid types: default, linear"),
    ({"theta": 1e4}, r"rope.type None is not supported"),
    ({"type": "default"}, r"missing key\(s\) \['theta'\]; keys for default: theta"),
    ({"type": "linear", "theta": 1e4}, r"missing key\(s\) \['factor'\]; keys for linear: factor, theta"),
    ({"type": "default", "theta": 1e4, "factor": 2}, r"unexpected key\(s\) \['factor'\]; keys for default: theta"),
    ({"type": "yarn", "theta": 1e4, "factor": 2, "beta": 3}, r"unexpected key\(s\) \['beta'\]; keys for yarn: "
                                                             r"attention_factor, beta_fast, beta_slow, factor"),
    ({"type": "default", "theta": -5}, r"rope.theta must be a number > 0"),
    ({"type": "default", "theta": "1e6"}, r"rope.theta must be a number > 0, got '1e6'.*write 1.0e6 or 1000000"),
    ({"type": "linear", "theta": 1e4, "factor": 0.5}, r"rope.factor must be a number >= 1.0"),
    ({"type": "llama3", "theta": 1e4, "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1},
     r"high_freq_factor must be > rope.low_freq_factor"),
    ({"type": "yarn", "theta": 1e4, "factor": 4, "original_max_position_embeddings": 4096.5},
     r"original_max_position_embeddings must be a positive integer"),
    ("default", r"rope must be a mapping"),
    ({"type": "longrope", "theta": 1e4, "short_factor": [1, 1], "long_factor": 4},
     r"rope.long_factor must be a non-empty list of positive numbers"),
])
def test_bad_config_is_a_clear_error(rope, match):
    with pytest.raises(ValueError, match=match):
        rope_parameters(rope, original_max_position_embeddings=4096)


def test_apply_through_a_wrapper_module():
    """The trainer's DeepSpeed module wraps the HF model (no .config of its own): the rotary module is found."""
    model = _build("mistral")
    wrapper = torch.nn.ModuleDict({"hf_model": model})
    apply_rope(wrapper, rope_parameters({"type": "default", "theta": 1e6}, original_max_position_embeddings=64), 128)
    assert model.config.rope_parameters["rope_theta"] == 1e6 and model.config.max_position_embeddings == 128
    assert "rope_theta=1000000.0" in describe_rope(wrapper)


def test_apply_rejects_bad_arguments():
    model = _build("llama")
    with pytest.raises(ValueError, match="max_position_embeddings must be a positive int"):
        apply_rope(model, {"rope_type": "default", "rope_theta": 1e4}, 0)
    with pytest.raises(ValueError, match="rope_type'\\]='ntk'"):
        apply_rope(model, {"rope_type": "ntk", "rope_theta": 1e4}, 64)
    with pytest.raises(ValueError, match="invalid rope_params .*factor"):  # transformers' own validation
        apply_rope(model, {"rope_type": "linear", "rope_theta": 1e4}, 64)
    with pytest.raises(ValueError, match="need original_max_position_embeddings"):  # transformers' silent default
        apply_rope(model, {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, 256)
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}  # left untouched
    with pytest.raises(ValueError, match=r"rope.short_factor has 3 factors but this model needs 8 \(head_dim 16"):
        apply_rope(model, rope_parameters({"type": "longrope", "theta": 1e4, "short_factor": [1] * 3,
                                           "long_factor": [1] * 8}, original_max_position_embeddings=64), 256)
    with pytest.raises(ValueError, match="has no rotary embedding module"):
        apply_rope(torch.nn.Linear(2, 2), {"rope_type": "default", "rope_theta": 1e4}, 64)


_ZERO3_SCRIPT = r'''
import copy, json, os, sys
import torch
import deepspeed
from transformers import LlamaConfig, LlamaForCausalLM
from longtrain.rope import apply_rope, rope_parameters

cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.bfloat16)  # bf16 buffers: the trap
state = {k: v.clone() for k, v in model.state_dict().items()}
ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
params = rope_parameters({"type": "default", "theta": 1e6}, original_max_position_embeddings=64)
apply_rope(engine.module, params, 4096)

fresh = LlamaForCausalLM(LlamaConfig(**{**cfg, "rope_parameters": copy.deepcopy(params),
                                        "max_position_embeddings": 4096}))
fresh.load_state_dict(state)
plain = copy.deepcopy(fresh).to(torch.bfloat16)  # the same change on a plain bf16 model, no DeepSpeed
apply_rope(plain, params, 4096)
trapped = copy.deepcopy(fresh).to(torch.bfloat16)  # inv_freq cast to bf16
ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))
pos = torch.arange(100).unsqueeze(0) + 3000
engine.eval()
with torch.no_grad():
    ours = engine(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
    ref = plain(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
    bad = trapped(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
rot = engine.module.model.rotary_emb
result = {"dtype": str(rot.inv_freq.dtype), "orig_dtype": str(rot.original_inv_freq.dtype),
          "param_dtype": str(next(engine.module.parameters()).dtype),
          "freq_equal": torch.equal(rot.inv_freq, fresh.model.rotary_emb.inv_freq),
          "max_diff": (ours - ref).abs().max().item(), "trap_diff": (ours - bad).abs().max().item()}
open(sys.argv[1], "w").write(json.dumps(result))
torch.distributed.destroy_process_group()
'''


def test_apply_on_deepspeed_zero3_bf16_engine(tmp_path):
    """On engine.module under ZeRO-3 bf16: fp32 frequencies equal a fresh model's; logits equal a plain model's."""
    pytest.importorskip("deepspeed")
    child = env.child_env(PYTHONPATH=str(env.REPO_ROOT), **env.single_rank_vars())
    script, out = tmp_path / "zero3.py", tmp_path / "result.json"
    script.write_text(_ZERO3_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(out)], env=child, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert out.exists(), f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert result["param_dtype"] == "torch.bfloat16"
    assert result["dtype"] == result["orig_dtype"] == "torch.float32"
    assert result["freq_equal"]
    assert result["max_diff"] == 0.0
    assert result["trap_diff"] > 0.0  # positions ~3000 at base 1e6: bf16 frequencies change the output


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2))


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=16))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma2"])
def test_one_rotary_finder_for_training_export_and_eval(arch):
    """`rotary_modules` is the only finder: apply_rope, describe_rope, the model check, export's
    verification and eval's reset all see the same module."""
    from longtrain.eval.loading import reset_rotary_embeddings
    from longtrain.model import check_model_supported
    from longtrain.rope import rotary_modules

    model = _gemma2() if arch == "gemma2" else _build(arch)
    assert rotary_modules(model) == [("model.rotary_emb", model.model.rotary_emb)]
    check_model_supported(model)
    apply_rope(model, {"rope_type": "default", "rope_theta": 5e5}, 128)
    assert "rope default (rope_theta=500000.0)" in describe_rope(model)
    assert reset_rotary_embeddings(model) == 1 and rotary_modules(model)[0][1] is model.model.rotary_emb


def test_a_model_without_rope_is_named_or_left_alone():
    """Training and export need a rotary module (errors say what is missing); eval scores any causal LM."""
    from longtrain.config import ConfigError
    from longtrain.eval.loading import check_rotary_matches_config, reset_rotary_embeddings
    from longtrain.model import check_model_supported
    from longtrain.rope import rotary_modules

    model = _gpt2()  # learned absolute positions
    assert rotary_modules(model, required=False) == []
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel has no rotary embedding module \(a module with an "
                                         r"`inv_freq` buffer"):
        rotary_modules(model)
    with pytest.raises(ConfigError, match="GPT2LMHeadModel is not a supported RoPE causal LM"):
        check_model_supported(model)
    with pytest.raises(ValueError, match="has no rotary embedding module"):
        describe_rope(model)
    assert reset_rotary_embeddings(model) == 0
    check_rotary_matches_config(model, "gpt2")  # nothing to compare: no error
