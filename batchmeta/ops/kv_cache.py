"""``store_kv`` and ``store_mla_kv``: write new tokens' keys and values into a paged KV cache.

``store_kv``'s layout is FlashInfer's NHD paged layout, ``[num_pages, page_size, num_kv_heads,
head_dim]`` for keys and for values. A combined FlashInfer cache ``[num_pages, 2, page_size, H, D]``
passes as ``kv_cache[:, 0]`` and ``kv_cache[:, 1]`` (any strides are accepted). With a per-layer
``k_scale`` / ``v_scale`` (the scales FlashInfer's ``run()`` dequantizes with) the caches store
``x / scale``, saturated in float8 caches. ``store_mla_kv`` writes MLA's latent and rope caches,
``[num_pages, page_size, d_ckv]`` and ``[num_pages, page_size, d_kpe]``, as FlashInfer's
``BatchMLAPagedAttentionWrapper`` reads them.

Tokens whose slot is PAD (-1, or any negative value) are skipped: padding rows of a CUDA graph never
touch a real slot. Both ops launch the same kernel, once per call.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from batchmeta.launch import cached_kernel
from batchmeta.ops._common import INDEX_DTYPES, INTERPRET, check_tensor, use_triton

__all__ = ["store_kv", "store_mla_kv"]

_BLOCK = 512
# float8 caches and the largest finite value of each (a scaled value saturates to it).
_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, *_FP8_MAX)
_MLA_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FP32_MAX = 3.4028234663852886e38
_FP32_MIN_NORMAL = 2.0**-126
_PLAIN = (False, 1.0, 0.0)  # (SCALED, inv, FP8_MAX): a plain cast


@triton.jit
def _to_cache(x, inv, dst_ty: tl.constexpr, SCALED: tl.constexpr, FP8_MAX: tl.constexpr):
    """``x`` as the cache stores it: cast (not SCALED), or ``x * inv`` in fp32, saturated to
    ``[-FP8_MAX, FP8_MAX]`` for a float8 cache (FP8_MAX > 0), then rounded to nearest even."""
    if FP8_MAX > 0:
        y = x.to(tl.float32) * inv
        # Comparisons, not min/max: NaN compares false and stays NaN, as under torch.clamp.
        y = tl.where(y > FP8_MAX, FP8_MAX, tl.where(y < -FP8_MAX, -FP8_MAX, y))
        out = y.to(dst_ty, fp_downcast_rounding="rtne")
    elif SCALED:
        out = (x.to(tl.float32) * inv).to(dst_ty)
    else:
        out = x.to(dst_ty)
    return out


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,  # [T, H, D] and [T, Hv, Dv], strides sk_* and sv_*
    sk_t,
    sk_h,
    sk_d,
    sv_t,
    sv_h,
    sv_d,
    slot_mapping_ptr,  # [>= T] int32/int64
    k_cache_ptr,  # [P, page_size, H, D], strides sc_p, sc_s, sc_h, sc_d
    sc_p,
    sc_s,
    sc_h,
    sc_d,
    v_cache_ptr,  # [P, page_size, Hv, Dv]
    scv_p,
    scv_s,
    scv_h,
    scv_d,
    page_size,
    num_slots,
    num_heads,
    head_dim,
    v_num_heads,  # value's H and D: read only when V_OWN_SHAPE, else key's are used
    v_head_dim,
    k_inv,  # fp32 1 / k_scale, read only when K_SCALED or K_FP8_MAX > 0
    v_inv,
    BLOCK: tl.constexpr,
    V_OWN_SHAPE: tl.constexpr,  # False: value has key's shape and shares its index math (store_kv)
    K_SCALED: tl.constexpr,
    V_SCALED: tl.constexpr,
    K_FP8_MAX: tl.constexpr,  # > 0: the cache is float8 with this largest finite value
    V_FP8_MAX: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    valid = (slot >= 0) & (slot < num_slots)
    page = slot // page_size
    in_page = slot % page_size
    k_dst = k_cache_ptr + page * sc_p + in_page * sc_s
    v_dst = v_cache_ptr + page * scv_p + in_page * scv_s
    k_src = key_ptr + t * sk_t
    v_src = value_ptr + t * sv_t
    n = num_heads * head_dim
    # A PAD (or out-of-range) slot writes nothing: its element count is 0.
    limit = tl.where(valid, n, 0)
    if V_OWN_SHAPE:
        v_limit = tl.where(valid, v_num_heads * v_head_dim, 0)
        loop_limit = tl.maximum(limit, v_limit)
    else:
        v_limit = limit
        loop_limit = limit
    for off in range(0, loop_limit, BLOCK):
        e = off + tl.arange(0, BLOCK)
        m = e < limit
        h = e // head_dim
        d = e % head_dim
        if V_OWN_SHAPE:
            mv = e < v_limit
            hv = e // v_head_dim
            dv = e % v_head_dim
        else:
            mv = m
            hv = h
            dv = d
        k = tl.load(k_src + h * sk_h + d * sk_d, mask=m)
        v = tl.load(v_src + hv * sv_h + dv * sv_d, mask=mv)
        k_at = k_dst + h * sc_h + d * sc_d
        tl.store(k_at, _to_cache(k, k_inv, k_cache_ptr.dtype.element_ty, K_SCALED, K_FP8_MAX), mask=m)
        v_at = v_dst + hv * scv_h + dv * scv_d
        tl.store(v_at, _to_cache(v, v_inv, v_cache_ptr.dtype.element_ty, V_SCALED, V_FP8_MAX), mask=mv)


_store_kv = cached_kernel(_store_kv_kernel)


def _inverse_scale(name: str, scale: object) -> float | None:
    """``1 / scale`` rounded to float32 (as a Python float), or None for no scale."""
    if scale is None:
        return None
    # Python numbers only: a tensor's value would have to be read (a sync on the device).
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name}: expected a Python float or int, got {type(scale).__name__}")
    try:
        s = float(scale)
    except OverflowError:
        s = math.inf
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"{name}: expected a finite scale > 0, got {scale!r}")
    inv = 1.0 / s
    # A reciprocal past float32's range (or subnormal) would store infinities or flush to zero.
    if not _FP32_MIN_NORMAL <= inv <= _FP32_MAX:
        raise ValueError(
            f"{name}: expected a scale whose reciprocal is a normal float32 (about 2.9e-39 to 8.5e37), got {scale!r}"
        )
    return struct.unpack("f", struct.pack("f", inv))[0]


def _cache_conversion(inv: float | None, dtype: torch.dtype) -> tuple[bool, float, float]:
    """The kernel's ``(SCALED, inv, FP8_MAX)`` for a scale's inverse and a cache dtype: a float8
    cache without a scale stores with scale 1 (still saturating)."""
    fp8_max = _FP8_MAX.get(dtype, 0.0)
    return inv is not None, 1.0 if inv is None else inv, fp8_max


def _store_rows_torch(src, cache, pages, in_page, keep, scaled, inv, fp8_max):
    """The torch twin of ``_to_cache`` plus the store, for the kept tokens."""
    x = src[keep]
    if scaled or fp8_max:
        # A float32 tensor times a float32-exact Python float multiplies in float32, as the kernel.
        x = x.float() * inv
        if fp8_max:
            x = x.clamp(-fp8_max, fp8_max)
    cache[pages, in_page] = x.to(cache.dtype)  # round to nearest even


def _launch(
    num_tokens,
    key,
    value,
    key_strides,
    value_strides,
    slot_mapping,
    k_cache,
    k_cache_strides,
    v_cache,
    v_cache_strides,
    page_size,
    num_slots,
    k_shape,
    v_shape,
    v_own_shape,
    k_conv,
    v_conv,
):
    (k_scaled, k_inv, k_max), (v_scaled, v_inv, v_max) = k_conv, v_conv
    _store_kv.launch(
        (num_tokens,),
        (
            key,
            value,
            *key_strides,
            *value_strides,
            slot_mapping,
            k_cache,
            *k_cache_strides,
            v_cache,
            *v_cache_strides,
            page_size,
            num_slots,
            *k_shape,
            *v_shape,
            k_inv,
            v_inv,
            _BLOCK,
            v_own_shape,
            k_scaled,
            v_scaled,
            k_max,
            v_max,
        ),
    )


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    k_scale: float | None = None,
    v_scale: float | None = None,
    backend: str | None = None,
) -> None:
    """Writes ``key[t]``/``value[t]`` to slot ``slot_mapping[t]`` of the caches, skipping PAD slots.

    Slot ``s`` is ``k_cache[s // page_size, s % page_size]``. Negative slots (PAD) are skipped. A
    slot past the cache is a ``ValueError`` when ``slot_mapping`` is host data (a CPU tensor); on the
    device (where checking would sync) it is skipped, never wrapped to another slot.

    With a scale the cache stores ``key / k_scale`` (``value / v_scale``), computed as
    ``key.float() * inv`` with ``inv = 1 / k_scale`` rounded once to float32; a float8 cache then
    saturates to its finite range (``±448`` for float8_e4m3fn, ``±57344`` for float8_e5m2), and the
    result is rounded to nearest even in the cache dtype. FlashInfer's ``run(..., k_scale=, v_scale=)``
    multiplies back. A float8 cache without a scale stores with scale 1 (saturating); other caches
    without a scale take a plain cast, as before. NaN stays NaN. Under the Triton interpreter, whose
    casts to float8 round wrongly and to bfloat16 truncate, ``backend=None`` stores float8 and
    bfloat16 caches with torch.

    Parameters
    ----------
    key, value:
        ``[T, H, D]`` new keys and values (float dtypes; cast to the cache dtype).
    slot_mapping:
        ``[>= T]`` int32/int64; only the first ``T`` entries are read.
    k_cache, v_cache:
        ``[num_pages, page_size, H, D]`` with the same shape; any strides. float32, float16, bfloat16,
        float64, float8_e4m3fn or float8_e5m2 (the Triton kernel needs sm_89+ for float8_e4m3fn).
    k_scale, v_scale:
        Per-layer dequantization scales (Python floats or ints, finite and > 0), or None.
    """
    check_tensor("key", key, ndim=3)
    device = key.device
    check_tensor("value", value, ndim=3, device=device)
    if value.shape != key.shape:
        raise ValueError(f"value: expected shape {tuple(key.shape)} (the shape of key), got {tuple(value.shape)}")
    num_tokens, num_heads, head_dim = key.shape
    check_tensor(
        "slot_mapping", slot_mapping, dtypes=INDEX_DTYPES, ndim=1, device=device, min_numel=num_tokens, contiguous=True
    )
    check_tensor("k_cache", k_cache, ndim=4, device=device)
    check_tensor("v_cache", v_cache, ndim=4, device=device)
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache: expected shape {tuple(k_cache.shape)} (the shape of k_cache), got {tuple(v_cache.shape)}"
        )
    if tuple(k_cache.shape[2:]) != (num_heads, head_dim):
        raise ValueError(
            f"k_cache: expected (num_pages, page_size, {num_heads}, {head_dim}) to match key, "
            f"got {tuple(k_cache.shape)}"
        )
    for name, t in (("key", key), ("value", value)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point dtype, got {t.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, dtypes=_CACHE_DTYPES)
    k_conv = _cache_conversion(_inverse_scale("k_scale", k_scale), k_cache.dtype)
    v_conv = _cache_conversion(_inverse_scale("v_scale", v_scale), v_cache.dtype)
    num_pages, page_size = k_cache.shape[0], k_cache.shape[1]
    if slot_mapping.device.type == "cpu" and num_tokens:
        # Host data can be read without a sync: a slot past the cache is the caller's mistake, not PAD.
        top = int(slot_mapping[:num_tokens].max())
        if top >= num_pages * page_size:
            raise ValueError(
                f"slot_mapping: slot {top} is past the cache ({num_pages} pages of {page_size} slots: "
                f"{num_pages * page_size} slots)"
            )
    on_triton = use_triton(backend, key)
    if on_triton and backend is None and INTERPRET and torch.bfloat16 in (k_cache.dtype, v_cache.dtype):
        on_triton = False  # the interpreter's casts to bfloat16 truncate: the torch twin rounds to nearest even
    if on_triton and backend is None and INTERPRET and (k_conv[2] or v_conv[2]):
        # The interpreter's fp32 -> float8 cast (Triton 3.6-3.9) rounds wrongly (7.87 -> 4.0 in e4m3fn):
        # by default float8 stores take the torch twin there; backend="triton" still runs the kernel.
        on_triton = False
    if num_tokens == 0 or num_heads * head_dim == 0:
        return
    if on_triton:
        _launch(
            num_tokens,
            key,
            value,
            key.stride(),
            value.stride(),
            slot_mapping,
            k_cache,
            k_cache.stride(),
            v_cache,
            v_cache.stride(),
            page_size,
            num_pages * page_size,
            (num_heads, head_dim),
            (num_heads, head_dim),
            False,
            k_conv,
            v_conv,
        )
        return
    slots = slot_mapping[:num_tokens].long()
    keep = (slots >= 0) & (slots < num_pages * page_size)
    s = slots[keep]
    _store_rows_torch(key, k_cache, s // page_size, s % page_size, keep, *k_conv)
    _store_rows_torch(value, v_cache, s // page_size, s % page_size, keep, *v_conv)


def store_mla_kv(
    ckv: torch.Tensor,
    kpe: torch.Tensor,
    slot_mapping: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Writes MLA's ``ckv[t]``/``kpe[t]`` to slot ``slot_mapping[t]`` of the caches, skipping PAD slots.

    Slot ``s`` is ``ckv_cache[s // page_size, s % page_size]``; negative and past-the-cache slots are
    skipped. The caches are what FlashInfer's ``BatchMLAPagedAttentionWrapper.run`` reads. float8
    caches are not supported. Under the Triton interpreter, whose casts to bfloat16 truncate,
    ``backend=None`` stores bfloat16 caches with torch.

    Parameters
    ----------
    ckv, kpe:
        ``[T, d_ckv]`` compressed latents and ``[T, d_kpe]`` rope parts of the new tokens (float
        dtypes; cast to the cache dtype); any strides.
    slot_mapping:
        ``[>= T]`` int32/int64; only the first ``T`` entries are read.
    ckv_cache, kpe_cache:
        ``[num_pages, page_size, d_ckv]`` and ``[num_pages, page_size, d_kpe]``, float32, float16,
        bfloat16 or float64; any strides (e.g. ``[..., :d_ckv]`` and ``[..., d_ckv:]`` of one tensor).
    """
    check_tensor("ckv", ckv, ndim=2)
    device = ckv.device
    check_tensor("kpe", kpe, ndim=2, device=device)
    num_tokens, dim_ckv = ckv.shape
    dim_kpe = kpe.shape[1]
    if kpe.shape[0] != num_tokens:
        raise ValueError(f"kpe: expected {num_tokens} rows (the tokens of ckv), got shape {tuple(kpe.shape)}")
    # A zero-width part would make the kernel divide by zero in its (masked) index math.
    for name, t in (("ckv", ckv), ("kpe", kpe)):
        if t.shape[1] == 0:
            raise ValueError(f"{name}: expected a head dim >= 1, got shape {tuple(t.shape)}")
    check_tensor(
        "slot_mapping", slot_mapping, dtypes=INDEX_DTYPES, ndim=1, device=device, min_numel=num_tokens, contiguous=True
    )
    check_tensor("ckv_cache", ckv_cache, ndim=3, device=device)
    check_tensor("kpe_cache", kpe_cache, ndim=3, device=device)
    if ckv_cache.shape[2] != dim_ckv:
        raise ValueError(
            f"ckv_cache: expected (num_pages, page_size, {dim_ckv}) to match ckv, got {tuple(ckv_cache.shape)}"
        )
    num_pages, page_size = ckv_cache.shape[0], ckv_cache.shape[1]
    if tuple(kpe_cache.shape) != (num_pages, page_size, dim_kpe):
        raise ValueError(
            f"kpe_cache: expected ({num_pages}, {page_size}, {dim_kpe}) (the pages of ckv_cache, "
            f"the head dim of kpe), got {tuple(kpe_cache.shape)}"
        )
    for name, t in (("ckv", ckv), ("kpe", kpe)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point dtype, got {t.dtype}")
    for name, t in (("ckv_cache", ckv_cache), ("kpe_cache", kpe_cache)):
        if t.dtype in _FP8_MAX:
            raise TypeError(f"{name}: MLA fp8 KV is not supported by batchmeta, got {t.dtype}")
        check_tensor(name, t, dtypes=_MLA_CACHE_DTYPES)
    on_triton = use_triton(backend, ckv)
    if on_triton and backend is None and INTERPRET and torch.bfloat16 in (ckv_cache.dtype, kpe_cache.dtype):
        on_triton = False  # the interpreter's casts to bfloat16 truncate: the torch twin rounds to nearest even
    if num_tokens == 0:
        return
    if on_triton:
        # The [T, 1, D] / [P, S, 1, D] views of store_kv's layout: the single head's stride is never used.
        _launch(
            num_tokens,
            ckv,
            kpe,
            (ckv.stride(0), 0, ckv.stride(1)),
            (kpe.stride(0), 0, kpe.stride(1)),
            slot_mapping,
            ckv_cache,
            (*ckv_cache.stride()[:2], 0, ckv_cache.stride(2)),
            kpe_cache,
            (*kpe_cache.stride()[:2], 0, kpe_cache.stride(2)),
            page_size,
            num_pages * page_size,
            (1, dim_ckv),
            (1, dim_kpe),
            True,
            _PLAIN,
            _PLAIN,
        )
        return
    slots = slot_mapping[:num_tokens].long()
    keep = (slots >= 0) & (slots < num_pages * page_size)
    s = slots[keep]
    _store_rows_torch(ckv, ckv_cache, s // page_size, s % page_size, keep, *_PLAIN)
    _store_rows_torch(kpe, kpe_cache, s // page_size, s % page_size, keep, *_PLAIN)
