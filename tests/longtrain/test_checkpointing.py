"""Activation memory: selective checkpointing recomputes layers but not the attention kernel; tiled MLP
and host offload change where activations live, not the loss or the gradients."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from longtrain.activation_checkpointing import (HostOffload, enable_activation_checkpointing, enable_tiled_mlp,
                                                mlp_tiles)
from longtrain.attention import register_attention
from longtrain.batching import make_packed_batch
from longtrain.config import ConfigError, TrainConfig
from longtrain.engine import CausalLMLoss, loss_module
from tests.support import models

FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] = self.counts.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


def _model():
    # transformers' default max_position_embeddings and untied embeddings, as before the shared family
    model = models.tiny_model("llama", vocab_size=300, num_hidden_layers=3, max_position_embeddings=2048,
                              tie_word_embeddings=False)
    register_attention()
    model.set_attn_implementation("longtrain")
    return model.train()


def _batch():
    gen = torch.Generator().manual_seed(1)
    lens = [40, 70, 18]  # three documents in one 128-token row
    row = {"input_ids": torch.randint(3, 300, (128,), generator=gen).tolist(), "doc_lens": lens,
           "loss_mask": [0 if i in (0, 40, 110) else 1 for i in range(128)]}
    return make_packed_batch([row])


def _loss_and_grads(model, batch):
    module = CausalLMLoss(model, 32)
    counter = CountOps()
    with counter:
        loss = module(batch.input_ids, batch.position_ids, batch.labels, batch.cu_seqlens, batch.max_seqlen)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, counter.counts.get(FLASH_CPU, 0)


def test_selective_checkpointing_keeps_attention_and_gradients():
    batch = _batch()
    plain_loss, plain_grads, plain_calls = _loss_and_grads(_model(), batch)
    full = _model()
    enable_activation_checkpointing(full, keep_attention=False)
    full_loss, full_grads, full_calls = _loss_and_grads(full, batch)
    selective = _model()
    enable_activation_checkpointing(selective, keep_attention=True)
    sel_loss, sel_grads, sel_calls = _loss_and_grads(selective, batch)

    docs_x_layers = 3 * 3
    assert plain_calls == docs_x_layers  # forward only: one kernel call per document and layer
    assert full_calls == 2 * docs_x_layers  # full recomputation runs attention again in backward
    assert sel_calls == docs_x_layers  # selective: attention output kept, not recomputed
    for loss, grads in ((full_loss, full_grads), (sel_loss, sel_grads)):
        assert torch.equal(loss, plain_loss)
        for name, want in plain_grads.items():
            torch.testing.assert_close(grads[name], want, rtol=1e-6, atol=1e-8, msg=name)


# ------------------------------------------------------------------------------ tiled MLP and host offload

def _long_batch(total=300, lens=(100, 37, 163)):
    gen = torch.Generator().manual_seed(2)
    row = {"input_ids": torch.randint(3, 300, (total,), generator=gen).tolist(), "doc_lens": list(lens),
           "loss_mask": [1] * total}
    return make_packed_batch([row])


def _prepared(**train):
    model = models.tiny_model("qwen2", vocab_size=300, num_hidden_layers=3, max_position_embeddings=512).train()
    return model, loss_module(model, TrainConfig(precision="fp32", loss_chunk_tokens=64, **train))


def _step(model, module, batch, hooks=None):
    with hooks if hooks is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        loss = module(batch.input_ids, batch.position_ids, batch.labels, batch.cu_seqlens, batch.max_seqlen)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_mlp_tiles():
    assert mlp_tiles("auto", 32768, 2048) == 8  # tiles of max(hidden, 4096) tokens
    assert mlp_tiles("auto", 524288, 8192) == 64
    assert mlp_tiles("auto", 4096, 64) == 1  # short rows: no tiling
    assert mlp_tiles(4, 300, 64) == 4 and mlp_tiles(1000, 300, 64) == 300
    for tokens in (7, 100, 300, 4097):
        for wanted in (2, 3, 7, 11, 23, 64):
            n = mlp_tiles(wanted, tokens, 64)
            # DeepSpeed's TiledMLP marks gradients ready at piece n - 1 of torch.chunk's pieces: they must agree
            assert len(torch.chunk(torch.empty(tokens), n)) == n and n <= wanted


@pytest.mark.parametrize("checkpointing, zero_stage", [(False, 2), (True, 2), (True, 3)])  # none, selective, full
def test_tiled_mlp_gives_the_untiled_loss_and_gradients(checkpointing, zero_stage):
    batch = _long_batch()
    ref_loss, ref_grads = _step(*_prepared(activation_checkpointing=False), batch)
    model, module = _prepared(activation_checkpointing=checkpointing, zero_stage=zero_stage, tiled_mlp=23)
    assert module.describe().endswith("MLP tiles 23, activation offload off")
    calls = []
    mlp = model.model.layers[0].mlp
    mlp.down_proj.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[-2]))
    loss, grads = _step(model, module, batch)
    assert torch.equal(loss, ref_loss)  # each tile's rows are computed by the same ops
    n = mlp_tiles(23, 300, 64)
    assert calls[:n] == [math.ceil(300 / n)] * (n - 1) + [300 - (n - 1) * math.ceil(300 / n)]  # tiled, not whole
    for name, want in ref_grads.items():  # tiles sum the weight gradients in another order: ~1e-6
        torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-6, msg=name)
    del mlp.forward  # enable_tiled_mlp only set an instance attribute: the model's own forward is back
    assert "forward" not in vars(mlp) and type(mlp).__name__ == "Qwen2MLP"


def test_host_offload_keeps_the_layer_inputs_and_gradients():
    """With checkpointing, what the forward keeps for backward is the layer inputs: offload gets those
    (copied out and back, bitwise the same gradients), not the layers' inner activations."""
    batch = _long_batch()
    ref_loss, ref_grads = _step(*_prepared(), batch)
    model, module = _prepared(offload_activations=True)  # on CPU a no-op, exercised for correctness
    loss, grads = _step(model, module, batch)
    assert torch.equal(loss, ref_loss) and all(torch.equal(grads[n], g) for n, g in ref_grads.items())
    hooks = HostOffload(copy_cpu=True)  # the copy path, on CPU
    loss, grads = _step(*_prepared(), batch, hooks)
    assert torch.equal(loss, ref_loss) and all(torch.equal(grads[n], g) for n, g in ref_grads.items())
    layer_input = 300 * 64 * 4  # (1, T, E) fp32
    # 3 layer inputs + the final norm (its input, output and rsqrt) + the loss chunks' inputs
    assert 3 * layer_input <= hooks.bytes <= 8 * layer_input, hooks.bytes
    everything = HostOffload(copy_cpu=True)
    _step(*_prepared(activation_checkpointing=False), batch, everything)
    assert everything.bytes > 5 * hooks.bytes  # guard (measured: 11.6x): without checkpointing the inner activations go too


