"""On a GPU: attention through every FlashInfer state equals a dense float32 reference, CUDA-graph
replay equals eager decode with fixed buffer addresses, and prepare_* makes no host sync."""

import math

import pytest
import torch

import batchmeta
from batchmeta import KVGroup, MetadataConfig, ops
from batchmeta.metadata import BatchMetadata

pytestmark = pytest.mark.gpu

NUM_PAGES = 512


class Engine:
    """A tiny engine: page allocation, a paged KV cache per group, and every request's K/V kept
    densely as well, for the reference."""

    def __init__(
        self,
        page_sizes=(16,),
        windows=(-1,),
        heads=(8, 2),
        head_dim=64,
        dtype=torch.float16,
        graph_sizes=(),
        max_draft_tokens=0,
        sm_scales=None,
        soft_caps=None,
        kv_dtype=None,
        kv_scales=None,
        **config,
    ):
        sm_scales = sm_scales or (None,) * len(page_sizes)
        soft_caps = soft_caps or (0.0,) * len(page_sizes)
        groups = tuple(
            KVGroup(page_size=p, window_left=w, sm_scale=s, logits_soft_cap=c)
            for p, w, s, c in zip(page_sizes, windows, sm_scales, soft_caps, strict=True)
        )
        kv_dtype = kv_dtype or dtype
        self.cfg = MetadataConfig(
            max_num_reqs=16,
            max_num_tokens=512,
            max_model_len=512,
            kv_groups=groups,
            num_qo_heads=heads[0],
            num_kv_heads=heads[1],
            head_dim=head_dim,
            q_dtype=dtype,
            kv_dtype=kv_dtype,
            device="cuda",
            num_kv_pages=NUM_PAGES,
            cuda_graph_batch_sizes=graph_sizes,
            max_draft_tokens=max_draft_tokens,
            **config,
        )
        self.meta = BatchMetadata(self.cfg)
        self.dtype = dtype
        self.hkv, self.d = heads[1], head_dim
        # A float8 cache: store_kv quantizes with these scales, attention dequantizes with them.
        self.k_scale, self.v_scale = kv_scales or (None, None)
        self.caches = [
            (
                torch.zeros(NUM_PAGES, p, heads[1], head_dim, dtype=kv_dtype, device="cuda"),
                torch.zeros(NUM_PAGES, p, heads[1], head_dim, dtype=kv_dtype, device="cuda"),
            )
            for p in page_sizes
        ]
        self.store_scales = {} if self.k_scale is None else dict(k_scale=self.k_scale, v_scale=self.v_scale)
        self.free = [list(range(NUM_PAGES - 1, 0, -1)) for _ in page_sizes]  # page 0: padding
        self.held = {}
        self.dense_k, self.dense_v = {}, {}  # what attention reads from the cache (float8: the round trip)
        self.raw_k, self.raw_v = {}, {}  # what the model made (a ragged prefill attends over these)

    def grow(self, req, seq_len):
        rows = self.held.setdefault(req, [[] for _ in self.cfg.kv_groups])
        new = []
        for g, grp in enumerate(self.cfg.kv_groups):
            need = math.ceil(seq_len / grp.page_size) - len(rows[g])
            pages = [self.free[g].pop() for _ in range(max(need, 0))]
            rows[g] += pages
            new.append(pages)
        self.meta.block_tables.append(req, new)

    def new_kv(self, idx, qlens):
        t = sum(qlens)
        k = torch.randn(t, self.hkv, self.d, device="cuda").to(self.dtype)
        v = torch.randn(t, self.hkv, self.d, device="cuda").to(self.dtype)
        s = 0
        for r, q in zip(idx, qlens, strict=True):
            self.dense_k[r] = torch.cat([self.dense_k.get(r, k[:0]), self.cached(k[s : s + q], self.k_scale)])
            self.dense_v[r] = torch.cat([self.dense_v.get(r, v[:0]), self.cached(v[s : s + q], self.v_scale)])
            self.raw_k[r] = torch.cat([self.raw_k.get(r, k[:0]), k[s : s + q]])
            self.raw_v[r] = torch.cat([self.raw_v.get(r, v[:0]), v[s : s + q]])
            s += q
        return k, v

    def cached(self, x, scale):
        """What attention reads back of ``x`` from the cache: ``x`` itself, or its float8 round trip."""
        if scale is None:
            return x
        kv_dtype = self.caches[0][0].dtype
        inv = torch.tensor(1.0 / scale, dtype=torch.float32)
        q = (x.float() * inv.item()).clamp(-torch.finfo(kv_dtype).max, torch.finfo(kv_dtype).max).to(kv_dtype)
        return (q.float() * scale).to(self.dtype)

    def reference(self, q, idx, qlens, window_left, group=0, raw=False, plain=False):
        """Dense float32 attention of each request's new queries over all its tokens, with the group's
        scale and soft cap (``plain``: ``1/sqrt(head_dim)`` and none); ``raw``: over the keys and
        values as made, not as cached."""
        grp = self.cfg.kv_groups[group]
        cap = 0.0 if plain else grp.logits_soft_cap
        sm_scale = grp.sm_scale if grp.sm_scale is not None and not plain else 1 / math.sqrt(self.d)
        out = torch.empty(q.shape, dtype=torch.float32, device="cuda")
        rep = q.shape[1] // self.hkv
        s = 0
        for r, n in zip(idx, qlens, strict=True):
            dk, dv = (self.raw_k, self.raw_v) if raw else (self.dense_k, self.dense_v)
            k = dk[r].float().repeat_interleave(rep, 1)
            v = dv[r].float().repeat_interleave(rep, 1)
            L = k.shape[0]
            qq = q[s : s + n].float()
            scores = torch.einsum("qhd,khd->hqk", qq, k) * sm_scale
            if cap:
                scores = cap * torch.tanh(scores / cap)
            qpos = torch.arange(L - n, L, device="cuda")[:, None]
            kpos = torch.arange(L, device="cuda")[None, :]
            mask = kpos <= qpos
            if window_left >= 0:
                mask &= kpos >= qpos - window_left
            scores = scores.masked_fill(~mask, float("-inf"))
            out[s : s + n] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v)
            s += n
        return out

    def run_step(self, step, idx, qlens, k, v):
        q = torch.randn(sum(qlens), self.cfg.num_qo_heads, self.d, device="cuda").to(self.dtype)
        outs = []
        for g, (kc, vc) in enumerate(self.caches):
            ops.store_kv(k, v, step.slot_mappings[g], kc, vc, **self.store_scales)
            outs.append(step.attention(q, kc, vc, group=g, k=k, v=v, **self.store_scales))
        return q, outs


