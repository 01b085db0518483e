"""On a GPU: the model families of issue 12 through FlashInfer against dense float32 references.

- per-group ``sm_scale`` and ``logits_soft_cap`` on every step type (ragged prefill, chunked, mixed,
  decode, speculative, CUDA graphs, sliding window), and the fast planners bit-identical to stock;
- float8 KV caches (e4m3fn, e5m2) with per-layer scales, within a stated tolerance;
- MLA groups through ``BatchMLAPagedAttentionWrapper`` (eager every step kind, CUDA-graph decode).
"""

import math

import pytest
import torch

from batchmeta import MLA, BatchMetadata, KVGroup, MetadataConfig, ops
from batchmeta.attention.mla import MLAPlanner, mla_run, new_mla_wrapper
from tests.test_gpu_attention import NUM_PAGES, Engine, check_outputs, tol

pytestmark = pytest.mark.gpu

# (mode, idx, query_lens, cache_lens): ragged prefill; chunks over cached prefixes beside decodes
# (mixed); plain decode; speculative decode (1 + 2 tokens per row).
STEPS = [
    ("prefill", [3, 7, 1], [40, 9, 70], [0, 0, 0]),
    ("prefill", [3, 7, 1], [1, 33, 1], [40, 9, 70]),
    ("decode", [1, 3, 7], [1, 1, 1], [71, 41, 42]),
    ("spec", [1, 3, 7], [3, 3, 3], [72, 42, 43]),
]


def run_steps(eng, kinds):
    """STEPS through ``eng``, checking every group's output against the dense reference."""
    for mode, idx, qlens, clens in STEPS:
        for r, c, q in zip(idx, clens, qlens, strict=True):
            eng.grow(r, c + q)
        k, v = eng.new_kv(idx, qlens)
        if mode == "prefill":
            step = eng.meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens)
        else:
            step = eng.meta.prepare_decode(idx, clens, num_draft_tokens=qlens[0] - 1)
        with step:
            kinds.append(step.kind)
            q, outs = eng.run_step(step, idx, qlens, k, v)
        check_outputs(eng, q, outs, idx, qlens, raw=step.kind == "ragged_prefill")
        yield q, outs, idx, qlens


def graph_decode(eng, sizes, lens):
    """Decode batches of changing size through captured graphs; checks each against the reference."""
    meta, hq = eng.meta, eng.cfg.num_qo_heads
    q_buf = torch.zeros(max(sizes), hq, eng.d, dtype=eng.dtype, device="cuda")
    k_buf = torch.zeros(max(sizes), eng.hkv, eng.d, dtype=eng.dtype, device="cuda")
    v_buf = torch.zeros_like(k_buf)
    out_bufs = [torch.zeros_like(q_buf) for _ in eng.caches]

    def forward(step):
        n = step.padded_num_reqs
        for g, (kc, vc) in enumerate(eng.caches):
            ops.store_kv(k_buf[:n], v_buf[:n], step.slot_mappings[g], kc, vc, **eng.store_scales)
            step.attention(q_buf[:n], kc, vc, group=g, out=out_bufs[g][:n], **eng.store_scales)

    for s in sizes:
        meta.capture_decode_graph(s, forward)
    for batch in ([1], [3, 7, 1], [7, 3]):
        for r in batch:
            eng.grow(r, lens[r] + 1)
        k, v = eng.new_kv(batch, [1] * len(batch))
        q = torch.randn(len(batch), hq, eng.d, device="cuda").to(eng.dtype)
        with meta.prepare_decode(batch, [lens[r] for r in batch], cuda_graph=True) as step:
            n = step.padded_num_reqs
            q_buf[: len(batch)], k_buf[: len(batch)], v_buf[: len(batch)] = q, k, v
            meta.replay_decode_graph(step)
        torch.cuda.synchronize()
        check_outputs(eng, q, [o[: len(batch)] for o in out_bufs], batch, [1] * len(batch))
        for r in batch:
            lens[r] += 1
        assert n >= len(batch)


# --------------------------------------------------------------------------------------------------
# sm_scale and logits_soft_cap
# --------------------------------------------------------------------------------------------------
# Scales large enough that the logits reach the caps (|logit| ~ 8 against caps of 3-4): an ignored
# cap or scale moves the output far beyond the tolerance (checked below).
SCALED = dict(page_sizes=(16, 4), windows=(-1, 24), sm_scales=(0.9, 0.7), soft_caps=(4.0, 3.0))


