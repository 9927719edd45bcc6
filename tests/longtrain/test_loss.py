"""Chunked cross-entropy: equals the full CE sum and its gradients, never holds [T, vocab] logits."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from longtrain.loss import chunked_lm_loss_sum
from tests.support import env

REPO = Path(__file__).resolve().parents[2]
T, E, V = 50, 16, 300


def _inputs(dtype=torch.float32, masked_frac=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, T, E, generator=g).to(dtype).requires_grad_()
    head = torch.nn.Linear(E, V, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, E, generator=g))
    labels = torch.randint(0, V, (1, T), generator=g)
    labels[torch.rand(1, T, generator=g) < masked_frac] = -100
    labels[0, 10:25] = -100  # a stretch without targets: some chunks have none
    return hidden, head, labels


def _full(hidden, head, labels):
    logits = head(hidden).float()
    return F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="sum", ignore_index=-100)


@pytest.mark.parametrize("chunk", [3, 7, 16, T, T + 5])
def test_equals_full_cross_entropy_and_gradients(chunk):
    hidden, head, labels = _inputs()
    ref = _full(hidden, head, labels)
    ref_grads = torch.autograd.grad(ref, (hidden, head.weight))
    ours = chunked_lm_loss_sum(hidden, head, labels, chunk)
    grads = torch.autograd.grad(ours, (hidden, head.weight))
    assert ours.shape == () and ours.dtype == torch.float32
    assert abs(ours.item() - ref.item()) <= 1e-6 * abs(ref.item())
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()
    assert (labels != -100).sum() > 20 and ref.item() > 0  # guard: a real loss over many targets


def test_scaled_backward_is_exact():
    """The trainer backpropagates loss * scale (docs/internals.md): gradients scale exactly."""
    hidden, head, labels = _inputs()
    (g1,) = torch.autograd.grad(chunked_lm_loss_sum(hidden, head, labels, 8) * 3.5, (head.weight,))
    (g2,) = torch.autograd.grad(_full(hidden, head, labels) * 3.5, (head.weight,))
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-6)


def test_zero_targets_give_exact_zero_that_backpropagates():
    hidden, head, labels = _inputs()
    labels.fill_(-100)
    loss = chunked_lm_loss_sum(hidden, head, labels, 16)
    assert loss.item() == 0.0 and loss.requires_grad
    (loss * 123.0).backward()
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(head.weight.grad) == 0
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(head.weight.grad).all()


def test_lm_head_called_once_per_chunk_and_recomputed_in_backward():
    """Same number of lm_head calls on every rank (ZeRO-3 gathers are collective), target-free chunks too."""
    hidden, head, labels = _inputs()
    calls = []
    handle = head.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    loss = chunked_lm_loss_sum(hidden, head, labels, 16)  # chunks 16, 16, 16, 2
    assert calls == [16, 16, 16, 2]
    loss.backward()
    assert calls[4:] == [2, 16, 16, 16]  # recomputed chunk by chunk (last first) under activation checkpointing
    handle.remove()


def test_no_tensor_of_full_logits_size_is_saved_for_backward():
    """Autograd keeps nothing of T x vocab size (the unchunked version keeps the logits and more)."""
    def largest_saved(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return max(sizes)

    hidden, head, labels = _inputs()
    assert largest_saved(lambda: _full(hidden, head, labels)) >= T * V
    assert largest_saved(lambda: chunked_lm_loss_sum(hidden, head, labels, 16)) <= T * E


def test_bf16_logits_are_upcast():
    hidden, head, labels = _inputs(torch.bfloat16)
    loss = chunked_lm_loss_sum(hidden, head, labels, 16)
    assert loss.dtype == torch.float32
    ref = _full(hidden.detach().float(), head.float(), labels)
    assert abs(loss.item() - ref.item()) <= 2e-2 * ref.item()


@pytest.mark.parametrize("args, match", [
    (dict(chunk_size=0), r"chunk_size \(train.loss_chunk_tokens\) must be a positive int, got 0"),
    (dict(chunk_size=2.5), r"must be a positive int, got 2.5"),
    (dict(labels=torch.zeros(1, T + 1, dtype=torch.long)), r"hidden must be \(1, T, E\) and labels \(1, T\)"),
    (dict(labels=torch.zeros(1, T, dtype=torch.int32)), r"labels must be int64"),
])
def test_bad_arguments(args, match):
    hidden, head, labels = _inputs()
    kwargs = {"labels": labels, "chunk_size": 16, **args}
    with pytest.raises(ValueError, match=match):
        chunked_lm_loss_sum(hidden, head, kwargs["labels"], kwargs["chunk_size"])


_MEMORY_SCRIPT = r'''
import json, sys
import torch, torch.nn.functional as F
from longtrain.loss import chunked_lm_loss_sum
T, E, V, chunk = map(int, sys.argv[1:5])
torch.manual_seed(0)
hidden = torch.randn(1, T, E, requires_grad=True)
head = torch.nn.Linear(E, V, bias=False)
labels = torch.randint(0, V, (1, T))


def status_kib(key):  # VmRSS: resident now; VmHWM: high-water mark since the last reset
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))


# Warm up: first calls fault in library code pages and allocator pools (~100 MiB of RSS, varying).
F.cross_entropy(head(hidden[0, :8]), labels[0, :8], reduction="sum").backward()
chunked_lm_loss_sum(hidden[:, :8], head, labels[:, :8], 4).backward()
hidden.grad = head.weight.grad = None
result = {}
for mode in ("chunked", "full"):
    # Reset the high-water mark (proc(5), clear_refs "5"). Not getrusage's ru_maxrss: it keeps the
    # peak of the process that forked us (pytest), which can exceed what we measure here.
    open("/proc/self/clear_refs", "w").write("5")
    before = status_kib("VmRSS")
    if mode == "full":
        loss = F.cross_entropy(head(hidden).float().reshape(-1, V), labels.reshape(-1), reduction="sum")
    else:
        loss = chunked_lm_loss_sum(hidden, head, labels, chunk)
    loss.backward()
    result[mode] = {"extra_peak_mib": (status_kib("VmHWM") - before) / 1024, "loss": loss.item()}
    del loss
    hidden.grad = head.weight.grad = None
print(json.dumps(result))
'''


def test_peak_memory_is_lower_than_full_logits(tmp_path):
    """Peak RSS of forward+backward at T=1024, vocab 32000 (full fp32 logits: 125 MiB)."""
    script = tmp_path / "mem.py"
    script.write_text(_MEMORY_SCRIPT)
    # glibc's malloc raises its mmap threshold after large frees and then keeps freed chunk-sized blocks
    # in the heap, which inflates RSS unpredictably; a fixed threshold makes RSS track live tensors.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, str(script), "1024", "64", "32000", "128"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"extra peak RSS: full {results['full']['extra_peak_mib']:.0f} MiB, "
          f"chunked(128) {results['chunked']['extra_peak_mib']:.0f} MiB")
    assert abs(results["full"]["loss"] - results["chunked"]["loss"]) <= 1e-5 * results["full"]["loss"]
    assert results["full"]["extra_peak_mib"] > 250  # logits, their log-softmax and gradient: ~3 x 125 MiB
    assert results["chunked"]["extra_peak_mib"] < 0.25 * results["full"]["extra_peak_mib"]  # measured ~0.15


_ZERO3_SCRIPT = r'''
import json, sys
import torch, torch.nn.functional as F
import deepspeed
from deepspeed.utils import safe_get_full_grad
from transformers import LlamaConfig, LlamaForCausalLM
from longtrain.loss import chunked_lm_loss_sum

cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  tie_word_embeddings=False)
torch.manual_seed(0)
ref = LlamaForCausalLM(cfg)
state = {k: v.clone() for k, v in ref.state_dict().items()}

class Wrapped(torch.nn.Module):
    def __init__(self, hf):
        super().__init__()
        self.hf = hf
    def forward(self, ids, labels):
        hidden = self.hf.model(input_ids=ids, use_cache=False).last_hidden_state
        return chunked_lm_loss_sum(hidden, self.hf.lm_head, labels, 7)

model = LlamaForCausalLM(cfg)
model.load_state_dict(state)
ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=Wrapped(model), model_parameters=model.parameters(), config=ds)
ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(1))
labels = ids.roll(-1, 1)
labels[0, -1] = -100
loss = engine(ids, labels)
engine.backward(loss)
grad = safe_get_full_grad(engine.module.hf.lm_head.weight).clone()
engine.step()
partitioned = engine.module.hf.lm_head.weight.numel() == 0  # ZeRO-3 really partitioned it
empty = engine(ids, torch.full_like(labels, -100))  # a rank with no targets
engine.backward(empty)
ref_loss = F.cross_entropy(ref(input_ids=ids, use_cache=False).logits.reshape(-1, 300), labels.reshape(-1),
                           reduction="sum")
ref_loss.backward()
ref_grad = ref.lm_head.weight.grad
print(json.dumps({"loss": loss.item(), "ref": ref_loss.item(), "partitioned": partitioned, "empty": empty.item(),
                  "grad_err": ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item()}))
torch.distributed.destroy_process_group()
'''


def test_under_deepspeed_zero3(tmp_path):
    """lm_head called as a module: ZeRO-3 gathers its partitioned weight, in forward and in the recomputation."""
    pytest.importorskip("deepspeed")
    child = env.child_env(PYTHONPATH=str(REPO), **env.single_rank_vars())
    script = tmp_path / "zero3.py"
    script.write_text(_ZERO3_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], env=child, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert result["partitioned"]
    assert abs(result["loss"] - result["ref"]) <= 1e-5 * result["ref"]
    assert result["grad_err"] <= 1e-5
    assert result["empty"] == 0.0


def test_default_chunk_keeps_a_fixed_logits_budget():
    from longtrain.loss import default_chunk_tokens

    assert default_chunk_tokens(32000) == 512 and default_chunk_tokens(128256) == 128
    assert default_chunk_tokens(2048) == 8192 and default_chunk_tokens(512) == 32768
    assert default_chunk_tokens(152064) == 128 and default_chunk_tokens(10**7) == 128  # never below 128


def test_without_softcap_the_loss_is_bitwise_the_plain_chunked_cross_entropy():
    """Training losses stay bitwise what they were before eval shared this code (resume tests compare with ==)."""
    from torch.utils.checkpoint import checkpoint

    def plain(h, lab, head):  # the chunk function training used before lm_cross_entropy
        return F.cross_entropy(head(h).float(), lab, ignore_index=-100, reduction="sum")

    for dtype in (torch.float32, torch.bfloat16):
        hidden, head, labels = _inputs(dtype)
        ours = chunked_lm_loss_sum(hidden, head, labels, 16)
        g_ours = torch.autograd.grad(ours, (hidden, head.weight))
        flat_h, flat_l = hidden.reshape(-1, E), labels.reshape(-1)
        ref = sum(checkpoint(plain, flat_h[s:s + 16], flat_l[s:s + 16], head, use_reentrant=False)
                  for s in range(0, T, 16))
        g_ref = torch.autograd.grad(ref, (hidden, head.weight))
        assert torch.equal(ours, ref), dtype
        assert all(torch.equal(a, b) for a, b in zip(g_ours, g_ref)), dtype


def _gemma2(vocab: int = 300):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0,
                          tie_word_embeddings=False)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # logits of a few units: beyond the cap, as in a trained model
    return model


def test_softcap_training_and_eval_match_the_models_own_logits():
    """A Gemma-2-style model: training's sum and eval's per-position losses both equal the cross-entropy
    of the logits its own forward computes (soft-capped), and each other."""
    from longtrain.eval.perplexity import token_nll
    from longtrain.loss import logit_softcap

    model = _gemma2()
    cap = logit_softcap(model.config)
    from transformers import LlamaConfig

    assert cap == 2.0 and logit_softcap(LlamaConfig()) is None
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, 1)
    labels[0, -1] = -100
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()  # (1, 40, V), capped by Gemma-2 itself
        ref = F.cross_entropy(logits[0], labels[0], ignore_index=-100, reduction="none")  # (40,)
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        assert logits.abs().max() <= cap < model.lm_head(hidden).abs().max()  # guard: the cap really bites
        train = chunked_lm_loss_sum(hidden, model.lm_head, labels, 7, softcap=cap)
        uncapped = chunked_lm_loss_sum(hidden, model.lm_head, labels, 7)
        per_position = token_nll(model, ids, chunk_rows=8)  # (1, 39)
    torch.testing.assert_close(per_position[0], ref[:-1], rtol=1e-5, atol=1e-5)
    assert abs(train.item() - ref.sum().item()) <= 1e-5 * ref.sum().item()
    assert abs(train.item() - per_position.sum().item()) <= 1e-5 * train.item()  # one function, two reductions
    assert abs(uncapped.item() - train.item()) > 1e-2 * train.item()  # guard: the cap changes the loss (3%)
