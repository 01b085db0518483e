"""On a GPU: the engine loop of issue 13. Speculative verify steps replay CUDA graphs captured per
(batch size, draft tokens) and equal eager verify and the dense reference, over changing batch
sizes and acceptance patterns, with fixed buffer addresses and padding rows that write nothing."""

import pytest
import torch

from batchmeta import ops
from batchmeta.attention import fast_plan_supported
from tests.test_gpu_attention import Engine, check_outputs, tol

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("heads", [(8, 2), (16, 2)])
def test_speculative_verify_under_cuda_graphs(heads):
    sizes, drafts = (1, 2, 4, 8), (1, 3)
    eng = Engine(page_sizes=(16, 1), windows=(-1, 20), heads=heads, dtype=torch.bfloat16, graph_sizes=sizes,
                 max_draft_tokens=3)  # fmt: skip
    meta, hq = eng.meta, heads[0]
    gen = torch.Generator().manual_seed(21)
    cap = max(sizes) * (1 + max(drafts))
    q_buf = torch.zeros(cap, hq, eng.d, dtype=eng.dtype, device="cuda")
    k_buf = torch.zeros(cap, eng.hkv, eng.d, dtype=eng.dtype, device="cuda")
    v_buf = torch.zeros_like(k_buf)
    out_bufs = [torch.zeros_like(q_buf) for _ in eng.caches]

    def forward(step):
        n = step.padded_num_reqs * step.query_len
        for g, (kc, vc) in enumerate(eng.caches):
            ops.store_kv(k_buf[:n], v_buf[:n], step.slot_mappings[g], kc, vc)
            step.attention(q_buf[:n], kc, vc, group=g, out=out_bufs[g][:n])

    for k in drafts:
        for s in sizes:
            meta.capture_decode_graph(s, forward, num_draft_tokens=k)
    fixed = (meta.positions, *meta.slot_mappings, *meta.kv_indices, meta._staging.dev, q_buf, *out_bufs)
    addresses = [t.data_ptr() for t in fixed]
    torch.manual_seed(22)
    lens = {}
    for r in range(8):
        lens[r] = int(torch.randint(3, 60, (), generator=gen))
        eng.grow(r, lens[r])
        k, v = eng.new_kv([r], [lens[r]])
        with meta.prepare_prefill([r], [lens[r]], [0]) as step:
            for g, (kc, vc) in enumerate(eng.caches):
                ops.store_kv(k, v, step.slot_mappings[g], kc, vc)
    batches = ([0], [1, 2, 3], [4, 5, 6, 7, 0], [2, 7], list(range(8)), [6], [3, 1, 4])
    for i, batch in enumerate(batches):
        kd = drafts[i % len(drafts)]
        q_len, b = 1 + kd, len(batch)
        clens = [lens[r] for r in batch]
        for r in batch:
            eng.grow(r, lens[r] + q_len)
        k, v = eng.new_kv(batch, [q_len] * b)
        q = torch.randn(b * q_len, hq, eng.d, device="cuda").to(eng.dtype)
        with meta.prepare_decode(batch, clens, num_draft_tokens=kd, cuda_graph=True) as step:
            assert step.kind == "spec_decode" and step.cuda_graph and step.query_len == q_len
            n = step.padded_num_reqs
            assert n == min(s for s in sizes if s >= b)
            q_buf[: b * q_len], k_buf[: b * q_len], v_buf[: b * q_len] = q, k, v
            q_buf[b * q_len : n * q_len] = 0
            meta.replay_decode_graph(step)
        torch.cuda.synchronize()
        graph_outs = [o[: b * q_len].clone() for o in out_bufs]
        check_outputs(eng, q, graph_outs, batch, [q_len] * b)
        # The same verify step eagerly (the same tokens, written again to the same slots).
        with meta.prepare_decode(batch, clens, num_draft_tokens=kd) as step:
            eager = []
            for g, (kc, vc) in enumerate(eng.caches):
                ops.store_kv(k, v, step.slot_mappings[g], kc, vc)
                eager.append(step.attention(q, kc, vc, group=g))
        for g_out, e_out in zip(graph_outs, eager, strict=True):
            torch.testing.assert_close(g_out.float(), e_out.float(), **tol(eng.dtype))
        # Acceptance: each row keeps 1..q_len of its tokens; the rest are overwritten by later steps.
        for r in batch:
            accepted = int(torch.randint(1, q_len + 1, (), generator=gen))
            lens[r] += accepted
            eng.dense_k[r] = eng.dense_k[r][: lens[r]]
            eng.dense_v[r] = eng.dense_v[r][: lens[r]]
            eng.raw_k[r], eng.raw_v[r] = eng.dense_k[r], eng.dense_v[r]
    assert addresses == [t.data_ptr() for t in fixed]
    # Padding rows read the padding page and never write it.
    for kc, vc in eng.caches:
        assert (kc[0] == 0).all() and (vc[0] == 0).all()
    planners = meta._planner.prefill_planners().items()
    graph_planners = {k: p for k, p in planners if isinstance(k, tuple) and k[0] == "graph"}
    assert {key[2:] for key in graph_planners} == {(s, 1 + kd) for s in sizes for kd in drafts}
    assert all(p.fast == fast_plan_supported() for p in graph_planners.values())
    # A draft count with no captured graph raises; so does a batch above the largest size.
    for r in (0, 1):
        eng.grow(r, lens[r] + 3)
    step = meta.prepare_decode([0, 1], [lens[0], lens[1]], num_draft_tokens=2, cuda_graph=True)
    with pytest.raises(ValueError, match="no CUDA graph captured for batch size 2 with 2 draft tokens"):
        meta.replay_decode_graph(step)
    with pytest.raises(ValueError, match="at most 8"):
        meta.prepare_decode(list(range(9)), [1] * 9, num_draft_tokens=1, cuda_graph=True)