def test_tiled_mlp_needs_mlp_modules():
    model = models.tiny_model("llama", num_hidden_layers=1)
    del model.model.layers[0].mlp
    with pytest.raises(ConfigError, match="train.tiled_mlp: decoder layer 0 of LlamaForCausalLM has no `mlp`"):
        enable_tiled_mlp(model, 4)


@pytest.mark.gpu
def test_host_offload_moves_saved_tensors_to_pinned_host_memory_on_cuda():
    batch = _long_batch()
    args = [t.cuda() if torch.is_tensor(t) else t for t in (batch.input_ids, batch.position_ids, batch.labels,
                                                              batch.cu_seqlens, batch.max_seqlen)]
    grads = []
    for offload in (False, True):
        model = models.tiny_model("qwen2", vocab_size=300, num_hidden_layers=3, max_position_embeddings=512)
        model = model.cuda().train()
        module = loss_module(model, TrainConfig(precision="fp32", loss_chunk_tokens=64))
        hooks = HostOffload()  # what train.offload_activations puts around the forward (pinned on CUDA)
        with hooks if offload else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            loss = module(*args)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        if offload:
            assert hooks.bytes >= 3 * 300 * 64 * 4  # at least the three layer inputs went to host memory
    assert all(torch.equal(grads[1][n], g) for n, g in grads[0].items())
