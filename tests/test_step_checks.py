"""``Step.attention`` / ``Step.mla_attention`` check their tensors against the config and the step
before any work (shape, dtype, device, the group's page size, ``num_kv_pages``), naming the argument;
float32 works where nothing is planned."""

import pytest
import torch

from batchmeta import MLA, BatchMetadata, KVGroup, MetadataConfig
from batchmeta.attention import flashinfer_available

H, HKV, D, PS, PAGES = 8, 2, 64, 4, 16


def make(dtype=torch.float16, **kw):
    cfg = MetadataConfig(
        max_num_reqs=4,
        max_num_tokens=32,
        max_model_len=64,
        kv_groups=KVGroup(page_size=PS),
        num_qo_heads=H,
        num_kv_heads=HKV,
        head_dim=D,
        q_dtype=dtype,
        kv_dtype=dtype,
        num_kv_pages=PAGES,
        device="cpu",
        **kw,
    )
    meta = BatchMetadata(cfg)
    meta.block_tables.append(0, [1, 2])
    meta.block_tables.append(1, [3])
    return meta


def good(num_tokens, dtype=torch.float16):
    q = torch.randn(num_tokens, H, D).to(dtype)
    caches = [torch.randn(PAGES, PS, HKV, D).to(dtype) for _ in range(2)]
    return q, *caches


@pytest.fixture
def step():
    meta = make()
    with meta.prepare_decode([0, 1], [5, 2]) as s:  # 2 tokens
        yield s


