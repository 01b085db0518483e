"""``store_kv`` and ``store_mla_kv``: new keys/values into a paged KV cache at a slot mapping.

The caches start full of a sentinel; after each call the whole cache must equal a naive per-token loop
applied to that sentinel cache, so a PAD slot that wrote anything, or a write to a wrong slot, shows.
float8 caches are compared bit for bit (their sentinel is a NaN byte no finite store produces).
"""

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from batchmeta.ops import PAD_SLOT_ID, store_kv, store_mla_kv

SENTINEL = -7.25  # exact in every float dtype used here
# (cache dtype, input dtype): same dtype, narrowing casts, widening casts. fp32 -> bf16 rounding has its
# own test below.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
]


FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]
FP8_SENTINEL_BYTE = 0x7F  # NaN in both float8 formats: only a NaN input could store it
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter's fp32 -> float8 cast (triton/runtime/interpreter.py, _convert_float) rounds ties away
# from zero and drops the carry of a rounded-up mantissa (7.87 -> 4.0 in float8_e4m3fn); its fp32 ->
# bf16 cast truncates. Values that need no rounding convert exactly, so the exact-value tests run there.
INTERPRETER_ROUNDING = "the Triton CPU interpreter's fp32 -> float8/bf16 casts do not round to nearest even"


def skip_inexact_interpreter(backend, dtype):
    """Skips the Triton-interpreter run of a test whose stores round into ``dtype`` (the GPU run covers it)."""
    if backend == "triton" and INTERPRETED and dtype in (*FP8_DTYPES, torch.bfloat16):
        pytest.skip(INTERPRETER_ROUNDING)


def sentinel_tensor(shape, dtype, device):
    if dtype in FP8_DTYPES:
        return torch.full(shape, FP8_SENTINEL_BYTE, dtype=torch.uint8, device=device).view(dtype)
    return torch.full(shape, SENTINEL, dtype=dtype, device=device)


def bits(t):
    """The tensor's bit patterns on the CPU: equal bits, not equal values (NaN, -0.0, float8 all compare)."""
    return t.cpu().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(got, expected):
    assert got.shape == expected.shape and got.dtype == expected.dtype
    diff = bits(got) != bits(expected)
    if diff.any():
        where = diff.nonzero()[:5].tolist()
        g, e = got.cpu().float()[diff][:5].tolist(), expected.cpu().float()[diff][:5].tolist()
        raise AssertionError(f"{int(diff.sum())} elements differ, first at {where}: {g} != {e}")


# --------------------------------------------------------------------------------------------------
# Naive reference
# --------------------------------------------------------------------------------------------------
def quantize(x, scale, dtype):
    """What the cache stores for ``x`` (one token), by the documented formula: ``x.float() * inv`` with
    ``inv = 1 / scale`` rounded once to float32, saturated for float8 caches, rounded to nearest even."""
    if scale is None and dtype not in FP8_DTYPES:
        return x.to(dtype)
    inv = torch.tensor(np.float32(1.0 / (1.0 if scale is None else scale)))
    y = x.float() * inv
    if dtype in FP8_DTYPES:
        y = y.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    return y.to(dtype)


