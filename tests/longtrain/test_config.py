"""Run config: strict typed loading, dotted overrides, DeepSpeed JSON generation."""
from __future__ import annotations

import pytest
import yaml

from longtrain.config import ConfigError, apply_override, config_from_dict, load_config
from longtrain.ds_config import build_deepspeed_config


def base_raw():
    return {
        "model": {"config": {"model_type": "llama", "hidden_size": 64}},
        "train": {"zero_stage": 2, "precision": "fp32"},
        "stages": [
            {"seq_len": 128, "rope": {"type": "default", "theta": 10000}, "data": "d128", "lr": 1e-3, "steps": 5},
            {"name": "long", "seq_len": 512, "rope": {"type": "default", "theta": 1e6}, "data": "d512",
             "lr": 5e-4, "tokens": 100000, "grad_accum": 2},
        ],
    }


def test_valid_config_builds_typed_stages():
    cfg = config_from_dict(base_raw())
    assert [s.name for s in cfg.stages] == ["stage0", "long"]
    assert cfg.stages[1].grad_accum == 2 and cfg.stages[1].steps is None
    assert cfg.train.optimizer.betas == [0.9, 0.95]


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["stages"][0].update(foo=1), "unknown key stages.0.foo"),
    (lambda r: r["train"].update(zero_stag=2), "unknown key train.zero_stag"),
    (lambda r: r["stages"][0].update(seq_len="long"), "stages.0.seq_len: expected an integer"),
    (lambda r: r["stages"][1].update(steps=3), "exactly one of stages.1.steps or stages.1.tokens"),
    (lambda r: r["stages"][0].update(seq_len=1), "stages.0.seq_len must be >= 2"),
    (lambda r: r["stages"][0]["rope"].update(type="ntk"), "stages.0.rope.type must be one of"),
    (lambda r: r["stages"][0].update(sp_mode="tree"), "stages.0.sp_mode must be one of"),
    (lambda r: r["train"].update(zero_stage=4), "train.zero_stage must be 0, 1, 2 or 3"),
    (lambda r: r["train"].update(offload_param=True), "offload_param needs train.zero_stage: 3"),
    (lambda r: r["train"].update(activation_checkpointing="yes"), "expected true or false"),
    (lambda r: r["stages"][0].pop("lr"), "missing required key stages.0.lr"),
    (lambda r: r["stages"][1].update(name="stage0"), "names must be unique"),
    (lambda r: r.update(stages=[]), "at least one stage"),
    (lambda r: r["model"].update(name_or_path="x"), "exactly one of model.name_or_path"),
])
def test_errors_name_the_key(mutate, message):
    raw = base_raw()
    mutate(raw)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config_from_dict(raw)


def test_yaml_scientific_strings_are_numbers():
    raw = base_raw()
    raw["stages"][0]["lr"] = "3e-4"  # PyYAML reads 3e-4 (no dot) as a string
    raw["stages"][1]["tokens"] = "1e5"
    cfg = config_from_dict(raw)
    assert cfg.stages[0].lr == 3e-4 and cfg.stages[1].tokens == 100000


def test_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base_raw()))
    cfg = load_config(path, ["stages.1.grad_accum=4", "train.zero_stage=3", "stages.0.rope.theta=500000",
                             "deepspeed.zero_optimization.reduce_bucket_size=1000"])
    assert cfg.stages[1].grad_accum == 4 and cfg.train.zero_stage == 3
    assert cfg.stages[0].rope["theta"] == 500000
    assert cfg.deepspeed == {"zero_optimization": {"reduce_bucket_size": 1000}}
    # Relative data paths become absolute against the working directory.
    assert cfg.stages[0].data.endswith("/d128") and cfg.stages[0].data.startswith("/")
    with pytest.raises(ConfigError, match="unknown key stages.0.seqlen"):
        load_config(path, ["stages.0.seqlen=3"])
    with pytest.raises(ConfigError, match="index 7 out of range"):
        load_config(path, ["stages.7.steps=3"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_override({}, "stages.0.steps")


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_deepspeed_config_generation_and_passthrough():
    raw = base_raw()
    raw["train"].update(zero_stage=3, offload_optimizer=True, precision="bf16", grad_clip=0.5)
    raw["deepspeed"] = {"zero_optimization": {"stage3_prefetch_bucket_size": 123}, "comms_logger": {"enabled": True}}
    cfg = config_from_dict(raw)
    ds = build_deepspeed_config(cfg, world_size=4, on_cuda=False)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 123  # merged, not replaced
    assert ds["comms_logger"] == {"enabled": True}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5
    assert ds["train_batch_size"] == ds["gradient_accumulation_steps"] * 4
    assert "torch_adam" not in ds["optimizer"]["params"]  # offload -> DeepSpeedCPUAdam
    raw["train"].update(offload_optimizer=False, zero_stage=2, precision="fp32")
    ds = build_deepspeed_config(config_from_dict(raw), world_size=1, on_cuda=False)
    assert ds["optimizer"]["params"]["torch_adam"] is True


def test_include_presets_merge_and_the_including_file_wins(tmp_path):
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump({"train": {"zero_stage": 3, "precision": "bf16"}}))
    raw = base_raw()
    raw["include"] = ["preset.yaml"]
    raw["train"] = {"precision": "fp32"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.train.zero_stage == 3 and cfg.train.precision == "fp32"
    (tmp_path / "loop.yaml").write_text("include: [loop.yaml]\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "loop.yaml")


@pytest.mark.parametrize("recipe", ["tiny_cpu.yaml", "qwen2_7b_4k_to_32k.yaml", "llama3_8b_8k_to_64k.yaml"])
def test_shipped_recipes_validate(recipe):
    from tests.support.paths import REPO_ROOT

    path = REPO_ROOT / "configs" / recipe
    if not path.exists():
        pytest.skip(f"{recipe} not written yet")
    cfg = load_config(path)
    assert cfg.stages


def test_bf16_fp32_grad_accumulation_only_with_zero():
    """DeepSpeed 0.19 refuses bf16 weights with fp32 gradient accumulation without ZeRO."""
    raw = base_raw()
    raw["train"].update(precision="bf16", zero_stage=0)
    assert "data_types" not in build_deepspeed_config(config_from_dict(raw), 1, False)
    raw["train"]["zero_stage"] = 1
    assert build_deepspeed_config(config_from_dict(raw), 1, False)["data_types"] == {"grad_accum_dtype": "fp32"}


def test_stage_max_position_embeddings_keeps_the_original_length_for_dynamic_ntk():
    """transformers' dynamic NTK scales only beyond max_position_embeddings: a dynamic stage that set
    it to its own seq_len would train exactly like `default` (found by the long-context study)."""
    from longtrain.stages import stage_max_position_embeddings

    raw = base_raw()
    raw["stages"][1]["rope"] = {"type": "dynamic", "theta": 10000, "factor": 4}
    raw["stages"][0]["max_position_embeddings"] = 200
    cfg = config_from_dict(raw)
    assert stage_max_position_embeddings(cfg.stages[1], original_max=128) == 128
    assert stage_max_position_embeddings(cfg.stages[0], original_max=128) == 200  # explicit wins
    raw["stages"][1]["rope"] = {"type": "default", "theta": 1e6}
    assert stage_max_position_embeddings(config_from_dict(raw).stages[1], original_max=128) == 512
