"""Model coverage on the CPU: per-group ``sm_scale`` / ``logits_soft_cap``, float8 KV caches and MLA
groups through ``BatchMetadata`` and the torch fallbacks, against naive dense float32 attention.

The GPU twins (FlashInfer) are in ``tests/test_gpu_model_coverage.py``.
"""

import math

import pytest
import torch

from batchmeta import MLA, BatchMetadata, KVGroup, MetadataConfig, ops
from batchmeta.attention.torch_ref import mla_attention_torch, paged_attention_torch

NUM_PAGES = 64
# (mode, idx, query_lens, cache_lens): ragged prefill; chunks beside decodes; decode; speculative.
STEPS = [
    ("prefill", [3, 7, 1], [9, 4, 13], [0, 0, 0]),
    ("prefill", [3, 7, 1], [1, 6, 1], [9, 4, 13]),
    ("decode", [1, 3, 7], [1, 1, 1], [14, 10, 10]),
    ("spec", [1, 3, 7], [3, 3, 3], [15, 11, 11]),
]


def naive_attention(q, k, v, sm_scale, cap=0.0, window_left=-1):
    """One request: ``q`` ``[n, H, D]`` (the last n positions) over ``k``/``v`` ``[L, H, D]``, float32."""
    n, L = q.shape[0], k.shape[0]
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(n):
        p = L - n + i
        lo = 0 if window_left < 0 else max(0, p - window_left)
        for h in range(q.shape[1]):
            logits = (k[lo : p + 1, h].float() @ q[i, h].float()) * sm_scale
            if cap:
                logits = cap * torch.tanh(logits / cap)
            out[i, h] = torch.softmax(logits, 0) @ v[lo : p + 1, h].float()
    return out


class CPUEngine:
    """A model runner on the CPU: pages per group, caches, and every request's K/V kept densely."""

    def __init__(self, groups, kv_dtype=torch.float16, max_draft_tokens=2, heads=(4, 2), head_dim=8, **kw):
        self.cfg = MetadataConfig(
            max_num_reqs=8,
            max_num_tokens=64,
            max_model_len=64,
            kv_groups=groups,
            num_qo_heads=heads[0],
            num_kv_heads=heads[1],
            head_dim=head_dim,
            q_dtype=torch.float16,
            kv_dtype=kv_dtype,
            device="cpu",
            num_kv_pages=NUM_PAGES,
            max_draft_tokens=max_draft_tokens,
            **kw,
        )
        self.meta = BatchMetadata(self.cfg)
        self.heads, self.d = heads, head_dim
        self.free = [list(range(NUM_PAGES - 1, 0, -1)) for _ in groups]
        self.held = {}

    def grow(self, req, seq_len):
        rows = self.held.setdefault(req, [[] for _ in self.cfg.kv_groups])
        new = []
        for g, grp in enumerate(self.cfg.kv_groups):
            need = math.ceil(seq_len / grp.page_size) - len(rows[g])
            new.append([self.free[g].pop() for _ in range(max(need, 0))])
            rows[g] += new[-1]
        self.meta.block_tables.append(req, new)

    def prepare(self, mode, idx, qlens, clens):
        for r, c, n in zip(idx, clens, qlens, strict=True):
            self.grow(r, c + n)
        if mode == "prefill":
            return self.meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens)
        return self.meta.prepare_decode(idx, clens, num_draft_tokens=qlens[0] - 1)


def split(x, qlens):
    return torch.split(x, list(qlens))