def naive_store_kv(key, value, slots, k_cache, v_cache, k_scale=None, v_scale=None):
    """Token t goes to ``cache[s // page_size, s % page_size]`` for ``s = slots[t]`` in the cache;
    negative (PAD) and past-the-end slots write nothing. Returns new caches."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    num_pages, page_size = k_cache.shape[:2]
    for tok in range(key.shape[0]):
        s = slots[tok]
        if 0 <= s < num_pages * page_size:
            k_cache[s // page_size, s % page_size] = quantize(key[tok], k_scale, k_cache.dtype)
            v_cache[s // page_size, s % page_size] = quantize(value[tok], v_scale, v_cache.dtype)
    return k_cache, v_cache


def make_caches(layout, num_pages, page_size, num_heads, head_dim, dtype, device):
    """Sentinel-filled ``(k_cache, v_cache, storage)``: separate tensors, or FlashInfer's combined
    ``[P, 2, page_size, H, D]`` cache passed as ``kv[:, 0]`` and ``kv[:, 1]``."""
    if layout == "separate":
        k = sentinel_tensor((num_pages, page_size, num_heads, head_dim), dtype, device)
        v = sentinel_tensor((num_pages, page_size, num_heads, head_dim), dtype, device)
        return k, v, (k, v)
    kv = sentinel_tensor((num_pages, 2, page_size, num_heads, head_dim), dtype, device)
    return kv[:, 0], kv[:, 1], (kv,)


# --------------------------------------------------------------------------------------------------
# Against the reference
# --------------------------------------------------------------------------------------------------
@given(data=st.data())
def test_store_kv_matches_naive(data, device, backend):
    page_size = data.draw(st.sampled_from([1, 16, 3]), label="page_size")
    num_pages = data.draw(st.integers(1, 4), label="num_pages")
    num_heads = data.draw(st.integers(1, 4), label="heads")
    head_dim = data.draw(st.sampled_from([1, 8, 130]), label="head_dim")
    cache_dtype, in_dtype = data.draw(st.sampled_from(DTYPE_PAIRS), label="cache and input dtypes")
    layout = data.draw(st.sampled_from(["separate", "combined"]), label="layout")
    num_slots = num_pages * page_size
    # Distinct real slots (a full cache is possible) with PAD tokens mixed in.
    real = data.draw(st.lists(st.integers(0, num_slots - 1), unique=True, max_size=min(num_slots, 12)), label="slots")
    slots = list(real)
    for _ in range(data.draw(st.integers(0, 4), label="PAD tokens")):
        slots.insert(data.draw(st.integers(0, len(slots))), PAD_SLOT_ID)
    # Entries past the T tokens are not read, even when they name real slots.
    tail = data.draw(st.lists(st.integers(-1, num_slots - 1), max_size=3), label="unread tail")
    slot_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]), label="slot dtype")

    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    key = torch.randn((len(slots), num_heads, head_dim), generator=gen).to(in_dtype)
    value = torch.randn((len(slots), num_heads, head_dim), generator=gen).to(in_dtype)
    k_cache, v_cache, storage = make_caches(layout, num_pages, page_size, num_heads, head_dim, cache_dtype, device)
    expected_k, expected_v = naive_store_kv(key, value, slots, k_cache.cpu(), v_cache.cpu())

    store_kv(
        key.to(device),
        value.to(device),
        torch.tensor(slots + tail, dtype=slot_dtype, device=device),
        k_cache,
        v_cache,
        backend=backend,
    )
    assert torch.equal(k_cache.cpu(), expected_k)
    assert torch.equal(v_cache.cpu(), expected_v)
    if layout == "combined":  # the two halves of the combined cache are all there is
        assert torch.equal(storage[0].cpu(), torch.stack([expected_k, expected_v], 1))


@pytest.mark.parametrize("layout", ["separate", "combined"])
def test_pad_slots_leave_the_whole_cache_unchanged(layout, device, backend):
    # SPEC bug 6: padding rows of a CUDA graph (slot -1) must not write slot 0 or the last slot.
    k_cache, v_cache, storage = make_caches(layout, 2, 16, 2, 130, torch.float16, device)
    before = [s.clone() for s in storage]
    key = torch.randn(5, 2, 130, device=device)
    store_kv(
        key, key + 1, torch.full((5,), PAD_SLOT_ID, dtype=torch.int64, device=device), k_cache, v_cache, backend=backend
    )
    for s, b in zip(storage, before, strict=True):
        assert torch.equal(s, b)


def test_pad_and_real_slots_mixed_with_fp32_into_fp16(device, backend):
    # A padded batch: 3 real tokens, 2 PAD. Only the 3 slots change, to the fp16-rounded inputs; the last
    # slot (what -1 wraps to) and slot 0 keep the sentinel.
    k_cache, v_cache, _ = make_caches("separate", 3, 4, 4, 130, torch.float16, device)
    key = torch.randn(5, 4, 130, device=device) * 100
    value = torch.randn(5, 4, 130, device=device)
    slots = [5, PAD_SLOT_ID, 1, 10, PAD_SLOT_ID]
    store_kv(key, value, torch.tensor(slots, device=device), k_cache, v_cache, backend=backend)
    for tok, s in enumerate(slots):
        if s >= 0:
            assert torch.equal(k_cache[s // 4, s % 4], key[tok].half())
            assert torch.equal(v_cache[s // 4, s % 4], value[tok].half())
    written = {5, 1, 10}
    for s in range(12):
        if s not in written:
            assert (k_cache[s // 4, s % 4] == SENTINEL).all(), f"slot {s} was written"
            assert (v_cache[s // 4, s % 4] == SENTINEL).all(), f"slot {s} was written"


def test_fp32_inputs_into_bf16_cache_round_to_nearest(device, backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton CPU interpreter truncates fp32 -> bf16 casts; compiled kernels round to nearest")
    # Each input lies 3/4 of a bf16 ulp above a bf16 value: the nearest bf16 (what torch's cast and the
    # GPU's cvt.rn give) is the next value up; truncation would give the value below.
    base = torch.tensor([1.0, -1.5, 3.0, 0.109375, 100.0, -7.0], dtype=torch.float32)
    ulp = 2.0 ** (torch.floor(torch.log2(base.abs())) - 7)
    key = (base + torch.sign(base) * 0.75 * ulp).reshape(6, 1, 1).repeat(1, 2, 3).to(device)
    k_cache, v_cache, _ = make_caches("separate", 1, 8, 2, 3, torch.bfloat16, device)
    store_kv(key, key, torch.arange(6, device=device), k_cache, v_cache, backend=backend)
    expected = (base + torch.sign(base) * ulp).to(torch.bfloat16)
    assert torch.equal(key[:, 0, 0].cpu().to(torch.bfloat16), expected)  # torch's own cast rounds to nearest
    got = k_cache[0, :6, 0, 0].cpu()
    assert torch.equal(got, expected), f"{got.tolist()} != {expected.tolist()}"
    assert torch.equal(k_cache[0, :6].cpu(), expected[:, None, None].expand(6, 2, 3))
    assert torch.equal(v_cache[0, :6].cpu(), expected[:, None, None].expand(6, 2, 3))
    assert (k_cache[0, 6:] == SENTINEL).all() and (v_cache[0, 6:] == SENTINEL).all()


def test_slots_past_the_cache_are_skipped_not_wrapped(device, backend):
    k_cache, v_cache, _ = make_caches("separate", 2, 4, 1, 8, torch.float32, device)
    key = torch.ones(3, 1, 8, device=device)
    slots = torch.tensor([8, 9, 2**31 + 3], device=device)
    if slots.device.type == "cpu":  # host data: checked, a ValueError before anything is written
        with pytest.raises(ValueError, match=r"slot_mapping: slot 2147483651 is past the cache \(2 pages of 4"):
            store_kv(key, key, slots, k_cache, v_cache, backend=backend)
    else:
        store_kv(key, key, slots, k_cache, v_cache, backend=backend)
    assert (k_cache == SENTINEL).all() and (v_cache == SENTINEL).all()


@pytest.mark.parametrize("slots", [[0, 8], [8], [-1, 7, 8]])
def test_host_slot_past_the_cache_is_a_value_error(slots, backend):
    k_cache, v_cache, _ = make_caches("separate", 2, 4, 1, 8, torch.float32, "cpu")
    key = torch.ones(len(slots), 1, 8)
    with pytest.raises(ValueError, match="slot_mapping: slot 8 is past the cache"):
        store_kv(key, key, torch.tensor(slots), k_cache, v_cache, backend=backend)
    assert (k_cache == SENTINEL).all() and (v_cache == SENTINEL).all()
    # Entries past the T tokens are not read: a long slot mapping's tail may hold anything.
    store_kv(key[:1], key[:1], torch.tensor([3, *slots]), k_cache, v_cache, backend=backend)
    assert (k_cache[0, 3] == 1).all()


def _strided_inputs(kind, num_tokens, num_heads, head_dim, device):
    if kind == "fused qkv":  # views into a [T, 3, H, D] projection output: token stride 3 * H * D
        qkv = torch.randn(num_tokens, 3, num_heads, head_dim, device=device)
        return qkv[:, 1], qkv[:, 2]
    # key from head-major storage (head stride T * D), value with a padded head dim (head stride D + 6)
    key = torch.randn(num_heads, num_tokens, head_dim, device=device).transpose(0, 1)
    value = torch.randn(num_tokens, num_heads, head_dim + 6, device=device)[..., :head_dim]
    return key, value


def _strided_caches(kind, num_pages, page_size, num_heads, head_dim, device):
    if kind == "combined":
        k_cache, v_cache, storage = make_caches(
            "combined", num_pages, page_size, num_heads, head_dim, torch.float16, device
        )
        return k_cache, v_cache, storage
    # keys NHD [P, ps, H, D]; values stored HND [P, H, ps, D] and passed as the [P, ps, H, D] view
    k_cache = torch.full((num_pages, page_size, num_heads, head_dim), SENTINEL, dtype=torch.float16, device=device)
    v_storage = torch.full((num_pages, num_heads, page_size, head_dim), SENTINEL, dtype=torch.float16, device=device)
    return k_cache, v_storage.transpose(1, 2), (k_cache, v_storage)


@pytest.mark.parametrize("inputs", ["fused qkv", "transposed and padded"])
@pytest.mark.parametrize("caches", ["combined", "k NHD, v HND"])
def test_strided_inputs_and_caches(inputs, caches, device, backend):
    # Every stride of key, value, k_cache and v_cache is honoured: none is assumed from another tensor.
    key, value = _strided_inputs(inputs, 6, 3, 130, device)
    k_cache, v_cache, storage = _strided_caches(caches, 2, 16, 3, 130, device)
    slots = [31, 0, PAD_SLOT_ID, 16, 15, 7]
    expected_k, expected_v = naive_store_kv(key.cpu(), value.cpu(), slots, k_cache.cpu(), v_cache.cpu())
    store_kv(key, value, torch.tensor(slots, device=device), k_cache, v_cache, backend=backend)
    assert torch.equal(k_cache.cpu(), expected_k)
    assert torch.equal(v_cache.cpu(), expected_v)
    if caches == "combined":
        assert torch.equal(storage[0].cpu(), torch.stack([expected_k, expected_v], 1))
    else:
        assert torch.equal(storage[1].cpu(), expected_v.transpose(1, 2))


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda d: {"key": torch.ones(3, 2, 8, dtype=torch.int32, device=d)}, TypeError, "key"),
        (lambda d: {"key": torch.ones(3, 16, device=d)}, ValueError, "key"),
        (lambda d: {"value": torch.ones(3, 2, 9, device=d)}, ValueError, "value"),
        (lambda d: {"value": torch.ones(3, 2, 8, dtype=torch.int64, device=d)}, TypeError, "value"),
        (lambda d: {"slot_mapping": torch.tensor([0.0, 1.0, 2.0], device=d)}, TypeError, "slot_mapping"),
        (lambda d: {"slot_mapping": torch.tensor([0, 1], device=d)}, ValueError, "slot_mapping"),
        (lambda d: {"slot_mapping": torch.tensor([[0, 1, 2]], device=d)}, ValueError, "slot_mapping"),
        (lambda d: {"k_cache": torch.full((2, 4, 16), SENTINEL, device=d)}, ValueError, "k_cache"),
        (
            lambda d: {
                "k_cache": torch.full((2, 4, 2, 9), SENTINEL, device=d),
                "v_cache": torch.full((2, 4, 2, 9), SENTINEL, device=d),
            },
            ValueError,
            "k_cache",
        ),
        (
            lambda d: {
                "k_cache": torch.zeros((2, 4, 2, 8), dtype=torch.int16, device=d),
                "v_cache": torch.zeros((2, 4, 2, 8), dtype=torch.int16, device=d),
            },
            TypeError,
            "k_cache",
        ),
        (lambda d: {"v_cache": torch.full((3, 4, 2, 8), SENTINEL, device=d)}, ValueError, "v_cache"),
        (lambda d: {"backend": "cuda"}, ValueError, "backend"),
    ],
)
def test_store_kv_rejects_bad_input_before_writing(change, error, match, device, backend):
    args = dict(
        key=torch.ones(3, 2, 8, device=device),
        value=torch.ones(3, 2, 8, device=device),
        slot_mapping=torch.tensor([0, 5, 6], device=device),
        k_cache=torch.full((2, 4, 2, 8), SENTINEL, device=device),
        v_cache=torch.full((2, 4, 2, 8), SENTINEL, device=device),
        backend=backend,
    )
    args.update(change(device))
    before = {k: args[k].clone() for k in ("k_cache", "v_cache")}
    with pytest.raises(error, match=match):
        store_kv(**args)
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{k} was written before the error"


def test_unknown_backend_rejected_with_no_tokens_too(device):
    k_cache, v_cache, _ = make_caches("separate", 1, 4, 2, 8, torch.float32, device)
    empty = torch.zeros(0, 2, 8, device=device)
    with pytest.raises(ValueError, match="backend"):
        store_kv(empty, empty, torch.zeros(0, dtype=torch.int64, device=device), k_cache, v_cache, backend="cuda")
    assert (k_cache == SENTINEL).all() and (v_cache == SENTINEL).all()


# --------------------------------------------------------------------------------------------------
# Scaled stores: float8 caches with per-layer scales
# --------------------------------------------------------------------------------------------------
SCALES = [None, 0.5, 1.0, 3.7, 1e-2, 2, 2.0**-6]


# float16 caches overflow to inf for large values and small scales (as torch does); numpy warns in the interpreter.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("cache_dtype", [*FP8_DTYPES, torch.float16, torch.bfloat16, torch.float32], ids=str)
@given(data=st.data())
def test_scaled_store_matches_naive(cache_dtype, data, device, backend):
    skip_inexact_interpreter(backend, cache_dtype)
    page_size = data.draw(st.sampled_from([1, 16, 3]), label="page_size")
    num_pages = data.draw(st.integers(1, 4), label="num_pages")
    num_heads = data.draw(st.integers(1, 4), label="heads")
    head_dim = data.draw(st.sampled_from([1, 8, 130]), label="head_dim")
    in_dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), label="input dtype")
    layout = data.draw(st.sampled_from(["separate", "combined"]), label="layout")
    k_scale = data.draw(st.sampled_from(SCALES), label="k_scale")
    v_scale = data.draw(st.sampled_from(SCALES), label="v_scale")
    # x1000 with a scale of 1e-2 saturates float8_e5m2 too (and overflows float16 to inf on both paths).
    magnitude = data.draw(st.sampled_from([1.0, 10.0, 1000.0]), label="magnitude")
    num_slots = num_pages * page_size
    slots = data.draw(st.lists(st.integers(0, num_slots - 1), unique=True, max_size=min(num_slots, 12)), label="slots")
    for _ in range(data.draw(st.integers(0, 3), label="PAD tokens")):
        slots.insert(data.draw(st.integers(0, len(slots))), PAD_SLOT_ID)
    tail = data.draw(st.lists(st.integers(-1, num_slots - 1), max_size=2), label="unread tail")

    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    key = (torch.randn((len(slots), num_heads, head_dim), generator=gen) * magnitude).to(in_dtype)
    value = (torch.randn((len(slots), num_heads, head_dim), generator=gen) * magnitude).to(in_dtype)
    k_cache, v_cache, storage = make_caches(layout, num_pages, page_size, num_heads, head_dim, cache_dtype, device)
    expected_k, expected_v = naive_store_kv(key, value, slots, k_cache.cpu(), v_cache.cpu(), k_scale, v_scale)

    slot_mapping = torch.tensor(slots + tail, dtype=torch.int64, device=device)
    store_kv(
        key.to(device),
        value.to(device),
        slot_mapping,
        k_cache,
        v_cache,
        k_scale=k_scale,
        v_scale=v_scale,
        backend=backend,
    )
    assert_same_bits(k_cache, expected_k)
    assert_same_bits(v_cache, expected_v)
    if layout == "combined":
        assert_same_bits(storage[0], torch.stack([expected_k, expected_v], 1))


def _fp8_grid(dtype):
    """Every finite value of the float8 format, as float32."""
    q = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    return q[torch.isfinite(q)]


@pytest.mark.parametrize("layout", ["separate", "combined"])
@pytest.mark.parametrize(("k_scale", "v_scale"), [(1.0, 0.5), (2.0**-6, 4), (None, 0.25)])
@pytest.mark.parametrize("cache_dtype", FP8_DTYPES, ids=str)
def test_fp8_exact_values_and_saturation(cache_dtype, k_scale, v_scale, layout, device, backend):
    # Every finite float8 value times a power-of-two scale divides back exactly, and values past the
    # format's range (an input that overflows to inf included) saturate to its largest finite value: no
    # rounding, so the Triton interpreter runs this too. The expected values come from the grid itself.
    top = torch.finfo(cache_dtype).max
    grid = _fp8_grid(cache_dtype)
    x = torch.cat([grid, torch.tensor([top * 1.2, top * 4, 1e30, 3e38, -top * 1.2, -1e30])])
    want = torch.cat([grid, torch.tensor([top, top, top, top, -top, -top])])
    heads, dim = 2, 16
    num_real = math.ceil(x.numel() / (heads * dim))
    pad = num_real * heads * dim - x.numel()
    x = torch.cat([x, torch.zeros(pad)]).reshape(num_real, heads, dim)
    want = torch.cat([want, torch.zeros(pad)]).reshape(num_real, heads, dim).to(cache_dtype)  # exact values
    # A PAD token (huge values that would saturate) before each real one; real tokens in reverse slot
    # order over pages of 3 slots.
    slots = [s for i in range(num_real) for s in (PAD_SLOT_ID, 2 * (num_real - 1 - i))]
    key = torch.full((2 * num_real, heads, dim), 1e4)
    value = torch.full((2 * num_real, heads, dim), -1e4)
    key[1::2] = x * (1.0 if k_scale is None else k_scale)
    value[1::2] = x.flip(0) * v_scale
    num_pages, page_size = math.ceil(2 * num_real / 3), 3
    k_cache, v_cache, _ = make_caches(layout, num_pages, page_size, heads, dim, cache_dtype, device)
    expected_k, expected_v = k_cache.cpu().clone(), v_cache.cpu().clone()
    for i, s in enumerate(slots[1::2]):
        expected_k[s // page_size, s % page_size] = want[i]
        expected_v[s // page_size, s % page_size] = want.flip(0)[i]
    naive = naive_store_kv(key, value, slots, k_cache.cpu(), v_cache.cpu(), k_scale, v_scale)
    assert_same_bits(naive[0], expected_k)
    assert_same_bits(naive[1], expected_v)

    store_kv(
        key.to(device),
        value.to(device),
        torch.tensor(slots, device=device),
        k_cache,
        v_cache,
        k_scale=k_scale,
        v_scale=v_scale,
        backend=backend,
    )
    assert_same_bits(k_cache, expected_k)
    assert_same_bits(v_cache, expected_v)


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("cache_dtype", FP8_DTYPES, ids=str)
def test_fp8_rounds_to_nearest_even(cache_dtype, scale, device, backend):
    skip_inexact_interpreter(backend, cache_dtype)
    # Midpoints between neighbouring finite values (exact in float32) go to the one with the even byte
    # (even mantissa); a hair above or below a midpoint goes to the nearer one. Checked against byte
    # arithmetic, not against torch's cast.
    byte = torch.arange(0, 256, dtype=torch.uint8)
    q = byte.view(cache_dtype).float()
    lo = torch.arange(0, 127)  # positive finite neighbours (b, b + 1); b + 1 finite
    lo = lo[torch.isfinite(q[lo + 1])]
    mid = (q[lo] + q[lo + 1]) / 2
    even = torch.where(lo % 2 == 0, lo, lo + 1)
    up = torch.nextafter(mid, torch.tensor(math.inf))
    down = torch.nextafter(mid, torch.tensor(-math.inf))
    x = torch.cat([mid, up, down, -mid, -up])
    want = torch.cat([even, lo + 1, lo, even + 128, lo + 1 + 128]).to(torch.uint8)
    n = x.numel()
    key = (x * scale).reshape(n, 1, 1)
    k_cache, v_cache, _ = make_caches("separate", 1, n, 1, 1, cache_dtype, device)
    store_kv(
        key.to(device),
        key.to(device),
        torch.arange(n, device=device),
        k_cache,
        v_cache,
        k_scale=scale,
        v_scale=scale,
        backend=backend,
    )
    got = bits(k_cache).flatten()
    bad = got != want
    assert not bad.any(), f"{x[bad][:6].tolist()} stored as {got[bad][:6].tolist()}, want {want[bad][:6].tolist()}"
    assert torch.equal(bits(v_cache), bits(k_cache))


@pytest.mark.skipif(INTERPRETED, reason=INTERPRETER_ROUNDING + "; this compares Triton with torch on the GPU")
@pytest.mark.parametrize("scale", [0.5, 1.0, 3.7, 1e-2, 7e-4])
@pytest.mark.parametrize("cache_dtype", [*FP8_DTYPES, torch.bfloat16, torch.float16], ids=str)
def test_triton_and_torch_scaled_stores_are_bit_identical(cache_dtype, scale, device):
    # Many values over a wide range of magnitudes (both float8 formats' subnormals, saturation) through
    # both implementations: the same bits everywhere.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 8, 64, generator=gen) * torch.logspace(-8, 4, 4096)[:, None, None]
    for in_dtype in (torch.float32, torch.bfloat16):
        key = x.to(in_dtype).to(device)
        slots = torch.randperm(4096 * 2, generator=gen)[:4096].to(device)
        slots[::7] = PAD_SLOT_ID
        caches = {}
        for backend in ("triton", "torch"):
            caches[backend] = make_caches("combined", 512, 16, 8, 64, cache_dtype, device)[2][0]
            store_kv(
                key,
                key.flip(0),
                slots,
                caches[backend][:, 0],
                caches[backend][:, 1],
                k_scale=scale,
                v_scale=scale * 2,
                backend=backend,
            )
        assert_same_bits(caches["triton"], caches["torch"])


@pytest.mark.skipif(INTERPRETED, reason=INTERPRETER_ROUNDING + "; NaN becomes a finite byte there")
@pytest.mark.parametrize("cache_dtype", FP8_DTYPES, ids=str)
def test_nan_stays_nan(cache_dtype, device, backend):
    key = torch.tensor([math.nan, -math.nan, 1.0, math.inf, -math.inf], device=device).reshape(5, 1, 1)
    k_cache, v_cache, _ = make_caches("separate", 1, 8, 1, 1, cache_dtype, device)
    store_kv(key, key, torch.arange(5, device=device), k_cache, v_cache, k_scale=2.0, backend=backend)
    got = k_cache[0, :5, 0, 0].cpu().float()
    top = torch.finfo(cache_dtype).max
    assert got.isnan()[:2].all() and got[2:].tolist() == [0.5, top, -top]
    assert (bits(k_cache)[0, 5:] == FP8_SENTINEL_BYTE).all()


@pytest.mark.parametrize("cache_dtype", FP8_DTYPES, ids=str)
def test_default_backend_rounds_fp8_correctly(cache_dtype, device):
    # backend=None: compiled Triton on CUDA; under the interpreter (whose float8 casts are wrong) the torch
    # twin. Either way the stored values are the documented ones.
    key = (torch.randn(64, 2, 16, generator=torch.Generator().manual_seed(3)) * 30).to(device)
    k_cache, v_cache, _ = make_caches("separate", 4, 16, 2, 16, cache_dtype, device)
    slots = list(range(63, -1, -1))
    expected_k, expected_v = naive_store_kv(key.cpu(), key.cpu(), slots, k_cache.cpu(), v_cache.cpu(), 0.3, None)
    store_kv(key, key, torch.tensor(slots, device=device), k_cache, v_cache, k_scale=0.3)
    assert_same_bits(k_cache, expected_k)
    assert_same_bits(v_cache, expected_v)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=str)
def test_scales_divide_for_non_fp8_caches_too(cache_dtype, device, backend):
    # FlashInfer multiplies by k_scale / v_scale whatever the cache dtype, so the store divides for
    # every cache. Powers of two and 3 / 1.5 divide exactly.
    key = torch.tensor([3.0, -6.0, 0.75, 1e-3], device=device).reshape(4, 1, 1)
    k_cache, v_cache, _ = make_caches("separate", 1, 4, 1, 1, cache_dtype, device)
    store_kv(key, key, torch.arange(4, device=device), k_cache, v_cache, k_scale=2, v_scale=0.25, backend=backend)
    assert k_cache.flatten().tolist() == quantize(key.cpu(), 2, cache_dtype).flatten().tolist()
    assert k_cache.flatten()[:3].tolist() == [1.5, -3.0, 0.375]
    assert v_cache.flatten()[:3].tolist() == [12.0, -24.0, 3.0]
    # No scale: the plain cast, bit for bit as before (1e-3 is not a float16 value: one rounding only).
    store_kv(key, key, torch.arange(4, device=device), k_cache, v_cache, backend=backend)
    assert_same_bits(k_cache.flatten(), key.flatten().to(cache_dtype))


@pytest.mark.parametrize("cache_dtype", FP8_DTYPES, ids=str)
def test_fp8_cache_without_a_scale_stores_with_scale_one(cache_dtype, device, backend):
    top = torch.finfo(cache_dtype).max
    key = torch.tensor([1.5, -0.25, 1e6, -1e6, 0.0, -0.0], device=device).reshape(6, 1, 1)
    k_cache, v_cache, _ = make_caches("separate", 1, 6, 1, 1, cache_dtype, device)
    store_kv(key, key, torch.arange(6, device=device), k_cache, v_cache, backend=backend)
    want = torch.tensor([1.5, -0.25, top, -top, 0.0, -0.0]).to(cache_dtype).reshape(1, 6, 1, 1)
    assert_same_bits(k_cache, want)
    assert_same_bits(v_cache, want)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k_scale": 0.0}, ValueError, "k_scale"),
        ({"k_scale": -1.0}, ValueError, "k_scale"),
        ({"v_scale": math.nan}, ValueError, "v_scale"),
        ({"v_scale": math.inf}, ValueError, "v_scale"),
        ({"k_scale": -math.inf}, ValueError, "k_scale"),
        ({"k_scale": 1e-39}, ValueError, "k_scale"),  # 1 / scale past float32's range
        ({"v_scale": 1e39}, ValueError, "v_scale"),  # 1 / scale below float32's normal range
        ({"v_scale": 10**400}, ValueError, "v_scale"),  # no float at all
        ({"k_scale": True}, TypeError, "k_scale"),
        ({"v_scale": "1.0"}, TypeError, "v_scale"),
        ({"k_scale": torch.tensor(1.0)}, TypeError, "k_scale"),
        ({"v_scale": np.float32(1.0)}, TypeError, "v_scale"),
        ({"k_scale": 1.0, "v_scale": [1.0]}, TypeError, "v_scale"),
    ],
)
@pytest.mark.parametrize("num_tokens", [3, 0])
def test_bad_scales_rejected_before_writing(kwargs, error, match, num_tokens, device, backend):
    k_cache, v_cache, _ = make_caches("separate", 2, 4, 2, 8, torch.float8_e4m3fn, device)
    key = torch.ones(num_tokens, 2, 8, device=device)
    with pytest.raises(error, match=match):
        store_kv(key, key, torch.arange(num_tokens, device=device), k_cache, v_cache, backend=backend, **kwargs)
    assert (bits(k_cache) == FP8_SENTINEL_BYTE).all() and (bits(v_cache) == FP8_SENTINEL_BYTE).all()


def test_scale_extremes_accepted(device, backend):
    # The largest and smallest scales whose reciprocal is a normal float32, and an int.
    for scale in (2.0**126, 2.0**-127, 3):
        k_cache, v_cache, _ = make_caches("separate", 1, 1, 1, 1, torch.float32, device)
        key = torch.full((1, 1, 1), 1.5, device=device)
        store_kv(
            key,
            key,
            torch.zeros(1, dtype=torch.int64, device=device),
            k_cache,
            v_cache,
            k_scale=scale,
            v_scale=scale,
            backend=backend,
        )
        assert k_cache.item() == quantize(key.cpu(), scale, torch.float32).item()


# --------------------------------------------------------------------------------------------------
# MLA
# --------------------------------------------------------------------------------------------------
def naive_store_mla(ckv, kpe, slots, ckv_cache, kpe_cache):
    ckv_cache, kpe_cache = ckv_cache.clone(), kpe_cache.clone()
    num_pages, page_size = ckv_cache.shape[:2]
    for tok in range(ckv.shape[0]):
        s = slots[tok]
        if 0 <= s < num_pages * page_size:
            ckv_cache[s // page_size, s % page_size] = ckv[tok].to(ckv_cache.dtype)
            kpe_cache[s // page_size, s % page_size] = kpe[tok].to(kpe_cache.dtype)
    return ckv_cache, kpe_cache


def make_mla_caches(layout, num_pages, page_size, dim_ckv, dim_kpe, dtypes, device):
    """Sentinel-filled ``(ckv_cache, kpe_cache, storage)``: separate tensors, the two parts of one
    ``[P, S, d_ckv + d_kpe]`` tensor, or page-slot-transposed storage ``[S, P, D]`` with a padded row."""
    shape = (num_pages, page_size)
    if layout == "separate":
        c = sentinel_tensor((*shape, dim_ckv), dtypes[0], device)
        k = sentinel_tensor((*shape, dim_kpe), dtypes[1], device)
        return c, k, (c, k)
    if layout == "combined":
        both = sentinel_tensor((*shape, dim_ckv + dim_kpe), dtypes[0], device)
        return both[..., :dim_ckv], both[..., dim_ckv:], (both,)
    c = sentinel_tensor((page_size, num_pages, dim_ckv + 5), dtypes[0], device)
    k = sentinel_tensor((page_size, num_pages, dim_kpe), dtypes[1], device)
    return c.transpose(0, 1)[..., :dim_ckv], k.transpose(0, 1), (c, k)


@given(data=st.data())
def test_store_mla_kv_matches_naive(data, device, backend):
    page_size = data.draw(st.sampled_from([1, 16, 3]), label="page_size")
    num_pages = data.draw(st.integers(1, 4), label="num_pages")
    dim_ckv = data.draw(st.sampled_from([1, 8, 512, 600]), label="d_ckv")  # 600: two blocks of the kernel
    dim_kpe = data.draw(st.sampled_from([1, 64, 9]), label="d_kpe")
    layout = data.draw(st.sampled_from(["separate", "combined", "transposed"]), label="layout")
    ckv_pair = data.draw(st.sampled_from(DTYPE_PAIRS), label="ckv cache and input dtypes")
    kpe_pair = ckv_pair if layout == "combined" else data.draw(st.sampled_from(DTYPE_PAIRS), label="kpe dtypes")
    fused = data.draw(st.booleans(), label="inputs from one projection")
    num_slots = num_pages * page_size
    slots = data.draw(st.lists(st.integers(0, num_slots - 1), unique=True, max_size=min(num_slots, 10)), label="slots")
    for _ in range(data.draw(st.integers(0, 3), label="PAD tokens")):
        slots.insert(data.draw(st.integers(0, len(slots))), PAD_SLOT_ID)
    tail = data.draw(st.lists(st.integers(-1, num_slots - 1), max_size=2), label="unread tail")
    slot_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]), label="slot dtype")

    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    if fused:  # [T, d_ckv + d_kpe + 3] projection output, split: token stride wider than either part
        proj = torch.randn((len(slots), dim_ckv + dim_kpe + 3), generator=gen)
        ckv, kpe = proj[:, :dim_ckv].to(ckv_pair[1]), proj[:, dim_ckv : dim_ckv + dim_kpe].to(kpe_pair[1])
    else:
        ckv = torch.randn((len(slots), dim_ckv), generator=gen).to(ckv_pair[1])
        kpe = torch.randn((len(slots), dim_kpe), generator=gen).to(kpe_pair[1])
    ckv_cache, kpe_cache, storage = make_mla_caches(
        layout, num_pages, page_size, dim_ckv, dim_kpe, (ckv_pair[0], kpe_pair[0]), device
    )
    before = [s.cpu().clone() for s in storage]
    expected_c, expected_k = naive_store_mla(ckv, kpe, slots, ckv_cache.cpu(), kpe_cache.cpu())

    if fused and ckv_pair[1] == torch.float32 and kpe_pair[1] == torch.float32:
        ckv, kpe = proj.to(device)[:, :dim_ckv], proj.to(device)[:, dim_ckv : dim_ckv + dim_kpe]  # strided views
    store_mla_kv(
        ckv.to(device),
        kpe.to(device),
        torch.tensor(slots + tail, dtype=slot_dtype, device=device),
        ckv_cache,
        kpe_cache,
        backend=backend,
    )
    assert_same_bits(ckv_cache, expected_c)
    assert_same_bits(kpe_cache, expected_k)
    # Nothing outside the two views changed (the transposed ckv storage's padded columns).
    if layout == "transposed":
        assert_same_bits(storage[0][..., dim_ckv:], before[0][..., dim_ckv:])


@pytest.mark.parametrize("layout", ["separate", "combined", "transposed"])
def test_mla_pad_slots_leave_the_whole_cache_unchanged(layout, device, backend):
    ckv_cache, kpe_cache, storage = make_mla_caches(layout, 2, 16, 512, 64, (torch.bfloat16,) * 2, device)
    before = [s.clone() for s in storage]
    ckv, kpe = torch.randn(5, 512, device=device), torch.randn(5, 64, device=device)
    slots = torch.tensor([PAD_SLOT_ID, -5, PAD_SLOT_ID, 32, 2**40], device=device)  # PAD, and past the end
    store_mla_kv(ckv, kpe, slots, ckv_cache, kpe_cache, backend=backend)
    for s, b in zip(storage, before, strict=True):
        assert_same_bits(s, b)


def test_mla_combined_cache_as_flashinfer_reads_it(device, backend):
    # One [P, S, 576] bf16 tensor, passed as its [..., :512] and [..., 512:] parts: each token's row holds
    # ckv then kpe, the rest keeps the sentinel.
    both = sentinel_tensor((3, 4, 576), torch.bfloat16, device)
    ckv = torch.randn(3, 512, device=device, dtype=torch.bfloat16)
    kpe = torch.randn(3, 64, device=device, dtype=torch.bfloat16)
    slots = [11, PAD_SLOT_ID, 4]
    store_mla_kv(ckv, kpe, torch.tensor(slots, device=device), both[..., :512], both[..., 512:], backend=backend)
    assert_same_bits(both[2, 3], torch.cat([ckv[0], kpe[0]]))
    assert_same_bits(both[1, 0], torch.cat([ckv[2], kpe[2]]))
    untouched = torch.ones(3, 4, dtype=torch.bool)
    untouched[2, 3] = untouched[1, 0] = False
    assert (both.cpu()[untouched] == SENTINEL).all()


_MLA_BAD_INPUT = [
    (lambda d: {"ckv": torch.ones(3, 1, 16, device=d)}, ValueError, "ckv"),
    (lambda d: {"kpe": torch.ones(3 * 8, device=d)}, ValueError, "kpe"),
    (lambda d: {"kpe": torch.ones(2, 8, device=d)}, ValueError, "kpe"),
    (lambda d: {"kpe": torch.ones(3, 9, device=d)}, ValueError, "kpe_cache"),
    (lambda d: {"ckv": torch.ones(3, 17, device=d)}, ValueError, "ckv_cache"),
    (lambda d: {"ckv": torch.ones(3, 16, dtype=torch.int32, device=d)}, TypeError, "ckv"),
    (lambda d: {"kpe": torch.ones(3, 8, dtype=torch.int64, device=d)}, TypeError, "kpe"),
    (lambda d: {"kpe": torch.ones(3, 0, device=d), "kpe_cache": torch.ones(2, 4, 0, device=d)}, ValueError, "kpe"),
    (lambda d: {"slot_mapping": torch.tensor([0.0, 1.0, 2.0], device=d)}, TypeError, "slot_mapping"),
    (lambda d: {"slot_mapping": torch.tensor([0, 1], device=d)}, ValueError, "slot_mapping"),
    (lambda d: {"slot_mapping": torch.tensor([0, 1, 2], dtype=torch.int16, device=d)}, TypeError, "slot_mapping"),
    (lambda d: {"ckv_cache": torch.full((2, 4, 1, 16), SENTINEL, device=d)}, ValueError, "ckv_cache"),
    (lambda d: {"kpe_cache": torch.full((2, 5, 8), SENTINEL, device=d)}, ValueError, "kpe_cache"),
    (lambda d: {"kpe_cache": torch.full((3, 4, 8), SENTINEL, device=d)}, ValueError, "kpe_cache"),
    (
        lambda d: {"ckv_cache": sentinel_tensor((2, 4, 16), torch.float8_e4m3fn, d)},
        TypeError,
        "ckv_cache: MLA fp8 KV is not supported by batchmeta",
    ),
    (
        lambda d: {"kpe_cache": sentinel_tensor((2, 4, 8), torch.float8_e5m2, d)},
        TypeError,
        "kpe_cache: MLA fp8 KV is not supported by batchmeta",
    ),
    (lambda d: {"ckv_cache": torch.zeros((2, 4, 16), dtype=torch.int16, device=d)}, TypeError, "ckv_cache"),
    (lambda d: {"backend": "cuda"}, ValueError, "backend"),
]


@pytest.mark.parametrize(("change", "error", "match"), _MLA_BAD_INPUT)
def test_store_mla_kv_rejects_bad_input_before_writing(change, error, match, device, backend):
    args = dict(
        ckv=torch.ones(3, 16, device=device),
        kpe=torch.ones(3, 8, device=device),
        slot_mapping=torch.tensor([0, 5, 6], device=device),
        ckv_cache=torch.full((2, 4, 16), SENTINEL, device=device),
        kpe_cache=torch.full((2, 4, 8), SENTINEL, device=device),
        backend=backend,
    )
    args.update(change(device))
    before = {k: args[k].clone() for k in ("ckv_cache", "kpe_cache")}
    with pytest.raises(error, match=match):
        store_mla_kv(**args)
    for k, v in before.items():
        assert_same_bits(args[k], v)


def test_store_mla_kv_with_no_tokens_checks_and_writes_nothing(device, backend):
    ckv_cache, kpe_cache, _ = make_mla_caches("combined", 1, 4, 16, 8, (torch.float32,) * 2, device)
    ckv, kpe = torch.zeros(0, 16, device=device), torch.zeros(0, 8, device=device)
    no_slots = torch.zeros(0, dtype=torch.int64, device=device)
    store_mla_kv(ckv, kpe, no_slots, ckv_cache, kpe_cache, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        store_mla_kv(ckv, kpe, no_slots, ckv_cache, kpe_cache, backend="cuda")
    assert (ckv_cache == SENTINEL).all() and (kpe_cache == SENTINEL).all()


def test_default_backend_rounds_bf16_to_nearest_even(device):
    # backend=None: compiled Triton on CUDA; under the interpreter (whose casts to bf16 truncate) the torch
    # twin. Either way a bf16 cache holds torch's round-to-nearest-even cast, for store_kv and store_mla_kv.
    base = torch.tensor([1.0, -1.5, 3.0, 0.109375, 100.0, -7.0], dtype=torch.float32)
    ulp = 2.0 ** (torch.floor(torch.log2(base.abs())) - 7)
    x = (base + torch.sign(base) * 0.75 * ulp).to(device)  # 3/4 ulp above: truncation gives the value below
    expected = x.cpu().to(torch.bfloat16)
    k_cache, v_cache, _ = make_caches("separate", 1, 8, 1, 1, torch.bfloat16, device)
    store_kv(x.reshape(6, 1, 1), x.reshape(6, 1, 1), torch.arange(6, device=device), k_cache, v_cache)
    assert_same_bits(k_cache[0, :6, 0, 0], expected)
    assert_same_bits(v_cache[0, :6, 0, 0], expected)
    ckv_cache, kpe_cache, _ = make_mla_caches("separate", 1, 8, 6, 6, (torch.bfloat16,) * 2, device)
    rows = x.repeat(6, 1)  # [6 tokens, 6]
    store_mla_kv(rows, rows, torch.arange(6, device=device), ckv_cache, kpe_cache)
    assert_same_bits(ckv_cache[0, :6], expected.repeat(6, 1))
    assert_same_bits(kpe_cache[0, :6], expected.repeat(6, 1))
