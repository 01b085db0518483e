"""On a GPU: the engine loop of issue 13. Speculative verify steps replay CUDA graphs captured per
(batch size, draft tokens) and equal eager verify and the dense reference, over changing batch
sizes and acceptance patterns, with fixed buffer addresses and padding rows that write nothing."""

import pytest
import torch

from batchmeta import ops
from tests.test_gpu_attention import Engine, check_outputs, tol

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("heads", [(8, 2), (16, 2)])
def test_speculative_verify_under_cuda_graphs(heads):
    sizes, drafts = (1, 2, 4, 8), (1, 3)
    eng = Engine(
        page_sizes=(16, 1), windows=(-1, 20), heads=heads, dtype=torch.bfloat16, graph_sizes=sizes, max_draft_tokens=3
    )
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
        with meta.prepare_prefill([r], query_lens=[lens[r]], cache_lens=[0]) as step:
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
    planners = meta._launcher.planner.prefill_planners().items()
    graph_planners = {k: p for k, p in planners if isinstance(k, tuple) and k[0] == "graph"}
    assert {key[2:] for key in graph_planners} == {(s, 1 + kd) for s in sizes for kd in drafts}
    assert all(p.fast is True for p in graph_planners.values())
    # A draft count with no captured graph raises; so does a batch above the largest size.
    for r in (0, 1):
        eng.grow(r, lens[r] + 3)
    step = meta.prepare_decode([0, 1], [lens[0], lens[1]], num_draft_tokens=2, cuda_graph=True)
    with pytest.raises(ValueError, match="no CUDA graph captured for batch size 2 with 2 draft tokens"):
        meta.replay_decode_graph(step)
    with pytest.raises(ValueError, match="at most 8"):
        meta.prepare_decode(list(range(9)), [1] * 9, num_draft_tokens=1, cuda_graph=True)
    # That (2, k=2) graph captured after a step was planned for it (its planner's first, stock plan
    # was a real batch's): the capture's eager warm-up runs through the fast plan, then it replays.
    meta.capture_decode_graph(2, forward, num_draft_tokens=2)
    k, v = eng.new_kv([0, 1], [3, 3])
    q = torch.randn(6, hq, eng.d, device="cuda").to(eng.dtype)
    with meta.prepare_decode([0, 1], [lens[0], lens[1]], num_draft_tokens=2, cuda_graph=True) as step:
        q_buf[:6], k_buf[:6], v_buf[:6] = q, k, v
        meta.replay_decode_graph(step)
    torch.cuda.synchronize()
    check_outputs(eng, q, [o[:6] for o in out_bufs], [0, 1], [3, 3])


def test_fast_verify_graph_plan_equals_stock_plan():
    """A verify step planned by the fast planner on a CUDA-graph wrapper (padding rows included) gives
    bit-identical attention to a CUDA-graph wrapper planned by FlashInfer's stock plan() with
    uniform_q_len over its own buffers; run eagerly on the graph step's rows."""
    import flashinfer

    heads = (8, 2)
    eng = Engine(page_sizes=(16,), heads=heads, dtype=torch.bfloat16, graph_sizes=(4,), max_draft_tokens=2)
    meta, ((kc, vc),) = eng.meta, eng.caches
    torch.manual_seed(23)
    lens = {r: 20 + 7 * r for r in range(4)}
    for r, n in lens.items():
        eng.grow(r, n + 9)
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    bufs = (
        torch.zeros(5, dtype=torch.int32, device="cuda"),
        torch.zeros(5, dtype=torch.int32, device="cuda"),
        torch.zeros(4096, dtype=torch.int32, device="cuda"),
        torch.zeros(4, dtype=torch.int32, device="cuda"),
    )
    stock = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
        ws,
        "NHD",
        use_cuda_graph=True,
        qo_indptr_buf=bufs[0],
        paged_kv_indptr_buf=bufs[1],
        paged_kv_indices_buf=bufs[2],
        paged_kv_last_page_len_buf=bufs[3],
        backend="fa2",
    )
    for batch in ([0, 1, 2, 3], [1, 3], [2], [0, 1, 3]):  # 4 rows, then 2 and 3 padding rows
        q = torch.randn(12, heads[0], eng.d, device="cuda").to(eng.dtype)
        with meta.prepare_decode(batch, [lens[r] for r in batch], num_draft_tokens=2, cuda_graph=True) as step:
            fast = step.attention(q, kc, vc)
            host = [
                torch.from_numpy(a.copy())
                for a in (step.qo_indptr_host, step.kv_indptr_host[0], step.kv_last_page_len_host[0])
            ]
            stock.plan(
                host[0],
                host[1],
                step.kv_indices[0].clone(),
                host[2],
                *heads,
                eng.d,
                16,
                causal=True,
                q_data_type=eng.dtype,
                kv_data_type=eng.dtype,
                uniform_q_len=3,
            )
            ref = stock.run(q, (kc, vc))
        torch.cuda.synchronize()
        assert torch.equal(fast, ref), batch
        for r in batch:
            lens[r] += 1
    planner = meta._launcher.planner.prefill_planners()[("graph", 0, 4, 3)]
    assert planner.fast is True


