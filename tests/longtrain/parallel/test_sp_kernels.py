"""Kernel level, real gloo ranks: Ulysses and ring attention vs single-process document_attention.

Each rank computes the full-row reference itself (``longtrain.attention.document_attention``,
same seeded tensors everywhere), then its SP slice through the real collectives, and reports the
largest difference of its output and of its q/k/v gradients. Layouts have documents crossing
slice (and zigzag chunk) boundaries, tiny and long documents, GQA with kv_heads < sp_size and
odd head counts.
"""
from __future__ import annotations

import pytest

import longtrain.attention  # noqa: F401  (imported once here; the forked ranks inherit it)
from longtrain.parallel import local_token_index
from tests.support.distributed import run_distributed
from tests.longtrain.parallel._workers import kernel_worker

pytestmark = pytest.mark.multiproc
TOL = 1e-5
DOCS_2 = [5, 21, 3, 11, 1, 7]  # T = 48
DOCS_4 = [2, 30, 9, 1, 6]  # T = 48

CASES = {
    2: [dict(name=f"{mode}-h{h}-kv{kv}", mode=mode, heads=h, kv_heads=kv, docs=DOCS_2, seed=i)
        for i, (mode, h, kv) in enumerate([("ulysses", 4, 4), ("ulysses", 4, 1), ("ulysses", 6, 3),
                                           ("ring", 4, 4), ("ring", 4, 1), ("ring", 3, 3)])],
    4: [dict(name=f"{mode}-h{h}-kv{kv}", mode=mode, heads=h, kv_heads=kv, docs=DOCS_4, seed=i)
        for i, (mode, h, kv) in enumerate([("ulysses", 8, 2), ("ulysses", 4, 1), ("ring", 4, 1), ("ring", 5, 5)])],
}


@pytest.fixture(scope="module", params=[2, 4], ids=["sp2", "sp4"])
def kernel_results(request, tmp_path_factory):
    world = request.param
    results = run_distributed(kernel_worker, world, tmp_path_factory.mktemp(f"kernels{world}"), CASES[world])
    return world, results


def _crossing_documents(docs: list[int], sp: int, mode: str) -> int:
    """How many documents have tokens on more than one rank (guard against vacuous layouts)."""
    total, starts = sum(docs), [0]
    for n in docs:
        starts.append(starts[-1] + n)
    owner = {}
    for r in range(sp):
        for g in local_token_index(total, sp, r, mode).tolist():
            owner[g] = r
    return sum(len({owner[g] for g in range(a, b)}) > 1 for a, b in zip(starts[:-1], starts[1:]))


def test_layouts_cross_slice_boundaries():
    for world, cases in CASES.items():
        for case in cases:
            need = 1 if (case["mode"], world) == ("ulysses", 2) else 2  # Ulysses at sp 2 has one boundary
            assert _crossing_documents(case["docs"], world, case["mode"]) >= need, case["name"]


def test_outputs_and_grads_match_document_attention(kernel_results):
    world, results = kernel_results
    for rank, per_case in enumerate(results):
        assert set(per_case) == {c["name"] for c in CASES[world]}
        for name, err in per_case.items():
            assert err["local_tokens"] == 48 // world
            assert err["grad_abs"] > 0, f"rank {rank} {name}: no gradient reached the inputs"
            for key in ("out", "dq", "dk", "dv"):
                assert err[key] <= TOL, f"rank {rank} sp={world} {name}: {key} differs by {err[key]:.2e}"
