"""Fast FlashInfer prefill planning (paged and ragged): ``PrefillPlanner``, the counterpart of ``DecodePlanner``."""

from __future__ import annotations

from typing import Any

import torch

from batchmeta.attention.fast_plan import (
    bind_device_arrays,
    fast_plan_conventions,
    path_reproduced,
    plan_state,
    verify_fast_plan,
)

__all__ = ["PrefillPlanner"]

# The backends whose planning call :meth:`PrefillPlanner.plan` reproduces (FlashInfer 0.7.2.post1's
# and 0.7.4's ``BatchPrefillWithPagedKVCacheWrapper.plan`` and ``BatchPrefillWithRaggedKVCacheWrapper.plan``):
# FA2 takes four more arguments than FA3 (five from 0.7.4).
_FAST_BACKENDS = ("fa2", "fa3")


class PrefillPlanner:
    """Plans one prefill wrapper (eager, NHD, causal) per step, from host arrays.

    The wrapper is a ``BatchPrefillWithPagedKVCacheWrapper``, or with ``ragged=True`` a
    ``BatchPrefillWithRaggedKVCacheWrapper`` (nothing cached: keys and values are the step's own
    tokens, so ``kv_indptr`` is ``qo_indptr``). FlashInfer's ``plan()`` copies the indptr (and
    last-page-length) arrays to the device, rebuilds the KV lengths, resolves the backend and module,
    and only then calls the cached module's planning function. The first plan of a planner is the
    stock ``plan()``; if it left the wrapper on the FA2 or FA3 path (no custom mask, no JIT
    variant, no block tables, no specialised verify kernel), the planner checks once that its fast
    plan of that batch equals the stock plan (plan info and int workspace bytes:
    :func:`~batchmeta.attention.fast_plan.verify_fast_plan`). From then on, plans set the
    batch-dependent wrapper state and call the module's ``plan`` directly, with the caller's device
    buffers (already written by the step kernel) and pinned host arrays: nothing is copied or
    allocated. Otherwise (another path, a fast plan that differed, ``BATCHMETA_FAST_PLAN=0``) every
    plan is the stock ``plan()``. The backend is the one the first plan chose: with ``"auto"``,
    FlashInfer 0.7.4 may choose again per plan (FA2 for short queries where FA3 otherwise), the
    fast path keeps the first plan's.

    Parameters
    ----------
    wrapper:
        A ``BatchPrefillWithPagedKVCacheWrapper`` (eager or CUDA-graph) or, with ``ragged``, a
        ``BatchPrefillWithRaggedKVCacheWrapper``.
    num_qo_heads, num_kv_heads, head_dim, page_size, window_left, q_data_type, kv_data_type:
        As for ``plan()`` (causal attention; a ragged wrapper ignores ``page_size``).
    sm_scale, logits_soft_cap:
        As for ``plan()`` (None: ``1/sqrt(head_dim)``; 0: no soft cap). The stock plan stores both on
        the wrapper, whose ``run()`` reads them; the fast path leaves them as they are.
    ragged:
        Whether ``wrapper`` is the ragged one.
    uniform_query_len:
        For a CUDA-graph paged wrapper (speculative verify: its fixed buffers are the caller's
        device arrays, which :meth:`plan` must be given), the query rows of every request; FA2
        then sizes its query tiles for them (FlashInfer's ``uniform_q_len``). 0 otherwise.

    Attributes
    ----------
    fast:
        Whether plans take the fast path: True once the wrapper's fast plan was found equal to its
        stock plan.
    stock_planned:
        Whether the last :meth:`plan` ran the stock ``plan()``. An eager paged wrapper is then
        pointed at the caller's device arrays; a CUDA-graph wrapper's stock plan copied the host
        arrays into them (see :func:`~batchmeta.attention.fast_plan.bind_device_arrays`).
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
        ragged: bool = False,
        sm_scale: float | None = None,
        logits_soft_cap: float = 0.0,
        uniform_query_len: int = 0,
    ):
        self.wrapper = wrapper
        self.ragged = ragged
        self._heads = (num_qo_heads, num_kv_heads, head_dim)
        self._page_size = page_size
        self._window_left = window_left
        self._dtypes = dict(q_data_type=q_data_type, kv_data_type=kv_data_type)
        self._scales = dict(sm_scale=sm_scale, logits_soft_cap=float(logits_soft_cap))
        self._uniform = uniform_query_len
        self._graph = wrapper.is_cuda_graph_enabled
        self._conventions = fast_plan_conventions()
        self._undecided = self._conventions is not None  # until the fast plan was compared with the stock plan
        self.fast = False
        self.stock_planned = False
        self._tail: tuple = ()  # the planner's arguments after window_left

    def plan(
        self,
        qo_indptr_host: torch.Tensor,
        kv_indptr_host: torch.Tensor,
        kv_last_page_len_host: torch.Tensor,
        seq_lens_host: torch.Tensor,
        num_tokens: int,
        max_query_len: int,
        max_seq_len: int,
        qo_indptr: torch.Tensor,
        kv_indptr: torch.Tensor,
        kv_indices: torch.Tensor,
        kv_last_page_len: torch.Tensor,
        num_kv_pages: int,
    ) -> Any:
        """Plans the wrapper for a batch of ``B`` rows; returns it.

        Parameters
        ----------
        qo_indptr_host, kv_indptr_host, kv_last_page_len_host, seq_lens_host:
            ``[B + 1]``, ``[B + 1]``, ``[B]``, ``[B]`` int32 CPU tensors (pinned): FlashInfer's
            arrays and each row's KV length (cached + new tokens, ``>= 1``).
        num_tokens, max_query_len, max_seq_len:
            ``qo_indptr[B]``, the longest row's new tokens and its KV length.
        qo_indptr, kv_indptr, kv_indices, kv_last_page_len:
            The same on the device (``kv_indices`` may be longer than ``num_kv_pages``), already
            written or enqueued on the current stream.

        A ragged planner reads only ``qo_indptr_host``, ``seq_lens_host`` (the query lengths),
        ``num_tokens`` and ``qo_indptr``; pass None for the paged-only arguments.
        """
        args = (
            qo_indptr_host,
            kv_indptr_host,
            kv_last_page_len_host,
            seq_lens_host,
            num_tokens,
            max_query_len,
            max_seq_len,
            qo_indptr,
            kv_indptr,
            kv_indices,
            kv_last_page_len,
            num_kv_pages,
        )
        if self.fast:  # common case
            self.stock_planned = False
            self._fast_plan(*args)
            return self.wrapper
        self.stock_planned = True
        self._stock_plan(*args)
        check = (qo_indptr, kv_indptr, kv_indices, kv_last_page_len)
        if self._undecided and path_reproduced(self.wrapper, lambda: self._reproducible(*check)):
            self._undecided = False
            self.fast = verify_fast_plan(
                self.wrapper, lambda: self._fast_plan(*args), lambda: self._stock_plan(*args), self._plan_state
            )
        return self.wrapper

    def _stock_plan(
        self,
        qo_indptr_host,
        kv_indptr_host,
        kv_last_page_len_host,
        seq_lens_host,
        num_tokens,
        max_query_len,
        max_seq_len,
        qo_indptr,
        kv_indptr,
        kv_indices,
        kv_last_page_len,
        num_kv_pages,
    ) -> None:
        w = self.wrapper
        hq, hkv, d = self._heads
        if self.ragged:
            # The keys and values are the step's own (unquantized) tokens: the query dtype.
            w.plan(
                qo_indptr_host,
                qo_indptr_host,
                hq,
                hkv,
                d,
                causal=True,
                window_left=self._window_left,
                q_data_type=self._dtypes["q_data_type"],
                kv_data_type=self._dtypes["q_data_type"],
                **self._scales,
            )
        else:
            # A graph wrapper copies into its fixed buffers: they are these, holding these values.
            graph = dict(uniform_q_len=self._uniform) if self._graph else {}
            w.plan(
                qo_indptr_host,
                kv_indptr_host,
                kv_indices[:num_kv_pages],
                kv_last_page_len_host,
                hq,
                hkv,
                d,
                self._page_size,
                causal=True,
                window_left=self._window_left,
                **self._dtypes,
                **self._scales,
                **graph,
            )
            if not self._graph:
                bind_device_arrays(w, kv_indptr, kv_indices, kv_last_page_len)

    def _fast_plan(
        self,
        qo_indptr_host,
        kv_indptr_host,
        kv_last_page_len_host,
        seq_lens_host,
        num_tokens,
        max_query_len,
        max_seq_len,
        qo_indptr,
        kv_indptr,
        kv_indices,
        kv_last_page_len,
        num_kv_pages,
    ) -> None:
        w = self.wrapper
        hq, hkv, d = self._heads
        b = qo_indptr_host.shape[0] - 1
        # run() checks the queries' rows against this: a graph's rows include its padding rows'
        # (uniform rows: every plan has the capture's row count).
        w._qo_indptr_last = w._max_total_num_rows if self._graph else num_tokens
        w._qo_indptr_buf = qo_indptr
        if self.ragged:
            # Keys and values are the step's tokens: their indptr is the queries' (as plan() sets it).
            w._kv_indptr_buf = w._o_indptr_buf = w._v_indptr_buf = qo_indptr
            kv_indptr_host, page_size = qo_indptr_host, 1
        else:
            w._batch_size = b
            w._max_q_len = max_query_len
            w._max_kv_len = max_seq_len
            if not self._graph:  # a graph wrapper's buffers are already these (checked once)
                bind_device_arrays(w, kv_indptr, kv_indices, kv_last_page_len)
            page_size = self._page_size
        # A graph wrapper plans for the row count fixed at its first plan (its capture).
        total_rows = w._max_total_num_rows if self._graph else num_tokens
        w._plan_info = w._cached_module.plan(
            w._float_workspace_buffer,
            w._int_workspace_buffer,
            w._pin_memory_int_workspace_buffer,
            qo_indptr_host,
            kv_indptr_host,
            seq_lens_host,
            total_rows,
            b,
            hq,
            hkv,
            page_size,
            self._graph,
            d,
            d,
            True,
            self._window_left,
            *self._tail,
        )

    def _plan_state(self):
        if self.ragged:
            return plan_state(self.wrapper, ("_qo_indptr_last",))
        return plan_state(self.wrapper, ("_qo_indptr_last", "_batch_size", "_max_q_len", "_max_kv_len"))

    def _reproducible(self, qo_indptr: torch.Tensor, kv_indptr: Any, kv_indices: Any, kv_last_page_len: Any) -> bool:
        """Whether the stock plan left the wrapper on a path :meth:`_fast_plan` reproduces (and sets
        the planner's trailing arguments for its backend)."""
        w = self.wrapper
        if self._graph:
            # The graph reads the wrapper's own buffers: they must be the caller's, so nothing is copied;
            # every plan must be uniform (padding rows included) for the tile size the capture used.
            pairs = (
                (w._qo_indptr_buf, qo_indptr),
                (w._paged_kv_indptr_buf, kv_indptr),
                (w._paged_kv_indices_buf, kv_indices),
                (w._paged_kv_last_page_len_buf, kv_last_page_len),
            )
            same = all(a.data_ptr() == b.data_ptr() for a, b in pairs)
            if self.ragged or not same or not self._uniform or w._max_total_num_rows is None:
                return False
        common = (
            getattr(w, "_jit_module", None) is None
            and w._cached_module is not None
            and w._backend in _FAST_BACKENDS
            and w._custom_mask_buf is None
            and w._prefix_len_ptr is None
            and not getattr(w, "_variant_owns_mask", False)
            and not getattr(w, "_use_token_head_sf", False)  # 0.7.4: not asked for
            and w._seq_lens_kv is None
        )
        if self.ragged:  # keys and values indexed by the queries' indptr, as plan() sets them
            ok = (
                common
                and w._seq_lens_q is None
                and w._o_indptr_buf is w._qo_indptr_buf
                and w._v_indptr_buf is w._kv_indptr_buf
            )
        else:
            ok = common and w._block_tables is None and getattr(w, "_eagle_verify_fp8kv_sm90_state", None) is None
        if ok:
            # FA2's planner takes fixed_split_size, disable_split_kv, num_colocated_ctas, uniform_q_len
            # (a graph's uniform rows; 0 eager) and from 0.7.4 fixed_uniform_q_len; FA3's none of them.
            uniform = self._uniform if self._graph else 0
            self._tail = self._conventions.prefill_fa2_tail(uniform) if w._backend == "fa2" else ()
        return ok
