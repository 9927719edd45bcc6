"""The attention backends around their kernels: which one runs where, and what each kernel is handed.

The FlashAttention kernels run only on CUDA, so on CPU everything around them is checked against the
installed torch itself: the wrappers run on ``meta`` tensors through torch's real ``varlen_attn`` (its
custom op, autograd registration and fake kernel) and the real ``aten._flash_attention_forward /
_backward`` schemas, which check every argument's name and type; the argument values (layouts, int32
cu_seqlens on the device, windows, GQA) are checked on CPU tensors, and numerically against a
reference of ``varlen_attn``'s documented semantics. The kernels themselves are the ``gpu`` tests.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longtrain import attention_backends as ab
from longtrain.attention import check_packed_length, document_attention
from longtrain.config import ConfigError
from longtrain.parallel.kernels import block_backward, block_forward, block_kernel, math_backward, math_forward

BF16 = torch.bfloat16


def _qkv(heads, kv_heads, total, dim=16, dtype=torch.float32, device="cpu", seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(1, h, total, dim, generator=g).to(device, dtype).requires_grad_(grad)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


# ------------------------------------------------------------------------------ choice

def test_choice_per_device_dtype_and_installation():
    flash_missing = ab.flash_attn_status() is not None  # flash-attn needs a CUDA build: absent here
    assert ab.torch_varlen_status() is None  # torch 2.13 ships varlen_attn with window_size and scale
    cpu = ab.select_backend("auto", "cpu", BF16, head_dim=64)
    assert cpu.name == "sdpa_loop" and "exact" in cpu.reason
    assert ab.select_backend("auto", "cuda", torch.float32, head_dim=64).name == "sdpa_loop"  # fp32: exact path
    cuda = ab.select_backend("auto", "cuda", BF16, head_dim=64)
    if flash_missing:
        assert cuda.name == "torch_varlen" and "flash_attn flash-attn is not installed" in cuda.reason
    assert ab.select_backend("auto", "cuda", torch.float16, head_dim=128).name == cuda.name
    # attention dropout: torch's varlen has none, so auto passes it over (and says why)
    dropped = ab.select_backend("auto", "cuda", BF16, head_dim=64, dropout=0.1)
    assert dropped.name != "torch_varlen" and "attention dropout" in dropped.reason
    assert ab.select_backend("sdpa_loop", "cuda", BF16).name == "sdpa_loop"


@pytest.mark.parametrize("forced, device, dtype, head_dim, why", [
    ("torch_varlen", "cpu", BF16, 64, "needs a CUDA device"),
    ("torch_varlen", "cuda", torch.float32, 64, "needs bf16 or fp16"),
    ("torch_varlen", "cuda", BF16, 12, "needs a head dimension that is a multiple of 8 and at most 256, the model has 12"),
    ("flash_attn", "cpu", BF16, 64, "needs a CUDA device"),
])
def test_forced_backend_that_cannot_run_is_a_config_error(forced, device, dtype, head_dim, why):
    with pytest.raises(ConfigError, match=rf"train.attention: {forced} cannot run here: it {why}.*use auto"):
        ab.select_backend(forced, device, dtype, head_dim=head_dim)


def test_forced_flash_attn_without_the_package():
    if ab.flash_attn_status() is None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match="flash_attn cannot run here: it flash-attn is not installed"):
        ab.select_backend("flash_attn", "cuda", BF16, head_dim=64)
    with pytest.raises(ConfigError, match="must be one of auto, flash_attn, torch_varlen, sdpa_loop"):
        ab.select_backend("flash", "cuda", BF16)


def test_a_chosen_kernel_refuses_tensors_it_cannot_take():
    q, k, v = _qkv(4, 2, 10, grad=False)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="torch_varlen needs CUDA fp16/bf16 tensors, got cpu torch.float32"):
        document_attention(q, k, v, cu, 6, backend=ab.AttentionBackend("torch_varlen", "test"))
    assert block_kernel(q) == "cpu" and block_kernel(q.to(BF16), "torch_varlen") == "cpu"  # CPU: its own op


# ------------------------------------------------------------------------------ arguments

def test_window_and_varlen_arguments():
    assert ab.window_size(None, 100) == (-1, 0)  # causal
    assert ab.window_size(8, 100) == (7, 0)  # transformers' window 8 = itself + 7 to the left
    assert ab.window_size(200, 100) == (-1, 0)  # a window longer than every document changes nothing
    assert ab.torch_varlen_kwargs(8, 2, 0.125, (7, 0)) == {"scale": 0.125, "window_size": (7, 0), "enable_gqa": True}
    assert ab.torch_varlen_kwargs(8, 8, 0.125, (-1, 0)) == {"scale": 0.125, "window_size": (-1, 0)}
    cu = ab.one_sequence_cu(37, torch.device("cpu"))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 37] and ab.one_sequence_cu(37, torch.device("cpu")) is cu


def _reference_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, window_size, enable_gqa=False):
    """torch's documented varlen_attn semantics on CPU, (T, H, D): query i of a sequence sees key j of the
    same sequence with i - left <= j <= i + right (-1: unbounded), as FlashAttention defines windows."""
    left, right = window_size
    assert cu_seq_q is cu_seq_k and cu_seq_q.dtype == torch.int32 and cu_seq_q.device == q.device
    assert isinstance(max_q, int) and max_q == int(cu_seq_q.diff().max())
    heads, kv_heads = q.shape[1], k.shape[1]
    assert enable_gqa == (heads != kv_heads)
    seg = torch.repeat_interleave(torch.arange(len(cu_seq_q) - 1), cu_seq_q.diff())
    i, j = torch.arange(q.shape[0])[:, None], torch.arange(q.shape[0])[None, :]
    allowed = (seg[:, None] == seg[None, :]) & ((j <= i + right) if right >= 0 else True)
    allowed = allowed & ((j >= i - left) if left >= 0 else True)
    rep = heads // kv_heads
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(rep, 0), v.transpose(0, 1).repeat_interleave(rep, 0)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale).transpose(0, 1)


@pytest.mark.parametrize("heads, kv_heads, window", [(4, 4, None), (8, 2, None), (8, 2, 5), (6, 1, 9)])
def test_varlen_arguments_give_document_attention(heads, kv_heads, window):
    """The arguments our wrapper builds, fed to varlen_attn's documented semantics, equal the exact path."""
    cu = torch.tensor([0, 13, 14, 40, 41, 70], dtype=torch.int32)
    q, k, v = _qkv(heads, kv_heads, 70, grad=False)
    q3, k3, v3 = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))  # the wrapper's (T, H, D) layout
    out = _reference_varlen_attn(q3, k3, v3, cu, cu, 29, 29, **ab.torch_varlen_kwargs(
        heads, kv_heads, 0.3, ab.window_size(window, 29)))
    torch.testing.assert_close(out[None], document_attention(q, k, v, cu, 29, 0.3, sliding_window=window),
                               rtol=1e-5, atol=1e-5)


