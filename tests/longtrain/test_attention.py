"""Document attention: a packed row behaves exactly like its documents run one by one."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from longtrain.attention import (ATTENTION_NAME, attention_backend, document_attention, longtrain_attention,
                                 longtrain_mask, register_attention)
from longtrain.batching import make_packed_batch
from tests.support.paths import shared_file

VOCAB = 1000  # spm_botchan_test_model
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256,
            tie_word_embeddings=False, attention_dropout=0.0)
ARCHS = {  # (config class, model class, query heads, key/value heads)
    "llama": (LlamaConfig, LlamaForCausalLM, 4, 4),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, 4, 2),  # GQA
    "mistral": (MistralConfig, MistralForCausalLM, 8, 2),  # GQA, 4 query heads per kv head
}
DOC_LENS = [37, 1, 64, 20, 50]  # incl. a one-token document


def _model(arch: str, **overrides):
    config_cls, model_cls, heads, kv_heads = ARCHS[arch]
    torch.manual_seed(0)
    config = config_cls(**{**TINY, "num_attention_heads": heads, "num_key_value_heads": kv_heads, **overrides})
    return model_cls(config).float().train()  # train(): attention_dropout is 0, so still deterministic


@pytest.fixture(scope="module")
def real_docs() -> list[list[int]]:
    """Token ids of real WikiText articles (SentencePiece test model), one list per article."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(shared_file("tokenizers", "spm_botchan_test_model.model")))
    lines = shared_file("corpora", "wikitext2_valid.jsonl").read_text(encoding="utf-8").splitlines()
    return [sp.encode(json.loads(line)["text"]) for line in lines[:8]]


def _packed_row(real_docs, doc_lens=DOC_LENS, pad=11):
    """One row: pieces of different articles, a masked-out stretch inside doc 2, and a padding segment."""
    ids, mask = [], []
    for i, n in enumerate(doc_lens):
        ids += real_docs[i][100:100 + n]
        mask += [0 if (i == 2 and 10 <= j < 20) else 1 for j in range(n)]
    return {"input_ids": ids + [0] * pad, "doc_lens": doc_lens + [pad], "loss_mask": mask + [0] * pad}


def _ce_sum(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum",
                           ignore_index=-100)


def _packed_loss(model, batch, inputs_embeds=None):
    kw = dict(cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens, max_length_q=batch.max_seqlen,
              max_length_k=batch.max_seqlen)
    model.set_attn_implementation(register_attention())
    if inputs_embeds is None:
        hidden = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **kw)
    else:
        hidden = model.model(inputs_embeds=inputs_embeds, position_ids=batch.position_ids, use_cache=False, **kw)
    return model.lm_head(hidden.last_hidden_state), hidden.last_hidden_state


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_packed_row_equals_documents_one_by_one(arch, real_docs):
    model = _model(arch)
    row = _packed_row(real_docs)
    batch = make_packed_batch([row])
    logits, _ = _packed_loss(model, batch)
    packed = _ce_sum(logits, batch.labels)
    packed.backward()
    packed_grads = _grads(model)
    model.zero_grad()

    model.set_attn_implementation("sdpa")  # reference: transformers' own attention, one document at a time
    reference, start = 0.0, 0
    for n in DOC_LENS:
        doc = batch.input_ids[:, start:start + n]
        labels = batch.labels[:, start:start + n]  # the packed labels of this document: same targets
        loss = _ce_sum(model(input_ids=doc, use_cache=False).logits, labels)
        loss.backward()
        reference += loss.item()
        start += n
    ref_grads = _grads(model)

    assert batch.num_targets == sum(DOC_LENS) - len(DOC_LENS) - 10 > 100
    assert abs(packed.item() - reference) <= 1e-5 * abs(reference)
    assert packed_grads.keys() == ref_grads.keys() and len(packed_grads) > 10
    for name, grad in packed_grads.items():
        err = (grad - ref_grads[name]).abs().max() / ref_grads[name].abs().max().clamp_min(1e-12)
        assert err <= 1e-5, f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_no_gradient_crosses_a_document_boundary(arch, real_docs):
    model = _model(arch)
    batch = make_packed_batch([_packed_row(real_docs)])
    embeds = model.model.embed_tokens(batch.input_ids).detach().requires_grad_()
    logits, _ = _packed_loss(model, batch, inputs_embeds=embeds)
    token_ce = F.cross_entropy(logits[0].float(), batch.labels[0], reduction="none", ignore_index=-100)  # (T,)
    cu = batch.cu_seqlens.tolist()
    for i in range(len(cu) - 2):  # every real document (the last segment is padding)
        a, b = cu[i], cu[i + 1]
        if (batch.labels[0, a:b] == -100).all():
            continue
        (grad,) = torch.autograd.grad(token_ce[a:b].sum(), embeds, retain_graph=True)  # (1, T, E)
        assert grad[0, a:b].abs().sum() > 0  # guard: the document's own inputs do matter
        outside = torch.cat([grad[0, :a], grad[0, b:]])
        assert torch.count_nonzero(outside) == 0, f"document {i} leaks gradient to other documents"


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_equals_transformers_sdpa_with_reset_positions(arch, real_docs):
    """Second reference: transformers' sdpa builds a block-diagonal mask from reset position_ids (no cache)."""
    model = _model(arch).eval()
    batch = make_packed_batch([_packed_row(real_docs)])
    with torch.no_grad():
        ours, _ = _packed_loss(model, batch)
        model.set_attn_implementation("sdpa")
        theirs = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        leaky = model(input_ids=batch.input_ids, use_cache=True).logits  # the DESIGN.md trap: documents leak
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - leaky).abs().max() > 1e-3  # guard: attending across documents would be visible


