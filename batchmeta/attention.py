"""FlashInfer plumbing: the shared workspace, wrapper construction, the active-step ContextVar, and
a torch paged-attention implementation (the CPU fallback and a readable reference).

This module knows nothing of :class:`~batchmeta.metadata.BatchMetadata`; it deals in tensors.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = [
    "activate_step",
    "current_step",
    "flashinfer_available",
    "get_workspace",
    "new_decode_wrapper",
    "new_paged_prefill_wrapper",
    "new_ragged_prefill_wrapper",
    "paged_attention_torch",
]

_workspaces: dict[torch.device, torch.Tensor] = {}
_current: contextvars.ContextVar[Any] = contextvars.ContextVar("batchmeta_step", default=None)


@functools.cache
def flashinfer_available() -> bool:
    """FlashInfer importable and a CUDA device present."""
    if not torch.cuda.is_available():
        return False
    try:
        import flashinfer  # noqa: F401
    except Exception:  # an import error, or a broken CUDA toolchain under it
        return False
    return True


def get_workspace(device: torch.device, nbytes: int = 128 * 1024 * 1024) -> torch.Tensor:
    """The float workspace FlashInfer wrappers on ``device`` share: one per device, made on first use.

    A later request for more bytes than the existing workspace has replaces it for new wrappers;
    wrappers made earlier keep theirs.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ws = _workspaces.get(device)
    if ws is None or ws.numel() < nbytes:
        ws = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        _workspaces[device] = ws
    return ws


def new_paged_prefill_wrapper(workspace: torch.Tensor) -> Any:
    """``BatchPrefillWithPagedKVCacheWrapper`` (NHD) over ``workspace``."""
    import flashinfer

    return flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")


def new_ragged_prefill_wrapper(workspace: torch.Tensor) -> Any:
    """``BatchPrefillWithRaggedKVCacheWrapper`` (NHD) over ``workspace``: prefill with nothing cached."""
    import flashinfer

    return flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD")


def new_decode_wrapper(
    workspace: torch.Tensor,
    *,
    use_tensor_cores: bool,
    graph_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> Any:
    """``BatchDecodeWithPagedKVCacheWrapper`` (NHD). With ``graph_buffers`` =
    ``(kv_indptr [bs+1], kv_indices [capacity], kv_last_page_len [bs])`` it is a CUDA-graph wrapper
    for one batch size, reading those fixed buffers."""
    import flashinfer

    if graph_buffers is None:
        return flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=use_tensor_cores)
    indptr, indices, last_page_len = graph_buffers
    return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace,
        "NHD",
        use_cuda_graph=True,
        use_tensor_cores=use_tensor_cores,
        paged_kv_indptr_buffer=indptr,
        paged_kv_indices_buffer=indices,
        paged_kv_last_page_len_buffer=last_page_len,
    )


def current_step() -> Any:
    """The step of the innermost active ``with meta.prepare_*(...)`` block.

    Attention layers call this instead of having metadata threaded through the model.

    Raises
    ------
    RuntimeError
        When no step is active.
    """
    step = _current.get()
    if step is None:
        raise RuntimeError("batchmeta.current_step(): no step is active; call it inside `with meta.prepare_*(...)`")
    return step


@contextlib.contextmanager
def activate_step(step: Any) -> Iterator[Any]:
    """Makes ``step`` the :func:`current_step` for the body; restores the previous one on exit or error."""
    token = _current.set(step)
    try:
        yield step
    finally:
        _current.reset(token)


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
