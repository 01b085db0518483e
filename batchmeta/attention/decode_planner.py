"""Fast FlashInfer decode planning: ``DecodePlanner``."""

from __future__ import annotations

from typing import Any

import torch

from batchmeta.attention.fast_plan import (
    bind_device_arrays,
    fast_plan_conventions,
    fast_plan_supported,
    path_reproduced,
    plan_state,
    verify_fast_plan,
)

__all__ = ["DecodePlanner", "fast_plan_supported"]


class DecodePlanner:
    """Plans one ``BatchDecodeWithPagedKVCacheWrapper`` per step, from host arrays, fast.

    FlashInfer's ``plan()`` spends most of its host time on Python: argument checks, dtype and
    backend resolution, copying the indptr arrays to the device, recomputing sequence lengths.
    Only the planning call of the wrapper's cached module depends on the batch. The first plan of
    a planner goes through the stock ``plan()``; if the wrapper then resolved to the kernels this
    reproduces (CUDA-core decode, or tensor-core prefill-as-decode on FA2 or FA3), the planner
    checks once that its fast plan of that batch equals the stock plan (plan info and int workspace
    bytes: :func:`~batchmeta.attention.fast_plan.verify_fast_plan`). From then on, plans set the
    batch-dependent wrapper state and call the cached module directly, with the caller's device
    buffers (already on the device) instead of fresh copies. Otherwise (another path, a fast plan
    that differed, ``BATCHMETA_FAST_PLAN=0``) every plan is the stock ``plan()``. Everything else
    (heads, dtypes, page size, window) is fixed per planner.

    Parameters
    ----------
    wrapper:
        A ``BatchDecodeWithPagedKVCacheWrapper`` (NHD). For a CUDA-graph wrapper, its indptr and
        last-page-length buffers must be the device tensors later passed to :meth:`plan`.
    num_qo_heads, num_kv_heads, head_dim, page_size, window_left, q_data_type, kv_data_type:
        As for ``plan()``.
    sm_scale, logits_soft_cap:
        As for ``plan()``: the logit scale (None: ``1/sqrt(head_dim)``) and soft cap (0: none). The
        soft cap selects FlashInfer's kernel variant, so a planner keeps one of each.
    max_batch_size:
        Largest batch this planner will see.

    Attributes
    ----------
    fast:
        Whether plans take the fast path: True once the wrapper's fast plan was found equal to its
        stock plan.
    stock_planned:
        Whether the last :meth:`plan` ran the stock ``plan()``. An eager wrapper is then pointed
        at the caller's device arrays; a CUDA-graph wrapper's stock plan copied the host arrays
        into them (see :func:`~batchmeta.attention.fast_plan.bind_device_arrays`).
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
        sm_scale: float | None = None,
        logits_soft_cap: float = 0.0,
    ):
        self.wrapper = wrapper
        self._static = (num_qo_heads, num_kv_heads, head_dim, page_size)
        self._window_left = window_left
        self._logits_soft_cap = float(logits_soft_cap)
        self._plan_kwargs = dict(
            q_data_type=q_data_type, kv_data_type=kv_data_type, sm_scale=sm_scale, logits_soft_cap=self._logits_soft_cap
        )
        self._conventions = fast_plan_conventions()
        self._undecided = self._conventions is not None  # until the fast plan was compared with the stock plan
        self.fast = False
        self.stock_planned = False
        self._tail: tuple = ()  # the tensor-core planner's arguments after window_left
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
        if self.fast:  # common case
            self.stock_planned = False
            self._fast_plan(
                kv_indptr_host,
                kv_last_page_len_host,
                seq_lens_host,
                max_seq_len,
                kv_indptr,
                kv_indices,
                kv_last_page_len,
            )
            return self.wrapper
        self.stock_planned = True
        device = (kv_indptr, kv_indices, kv_last_page_len)
        self._stock_plan(kv_indptr_host, kv_last_page_len_host, *device)
        if self._undecided and path_reproduced(self.wrapper, lambda: self._reproducible(kv_indptr, kv_last_page_len)):
            self._undecided = False
            args = (kv_indptr_host, kv_last_page_len_host, seq_lens_host, max_seq_len, *device)
            self.fast = verify_fast_plan(
                self.wrapper,
                lambda: self._fast_plan(*args),
                lambda: self._stock_plan(kv_indptr_host, kv_last_page_len_host, *device),
                self._plan_state,
            )
        return self.wrapper

    def adopt(
        self,
        source: DecodePlanner,
        kv_indptr: torch.Tensor | None,
        kv_indices: torch.Tensor | None,
        kv_last_page_len: torch.Tensor | None,
    ) -> None:
        """Takes ``source``'s latest plan, over these device arrays: this wrapper must share
        ``source``'s int workspace (where that plan's data is) and have been planned once itself.

        The plan's host state (the plan info and the scalars :meth:`plan` sets) is copied; an eager
        wrapper is pointed at ``kv_indptr``, ``kv_indices`` and ``kv_last_page_len`` (a CUDA-graph
        wrapper's own buffers are already this step's: pass None)."""
        w, src = self.wrapper, source.wrapper
        if not source.clamps_lengths:
            # Only FA2's kernels clamp each KV chunk to the step's device lengths; FA3's scheduler
            # takes the planned ones, the CUDA-core decode kernel does not clamp.
            backend = getattr(src, "_backend", None) if src.use_tensor_cores else "CUDA-core decode"
            raise RuntimeError(
                f"batchmeta: a plan of longer lengths is shared only with FlashInfer's tensor-core FA2 decode; "
                f"this wrapper runs {backend}"
            )
        if not w.is_cuda_graph_enabled:
            if kv_indptr is None or kv_indices is None or kv_last_page_len is None:
                raise ValueError("kv_indptr, kv_indices, kv_last_page_len: an eager wrapper adopts a plan over arrays")
            bind_device_arrays(w, kv_indptr, kv_indices, kv_last_page_len)
            w._qo_indptr_buf = src._qo_indptr_buf  # arange(B + 1) on the device: one row, one token
        w._batch_size = src._batch_size
        if w.use_tensor_cores:
            w._max_kv_len = src._max_kv_len
        w._plan_info = src._plan_info
        self.stock_planned = False

    @property
    def clamps_lengths(self) -> bool:
        """Whether the wrapper runs FlashInfer's tensor-core FA2 decode (known once planned), whose
        kernels clamp each KV chunk to the device lengths: a plan of longer lengths serves it."""
        w = self.wrapper
        return bool(w.use_tensor_cores) and getattr(w, "_backend", None) == "fa2"

    def _stock_plan(
        self,
        kv_indptr_host: torch.Tensor,
        kv_last_page_len_host: torch.Tensor,
        kv_indptr: torch.Tensor,
        kv_indices: torch.Tensor,
        kv_last_page_len: torch.Tensor,
    ) -> None:
        w = self.wrapper
        graph = w.is_cuda_graph_enabled
        # A CUDA-graph wrapper copies kv_indices itself unless given none.
        indices = kv_indices[:0] if graph else kv_indices
        w.plan(
            kv_indptr_host,
            indices,
            kv_last_page_len_host,
            *self._static,
            window_left=self._window_left,
            **self._plan_kwargs,
        )
        if not graph:
            bind_device_arrays(w, kv_indptr, kv_indices, kv_last_page_len)

    def _fast_plan(
        self,
        kv_indptr_host: torch.Tensor,
        kv_last_page_len_host: torch.Tensor,
        seq_lens_host: torch.Tensor,
        max_seq_len: int,
        kv_indptr: torch.Tensor,
        kv_indices: torch.Tensor,
        kv_last_page_len: torch.Tensor,
    ) -> None:
        w = self.wrapper
        b = kv_last_page_len_host.shape[0]
        views = self._qo_views.get(b)
        if views is None:
            views = self._qo_views[b] = (self._qo_host[: b + 1], self._qo_dev[: b + 1])
        graph = w.is_cuda_graph_enabled  # a property: read once
        if not graph:
            bind_device_arrays(w, kv_indptr, kv_indices, kv_last_page_len)
            w._qo_indptr_buf = views[1]
        w._batch_size = b
        hq, hkv, d, ps = self._static
        if w.use_tensor_cores:
            w._max_kv_len = max_seq_len
            w._plan_info = w._cached_module.plan(
                w._float_workspace_buffer,
                w._int_workspace_buffer,
                w._pin_memory_int_workspace_buffer,
                views[0],
                kv_indptr_host,
                seq_lens_host,
                b,
                b,
                hq,
                hkv,
                ps,
                graph,
                d,
                d,
                False,
                self._window_left,
                *self._tail,
            )
        else:
            w._plan_info = w._cached_module.plan(
                w._float_workspace_buffer,
                w._int_workspace_buffer,
                w._pin_memory_int_workspace_buffer,
                kv_indptr_host,
                b,
                hq,
                hkv,
                ps,
                graph,
                self._window_left,
                self._logits_soft_cap,
                d,
                d,
                *self._empty,
            )

    def _plan_state(self):
        scalars = ("_batch_size", "_max_kv_len") if self.wrapper.use_tensor_cores else ("_batch_size",)
        return plan_state(self.wrapper, scalars)

    def _reproducible(self, kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor) -> bool:
        """Whether the stock plan left the wrapper on a path :meth:`_fast_plan` reproduces (and sets
        the tensor-core planner's trailing arguments for its backend)."""
        w = self.wrapper
        path_ok = (
            getattr(w, "_jit_module", None) is None
            and getattr(w, "_cached_module", None) is not None
            and not w._uses_cudnn
            and getattr(w, "_q_len_per_req", 1) == 1
            and not getattr(w, "_use_xqa_mtp_decode", False)  # 0.7.4: multi-token rows only
            and not getattr(w, "_use_token_head_sf", False)  # 0.7.4: not asked for
            and w._block_tables is None
            and (w._backend in ("fa2", "fa3") if w.use_tensor_cores else w._backend == "auto")
        )
        if path_ok and w.is_cuda_graph_enabled:
            # The graph reads the wrapper's own buffers: they must be the caller's, so nothing is copied.
            path_ok = (
                w._paged_kv_indptr_buf.data_ptr() == kv_indptr.data_ptr()
                and w._paged_kv_last_page_len_buf.data_ptr() == kv_last_page_len.data_ptr()
            )
        if path_ok and w.use_tensor_cores:
            # FA2's planner takes fixed_split_size, disable_split_kv, num_colocated_ctas,
            # uniform_q_len (and from 0.7.4 fixed_uniform_q_len); FA3's none of them.
            self._tail = self._conventions.decode_fa2_tail() if w._backend == "fa2" else ()
        return path_ok