def test_sliding_window_equals_transformers(real_docs):
    """Mistral with a window shorter than the documents: same as transformers' sliding + packed mask."""
    model = _model("mistral", sliding_window=8).eval()
    batch = make_packed_batch([_packed_row(real_docs)])
    with torch.no_grad():
        ours, _ = _packed_loss(model, batch)
        model.set_attn_implementation("sdpa")
        theirs = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        model.config.sliding_window = None
        no_window = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - no_window).abs().max() > 1e-3  # guard: the window really changed something


def test_with_gradient_checkpointing(real_docs):
    """The layout kwargs survive transformers' gradient checkpointing (the trainer enables it)."""
    model = _model("qwen2")
    batch = make_packed_batch([_packed_row(real_docs)])
    loss = _ce_sum(_packed_loss(model, batch)[0], batch.labels)
    loss.backward()
    plain = _grads(model)
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_ckpt = _ce_sum(_packed_loss(model, batch)[0], batch.labels)
    loss_ckpt.backward()
    assert torch.equal(loss, loss_ckpt)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ kernel level (random tensors)

def _reference_attention(q, k, v, cu, scale, window=None):
    """Explicit T x T block-diagonal causal mask (the slow baseline). (1,H,T,D) -> (1,T,H,D)."""
    total = q.shape[2]
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu).diff())
    i, j = torch.arange(total)[:, None], torch.arange(total)[None, :]
    allowed = (seg[:, None] == seg[None, :]) & (j <= i)
    if window is not None:
        allowed &= j > i - window
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale).transpose(1, 2)


def _qkv(heads, kv_heads, total, dim=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(1, h, total, dim, generator=g, dtype=torch.float32).to(device, dtype)  # noqa: E731
    return make(heads).requires_grad_(), make(kv_heads).requires_grad_(), make(kv_heads).requires_grad_()


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("window", [None, 5])
def test_kernel_matches_block_diagonal_mask(heads, kv_heads, window):
    cu = [0, 13, 14, 40, 41, 70]
    q, k, v = _qkv(heads, kv_heads, cu[-1])
    out = document_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), 29, 0.3, sliding_window=window)
    ref = _reference_attention(q, k, v, cu, 0.3, window)
    assert out.shape == (1, 70, heads, 16) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), g)
    theirs = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _cpu_varlen_reference(calls):
    """A CPU stand-in with flash_attn_varlen_func's signature; checks the layout the wrapper hands it."""
    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
               causal=False, window_size=(-1, -1)):
        calls.append(dict(window_size=window_size, causal=causal, scale=softmax_scale))
        total, heads, dim = q.shape  # tokens first, then heads (flash-attn's varlen layout)
        assert k.shape == v.shape == (total, k.shape[1], dim) and heads % k.shape[1] == 0
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and cu_seqlens_q.device == q.device
        assert isinstance(max_seqlen_q, int) and max_seqlen_q == int(cu_seqlens_q.diff().max())
        assert causal and dropout_p == 0.0
        assert window_size == (-1, -1) or (window_size[0] > 0 and window_size[1] == 0)
        window = None if window_size == (-1, -1) else window_size[0] + 1
        out = _reference_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                   cu_seqlens_q.tolist(), softmax_scale, window)
        return out[0]  # (T, H, D)
    return varlen