@pytest.mark.parametrize("heads", [(8, 2), (16, 2)])  # decode on CUDA cores; on tensor cores
def test_scale_and_soft_cap_on_every_step_type(heads):
    eng = Engine(heads=heads, dtype=torch.bfloat16, graph_sizes=(1, 2, 4), max_draft_tokens=2, **SCALED)
    torch.manual_seed(11)
    kinds = []
    for q, outs, idx, qlens in run_steps(eng, kinds):
        # The same step with the default scale and no cap is far off: both were applied.
        for g, out in enumerate(outs):
            plain = eng.reference(q, idx, qlens, eng.cfg.kv_groups[g].window_left, group=g, raw=True, plain=True)
            assert (out.float() - plain).abs().max() > 0.2
    assert kinds == ["ragged_prefill", "prefill", "decode", "spec_decode"]
    graph_decode(eng, (1, 2, 4), {1: 75, 3: 45, 7: 46})


@pytest.mark.parametrize("heads", [(8, 2), (16, 2)])
def test_fast_plans_keep_scale_and_soft_cap(heads):
    """Decode and paged-prefill steps planned by the fast planners equal wrappers planned by
    FlashInfer's stock plan() with the same sm_scale and logits_soft_cap, bit for bit."""
    import flashinfer

    eng = Engine(heads=heads, dtype=torch.bfloat16, page_sizes=(16,), windows=(-1,), sm_scales=(0.9,), soft_caps=(4.0,))
    meta, ((kc, vc),) = eng.meta, eng.caches
    torch.manual_seed(12)
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=heads[0] // heads[1] > 4)
    prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa2")
    scales = dict(sm_scale=0.9, logits_soft_cap=4.0, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    lens = {r: 0 for r in range(6)}
    steps = [
        ([0, 1, 2], [30, 7, 19]),
        ([0, 1, 2, 3], [1, 40, 1, 12]),
        ([0, 1, 2, 3], [1, 1, 1, 1]),
        ([3, 4, 5, 0], [9, 50, 3, 1]),
        ([5, 4, 1], [1, 1, 1]),
        ([2, 3], [1, 1]),
    ]
    for idx, qlens in steps:
        clens = [lens[r] for r in idx]
        for r, n in zip(idx, qlens, strict=True):
            eng.grow(r, lens[r] + n)
        k, v = eng.new_kv(idx, qlens)
        q = torch.randn(sum(qlens), heads[0], eng.d, device="cuda").to(torch.bfloat16)
        decode_step = all(n == 1 for n in qlens) and all(clens)
        step = (
            meta.prepare_decode(idx, clens)
            if decode_step
            else meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens)
        )
        with step:
            ops.store_kv(k, v, step.slot_mappings[0], kc, vc)
            fast = step.attention(q, kc, vc, k=k, v=v)
            indptr = torch.from_numpy(step.kv_indptr_host[0].copy())
            last = torch.from_numpy(step.kv_last_page_len_host[0].copy())
            if step.kind == "decode":
                decode.plan(indptr, step.kv_indices[0], last, *heads, eng.d, 16, **scales)
                ref = decode.run(q, (kc, vc))
            elif step.kind == "prefill":
                prefill.plan(
                    torch.from_numpy(step.qo_indptr_host.copy()),
                    indptr,
                    step.kv_indices[0],
                    last,
                    *heads,
                    eng.d,
                    16,
                    causal=True,
                    **scales,
                )
                ref = prefill.run(q, (kc, vc))
            else:
                ref = None
        torch.cuda.synchronize()
        if ref is not None:
            assert torch.equal(fast, ref), step.kind
        check_outputs(eng, q, [fast], idx, qlens, raw=step.kind == "ragged_prefill")
        for r, n in zip(idx, qlens, strict=True):
            lens[r] += n
    assert meta._launcher.planner.decode_planners()[("decode", 0)].fast is True
    assert meta._launcher.planner.prefill_planners()[0].fast is True


