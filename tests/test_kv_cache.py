"""``store_kv``: new keys/values into a paged KV cache at a slot mapping.

The caches start full of a sentinel; after each call the whole cache must equal a naive per-token loop
applied to that sentinel cache, so a PAD slot that wrote anything, or a write to a wrong slot, shows.
"""

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from batchmeta.ops import PAD_SLOT_ID, store_kv

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


# --------------------------------------------------------------------------------------------------
# Naive reference
# --------------------------------------------------------------------------------------------------
def naive_store_kv(key, value, slots, k_cache, v_cache):
    """Token t goes to ``cache[s // page_size, s % page_size]`` for ``s = slots[t]`` in the cache;
    negative (PAD) and past-the-end slots write nothing. Returns new caches."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    num_pages, page_size = k_cache.shape[:2]
    for tok in range(key.shape[0]):
        s = slots[tok]
        if 0 <= s < num_pages * page_size:
            k_cache[s // page_size, s % page_size] = key[tok].to(k_cache.dtype)
            v_cache[s // page_size, s % page_size] = value[tok].to(v_cache.dtype)
    return k_cache, v_cache


def make_caches(layout, num_pages, page_size, num_heads, head_dim, dtype, device):
    """Sentinel-filled ``(k_cache, v_cache, storage)``: separate tensors, or FlashInfer's combined
    ``[P, 2, page_size, H, D]`` cache passed as ``kv[:, 0]`` and ``kv[:, 1]``."""
    if layout == "separate":
        k = torch.full((num_pages, page_size, num_heads, head_dim), SENTINEL, dtype=dtype, device=device)
        v = torch.full_like(k, SENTINEL)
        return k, v, (k, v)
    kv = torch.full((num_pages, 2, page_size, num_heads, head_dim), SENTINEL, dtype=dtype, device=device)
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
    store_kv(key, key, torch.tensor([8, 9, 2**31 + 3], device=device), k_cache, v_cache, backend=backend)
    assert (k_cache == SENTINEL).all() and (v_cache == SENTINEL).all()


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