@pytest.mark.parametrize("window", [None, 7, 100])
def test_varlen_path_layout_with_injected_kernel(window):
    """Everything around the flash kernel (transposes, cu_seqlens dtype, GQA, scaling, window, reshape)."""
    cu = torch.tensor([0, 9, 30, 31, 64], dtype=torch.int64)  # int64 on purpose: the wrapper must convert
    q, k, v = _qkv(8, 2, 64)
    calls = []
    out = document_attention(q, k, v, cu, 33, 0.25, sliding_window=window, varlen_fn=_cpu_varlen_reference(calls))
    ref = document_attention(q, k, v, cu, 33, 0.25, sliding_window=window)  # the CPU sdpa loop
    assert out.shape == (1, 64, 8, 16) and calls and calls[0]["scale"] == 0.25
    assert calls[0]["window_size"] == ((window - 1, 0) if window == 7 else (-1, -1))  # 100 > every segment
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_registration_is_idempotent_and_public():
    assert register_attention() == register_attention() == ATTENTION_NAME
    assert ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME] is longtrain_attention
    assert ALL_MASK_ATTENTION_FUNCTIONS[ATTENTION_NAME] is longtrain_mask
    assert longtrain_mask(batch_size=1, q_length=4, kv_length=4, attention_mask=torch.ones(1, 4, dtype=torch.bool)) \
        is None
    model = _model("llama")
    model.set_attn_implementation(ATTENTION_NAME)
    assert model.config._attn_implementation == ATTENTION_NAME
    assert attention_backend("cpu", torch.bfloat16) == "sdpa_loop"  # the backend names of train.attention


def test_clear_errors(real_docs):
    model = _model("llama")
    model.set_attn_implementation(register_attention())
    batch = make_packed_batch([_packed_row(real_docs)])
    with pytest.raises(ValueError, match="needs the packed row's document layout: call model.model"):
        model.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    with pytest.raises(ValueError, match="does not take padding masks"):
        mask = torch.ones_like(batch.input_ids)
        mask[0, -3:] = 0
        model.model(input_ids=batch.input_ids, attention_mask=mask, use_cache=False,
                    cu_seq_lens_q=batch.cu_seqlens, max_length_q=batch.max_seqlen)
    q, k, v = _qkv(4, 2, 10)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_k must equal cu_seq_lens_q"):
        longtrain_attention(model.model.layers[0].self_attn, q, k, v, None, cu_seq_lens_q=cu, max_length_q=6,
                            cu_seq_lens_k=torch.tensor([0, 5, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"rise strictly from 0 to T=10"):
        document_attention(q, k, v, torch.tensor([0, 4, 9]), 5)
    with pytest.raises(ValueError, match="max_seqlen=5 but the longest segment has 6"):
        document_attention(q, k, v, cu, 5)
    with pytest.raises(ValueError, match="one packed row"):
        document_attention(q.expand(2, -1, -1, -1), k, v, cu, 6)
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of key/value heads \(3\)"):
        document_attention(q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1), cu, 6)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads, window", [(8, None), (2, None), (2, 64)])
def test_flash_varlen_kernel_matches_sdpa_loop_on_cuda(kv_heads, window):
    pytest.importorskip("flash_attn")
    assert attention_backend("cuda", torch.bfloat16) == "flash_attn"
    cu = torch.tensor([0, 100, 101, 700, 1024], dtype=torch.int32, device="cuda")
    q, k, v = _qkv(8, kv_heads, 1024, dim=64, dtype=torch.bfloat16, device="cuda")
    out = document_attention(q, k, v, cu, 599, 0.125, sliding_window=window)  # flash-attn varlen
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = document_attention(q32, k32, v32, cu, 599, 0.125, sliding_window=window)  # fp32 -> sdpa loop
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g.bfloat16()), torch.autograd.grad(ref, (q32, k32, v32), g)):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)