# --------------------------------------------------------------------------------------------------
# float8 KV cache
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("heads", [(8, 2), (16, 2)])
def test_fp8_kv_cache_on_every_step_type(kv_dtype, heads):
    """A float8 cache written by store_kv with per-layer scales and read by FlashInfer with the same
    scales. Tolerance: against the dense reference over the dequantized cache (what the kernels
    read), bf16's (2e-2); against the unquantized keys and values, 0.25 absolute for e4m3 and 0.5 for
    e5m2 (their 3 and 2 mantissa bits: relative rounding error 2^-4 and 2^-3 per element)."""
    eng = Engine(
        heads=heads,
        dtype=torch.bfloat16,
        kv_dtype=kv_dtype,
        kv_scales=(0.05, 0.04),
        graph_sizes=(1, 2, 4),
        max_draft_tokens=2,
        page_sizes=(16, 4),
        windows=(-1, 24),
    )
    torch.manual_seed(13)
    kinds = []
    loose = 0.25 if kv_dtype == torch.float8_e4m3fn else 0.5
    for q, outs, idx, qlens in run_steps(eng, kinds):
        for g, out in enumerate(outs):
            raw = eng.reference(q, idx, qlens, eng.cfg.kv_groups[g].window_left, group=g, raw=True)
            torch.testing.assert_close(out.float(), raw, atol=loose, rtol=0)
    assert kinds == ["ragged_prefill", "prefill", "decode", "spec_decode"]
    graph_decode(eng, (1, 2, 4), {1: 75, 3: 45, 7: 46})
    # The cache holds float8 values: the store quantized (no page of zeros where tokens went).
    assert eng.caches[0][0].dtype == kv_dtype and eng.caches[0][0].float().abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# MLA
# --------------------------------------------------------------------------------------------------
CKV, KPE, MLA_HEADS = 512, 64, 16
MLA_SCALE = 1 / math.sqrt(128 + 64)  # DeepSeek's (qk_nope_head_dim + qk_rope_head_dim) ** -0.5


class MLAEngine:
    """An MLA model runner: one MLA group, a latent cache and a rope cache, dense copies on the side."""

    def __init__(self, page_size, dtype, graph_sizes=(), max_draft_tokens=0):
        self.cfg = MetadataConfig(
            max_num_reqs=16,
            max_num_tokens=512,
            max_model_len=512,
            kv_groups=KVGroup(
                page_size=page_size,
                sm_scale=MLA_SCALE,
                mla=MLA(num_heads=MLA_HEADS, head_dim_ckv=CKV, head_dim_kpe=KPE),
            ),
            num_qo_heads=MLA_HEADS,
            num_kv_heads=1,
            head_dim=CKV,
            q_dtype=dtype,
            kv_dtype=dtype,
            device="cuda",
            num_kv_pages=NUM_PAGES,
            cuda_graph_batch_sizes=graph_sizes,
            max_draft_tokens=max_draft_tokens,
        )
        self.meta = BatchMetadata(self.cfg)
        self.page_size, self.dtype = page_size, dtype
        self.ckv_cache = torch.zeros(NUM_PAGES, page_size, CKV, dtype=dtype, device="cuda")
        self.kpe_cache = torch.zeros(NUM_PAGES, page_size, KPE, dtype=dtype, device="cuda")
        self.free = list(range(NUM_PAGES - 1, 0, -1))  # page 0: padding
        self.held, self.dense = {}, {}

    def grow(self, req, seq_len):
        pages = self.held.setdefault(req, [])
        new = [self.free.pop() for _ in range(max(math.ceil(seq_len / self.page_size) - len(pages), 0))]
        pages += new
        self.meta.block_tables.append(req, [new])

    def new_tokens(self, idx, qlens):
        t = sum(qlens)
        ckv = torch.randn(t, CKV, device="cuda").to(self.dtype)
        kpe = torch.randn(t, KPE, device="cuda").to(self.dtype)
        q_nope = torch.randn(t, MLA_HEADS, CKV, device="cuda").to(self.dtype)
        q_pe = torch.randn(t, MLA_HEADS, KPE, device="cuda").to(self.dtype)
        s = 0
        for r, n in zip(idx, qlens, strict=True):
            old = self.dense.get(r, (ckv[:0], kpe[:0]))
            self.dense[r] = (torch.cat([old[0], ckv[s : s + n]]), torch.cat([old[1], kpe[s : s + n]]))
            s += n
        return ckv, kpe, q_nope, q_pe

    def reference(self, q_nope, q_pe, idx, qlens):
        out = torch.empty(q_nope.shape, dtype=torch.float32, device="cuda")
        s = 0
        for r, n in zip(idx, qlens, strict=True):
            ckv, kpe = (x.float() for x in self.dense[r])
            L = ckv.shape[0]
            scores = (
                torch.einsum("qhd,kd->hqk", q_nope[s : s + n].float(), ckv)
                + torch.einsum("qhd,kd->hqk", q_pe[s : s + n].float(), kpe)
            ) * MLA_SCALE
            qpos = torch.arange(L - n, L, device="cuda")[:, None]
            scores = scores.masked_fill(torch.arange(L, device="cuda")[None, :] > qpos, float("-inf"))
            out[s : s + n] = torch.einsum("hqk,kd->qhd", torch.softmax(scores, -1), ckv)
            s += n
        return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 16])
