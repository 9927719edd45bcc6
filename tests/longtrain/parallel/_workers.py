"""Per-rank bodies of the multi-process sequence-parallel tests (imported by spawned ranks)."""
from __future__ import annotations

import torch

from longtrain.parallel import init_parallel_states, local_token_index, ring_attention, ulysses_attention
from tests.support import models


def _max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach().double()).abs().max())


def kernel_case(state, mode: str, heads: int, kv_heads: int, docs: list[int], seed: int,
                reference_attention) -> dict:
    """One layout: SP attention output and q/k/v grads of this rank's slice vs the full row."""
    p = state.sp_size
    cu = torch.tensor([0] + docs, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    total, max_len, d = int(cu[-1]), max(docs), 16
    scale = d ** -0.5
    gen = torch.Generator().manual_seed(seed)  # same tensors on every rank
    q, k, v = (torch.randn(1, n, total, d, generator=gen) for n in (heads, kv_heads, kv_heads))
    dout = torch.randn(1, total, heads, d, generator=gen)

    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*full, cu, max_len, scale)  # (1, T, H, D)
    ref.backward(dout)

    idx = local_token_index(total, p, state.sp_rank, mode)
    local = [x[:, :, idx].clone().requires_grad_() for x in (q, k, v)]
    if mode == "ulysses":
        out = ulysses_attention(*local, cu, max_len, state, scale, reference_attention)
    else:
        out = ring_attention(*local, cu, state, scale)
    out.backward(dout[:, idx])
    return {
        "out": _max_err(out, ref[:, idx]),
        **{f"d{n}": _max_err(x.grad, f.grad[:, :, idx]) for n, x, f in zip("qkv", local, full)},
        "grad_abs": float(sum(x.grad.abs().sum() for x in local)),
        "local_tokens": len(idx),
    }


def kernel_worker(rank: int, world_size: int, cases: list[dict]) -> dict:
    from longtrain.attention import document_attention

    state = init_parallel_states([world_size])[world_size]
    return {c["name"]: kernel_case(state, c["mode"], c["heads"], c["kv_heads"], c["docs"], c["seed"],
                                   document_attention) for c in cases}


# ------------------------------------------------------------------------------------------------
# model level: a tiny random HF model, SP vs one process on the same packed batch

def tiny_model(arch: str, heads: int, kv_heads: int, sliding_window=None, seed: int = 0):
    extra = {"sliding_window": sliding_window} if arch == "mistral" else {}
    model = models.tiny_model(arch, seed, vocab_size=1000, hidden_size=16 * heads, intermediate_size=96,
                              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                              attention_dropout=0.0, tie_word_embeddings=False, **extra)
    return model.float().train()  # seeded: identical weights on every rank


def mask_rank_targets(rows: list[dict], total_padded: int, sp: int, sp_rank: int, mode: str) -> list[dict]:
    """Set loss_mask to 0 so that the slice of ``sp_rank`` has no target at all.

    The target of flattened token g is token g+1 (same row), kept when loss_mask[g+1] == 1.
    """
    seq_len = len(rows[0]["input_ids"])
    rows = [dict(r, loss_mask=list(r["loss_mask"])) for r in rows]
    for g in local_token_index(total_padded, sp, sp_rank, mode).tolist():
        row, pos = divmod(g + 1, seq_len)
        if g + 1 < seq_len * len(rows) and pos > 0:
            rows[row]["loss_mask"][pos] = 0
    return rows


def _loss_and_grads(model, batch, loss_sum_fn):
    model.zero_grad(set_to_none=True)
    hidden = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                         cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
                         max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen).last_hidden_state
    loss = loss_sum_fn(hidden, model.lm_head, batch.labels)
    loss.backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in
             model.named_parameters()}
    return loss.detach(), grads


def model_case(states, model, case: dict, rows: list[dict], loss_sum_fn) -> dict:
    import torch.distributed as dist

    from longtrain.batching import make_packed_batch
    from longtrain.parallel import padded_length, parallelize_attention, shard_batch

    sp, mode = case["sp"], case["mode"]
    state = states[sp]
    total = sum(len(r["input_ids"]) for r in rows)
    # SP rank 0 gets no target; later ranks' targets depend on its tokens (documents cross
    # slices), so its gradients are still exercised through the attention exchange
    rows = mask_rank_targets(rows, padded_length(total, sp, mode), sp, 0, mode)
    batch = make_packed_batch(rows)

    parallelize_attention(model, states[1], mode)  # reference: one process, whole row
    ref_loss, ref_grads = _loss_and_grads(model, batch, loss_sum_fn)

    local = shard_batch(batch, state, mode)
    name = parallelize_attention(model, state, mode)
    if case.get("checkpointing"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    try:
        loss, grads = _loss_and_grads(model, local, loss_sum_fn)
    finally:
        model.activation_checkpointing_disable()
    local_loss, local_targets = float(loss), local.num_targets
    dist.all_reduce(loss, group=state.sp_group)
    grad_err, nonzero = 0.0, 0
    for n, g in grads.items():
        dist.all_reduce(g, group=state.sp_group)
        ref = ref_grads[n]
        grad_err = max(grad_err, float((g - ref).norm() / ref.norm().clamp_min(1e-30)))
        nonzero += int(ref.abs().sum() > 0)
    return {"attention": name, "loss": float(loss), "ref_loss": float(ref_loss),
            "loss_rel": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)), "grad_rel": grad_err,
            "params_with_grad": nonzero, "params": len(grads), "local_loss": local_loss,
            "local_targets": local_targets, "targets": batch.num_targets, "finite": bool(torch.isfinite(loss)),
            "padded": padded_length(total, sp, mode) - total}


def model_worker(rank: int, world_size: int, cases: list[dict], rows: list[dict]) -> dict:
    from longtrain.loss import chunked_lm_loss_sum

    def loss_sum_fn(hidden, lm_head, labels):
        return chunked_lm_loss_sum(hidden, lm_head, labels, 32)  # several chunks even at T/4

    states = init_parallel_states([1] + [c["sp"] for c in cases])
    results, models = {}, {}
    for case in cases:  # one model per architecture, re-parallelized per case (as stages do)
        key = (case["arch"], case["heads"], case["kv_heads"], case.get("sliding_window"))
        if key not in models:
            models[key] = tiny_model(*key)
        try:
            results[case["name"]] = model_case(states, models[key], case, rows, loss_sum_fn)
        except ValueError as err:  # expected refusals are asserted by the test
            results[case["name"]] = {"error": str(err)}
    return results