@pytest.mark.parametrize("heads", [(4, 2), (4, 4)])
def test_scale_soft_cap_and_window_on_every_step_type(heads):
    groups = (
        KVGroup(page_size=4, sm_scale=0.9, logits_soft_cap=3.0),
        KVGroup(page_size=1, window_left=5, sm_scale=0.6, logits_soft_cap=2.0),
        KVGroup(page_size=2),
    )  # the default scale 1/sqrt(head_dim), no cap
    eng = CPUEngine(groups, heads=heads)
    hq, hkv = heads
    caches = [
        (torch.zeros(NUM_PAGES, g.page_size, hkv, 8, dtype=torch.float16),) * 1
        + (torch.zeros(NUM_PAGES, g.page_size, hkv, 8, dtype=torch.float16),)
        for g in groups
    ]
    gen = torch.Generator().manual_seed(0)
    dense = {}
    kinds = []
    for mode, idx, qlens, clens in STEPS:
        t = sum(qlens)
        q = (torch.randn(t, hq, 8, generator=gen) * 2).half()
        k, v = (torch.randn(t, hkv, 8, generator=gen) * 2).half(), torch.randn(t, hkv, 8, generator=gen).half()
        for r, kk, vv in zip(idx, split(k, qlens), split(v, qlens), strict=True):
            old = dense.get(r, (kk[:0], vv[:0]))
            dense[r] = (torch.cat([old[0], kk]), torch.cat([old[1], vv]))
        with eng.prepare(mode, idx, qlens, clens) as step:
            kinds.append(step.kind)
            assert step.sm_scales == (0.9, 0.6, 1 / math.sqrt(8)) and step.logits_soft_caps == (3.0, 2.0, 0.0)
            for g, (kc, vc) in enumerate(caches):
                ops.store_kv(k, v, step.slot_mappings[g], kc, vc)
                out = step.attention(q, kc, vc, group=g, k=k, v=v)
                grp = groups[g]
                scale = grp.sm_scale or 1 / math.sqrt(8)
                for r, qq, oo in zip(idx, split(q, qlens), split(out, qlens), strict=True):
                    kk, vv = (x.repeat_interleave(hq // hkv, 1) for x in dense[r])
                    ref = naive_attention(qq, kk, vv, scale, grp.logits_soft_cap, grp.window_left)
                    torch.testing.assert_close(oo.float(), ref, atol=2e-3, rtol=2e-3)
                    if grp.logits_soft_cap:  # the cap changed the result: the test sees an ignored cap
                        assert (naive_attention(qq, kk, vv, scale, 0.0, grp.window_left) - ref).abs().max() > 1e-2
    assert kinds == ["ragged_prefill", "prefill", "decode", "spec_decode"]


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_cache_dequantized_by_the_fallback(kv_dtype):
    eng = CPUEngine((KVGroup(page_size=4),), kv_dtype=kv_dtype)
    k_scale, v_scale = 0.05, 0.02
    kc = torch.zeros(NUM_PAGES, 4, 2, 8, dtype=kv_dtype)
    vc = torch.zeros_like(kc)
    gen = torch.Generator().manual_seed(1)
    dense = {}
    inv = lambda s: torch.tensor(1 / s, dtype=torch.float32).item()
    fmax = torch.finfo(kv_dtype).max
    for mode, idx, qlens, clens in STEPS:
        t = sum(qlens)
        q = torch.randn(t, 4, 8, generator=gen).half()
        k, v = torch.randn(t, 2, 8, generator=gen).half(), torch.randn(t, 2, 8, generator=gen).half()
        # What the cache holds after store_kv, dequantized: the reference's keys and values.
        kq = (k.float() * inv(k_scale)).clamp(-fmax, fmax).to(kv_dtype).float() * k_scale
        vq = (v.float() * inv(v_scale)).clamp(-fmax, fmax).to(kv_dtype).float() * v_scale
        for r, kk, vv, rk, rv in zip(
            idx, split(kq, qlens), split(vq, qlens), split(k, qlens), split(v, qlens), strict=True
        ):
            old = dense.get(r, (kk[:0], vv[:0], rk[:0], rv[:0]))
            dense[r] = tuple(torch.cat([a, b.float()]) for a, b in zip(old, (kk, vv, rk, rv), strict=True))
        with eng.prepare(mode, idx, qlens, clens) as step:
            ops.store_kv(k, v, step.slot_mappings[0], kc, vc, k_scale=k_scale, v_scale=v_scale)
            out = step.attention(q, kc, vc, k=k, v=v, k_scale=k_scale, v_scale=v_scale)
            for r, qq, oo in zip(idx, split(q, qlens), split(out, qlens), strict=True):
                # A ragged prefill attends over the new (unquantized) keys and values, as FlashInfer does.
                kk, vv = dense[r][2:] if step.kind == "ragged_prefill" else dense[r][:2]
                kk, vv = kk.repeat_interleave(2, 1), vv.repeat_interleave(2, 1)
                torch.testing.assert_close(
                    oo.float(), naive_attention(qq, kk, vv, 1 / math.sqrt(8)), atol=2e-3, rtol=2e-3
                )
    assert kc.float().abs().sum() > 0


CKV, KPE, MLA_HEADS, MLA_SCALE = 16, 8, 4, 0.3


def test_mla_group_on_every_step_type():
    grp = KVGroup(page_size=4, sm_scale=MLA_SCALE, mla=MLA(num_heads=MLA_HEADS, head_dim_ckv=CKV, head_dim_kpe=KPE))
    eng = CPUEngine((grp, KVGroup(page_size=2)))  # an MLA group beside an ordinary one
    ckv_cache = torch.zeros(NUM_PAGES, 4, CKV, dtype=torch.float16)
    kpe_cache = torch.zeros(NUM_PAGES, 4, KPE, dtype=torch.float16)
    gen = torch.Generator().manual_seed(2)
    dense = {}
    for mode, idx, qlens, clens in STEPS:
        t = sum(qlens)
        ckv, kpe = torch.randn(t, CKV, generator=gen).half(), torch.randn(t, KPE, generator=gen).half()
        q_nope = torch.randn(t, MLA_HEADS, CKV, generator=gen).half()
        q_pe = torch.randn(t, MLA_HEADS, KPE, generator=gen).half()
        for r, a, b in zip(idx, split(ckv, qlens), split(kpe, qlens), strict=True):
            old = dense.get(r, (a[:0], b[:0]))
            dense[r] = (torch.cat([old[0], a]), torch.cat([old[1], b]))
        with eng.prepare(mode, idx, qlens, clens) as step:
            ops.store_mla_kv(ckv, kpe, step.slot_mappings[0], ckv_cache, kpe_cache)
            out = step.mla_attention(q_nope, q_pe, ckv_cache, kpe_cache, group=0)
            with pytest.raises(ValueError, match=r"is an MLA group: call step\.mla_attention"):
                step.attention(q_nope, ckv_cache, kpe_cache, group=0, k=ckv, v=ckv)
            with pytest.raises(ValueError, match="not an MLA group"):
                step.mla_attention(q_nope, q_pe, ckv_cache, kpe_cache, group=1)
            with pytest.raises(ValueError, match="group: expected a KV-cache group in"):
                step.mla_attention(q_nope, q_pe, ckv_cache, kpe_cache, group=2)
        for r, qn, qp, oo in zip(idx, split(q_nope, qlens), split(q_pe, qlens), split(out, qlens), strict=True):
            c, p = (x.float() for x in dense[r])
            L, n = c.shape[0], qn.shape[0]
            for i in range(n):
                pos = L - n + i
                for h in range(MLA_HEADS):
                    logits = (c[: pos + 1] @ qn[i, h].float() + p[: pos + 1] @ qp[i, h].float()) * MLA_SCALE
                    ref = torch.softmax(logits, 0) @ c[: pos + 1]
                    torch.testing.assert_close(oo[i, h].float(), ref, atol=2e-3, rtol=2e-3)


def test_torch_references_agree_with_each_other():
    """MLA is attention with one shared key ``[ckv, kpe]`` and value ``ckv`` per token: the two torch
    implementations agree on such a cache (a cross-check of both)."""
    gen = torch.Generator().manual_seed(3)
    q_nope, q_pe = torch.randn(7, 2, 16, generator=gen), torch.randn(7, 2, 8, generator=gen)
    ckv, kpe = torch.randn(5, 4, 16, generator=gen), torch.randn(5, 4, 8, generator=gen)
    qo, kv, last = [0, 3, 7], [0, 2, 5], [3, 4]
    indices = torch.tensor([4, 0, 1, 3, 2], dtype=torch.int32)
    mla = mla_attention_torch(q_nope, q_pe, ckv, kpe, qo, kv, indices, last, sm_scale=0.25)
    k = torch.cat([ckv, kpe], -1)[:, :, None]
    v = torch.cat([ckv, torch.zeros_like(kpe)], -1)[:, :, None]
    paged = paged_attention_torch(torch.cat([q_nope, q_pe], -1), k, v, qo, kv, indices, last, sm_scale=0.25)
    torch.testing.assert_close(mla, paged[..., :16])


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(sm_scale=0.0), ValueError, "sm_scale: expected a finite float > 0"),
        (dict(sm_scale=-1.0), ValueError, "sm_scale: expected a finite float > 0"),
        (dict(sm_scale=float("nan")), ValueError, "sm_scale: expected a finite float > 0"),
        (dict(sm_scale="0.1"), TypeError, "sm_scale: expected a float"),
        (dict(sm_scale=True), TypeError, "sm_scale: expected a float"),
        (dict(logits_soft_cap=-1.0), ValueError, "logits_soft_cap: expected a finite float >= 0"),
        (dict(logits_soft_cap=float("inf")), ValueError, "logits_soft_cap: expected a finite float >= 0"),
        (dict(logits_soft_cap=None), TypeError, "logits_soft_cap: expected a float"),
        (dict(mla=(512, 64)), TypeError, "mla: expected an MLA or None"),
        (dict(mla=MLA(num_heads=16, head_dim_ckv=512, head_dim_kpe=64)), ValueError, "sm_scale: an MLA group needs"),
        (
            dict(mla=MLA(num_heads=16, head_dim_ckv=512, head_dim_kpe=64), sm_scale=0.1, window_left=8),
            ValueError,
            "window_left: an MLA group",
        ),
        (
            dict(mla=MLA(num_heads=16, head_dim_ckv=512, head_dim_kpe=64), sm_scale=0.1, logits_soft_cap=5.0),
            ValueError,
            "logits_soft_cap: an MLA group",
        ),
    ],
)
def test_kv_group_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        KVGroup(page_size=16, **kwargs)