def test_mla_prefill_mixed_decode_speculative_and_graphs(dtype, page_size):
    eng = MLAEngine(page_size, dtype, graph_sizes=(1, 2, 4), max_draft_tokens=2)
    meta = eng.meta
    torch.manual_seed(14)
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    kinds = []
    for mode, idx, qlens, clens in STEPS:
        for r, c, n in zip(idx, clens, qlens, strict=True):
            eng.grow(r, c + n)
        ckv, kpe, q_nope, q_pe = eng.new_tokens(idx, qlens)
        if mode == "prefill":
            step = meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens)
        else:
            step = meta.prepare_decode(idx, clens, num_draft_tokens=qlens[0] - 1)
        with step:
            kinds.append(step.kind)
            ops.store_mla_kv(ckv, kpe, step.slot_mappings[0], eng.ckv_cache, eng.kpe_cache)
            out = step.mla_attention(q_nope, q_pe, eng.ckv_cache, eng.kpe_cache)
            # A wrapper planned by FlashInfer's stock plan() on the same batch gives the same bits.
            stock = MLAPlanner(
                new_mla_wrapper(ws),
                num_heads=MLA_HEADS,
                head_dim_ckv=CKV,
                head_dim_kpe=KPE,
                page_size=page_size,
                sm_scale=MLA_SCALE,
                q_data_type=dtype,
                kv_data_type=dtype,
            )  # a new planner: its first plan is the stock plan()
            host = (
                torch.from_numpy(step.qo_indptr_host.copy()),
                torch.from_numpy(step.kv_indptr_host[0].copy()),
                torch.from_numpy(step.seq_lens_host.astype("int32")),
            )
            ref = mla_run(
                stock.plan(*host, step.kv_indices[0].clone(), step.num_tokens),
                q_nope,
                q_pe,
                eng.ckv_cache,
                eng.kpe_cache,
                None,
            )
        torch.cuda.synchronize()
        assert torch.equal(out, ref), step.kind
        torch.testing.assert_close(out.float(), eng.reference(q_nope, q_pe, idx, qlens), **tol(dtype))
    assert kinds == ["ragged_prefill", "prefill", "decode", "spec_decode"]
    assert meta._launcher.planner.mla_planners()[("mla", 0)].fast is True
    with pytest.raises(ValueError, match="MLA group"):
        step.attention(q_nope, eng.ckv_cache, eng.kpe_cache)

    # CUDA-graph decode over fixed buffers, batches of changing size.
    sizes = (1, 2, 4)
    shapes = dict(ckv=(CKV,), kpe=(KPE,), q_nope=(MLA_HEADS, CKV), q_pe=(MLA_HEADS, KPE))
    bufs = {name: torch.zeros(4, *shape, dtype=dtype, device="cuda") for name, shape in shapes.items()}
    out_buf = torch.zeros(4, MLA_HEADS, CKV, dtype=dtype, device="cuda")

    def forward(step):
        n = step.padded_num_reqs
        ops.store_mla_kv(bufs["ckv"][:n], bufs["kpe"][:n], step.slot_mappings[0], eng.ckv_cache, eng.kpe_cache)
        step.mla_attention(bufs["q_nope"][:n], bufs["q_pe"][:n], eng.ckv_cache, eng.kpe_cache, out=out_buf[:n])

    for s in sizes:
        meta.capture_decode_graph(s, forward)
    addresses = [t.data_ptr() for t in (meta.positions, *meta.slot_mappings, *meta.kv_indices, meta._staging.dev)]
    lens = {1: 75, 3: 45, 7: 46}
    for batch in ([1], [3, 7, 1], [7, 3], [1, 3, 7]):
        for r in batch:
            eng.grow(r, lens[r] + 1)
        ckv, kpe, q_nope, q_pe = eng.new_tokens(batch, [1] * len(batch))
        with meta.prepare_decode(batch, [lens[r] for r in batch], cuda_graph=True) as step:
            b = len(batch)
            for name, x in (("ckv", ckv), ("kpe", kpe), ("q_nope", q_nope), ("q_pe", q_pe)):
                bufs[name][:b] = x
            meta.replay_decode_graph(step)
        torch.cuda.synchronize()
        torch.testing.assert_close(out_buf[:b].float(), eng.reference(q_nope, q_pe, batch, [1] * b), **tol(dtype))
        for r in batch:
            lens[r] += 1
    assert addresses == [
        t.data_ptr() for t in (meta.positions, *meta.slot_mappings, *meta.kv_indices, meta._staging.dev)
    ]
    graph_planners = [p for key, p in meta._launcher.planner.mla_planners().items() if key[0] == "mla_graph"]
    assert len(graph_planners) == 3 and all(p.fast is True for p in graph_planners)
    # Padding rows wrote nothing: the padding page is still zero.
    assert (eng.ckv_cache[0] == 0).all() and (eng.kpe_cache[0] == 0).all()


