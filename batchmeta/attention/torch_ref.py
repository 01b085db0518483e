"""Paged attention in torch: the CPU fallback of a step's attention and a readable reference."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["paged_attention_torch"]


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: np.ndarray,
    kv_indptr: np.ndarray,
    kv_indices: torch.Tensor,
    kv_last_page_len: np.ndarray,
    *,
    causal: bool = True,
    window_left: int = -1,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Attention over a paged KV cache in float32, one request at a time (CPU fallback, reference).

    Query ``i`` of request ``b`` (``n_b`` queries, ``L_b`` keys) sits at position ``L_b - n_b + i``
    and sees keys at positions ``<= it`` (``causal``) and ``>= it - window_left`` (when
    ``window_left >= 0``).

    Parameters
    ----------
    q:
        ``[T, Hq, D]``.
    k_cache, v_cache:
        ``[num_pages, page_size, Hkv, D]`` (NHD).
    qo_indptr, kv_indptr, kv_last_page_len:
        Host arrays ``[B+1]``, ``[B+1]``, ``[B]``.
    kv_indices:
        ``[>= kv_indptr[B]]`` int32 pages.

    Returns ``[T, Hq, D]`` in ``q``'s dtype.
    """
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    page_size = k_cache.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.zeros_like(q)
    for b in range(len(qo_indptr) - 1):
        q0, q1 = int(qo_indptr[b]), int(qo_indptr[b + 1])
        p0, p1 = int(kv_indptr[b]), int(kv_indptr[b + 1])
        if q1 == q0 or p1 == p0:
            continue
        kv_len = (p1 - p0 - 1) * page_size + int(kv_last_page_len[b])
        pages = kv_indices[p0:p1].long()
        k = k_cache[pages].reshape(-1, num_kv_heads, head_dim)[:kv_len].float()
        v = v_cache[pages].reshape(-1, num_kv_heads, head_dim)[:kv_len].float()
        rep = num_q_heads // num_kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        qb = q[q0:q1].float()
        scores = torch.einsum("qhd,khd->hqk", qb, k) * scale
        qpos = torch.arange(kv_len - (q1 - q0), kv_len, device=q.device)[:, None]
        kpos = torch.arange(kv_len, device=q.device)[None, :]
        mask = torch.ones_like(scores[0], dtype=torch.bool)
        if causal:
            mask &= kpos <= qpos
        if window_left >= 0:
            mask &= kpos >= qpos - window_left
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out