def tol(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)


def check_outputs(eng, q, outs, idx, qlens, raw=False):
    for g, out in enumerate(outs):
        ref = eng.reference(q, idx, qlens, eng.cfg.kv_groups[g].window_left, group=g, raw=raw)
        torch.testing.assert_close(out.float(), ref, **tol(eng.dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_sizes, windows", [((16,), (-1,)), ((1,), (-1,)), ((16, 4), (-1, 24))])
@pytest.mark.parametrize("heads", [(8, 2), (16, 2)])  # GQA 4: decode without tensor cores; 8: with
def test_prefill_chunked_prefill_mixed_decode_against_dense(dtype, page_sizes, windows, heads):
    eng = Engine(page_sizes=page_sizes, windows=windows, heads=heads, dtype=dtype)
    torch.manual_seed(0)
    meta = eng.meta
    # 1. ragged prefill: nothing cached.
    idx, qlens, clens = [3, 7, 1], [40, 9, 70], [0, 0, 0]
    steps = [("prefill", idx, qlens, clens)]
    # 2. chunked prefill over cached prefixes, beside decodes (mixed).
    steps.append(("prefill", [3, 7, 1], [1, 33, 1], [40, 9, 70]))
    # 3. plain decode.
    steps.append(("decode", [1, 3, 7], [1, 1, 1], [71, 41, 42]))
    kinds = []
    for mode, idx, qlens, clens in steps:
        for r, c, q in zip(idx, clens, qlens, strict=True):
            eng.grow(r, c + q)
        k, v = eng.new_kv(idx, qlens)
        ctx = (
            meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens)
            if mode == "prefill"
            else meta.prepare_decode(idx, clens)
        )
        with ctx as step:
            kinds.append(step.kind)
            q, outs = eng.run_step(step, idx, qlens, k, v)
        check_outputs(eng, q, outs, idx, qlens)
    assert kinds == ["ragged_prefill", "prefill", "decode"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_speculative_decode_against_dense(dtype):
    eng = Engine(page_sizes=(16,), dtype=dtype, max_draft_tokens=3)
    torch.manual_seed(1)
    idx, clens = [0, 5], [30, 17]
    for r, c in zip(idx, clens, strict=True):
        eng.grow(r, c + 4)
        eng.new_kv([r], [c])
        with eng.meta.prepare_prefill([r], query_lens=[c], cache_lens=[0]) as step:
            for g, (kc, vc) in enumerate(eng.caches):
                ops.store_kv(eng.dense_k[r], eng.dense_v[r], step.slot_mappings[g], kc, vc)
    k, v = eng.new_kv(idx, [4, 4])
    with eng.meta.prepare_decode(idx, clens, num_draft_tokens=3) as step:
        assert step.kind == "spec_decode"
        q, outs = eng.run_step(step, idx, [4, 4], k, v)
    check_outputs(eng, q, outs, idx, [4, 4])


def test_cuda_graph_replay_equals_eager_and_buffers_stay():
    sizes = (1, 2, 4, 8)
    eng = Engine(page_sizes=(16, 4), windows=(-1, 20), graph_sizes=sizes)
    meta = eng.meta
    torch.manual_seed(2)
    hq = eng.cfg.num_qo_heads
    q_buf = torch.zeros(max(sizes), hq, eng.d, dtype=eng.dtype, device="cuda")
    k_buf = torch.zeros(max(sizes), eng.hkv, eng.d, dtype=eng.dtype, device="cuda")
    v_buf = torch.zeros_like(k_buf)
    out_bufs = [torch.zeros_like(q_buf) for _ in eng.caches]

    def forward(step):
        n = step.padded_num_reqs
        for g, (kc, vc) in enumerate(eng.caches):
            ops.store_kv(k_buf[:n], v_buf[:n], step.slot_mappings[g], kc, vc)
            step.attention(q_buf[:n], kc, vc, group=g, out=out_bufs[g][:n])

    for s in sizes:
        meta.capture_decode_graph(s, forward)
    fixed = (meta.positions, *meta.slot_mappings, *meta.kv_indices, meta._staging.dev)
    addresses = [t.data_ptr() for t in fixed]
    # Prefill some requests eagerly, then decode batches of changing size through the graphs.
    lens = {r: int(torch.randint(5, 60, ()).item()) for r in range(8)}
    for r, n in lens.items():
        eng.grow(r, n)
        k, v = eng.new_kv([r], [n])
        with meta.prepare_prefill([r], query_lens=[n], cache_lens=[0]) as step:
            for g, (kc, vc) in enumerate(eng.caches):
                ops.store_kv(k, v, step.slot_mappings[g], kc, vc)
    for batch in ([0], [1, 2, 3], [4, 5, 6, 7, 0], [2, 7], [0, 1, 2, 3, 4, 5, 6, 7]):
        clens = [lens[r] for r in batch]
        for r in batch:
            eng.grow(r, lens[r] + 1)
        k, v = eng.new_kv(batch, [1] * len(batch))
        q = torch.randn(len(batch), hq, eng.d, device="cuda").to(eng.dtype)
        with meta.prepare_decode(batch, clens, cuda_graph=True) as step:
            n = step.padded_num_reqs
            assert n == min(s for s in sizes if s >= len(batch))
            q_buf[: len(batch)] = q
            k_buf[: len(batch)] = k
            v_buf[: len(batch)] = v
            q_buf[len(batch) : n] = 0
            meta.replay_decode_graph(step)
        torch.cuda.synchronize()
        check_outputs(eng, q, [o[: len(batch)] for o in out_bufs], batch, [1] * len(batch))
        for r in batch:
            lens[r] += 1
    assert addresses == [t.data_ptr() for t in fixed]
    # Every graph batch size took the fast path (its fast plan equal to its stock plan).
    assert all(p.fast is True for key, p in meta._launcher.planner.decode_planners().items() if key[0] == "graph")
    # The padding page was never written: padded rows store nothing.
    for kc, vc in eng.caches:
        assert (kc[0] == 0).all() and (vc[0] == 0).all()
    with pytest.raises(ValueError, match="at most 8"):
        meta.prepare_decode(list(range(9)), [1] * 9, cuda_graph=True)
    # A graph step replaced by a later prepare must not replay (its plan is gone).
    for r in (0, 1):
        eng.grow(r, lens[r] + 1)
    stale = meta.prepare_decode([0], [lens[0]], cuda_graph=True)
    meta.prepare_decode([1], [lens[1]], cuda_graph=True)
    with pytest.raises(batchmeta.StaleStepError, match="replay"):
        meta.replay_decode_graph(stale)


def test_prepare_makes_no_host_sync():
    eng = Engine(page_sizes=(16, 4), windows=(-1, 20), graph_sizes=(4,), max_draft_tokens=2)
    meta = eng.meta
    for r in range(4):
        eng.grow(r, 64)
    history = torch.zeros(eng.cfg.max_num_reqs, 128, dtype=torch.int64, device="cuda")
    sampled = torch.arange(6, dtype=torch.int64, device="cuda")

    def steps():
        with meta.prepare_prefill([0, 1, 2, 3], query_lens=[10, 1, 20, 1], cache_lens=[0, 5, 0, 9]):
            pass
        with meta.prepare_prefill([0, 1], query_lens=[10, 20], cache_lens=[0, 0]):
            pass
        with meta.prepare_decode([0, 1, 2], [30, 31, 32]):
            pass
        with meta.prepare_decode([0, 1, 2], [30, 31, 32], num_draft_tokens=2) as step:
            meta.accept_tokens(step, history, sampled, [1, 3, 2], [0, 0, 0])
        with meta.prepare_decode([0, 1, 2], [30, 31, 32], cuda_graph=True):
            pass
        with meta.prepare_decode([0, 1, 2], [30, 31, 32], num_draft_tokens=2, cuda_graph=True):
            pass

    steps()  # compile kernels, build wrappers, JIT FlashInfer
    eng.grow(3, 80)  # a staged block-table write in the checked round too
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_current_step_inside_a_layer():
    eng = Engine()
    eng.grow(0, 8)
    seen = []

    def layer():
        seen.append(batchmeta.current_step().num_tokens)

    with eng.meta.prepare_prefill([0], query_lens=[8], cache_lens=[0]):
        layer()
    assert seen == [8]


@pytest.mark.parametrize("page_size", [16, 1])
@pytest.mark.parametrize("heads", [(8, 2), (16, 2)])  # CUDA-core decode; tensor-core decode
def test_fast_decode_plan_equals_stock_plan(page_size, heads):
    """The fast plan path gives bit-identical attention to FlashInfer's stock plan() on the same batch."""
    import flashinfer

    eng = Engine(page_sizes=(page_size,), heads=heads)
    meta = eng.meta
    torch.manual_seed(3)
    ((kc, vc),) = eng.caches
    lens = {}
    for r in range(8):
        lens[r] = int(torch.randint(5, 90, ()).item())
        eng.grow(r, lens[r])
        k, v = eng.new_kv([r], [lens[r]])
        with meta.prepare_prefill([r], query_lens=[lens[r]], cache_lens=[0]) as step:
            ops.store_kv(k, v, step.slot_mappings[0], kc, vc)
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    stock = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=heads[0] // heads[1] > 4)
    for batch in ([0, 1, 2], [3], [0, 1, 2, 3, 4, 5, 6, 7], [5, 2], [7, 6, 5, 4], [1]):
        clens = [lens[r] for r in batch]
        for r in batch:
            eng.grow(r, lens[r] + 1)
        k, v = eng.new_kv(batch, [1] * len(batch))
        q = torch.randn(len(batch), heads[0], eng.d, device="cuda").to(eng.dtype)
        with meta.prepare_decode(batch, clens) as step:
            ops.store_kv(k, v, step.slot_mappings[0], kc, vc)
            fast = step.attention(q, kc, vc)
            stock.plan(
                torch.from_numpy(step.kv_indptr_host[0].copy()),
                step.kv_indices[0],
                torch.from_numpy(step.kv_last_page_len_host[0].copy()),
                *heads,
                eng.d,
                page_size,
                q_data_type=eng.dtype,
                kv_data_type=eng.dtype,
            )
            ref = stock.run(q, (kc, vc))
        torch.cuda.synchronize()
        assert torch.equal(fast, ref)
        check_outputs(eng, q, [fast], batch, [1] * len(batch))
        for r in batch:
            lens[r] += 1
    assert meta._launcher.planner.decode_planners()[("decode", 0)].fast is True


def _skip_unless_backend(backend):
    if backend == "fa3" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("FlashInfer's FA3 kernels run on sm90 only")


@pytest.mark.parametrize("page_size", [16, 1])
@pytest.mark.parametrize("heads", [(8, 2), (16, 2)])  # GQA 4 and 8
@pytest.mark.parametrize("window, dtype", [(-1, torch.float16), (24, torch.bfloat16)])
@pytest.mark.parametrize("backend", ["fa2", "fa3"])
def test_fast_prefill_plan_equals_stock_plan(page_size, heads, window, dtype, backend):
    """Chunked, mixed and speculative steps planned by PrefillPlanner give bit-identical attention to
    a wrapper planned by FlashInfer's stock plan() on the same batch, over changing batches."""
    import flashinfer

    _skip_unless_backend(backend)
    eng = Engine(
        page_sizes=(page_size,),
        windows=(window,),
        heads=heads,
        dtype=dtype,
        max_draft_tokens=3,
        prefill_backend=backend,
    )
    meta = eng.meta
    torch.manual_seed(5)
    ((kc, vc),) = eng.caches
    lens = {r: 0 for r in range(8)}
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    stock = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
    steps = [  # (idx, query_lens): chunks over cached prefixes, mixed with decodes, speculative rows
        ([0, 1, 2], [30, 7, 19]),
        ([0, 1, 2, 3], [1, 40, 1, 12]),
        ([3, 4, 0], [25, 9, 4]),
        ([5, 6, 7, 1, 2], [1, 1, 33, 4, 4]),
        ([4, 5, 6, 7], [4, 4, 4, 4]),
        ([2], [61]),
    ]
    for idx, qlens in steps:
        clens = [lens[r] for r in idx]
        for r, q in zip(idx, qlens, strict=True):
            eng.grow(r, lens[r] + q)
        k, v = eng.new_kv(idx, qlens)
        q = torch.randn(sum(qlens), heads[0], eng.d, device="cuda").to(dtype)
        with meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens) as step:
            ops.store_kv(k, v, step.slot_mappings[0], kc, vc)
            fast = step.attention(q, kc, vc, k=k, v=v)
            if step.kind == "ragged_prefill":  # the first step: nothing cached, no paged plan
                for r, n in zip(idx, qlens, strict=True):
                    lens[r] += n
                continue
            stock.plan(
                torch.from_numpy(step.qo_indptr_host.copy()),
                torch.from_numpy(step.kv_indptr_host[0].copy()),
                step.kv_indices[0],
                torch.from_numpy(step.kv_last_page_len_host[0].copy()),
                *heads,
                eng.d,
                page_size,
                causal=True,
                window_left=window,
                q_data_type=dtype,
                kv_data_type=dtype,
            )
            ref = stock.run(q, (kc, vc))
        torch.cuda.synchronize()
        assert torch.equal(fast, ref)
        check_outputs(eng, q, [fast], idx, qlens)
        for r, n in zip(idx, qlens, strict=True):
            lens[r] += n
    planner = meta._launcher.planner.prefill_planners()[0]
    assert planner.fast is True
    assert planner.wrapper._backend == backend
    # Speculative decode steps plan through the same planner.
    idx = [0, 1, 2, 3]
    for r in idx:
        eng.grow(r, lens[r] + 4)
    k, v = eng.new_kv(idx, [4] * 4)
    q = torch.randn(16, heads[0], eng.d, device="cuda").to(dtype)
    with meta.prepare_decode(idx, [lens[r] for r in idx], num_draft_tokens=3) as step:
        ops.store_kv(k, v, step.slot_mappings[0], kc, vc)
        fast = step.attention(q, kc, vc)
        stock.plan(
            torch.from_numpy(step.qo_indptr_host.copy()),
            torch.from_numpy(step.kv_indptr_host[0].copy()),
            step.kv_indices[0],
            torch.from_numpy(step.kv_last_page_len_host[0].copy()),
            *heads,
            eng.d,
            page_size,
            causal=True,
            window_left=window,
            q_data_type=dtype,
            kv_data_type=dtype,
        )
        assert torch.equal(fast, stock.run(q, (kc, vc)))


@pytest.mark.parametrize("heads", [(8, 2), (16, 2)])
@pytest.mark.parametrize("window, dtype", [(-1, torch.float16), (24, torch.bfloat16)])
@pytest.mark.parametrize("backend", ["fa2", "fa3"])
def test_fast_ragged_plan_equals_stock_plan(heads, window, dtype, backend):
    """Prefill steps with nothing cached (the ragged wrapper) planned by PrefillPlanner give
    bit-identical attention to a ragged wrapper planned by FlashInfer's stock plan()."""
    import flashinfer

    _skip_unless_backend(backend)
    eng = Engine(windows=(window,), heads=heads, dtype=dtype, prefill_backend=backend)
    meta = eng.meta
    torch.manual_seed(9)
    ((kc, vc),) = eng.caches
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    stock = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend=backend)
    for idx, qlens in (([0, 1], [30, 7]), ([2], [61]), ([3, 4, 5], [1, 40, 12]), ([6, 7], [100, 3])):
        for r, q in zip(idx, qlens, strict=True):
            eng.grow(r, q)
        k, v = eng.new_kv(idx, qlens)
        q = torch.randn(sum(qlens), heads[0], eng.d, device="cuda").to(dtype)
        with meta.prepare_prefill(idx, query_lens=qlens, cache_lens=[0] * len(idx)) as step:
            assert step.kind == "ragged_prefill"
            ops.store_kv(k, v, step.slot_mappings[0], kc, vc)
            fast = step.attention(q, kc, vc, k=k, v=v)
            qo = torch.from_numpy(step.qo_indptr_host.copy())
            stock.plan(qo, qo, *heads, eng.d, causal=True, window_left=window, q_data_type=dtype, kv_data_type=dtype)
            ref = stock.run(q, k, v)
        torch.cuda.synchronize()
        assert torch.equal(fast, ref)
        check_outputs(eng, q, [fast], idx, qlens)
    planner = meta._launcher.planner.prefill_planners()[("ragged", 0)]
    assert planner.fast is True
    assert planner.wrapper._backend == backend
