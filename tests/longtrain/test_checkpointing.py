"""Selective activation checkpointing: layers are recomputed in backward, the attention kernel is not,
and gradients equal those of a model without any checkpointing."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from longtrain.attention import register_attention
from longtrain.batching import make_packed_batch
from longtrain.activation_checkpointing import enable_activation_checkpointing
from longtrain.engine import CausalLMLoss
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