# --------------------------------------------------------------------------------------------------
# Device-side input ids: the overlapped decode loop
# --------------------------------------------------------------------------------------------------
VOCAB, HQ, HKV, D = 97, 8, 2, 64


class TinyLM:
    """Embedding, one attention layer through batchmeta (``store_kv`` + ``step.attention``), an
    untied unembedding (a tied one makes greedy decoding echo its input): greedy tokens that
    depend on the earlier tokens and change from step to step."""

    def __init__(self, num_pages, device="cuda"):
        gen = torch.Generator().manual_seed(5)
        hidden = HQ * D
        self.emb = (torch.randn(VOCAB, hidden, generator=gen)).half().to(device)
        self.w = [
            (torch.randn(hidden, n, generator=gen) / hidden**0.5).half().to(device)
            for n in (HQ * D, HKV * D, HKV * D, hidden, VOCAB)
        ]
        self.k_cache = torch.zeros(num_pages, 16, HKV, D, dtype=torch.float16, device=device)
        self.v_cache = torch.zeros_like(self.k_cache)

    def logits(self, step, ids):
        x = self.emb[ids]
        q, k, v = (x @ w for w in self.w[:3])
        q, k, v = q.view(-1, HQ, D), k.view(-1, HKV, D), v.view(-1, HKV, D)
        ops.store_kv(k, v, step.slot_mappings[0], self.k_cache, self.v_cache)
        o = step.attention(q, self.k_cache, self.v_cache, k=k, v=v)
        return (x + o.reshape(x.shape[0], -1) @ self.w[3]) @ self.w[4]


def loop_meta(history, graphs):
    from batchmeta import BatchMetadata, KVGroup, MetadataConfig

    cfg = MetadataConfig(
        max_num_reqs=8,
        max_num_tokens=128,
        max_model_len=128,
        kv_groups=KVGroup(page_size=16),
        num_qo_heads=HQ,
        num_kv_heads=HKV,
        head_dim=D,
        q_dtype=torch.float16,
        kv_dtype=torch.float16,
        device="cuda",
        num_kv_pages=64,
        token_history=history,
        cuda_graph_batch_sizes=(4,) if graphs else (),
    )
    return BatchMetadata(cfg)


PROMPTS = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26], [43, 38], [83, 27, 95, 2, 88, 41, 9, 71, 69]]
STEPS = 50


def give_pages(meta, n):
    for r in range(n):
        meta.block_tables.append(r, [list(range(1 + 8 * r, 9 + 8 * r))])  # 128 tokens each