def test_rows_must_be_exactly_the_packed_length():
    """varlen kernels give NaN gradients for tokens past cu_seq_q[-1]: a shorter layout fails loudly."""
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"from 0 to T=10 .* got 0 \.\.\. 9: .* NaN gradients"):
        check_packed_length(cu, 10)
    good = torch.tensor([0, 4, 10], dtype=torch.int32)
    check_packed_length(good, 10)
    check_packed_length(good, 10)  # read once per tensor: the second call takes no host copy
    good[2] = 9  # changed in place (its version moves): checked again
    with pytest.raises(ValueError, match="got 0 ... 9"):
        check_packed_length(good, 10)


# ------------------------------------------------------------------------------ real torch ops on meta tensors

def _meta_qkv(heads, kv_heads, total, dim=64):
    return tuple(torch.empty(1, h, total, dim, device="meta", dtype=BF16, requires_grad=True)
                 for h in (heads, kv_heads, kv_heads))


@pytest.mark.parametrize("heads, kv_heads, window", [(8, 8, None), (32, 8, None), (32, 8, 512)])
def test_torch_varlen_wrapper_through_the_installed_varlen_attn(heads, kv_heads, window):
    """document_attention -> varlen_attn (its custom op, fake kernel and autograd) with our arguments."""
    q, k, v = _meta_qkv(heads, kv_heads, 4096)
    cu = torch.empty(4, device="meta", dtype=torch.int64)  # int64 on purpose: the wrapper converts
    out = document_attention(q, k, v, cu, 2048, 0.125, sliding_window=window,
                             backend=ab.AttentionBackend("torch_varlen", "test"))
    assert out.shape == (1, 4096, heads, 64) and out.dtype == BF16 and out.device.type == "meta"
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert dq.shape == q.shape and dk.shape == k.shape == dv.shape  # GQA: kv gradients keep Hkv heads


@pytest.mark.parametrize("heads, kv_heads, lq, lk, causal", [(8, 2, 96, 96, True), (8, 2, 64, 160, False),
                                                             (4, 4, 32, 32, True)])