F16 = torch.float16
BAD = {
    "q tokens": (
        lambda q, k, v: (q[:1], k, v, {}),
        ValueError,
        r"q: expected shape \[tokens, num_qo_heads, head_dim\] "
        r"= \(2, 8, 64\) for this step, got \(1, 8, 64\)",
    ),
    "q heads": (lambda q, k, v: (q[:, :4], k, v, {}), ValueError, r"q: expected shape .*got \(2, 4, 64\)"),
    "q head dim": (lambda q, k, v: (q[..., :32], k, v, {}), ValueError, r"q: expected shape .*got \(2, 8, 32\)"),
    "flat q": (lambda q, k, v: (q.reshape(2, H * D), k, v, {}), ValueError, r"q: .*pass q\.view\(-1, 8, 64\)"),
    "q dtype": (lambda q, k, v: (q.float(), k, v, {}), TypeError, "q: expected dtype torch.float16, got torch.float32"),
    "q not a tensor": (lambda q, k, v: (q.tolist(), k, v, {}), TypeError, "q: expected a torch.Tensor, got list"),
    "q device": (lambda q, k, v: (q.to("meta"), k, v, {}), ValueError, "q: expected a tensor on cpu"),
    "page size": (
        lambda q, k, v: (q, k.reshape(PAGES // 2, 2 * PS, HKV, D), v, {}),
        ValueError,
        r"k_cache: expected shape .*\(num_pages, 4, 2, 64\).* group 0 has page_size 4",
    ),
    "HND cache": (lambda q, k, v: (q, k, v.transpose(1, 2), {}), ValueError, r"v_cache: .*an HND cache\?"),
    "too few pages": (
        lambda q, k, v: (q, k[:8], v[:8], {}),
        ValueError,
        r"k_cache: expected at least config\.num_kv_pages \(16\) pages, got 8",
    ),
    "cache dtype": (lambda q, k, v: (q, k, v.float(), {}), TypeError, r"v_cache: expected dtype torch\.float16 \(c"),
    "flat cache": (lambda q, k, v: (q, k.reshape(PAGES, PS, HKV * D), v, {}), ValueError, "k_cache: expected shape"),
    "out shape": (lambda q, k, v: (q, k, v, {"out": torch.empty(3, H, D, dtype=F16)}), ValueError, "out: expected"),
    "out dtype": (lambda q, k, v: (q, k, v, {"out": torch.empty(2, H, D)}), TypeError, "out: expected dtype"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_attention_rejects_bad_tensors_naming_them(step, case):
    make_args, exc, match = BAD[case]
    q, k_cache, v_cache, kw = make_args(*good(2))
    with pytest.raises(exc, match=match):
        step.attention(q, k_cache, v_cache, **kw)


def test_attention_accepts_good_tensors_and_out(step):
    q, k_cache, v_cache = good(2)
    out = torch.empty(2, H, D, dtype=F16)
    assert step.attention(q, k_cache, v_cache, out=out) is out
    # A cache with more pages than num_kv_pages is fine (the engine may keep spare pages).
    more = torch.zeros(PAGES + 3, PS, HKV, D, dtype=F16)
    assert step.attention(q, more, more).shape == (2, H, D)


def test_ragged_prefill_checks_the_new_keys_and_values():
    meta = make()
    q, k_cache, v_cache = good(5)
    kv = torch.randn(5, HKV, D, dtype=F16)
    with meta.prepare_prefill([0, 1], query_lens=[3, 2], cache_lens=[0, 0]) as step:
        assert step.kind == "ragged_prefill"
        assert step.attention(q, k_cache, v_cache, k=kv, v=kv).shape == (5, H, D)
        with pytest.raises(ValueError, match=r"k: expected shape \[tokens, num_kv_heads, head_dim\] = \(5, 2, 64\)"):
            step.attention(q, k_cache, v_cache, k=kv[:4], v=kv)
        with pytest.raises(TypeError, match=r"v: expected dtype torch\.float16"):
            step.attention(q, k_cache, v_cache, k=kv, v=kv.float())


def test_mla_attention_rejects_bad_tensors_naming_them():
    grp = KVGroup(page_size=PS, sm_scale=0.3, mla=MLA(num_heads=4, head_dim_ckv=16, head_dim_kpe=8))
    cfg = MetadataConfig(
        max_num_reqs=4,
        max_num_tokens=32,
        max_model_len=64,
        kv_groups=grp,
        num_qo_heads=H,
        num_kv_heads=HKV,
        head_dim=D,
        q_dtype=F16,
        kv_dtype=F16,
        num_kv_pages=PAGES,
        device="cpu",
    )
    meta = BatchMetadata(cfg)
    meta.block_tables.append(0, [1, 2])
    q_nope, q_pe = torch.randn(1, 4, 16, dtype=F16), torch.randn(1, 4, 8, dtype=F16)
    ckv, kpe = torch.zeros(PAGES, PS, 16, dtype=F16), torch.zeros(PAGES, PS, 8, dtype=F16)
    with meta.prepare_decode([0], [5]) as step:
        assert step.mla_attention(q_nope, q_pe, ckv, kpe).shape == (1, 4, 16)
        bad = [
            ((q_nope[:, :2], q_pe, ckv, kpe), ValueError, r"q_nope: expected shape .* = \(1, 4, 16\)"),
            ((q_nope, q_pe[..., :4], ckv, kpe), ValueError, r"q_pe: expected shape .* = \(1, 4, 8\)"),
            ((q_nope, q_pe.float(), ckv, kpe), TypeError, "q_pe: expected dtype"),
            ((q_nope, q_pe, ckv.reshape(PAGES // 2, 2 * PS, 16), kpe), ValueError, "ckv_cache: .*page_size 4"),
            ((q_nope, q_pe, ckv, kpe[:4]), ValueError, r"kpe_cache: expected at least config\.num_kv_pages"),
        ]
        for args, exc, match in bad:
            with pytest.raises(exc, match=match):
                step.mla_attention(*args)
        with pytest.raises(ValueError, match="out: expected shape"):
            step.mla_attention(q_nope, q_pe, ckv, kpe, out=torch.empty(1, 4, 8, dtype=F16))


# float32 where nothing is planned ------------------------------------------------------------------
@pytest.mark.parametrize("plan_attention", [True, False])
def test_float32_runs_on_the_cpu(plan_attention):
    meta = make(torch.float32, plan_attention=plan_attention)
    q, k_cache, v_cache = good(2, torch.float32)
    with meta.prepare_decode([0, 1], [5, 2]) as step:
        out = step.attention(q, k_cache, v_cache)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    half = make()
    with half.prepare_decode([0, 1], [5, 2]) as step:
        ref = step.attention(q.half(), k_cache.half(), v_cache.half())
    torch.testing.assert_close(out, ref.float(), atol=2e-2, rtol=2e-2)


def test_config_docstring_says_where_dtypes_and_head_dims_work():
    doc = MetadataConfig.__doc__
    assert "float32 only where FlashInfer plans nothing" in doc
    assert "64, 128 or 256" in doc


@pytest.mark.gpu
@pytest.mark.skipif(not flashinfer_available(), reason="needs FlashInfer")
@pytest.mark.parametrize("field", ["q_dtype", "kv_dtype"])
def test_planned_cuda_metadata_rejects_float32(field):
    dtypes = {"q_dtype": torch.float16, "kv_dtype": torch.float16, field: torch.float32}
    cfg = MetadataConfig(
        max_num_reqs=4,
        max_num_tokens=32,
        max_model_len=64,
        kv_groups=KVGroup(page_size=PS),
        num_qo_heads=H,
        num_kv_heads=HKV,
        head_dim=D,
        device="cuda",
        **dtypes,
    )
    with pytest.raises(TypeError, match=r"q_dtype, kv_dtype: FlashInfer plans float16 or bfloat16"):
        BatchMetadata(cfg)
    BatchMetadata(
        cfg.__class__(**{**{a.name: getattr(cfg, a.name) for a in cfg.__attrs_attrs__}, "plan_attention": False})
    )