def synchronous_loop(model, graphs):
    """The reference: the host reads every step's tokens and passes them as the next input (through
    the same kind of decode step, eager or graph, so both loops compute bit for bit alike)."""
    meta = loop_meta(False, graphs)
    b = len(PROMPTS)
    give_pages(meta, b)
    ids_buf = torch.zeros(4, dtype=torch.int64, device="cuda")
    logits_buf = torch.zeros(4, VOCAB, dtype=torch.float16, device="cuda")
    if graphs:

        def forward(step):
            logits_buf[: step.padded_num_reqs] = model.logits(step, ids_buf[: step.padded_num_reqs])

        meta.capture_decode_graph(4, forward)
    lens = [len(p) for p in PROMPTS]
    with meta.prepare_prefill(list(range(b)), query_lens=lens, cache_lens=[0] * b) as step:
        ids = torch.tensor([t for p in PROMPTS for t in p], device="cuda")
        tokens = model.logits(step, ids)[step.logits_indices].argmax(-1).tolist()
    out = [tokens]
    for _ in range(STEPS):
        with meta.prepare_decode(list(range(b)), lens, cuda_graph=graphs) as step:
            ids_buf[:b] = torch.tensor(tokens, device="cuda")
            if graphs:
                meta.replay_decode_graph(step)
                logits = logits_buf[:b]
            else:
                logits = model.logits(step, ids_buf[:b])
            tokens = logits.argmax(-1).tolist()
        out.append(tokens)
        lens = [n + 1 for n in lens]
    return out


def overlapped_loop(model, meta, graphs, check_syncs):
    """Prepare N+1 while N runs: sampling, acceptance and the next step's input ids stay on the
    device; the host copies each step's tokens back without blocking and reads them one step late
    (only once the copy's event has completed: never waiting)."""
    b = len(PROMPTS)
    give_pages(meta, b)
    for r, p in enumerate(PROMPTS):
        meta.stage_prompt(r, p)
    lens = [len(p) for p in PROMPTS]
    pinned = [torch.zeros(b, dtype=torch.int64, pin_memory=True) for _ in range(STEPS + 1)]
    events = [torch.cuda.Event() for _ in range(STEPS + 1)]
    logits_buf = torch.zeros(4, VOCAB, dtype=torch.float16, device="cuda")
    if graphs:

        def forward(step):
            logits_buf[: step.padded_num_reqs] = model.logits(step, step.input_ids)

        meta.capture_decode_graph(4, forward)
    seen = []
    if check_syncs:
        torch.cuda.set_sync_debug_mode("error")
    try:
        step = meta.prepare_prefill(list(range(b)), query_lens=lens, cache_lens=[0] * b)
        for n in range(STEPS + 1):
            with step:
                if step.cuda_graph:
                    meta.replay_decode_graph(step)
                    logits = logits_buf[: step.num_reqs]
                else:
                    logits = model.logits(step, step.input_ids)[step.logits_indices]
            sampled = logits.argmax(-1)
            lens_next, _ = meta.accept_tokens(step, None, sampled, [1] * b, [len(p) for p in PROMPTS])
            pinned[n].copy_(sampled, non_blocking=True)
            events[n].record()
            if n and events[n - 1].query():  # one step late, only if already there
                seen.append(n - 1)
            if n < STEPS:
                step = meta.prepare_decode(list(range(b)), lens_next, cuda_graph=graphs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return [p.tolist() for p in pinned], seen


@pytest.mark.parametrize("graphs", [False, True])
def test_overlapped_decode_loop_without_host_syncs(graphs):
    model = TinyLM(64)
    want = synchronous_loop(model, graphs)
    assert len({tuple(t) for t in want}) > 5  # the tokens change from step to step: a real check
    warm = loop_meta(True, graphs)
    overlapped_loop(model, warm, graphs, check_syncs=False)  # compile kernels, JIT FlashInfer
    meta = loop_meta(True, graphs)
    got, _ = overlapped_loop(model, meta, graphs, check_syncs=True)
    assert got == want
    # The history holds each request's prompt and every token sampled after it.
    for r, p in enumerate(PROMPTS):
        assert meta.token_ids[r, : len(p) + STEPS + 1].tolist() == p + [t[r] for t in want]