def test_ring_block_kernel_through_the_aten_flash_ops(heads, kv_heads, lq, lk, causal):
    """The ring's torch_varlen block kernel binds the real aten schemas and returns the ring's layout."""
    q = torch.empty(heads, lq, 64, device="meta", dtype=BF16)
    k, v = (torch.empty(kv_heads, lk, 64, device="meta", dtype=BF16) for _ in range(2))
    out, lse = block_forward(q, k, v, causal, 0.125, kernel="torch_varlen")
    assert out.shape == (heads, lq, 64) and out.dtype == BF16 and lse.shape == (heads, lq) and lse.dtype == torch.float32
    dq, dk, dv = block_backward(torch.empty_like(out), q, k, v, out, lse, causal, 0.125, kernel="torch_varlen")
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape  # GQA native: no repeat
    assert ab.torch_varlen_status() is None  # the schemas take window_size_left/right and scale


def test_ring_block_kernels_on_cpu_match_the_math_reference():
    """The CPU ring kernel (what CPU tests of the ring use) equals the exact math version, GQA included."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(8, 24, 16, generator=g), torch.randn(2, 24, 16, generator=g), torch.randn(2, 24, 16, generator=g)
    for causal in (True, False):
        out, lse = block_forward(q, k, v, causal, 0.25)
        ref_out, ref_lse = math_forward(q, k, v, causal, 0.25)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
        dout = torch.randn(out.shape, generator=g)
        for a, b in zip(block_backward(dout, q, k, v, out, lse, causal, 0.25),
                        math_backward(dout, q, k, v, out, lse, causal, 0.25)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ the kernels (GPU)

def _fp32_reference(q, k, v, cu, max_len, window):
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    return (q32, k32, v32), document_attention(q32, k32, v32, cu, max_len, 0.125, sliding_window=window)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads, window", [(32, None), (8, None), (8, 256)])
def test_torch_varlen_kernel_matches_the_fp32_reference_on_cuda(kv_heads, window):
    backend = ab.select_backend("torch_varlen", "cuda", BF16, head_dim=64)
    cu = torch.tensor([0, 100, 101, 1700, 4096], dtype=torch.int32, device="cuda")
    q, k, v = _qkv(32, kv_heads, 4096, dim=64, dtype=BF16, device="cuda")
    out = document_attention(q, k, v, cu, 1599, 0.125, sliding_window=window, backend=backend)
    leaves, ref = _fp32_reference(q, k, v, cu, 1599, window)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g.to(BF16)), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_ring_block_kernel_matches_math_on_cuda(causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(32, 512, 64, generator=g).cuda().to(BF16)
    k, v = (torch.randn(8, 512, 64, generator=g).cuda().to(BF16) for _ in range(2))
    for kernel in ("torch_varlen", "sdpa") + (("flash_attn",) if ab.flash_attn_status() is None else ()):
        out, lse = block_forward(q, k, v, causal, 0.125, kernel=kernel)
        ref_out, ref_lse = math_forward(q.float(), k.float(), v.float(), causal, 0.125)
        torch.testing.assert_close(out.float(), ref_out, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-2, atol=1e-2)
        dout = torch.randn(out.shape, generator=g).cuda().to(BF16)
        grads = block_backward(dout, q, k, v, out, lse, causal, 0.125, kernel=kernel)
        refs = math_backward(dout.float(), q.float(), k.float(), v.float(), ref_out, ref_lse, causal, 0.125)
        for a, b in zip(grads, refs):
            torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("arch, window", [("qwen2", None), ("mistral", 48)])
def test_model_loss_with_torch_varlen_matches_the_exact_path_on_cuda(arch, window):
    """A whole model in bf16 through loss_module's start-up choice (torch_varlen) vs the exact path."""
    from longtrain.batching import make_packed_batch
    from longtrain.config import TrainConfig
    from longtrain.engine import loss_module
    from tests.support import models

    row = {"input_ids": torch.randint(3, 512, (512,), generator=torch.Generator().manual_seed(0)).tolist(),
           "doc_lens": [100, 1, 300, 111], "loss_mask": [1] * 512}
    batch = make_packed_batch([row])
    args = [t.cuda() if torch.is_tensor(t) else t for t in (batch.input_ids, batch.position_ids, batch.labels,
                                                              batch.cu_seqlens, batch.max_seqlen)]
    losses = {}
    for attention in ("torch_varlen", "sdpa_loop"):
        over = {"sliding_window": window} if window else {}
        model = models.tiny_model(arch, max_position_embeddings=512, **over).cuda().to(BF16).train()
        module = loss_module(model, TrainConfig(precision="bf16", attention=attention), device=torch.device("cuda"))
        assert module.attention_backend.name == attention
        losses[attention] = module(*args)
        losses[attention].backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(losses["torch_varlen"], losses["sdpa_loop"], rtol=1e-2, atol=1e-2)