def test_kv_group_accepts_ints_and_defaults():
    assert KVGroup(page_size=1, sm_scale=1, logits_soft_cap=30).logits_soft_cap == 30
    cfg = MetadataConfig(
        max_num_reqs=2,
        max_num_tokens=8,
        max_model_len=8,
        num_qo_heads=4,
        num_kv_heads=2,
        head_dim=16,
        device="cpu",
        kv_groups=(KVGroup(page_size=1), KVGroup(page_size=1, sm_scale=2)),
    )
    assert cfg.sm_scale(0) == 0.25 and cfg.sm_scale(1) == 2.0


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("num_heads", 0, "num_heads: expected an int in"),
        ("head_dim_ckv", 1.5, "head_dim_ckv: expected an int"),
        ("head_dim_kpe", -64, "head_dim_kpe: expected an int in"),
    ],
)
def test_mla_rejects(field, value, match):
    args = {**dict(num_heads=16, head_dim_ckv=512, head_dim_kpe=64), field: value}
    with pytest.raises((TypeError, ValueError), match=match):
        MLA(**args)


def test_config_rejects_fp8_with_mla_or_fa3():
    mla = KVGroup(page_size=1, sm_scale=0.1, mla=MLA(num_heads=16, head_dim_ckv=512, head_dim_kpe=64))
    base = dict(
        max_num_reqs=2,
        max_num_tokens=8,
        max_model_len=8,
        num_qo_heads=4,
        num_kv_heads=2,
        head_dim=16,
        device="cpu",
        kv_dtype=torch.float8_e4m3fn,
    )
    with pytest.raises(ValueError, match=r"kv_groups\[1\].mla: batchmeta has no float8 MLA cache"):
        MetadataConfig(kv_groups=(KVGroup(page_size=1), mla), **base)
    for backend in ("fa3", "auto"):
        with pytest.raises(ValueError, match="prefill_backend: a float8 KV cache"):
            MetadataConfig(kv_groups=KVGroup(page_size=1), prefill_backend=backend, **base)
    MetadataConfig(kv_groups=KVGroup(page_size=1), **base)  # fa2: accepted
