"""``store_kv``: write new keys and values into a paged KV cache at a slot mapping.

The cache layout is FlashInfer's NHD paged layout, ``[num_pages, page_size, num_kv_heads, head_dim]``
for keys and for values. A combined FlashInfer cache ``[num_pages, 2, page_size, H, D]`` passes as
``kv_cache[:, 0]`` and ``kv_cache[:, 1]`` (any strides are accepted). Tokens whose slot is PAD (-1,
or any negative value) are skipped: padding rows of a CUDA graph never touch a real slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchmeta.launch import cached_kernel
from batchmeta.ops._common import INDEX_DTYPES, check_tensor, use_triton

__all__ = ["store_kv"]

_BLOCK = 512


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr,  # [T, H, D] each, strides sk_* and sv_*
    sk_t, sk_h, sk_d,
    sv_t, sv_h, sv_d,
    slot_mapping_ptr,  # [>= T] int32/int64
    k_cache_ptr,  # [P, page_size, H, D], strides sc_p, sc_s, sc_h, sc_d
    sc_p, sc_s, sc_h, sc_d,
    v_cache_ptr,
    scv_p, scv_s, scv_h, scv_d,
    page_size,
    num_slots,
    num_heads,
    head_dim,
    BLOCK: tl.constexpr,
):  # fmt: skip
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
    for off in range(0, limit, BLOCK):
        e = off + tl.arange(0, BLOCK)
        m = e < limit
        h = e // head_dim
        d = e % head_dim
        k = tl.load(k_src + h * sk_h + d * sk_d, mask=m)
        v = tl.load(v_src + h * sv_h + d * sv_d, mask=m)
        tl.store(k_dst + h * sc_h + d * sc_d, k.to(k_cache_ptr.dtype.element_ty), mask=m)
        tl.store(v_dst + h * scv_h + d * scv_d, v.to(v_cache_ptr.dtype.element_ty), mask=m)


_store_kv = cached_kernel(_store_kv_kernel)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Writes ``key[t]``/``value[t]`` to slot ``slot_mapping[t]`` of the caches, skipping PAD slots.

    Slot ``s`` is ``k_cache[s // page_size, s % page_size]``. Slots that are negative or past the
    cache are skipped (never wrapped to another slot).

    Parameters
    ----------
    key, value:
        ``[T, H, D]`` new keys and values (float dtypes; cast to the cache dtype).
    slot_mapping:
        ``[>= T]`` int32/int64; only the first ``T`` entries are read.
    k_cache, v_cache:
        ``[num_pages, page_size, H, D]`` with the same shape; any strides.
    """
    check_tensor("key", key, ndim=3)
    device = key.device
    check_tensor("value", value, ndim=3, device=device)
    if value.shape != key.shape:
        raise ValueError(f"value: expected shape {tuple(key.shape)} (the shape of key), got {tuple(value.shape)}")
    num_tokens, num_heads, head_dim = key.shape
    check_tensor("slot_mapping", slot_mapping, dtypes=INDEX_DTYPES, ndim=1, device=device, min_numel=num_tokens,
                 contiguous=True)  # fmt: skip
    check_tensor("k_cache", k_cache, ndim=4, device=device)
    check_tensor("v_cache", v_cache, ndim=4, device=device)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected shape {tuple(k_cache.shape)} (the shape of k_cache), "
                         f"got {tuple(v_cache.shape)}")  # fmt: skip
    if tuple(k_cache.shape[2:]) != (num_heads, head_dim):
        raise ValueError(f"k_cache: expected (num_pages, page_size, {num_heads}, {head_dim}) to match key, "
                         f"got {tuple(k_cache.shape)}")  # fmt: skip
    for name, t in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point dtype, got {t.dtype}")
    num_pages, page_size = k_cache.shape[0], k_cache.shape[1]
    on_triton = use_triton(backend, key)
    if num_tokens == 0 or num_heads * head_dim == 0:
        return
    if on_triton:
        _store_kv.launch(
            (num_tokens,),
            (
                key, value, *key.stride(), *value.stride(), slot_mapping,
                k_cache, *k_cache.stride(), v_cache, *v_cache.stride(),
                page_size, num_pages * page_size, num_heads, head_dim, _BLOCK,
            ),
        )  # fmt: skip
        return
    slots = slot_mapping[:num_tokens].long()
    keep = (slots >= 0) & (slots < num_pages * page_size)
    s = slots[keep]
    k_cache[s // page_size, s % page_size] = key[keep].to(k_cache.dtype)
    v_cache[s // page_size, s % page_size] = value[keep].to(v_cache.dtype)
