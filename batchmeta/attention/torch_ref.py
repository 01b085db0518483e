"""Paged attention in torch: the CPU fallback of a step's attention and a readable reference.

Both functions follow FlashInfer's definitions: logits ``q·k * sm_scale``, then (when
``logits_soft_cap > 0``) ``cap * tanh(logits / cap)``, a causal mask (query ``i`` of a row with
``n`` queries and ``L`` keys sits at position ``L - n + i``), an optional sliding window, softmax
and the weighted sum of values, in float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["mla_attention_torch", "paged_attention_torch"]


def _row_pages(
    kv_indices: torch.Tensor, kv_indptr: np.ndarray, kv_last_page_len: np.ndarray, page_size: int, b: int
) -> tuple[torch.Tensor, int] | None:
    """Row ``b``'s pages (int64) and KV length, or None when it has none."""
    p0, p1 = int(kv_indptr[b]), int(kv_indptr[b + 1])
    if p1 == p0:
        return None
    return kv_indices[p0:p1].long(), (p1 - p0 - 1) * page_size + int(kv_last_page_len[b])


def _masked_logits(
    scores: torch.Tensor, num_q: int, kv_len: int, *, causal: bool, window_left: int, logits_soft_cap: float
) -> torch.Tensor:
    """``[H, n, L]`` scaled logits → soft-capped logits, -inf where a mask hides the key."""
    if logits_soft_cap > 0:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    qpos = torch.arange(kv_len - num_q, kv_len, device=scores.device)[:, None]
    kpos = torch.arange(kv_len, device=scores.device)[None, :]
    mask = torch.ones_like(scores[0], dtype=torch.bool)
    if causal:
        mask &= kpos <= qpos
    if window_left >= 0:
        mask &= kpos >= qpos - window_left
    return scores.masked_fill(~mask, float("-inf"))


def _softmax_weights(
    scores: torch.Tensor, num_q: int, kv_len: int, *, causal: bool, window_left: int, logits_soft_cap: float
) -> torch.Tensor:
    """``[H, n, L]`` scaled logits → attention weights (soft cap, masks, softmax; rows with no key → 0)."""
    logits = _masked_logits(
        scores, num_q, kv_len, causal=causal, window_left=window_left, logits_soft_cap=logits_soft_cap
    )
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


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
    logits_soft_cap: float = 0.0,
    k_scale: float | None = None,
    v_scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over a paged KV cache in float32, one request at a time (CPU fallback, reference).

    Query ``i`` of request ``b`` (``n_b`` queries, ``L_b`` keys) sits at position ``L_b - n_b + i``
    and sees keys at positions ``<= it`` (``causal``) and ``>= it - window_left`` (when
    ``window_left >= 0``).

    Parameters
    ----------
    q:
        ``[T, Hq, D]``.
    k_cache, v_cache:
        ``[num_pages, page_size, Hkv, D]`` (NHD); a float8 cache is dequantized with ``k_scale`` /
        ``v_scale`` (cached value × scale, as ``ops.store_kv`` quantized it).
    qo_indptr, kv_indptr, kv_last_page_len:
        Host arrays ``[B+1]``, ``[B+1]``, ``[B]``.
    kv_indices:
        ``[>= kv_indptr[B]]`` int32 pages.
    sm_scale:
        Logit scale; None for ``1 / sqrt(D)``.
    logits_soft_cap:
        ``cap * tanh(logit / cap)`` after scaling when ``> 0``.
    k_scale, v_scale:
        Dequantization scales of the caches (None: 1).
    return_lse:
        Also return each query's log-sum-exp of its (capped, masked) logits: ``[T, Hq]`` float32,
        natural log (FlashInfer's is base 2), -inf for a query that sees no key. What merging
        partial attentions (:func:`batchmeta.ops.correct_attn_out`) needs.

    Returns ``[T, Hq, D]`` in ``q``'s dtype (and the lse with ``return_lse``).
    """
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    page_size = k_cache.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    rep = num_q_heads // num_kv_heads
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device) if return_lse else None
    for b in range(len(qo_indptr) - 1):
        q0, q1 = int(qo_indptr[b]), int(qo_indptr[b + 1])
        row = _row_pages(kv_indices, kv_indptr, kv_last_page_len, page_size, b)
        if q1 == q0 or row is None:
            continue
        pages, kv_len = row
        k = k_cache[pages].reshape(-1, num_kv_heads, head_dim)[:kv_len].float()
        v = v_cache[pages].reshape(-1, num_kv_heads, head_dim)[:kv_len].float()
        if k_scale is not None:
            k = k * k_scale
        if v_scale is not None:
            v = v * v_scale
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), k) * scale
        logits = _masked_logits(
            scores, q1 - q0, kv_len, causal=causal, window_left=window_left, logits_soft_cap=logits_soft_cap
        )
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
        if lse is not None:
            lse[q0:q1] = torch.logsumexp(logits, dim=-1).transpose(0, 1)
    return out if lse is None else (out, lse)


def mla_attention_torch(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    qo_indptr: np.ndarray,
    kv_indptr: np.ndarray,
    kv_indices: torch.Tensor,
    kv_last_page_len: np.ndarray,
    *,
    sm_scale: float,
    causal: bool = True,
) -> torch.Tensor:
    """MLA (absorbed form) over a paged latent cache in float32, one request at a time.

    Logits are ``(q_nope·ckv + q_pe·kpe) * sm_scale``; the output is the weighted sum of the
    latents ``ckv`` (every head reads the same one latent per token), as FlashInfer's
    ``BatchMLAPagedAttentionWrapper`` computes it.

    Parameters
    ----------
    q_nope, q_pe:
        ``[T, H, head_dim_ckv]`` and ``[T, H, head_dim_kpe]``.
    ckv_cache, kpe_cache:
        ``[num_pages, page_size, head_dim_ckv]`` and ``[num_pages, page_size, head_dim_kpe]``.
    qo_indptr, kv_indptr, kv_last_page_len, kv_indices:
        As for :func:`paged_attention_torch`.

    Returns ``[T, H, head_dim_ckv]`` in ``q_nope``'s dtype.
    """
    page_size = ckv_cache.shape[1]
    out = torch.zeros_like(q_nope)
    for b in range(len(qo_indptr) - 1):
        q0, q1 = int(qo_indptr[b]), int(qo_indptr[b + 1])
        row = _row_pages(kv_indices, kv_indptr, kv_last_page_len, page_size, b)
        if q1 == q0 or row is None:
            continue
        pages, kv_len = row
        ckv = ckv_cache[pages].reshape(-1, ckv_cache.shape[-1])[:kv_len].float()
        kpe = kpe_cache[pages].reshape(-1, kpe_cache.shape[-1])[:kv_len].float()
        scores = (
            torch.einsum("qhd,kd->hqk", q_nope[q0:q1].float(), ckv)
            + torch.einsum("qhd,kd->hqk", q_pe[q0:q1].float(), kpe)
        ) * sm_scale
        probs = _softmax_weights(scores, q1 - q0, kv_len, causal=causal, window_left=-1, logits_soft_cap=0.0)
        out[q0:q1] = torch.einsum("hqk,kd->qhd", probs, ckv).to(q_nope.dtype)
    return out
