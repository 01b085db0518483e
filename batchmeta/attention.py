"""FlashInfer plumbing: the shared workspace, wrapper construction, the active-step ContextVar, and
a torch paged-attention implementation (the CPU fallback and a readable reference).

This module knows nothing of :class:`~batchmeta.metadata.BatchMetadata`; it deals in tensors.
"""

from __future__ import annotations

import contextvars
import functools
import math
import os
from typing import Any

import numpy as np
import torch

__all__ = [
    "DecodePlanner",
    "activate_step",
    "current_step",
    "fast_plan_supported",
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


# FlashInfer releases whose decode ``plan()`` was read and whose cached-module planning call (its
# argument order and the wrapper state ``run()`` reads) :class:`DecodePlanner` reproduces. Any other
# version plans through the stock ``plan()``.
_FAST_PLAN_VERIFIED = frozenset({"0.7.2.post1"})


@functools.cache
def fast_plan_supported() -> bool:
    """Whether :class:`DecodePlanner` may bypass ``plan()`` here: a verified FlashInfer version, and
    ``BATCHMETA_FAST_PLAN`` not set to ``0``."""
    if os.environ.get("BATCHMETA_FAST_PLAN", "1") == "0" or not flashinfer_available():
        return False
    import flashinfer

    return getattr(flashinfer, "__version__", None) in _FAST_PLAN_VERIFIED


class DecodePlanner:
    """Plans one ``BatchDecodeWithPagedKVCacheWrapper`` per step, from host arrays, fast.

    FlashInfer's ``plan()`` spends most of its host time on Python: argument checks, dtype and
    backend resolution, copying the indptr arrays to the device, recomputing sequence lengths.
    Only the planning call of the wrapper's cached module depends on the batch. The first plan of
    a planner goes through the stock ``plan()``; if the wrapper then resolved to the FA2 kernels
    (CUDA-core decode, or tensor-core prefill-as-decode) on a verified FlashInfer version, later
    plans set the batch-dependent wrapper state and call the cached module directly, with the
    caller's device buffers (already uploaded) instead of fresh copies. Otherwise every plan is the
    stock ``plan()``. Everything else (heads, dtypes, page size, window) is fixed per planner.

    Parameters
    ----------
    wrapper:
        A ``BatchDecodeWithPagedKVCacheWrapper`` (NHD). For a CUDA-graph wrapper, its indptr and
        last-page-length buffers must be the device tensors later passed to :meth:`plan`.
    num_qo_heads, num_kv_heads, head_dim, page_size, window_left, q_data_type, kv_data_type:
        As for ``plan()``.
    max_batch_size:
        Largest batch this planner will see.
    """

    def __init__(
        self,
        wrapper: Any,
        *,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        window_left: int,
        q_data_type: torch.dtype,
        kv_data_type: torch.dtype,
        max_batch_size: int,
    ):
        self.wrapper = wrapper
        self._static = (num_qo_heads, num_kv_heads, head_dim, page_size)
        self._window_left = window_left
        self._dtypes = dict(q_data_type=q_data_type, kv_data_type=kv_data_type)
        self._allowed = fast_plan_supported()
        self.fast = False  # True once the stock plan has shown the wrapper takes the verified path
        device = wrapper.device
        self._qo_host = torch.arange(max_batch_size + 1, dtype=torch.int32)
        self._qo_dev = torch.arange(max_batch_size + 1, dtype=torch.int32, device=device)
        self._qo_views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._empty = (torch.empty(0, dtype=q_data_type), torch.empty(0, dtype=kv_data_type))

    def plan(
        self,
        kv_indptr_host: torch.Tensor,
        kv_last_page_len_host: torch.Tensor,
        seq_lens_host: torch.Tensor,
        max_seq_len: int,
        kv_indptr: torch.Tensor,
        kv_indices: torch.Tensor,
        kv_last_page_len: torch.Tensor,
    ) -> Any:
        """Plans the wrapper for a batch of ``B`` rows; returns it.

        Parameters
        ----------
        kv_indptr_host, kv_last_page_len_host, seq_lens_host:
            ``[B + 1]``, ``[B]``, ``[B]`` int32 CPU tensors (pinned): FlashInfer's arrays and the
            rows' KV lengths (cached + new tokens, ``>= 1``); ``max_seq_len`` their maximum.
        kv_indptr, kv_indices, kv_last_page_len:
            The same on the device (``kv_indices`` may be longer than ``kv_indptr[B]``), already
            written or enqueued on the current stream.
        """
        w = self.wrapper
        b = kv_last_page_len_host.shape[0]
        if not self.fast:
            # Stock plan; a CUDA-graph wrapper copies kv_indices itself unless given none.
            indices = kv_indices[:0] if w.is_cuda_graph_enabled else kv_indices
            w.plan(kv_indptr_host, indices, kv_last_page_len_host, *self._static,
                   window_left=self._window_left, **self._dtypes)  # fmt: skip
            self.fast = self._allowed and self._verified_state(kv_indptr, kv_last_page_len)
            return w
        views = self._qo_views.get(b)
        if views is None:
            views = self._qo_views[b] = (self._qo_host[: b + 1], self._qo_dev[: b + 1])
        if not w.is_cuda_graph_enabled:
            w._paged_kv_indptr_buf = kv_indptr
            w._paged_kv_indices_buf = kv_indices
            w._paged_kv_last_page_len_buf = kv_last_page_len
            w._qo_indptr_buf = views[1]
        w._batch_size = b
        hq, hkv, d, ps = self._static
        if w.use_tensor_cores:
            w._max_kv_len = max_seq_len
            w._plan_info = w._cached_module.plan(
                w._float_workspace_buffer, w._int_workspace_buffer, w._pin_memory_int_workspace_buffer,
                views[0], kv_indptr_host, seq_lens_host, b, b, hq, hkv, ps, w.is_cuda_graph_enabled, d, d,
                False, self._window_left, -1, False, 0, 0,
            )  # fmt: skip
        else:
            w._plan_info = w._cached_module.plan(
                w._float_workspace_buffer, w._int_workspace_buffer, w._pin_memory_int_workspace_buffer,
                kv_indptr_host, b, hq, hkv, ps, w.is_cuda_graph_enabled, self._window_left, 0.0, d, d, *self._empty,
            )  # fmt: skip
        return w

    def _verified_state(self, kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor) -> bool:
        """Whether the stock plan left the wrapper on the path :meth:`plan` reproduces."""
        w = self.wrapper
        try:
            path_ok = (
                getattr(w, "_jit_module", None) is None
                and getattr(w, "_cached_module", None) is not None
                and not w._uses_cudnn
                and getattr(w, "_q_len_per_req", 1) == 1
                and w._block_tables is None
                and (w._backend == "fa2" if w.use_tensor_cores else w._backend == "auto")
            )
        except AttributeError:
            return False
        if path_ok and w.is_cuda_graph_enabled:
            # The graph reads the wrapper's own buffers: they must be the caller's, so nothing is copied.
            path_ok = (
                w._paged_kv_indptr_buf.data_ptr() == kv_indptr.data_ptr()
                and w._paged_kv_last_page_len_buf.data_ptr() == kv_last_page_len.data_ptr()
            )
        return path_ok


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


class activate_step:
    """Makes ``step`` the :func:`current_step` for the body; restores the previous one on exit or error.

    A small class rather than a generator-based context manager: it is entered every step.
    """

    __slots__ = ("_step", "_token")

    def __init__(self, step: Any):
        self._step = step
        self._token: contextvars.Token | None = None

    def __enter__(self) -> Any:
        self._token = _current.set(self._step)
        return self._step

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._token)  # type: ignore[arg-type]


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
