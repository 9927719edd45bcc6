"""Start-up choices a GPU run depends on, checked on CPU: the optimizer DeepSpeed builds, the keys that
choose kernels and long-row memory, the MFU peak table and the memory fields of metrics.jsonl."""
from __future__ import annotations

import json

import pytest
import torch

from longtrain.config import ConfigError, TrainConfig, config_from_dict
from longtrain.ds_config import build_deepspeed_config, optimizer_impl
from longtrain.engine import loss_module
from longtrain.metrics import GPU_PEAK_FLOPS, MetricsLogger, gpu_peak_flops
from tests.support import models
from tests.support.distributed import run_distributed


def _cfg(**train):
    return config_from_dict({"model": {"config": models.tiny_model_config()}, "train": {"precision": "fp32", **train},
                             "stages": [{"seq_len": 64, "rope": {"type": "default", "theta": 10000},
                                         "data": "unused", "lr": 1e-3, "steps": 1}]})


def test_auto_optimizer_on_cuda_is_fused_torch_adamw():
    """No DeepSpeed FusedAdam JIT build (it fails where TORCH_CUDA_ARCH_LIST=9.0a): torch AdamW, fused."""
    assert optimizer_impl(_cfg(), on_cuda=True) == "torch"
    params = build_deepspeed_config(_cfg(), 1, on_cuda=True)["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    assert "fused" not in build_deepspeed_config(_cfg(), 1, on_cuda=False)["optimizer"]["params"]
    offload = build_deepspeed_config(_cfg(zero_stage=2, offload_optimizer=True), 1, on_cuda=True)
    assert "fused" not in offload["optimizer"]["params"] and "torch_adam" not in offload["optimizer"]["params"]
    explicit = build_deepspeed_config(_cfg(optimizer={"impl": "fused"}), 1, on_cuda=True)["optimizer"]["params"]
    assert explicit["torch_adam"] is False and "fused" not in explicit  # DeepSpeed's FusedAdam, asked for


def fused_optimizer_worker(rank: int, world: int) -> dict:
    """DeepSpeed 0.19.8 builds the optimizer of the CUDA config; torch's fused AdamW also runs on CPU."""
    from longtrain.batching import make_packed_batch
    from longtrain.engine import build_engine
    from longtrain.model import load_model

    cfg = _cfg(zero_stage=2)
    engine = build_engine(loss_module(load_model(cfg.model), cfg.train), build_deepspeed_config(cfg, 1, True), 0.1)
    batch = make_packed_batch([{"input_ids": list(range(3, 67)), "doc_lens": [30, 34], "loss_mask": [1] * 64}])
    before = next(engine.module.parameters()).detach().clone()
    loss = engine(batch.input_ids, batch.position_ids, batch.labels, batch.cu_seqlens, batch.max_seqlen)
    engine.backward(loss / batch.num_targets)
    engine.step()
    opt = engine.basic_optimizer
    return {"type": type(opt).__name__, "fused": opt.defaults.get("fused"),
            "moved": (next(engine.module.parameters()).detach() - before).abs().max().item()}


def test_deepspeed_builds_torch_adamw_with_fused(tmp_path):
    (result,) = run_distributed(fused_optimizer_worker, 1, tmp_path)
    assert result["type"] == "AdamW" and result["fused"] is True and result["moved"] > 0


def test_config_keys():
    train = TrainConfig()
    assert (train.attention, train.tiled_mlp, train.offload_activations) == ("auto", 1, False)
    assert _cfg(tiled_mlp="auto", attention="sdpa_loop", offload_activations=True).train.tiled_mlp == "auto"
    for bad in (0, -2, "4", True, 2.5):
        with pytest.raises(ConfigError, match="train.tiled_mlp must be a positive integer"):
            _cfg(tiled_mlp=bad)
    with pytest.raises(ConfigError, match="train.attention must be one of auto, flash_attn, torch_varlen, sdpa_loop"):
        _cfg(attention="flash")


def test_loss_module_chooses_the_kernel_once_and_refuses_what_cannot_run():
    model = models.tiny_model("llama")
    module = loss_module(model, TrainConfig(precision="bf16"), device=torch.device("cpu"))
    assert module.attention_backend.name == "sdpa_loop"
    assert module.describe().startswith("attention kernel sdpa_loop (auto: exact per-document path on cpu")
    cuda = loss_module(models.tiny_model("llama"), TrainConfig(precision="bf16"), device=torch.device("cuda"))
    assert cuda.attention_backend.name in ("flash_attn", "torch_varlen")  # a FlashAttention kernel on CUDA bf16
    with pytest.raises(ConfigError, match="train.attention: torch_varlen cannot run here: it needs a CUDA device"):
        loss_module(models.tiny_model("llama"), TrainConfig(attention="torch_varlen"), device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="needs bf16 or fp16"):
        loss_module(models.tiny_model("llama"), TrainConfig(attention="torch_varlen", precision="fp32"),
                    device=torch.device("cuda"))


def test_gpu_peak_table():
    assert gpu_peak_flops("NVIDIA H200") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12 and gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and gpu_peak_flops("NVIDIA A10") == 125e12
    assert gpu_peak_flops("NVIDIA L40S") == 362e12 and gpu_peak_flops("NVIDIA L4") == 121e12
    assert gpu_peak_flops("Some Other GPU") is None and all(v > 1e14 for v in GPU_PEAK_FLOPS.values())


def test_metrics_memory_fields(tmp_path):
    logger = MetricsLogger(tmp_path, True, 1, 1, tensorboard=False)
    logger.log_step({"step": 1, "stage": "s", "loss": 1.0, "lr": 1e-3, "tokens_per_s": 1.0, "peak_mem_gb": 0.5,
                     "seq_len": 64, "rope_theta": 1e4, "step_seconds": 1.0})
    logger.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["peak_mem_gb"] == 0.5
    assert ("peak_reserved_gb" in record) == (torch.cuda.is_available() and torch.cuda.is_initialized())


@pytest.mark.gpu
def test_metrics_log_reserved_memory_on_cuda(tmp_path):
    torch.ones(1, device="cuda")
    logger = MetricsLogger(tmp_path, True, 1, 1, tensorboard=False)
    logger.log_step({"step": 1, "stage": "s", "loss": 1.0, "lr": 1e-3, "tokens_per_s": 1.0, "peak_mem_gb": 0.5,
                     "seq_len": 64, "rope_theta": 1e4, "step_seconds": 1.0})
    logger.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["peak_reserved_gb"] >= torch.cuda.max_memory_allocated() / 2**30