def test_no_host_sync_with_scales_fp8_and_mla():
    """prepare_* and attention of soft-capped, float8 and MLA groups make no host sync."""
    eng = Engine(
        heads=(8, 2),
        dtype=torch.bfloat16,
        kv_dtype=torch.float8_e4m3fn,
        kv_scales=(0.05, 0.04),
        graph_sizes=(4,),
        max_draft_tokens=2,
        **SCALED,
    )
    mla = MLAEngine(16, torch.bfloat16, graph_sizes=(4,), max_draft_tokens=2)
    for r in range(4):
        eng.grow(r, 64)
        mla.grow(r, 64)
    q = torch.randn(40, 8, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(40, 2, 64, device="cuda", dtype=torch.bfloat16)
    ckv, kpe, q_nope, q_pe = mla.new_tokens([0], [40])

    def steps():
        for m in (eng.meta, mla.meta):
            prepares = (
                lambda m=m: m.prepare_prefill([0, 1, 2, 3], query_lens=[10, 1, 20, 1], cache_lens=[0, 5, 0, 9]),
                lambda m=m: m.prepare_prefill([0, 1], query_lens=[10, 20], cache_lens=[0, 0]),
                lambda m=m: m.prepare_decode([0, 1, 2], [30, 31, 32]),
                lambda m=m: m.prepare_decode([0, 1, 2], [30, 31, 32], num_draft_tokens=2),
                lambda m=m: m.prepare_decode([0, 1, 2], [30, 31, 32], cuda_graph=True),
            )
            for prepare in prepares:
                step = prepare()
                t = step.padded_num_reqs if step.cuda_graph else step.num_tokens
                if m is eng.meta:
                    for g, (kc, vc) in enumerate(eng.caches):
                        ops.store_kv(kv[:t], kv[:t], step.slot_mappings[g], kc, vc, **eng.store_scales)
                        step.attention(q[:t], kc, vc, group=g, k=kv[:t], v=kv[:t], **eng.store_scales)
                else:
                    ops.store_mla_kv(ckv[:t], kpe[:t], step.slot_mappings[0], mla.ckv_cache, mla.kpe_cache)
                    step.mla_attention(q_nope[:t], q_pe[:t], mla.ckv_cache, mla.kpe_cache)

    steps()  # compile kernels, build wrappers, JIT FlashInfer
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_planned_shapes_flashinfer_cannot_run_are_rejected_when_made():
    base = dict(max_num_reqs=4, max_num_tokens=16, max_model_len=64, num_qo_heads=8, num_kv_heads=2, device="cuda")
    with pytest.raises(ValueError, match=r"head_dim: FlashInfer's kernels take head_dim \(64, 128, 256\), got 32"):
        BatchMetadata(MetadataConfig(kv_groups=KVGroup(page_size=16), head_dim=32, **base))
    BatchMetadata(MetadataConfig(kv_groups=KVGroup(page_size=16), head_dim=32, plan_attention=False, **base))
    mla = KVGroup(page_size=16, sm_scale=0.1, mla=MLA(num_heads=16, head_dim_ckv=96, head_dim_kpe=64))
    with pytest.raises(ValueError, match=r"kv_groups\[0\]\.mla: FlashInfer's MLA kernels need head_dim_ckv"):
        BatchMetadata(MetadataConfig(kv_groups=mla, head_dim=64, **base))
