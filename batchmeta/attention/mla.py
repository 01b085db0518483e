"""FlashInfer's MLA wrapper: construction, planning from a step's arrays, and the attention call.

An MLA group's metadata is the same as any group's (``qo_indptr``, ``kv_indptr``, ``kv_indices``
from the step kernel; the KV lengths are ``seq_lens``); only the wrapper differs:
``BatchMLAPagedAttentionWrapper`` with FlashInfer's FA2 backend, which runs on sm80 and newer and
needs ``head_dim_ckv`` a multiple of 128 and ``head_dim_kpe`` a multiple of 64.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from batchmeta.attention.fast_plan import fast_plan_conventions, path_reproduced, plan_state, verify_fast_plan

__all__ = ["MLAPlanner", "check_mla_shape", "mla_run", "new_mla_wrapper"]


def check_mla_shape(group: int, head_dim_ckv: int, head_dim_kpe: int) -> None:
    """Raises ``ValueError`` naming the group when FlashInfer's FA2 MLA kernels cannot run its shape."""
    if head_dim_ckv % 128 or head_dim_kpe % 64:
        raise ValueError(
            f"kv_groups[{group}].mla: FlashInfer's MLA kernels need head_dim_ckv a multiple of 128 and "
            f"head_dim_kpe a multiple of 64, got {head_dim_ckv} and {head_dim_kpe}"
        )


@functools.cache
def _canonical_api() -> bool:
    """FlashInfer 0.7's metadata object and structural ``query=`` / ``kv_cache=`` run arguments."""
    import flashinfer.mla

    return hasattr(flashinfer.mla, "MLAPlanMetadata")


def new_mla_wrapper(workspace: torch.Tensor, graph_buffers: tuple[torch.Tensor, ...] | None = None) -> Any:
    """``BatchMLAPagedAttentionWrapper`` (FA2) over ``workspace``. With ``graph_buffers`` =
    ``(qo_indptr [bs+1], kv_indptr [bs+1], kv_indices [capacity], kv_len_arr [bs])`` it is a
    CUDA-graph wrapper for one batch size, reading those fixed buffers."""
    from flashinfer.mla import BatchMLAPagedAttentionWrapper

    if graph_buffers is None:
        return BatchMLAPagedAttentionWrapper(workspace, backend="fa2")
    qo, kv, indices, lens = graph_buffers
    return BatchMLAPagedAttentionWrapper(
        workspace, use_cuda_graph=True, qo_indptr=qo, kv_indptr=kv, kv_indices=indices, kv_len_arr=lens, backend="fa2"
    )


class MLAPlanner:
    """Plans one ``BatchMLAPagedAttentionWrapper`` per step (causal) from pinned host arrays.

    The metadata goes in as pinned host tensors (``qo_indptr``, ``kv_indptr``, KV lengths: what
    FlashInfer's planner reads on the host, so nothing syncs) and the device ``kv_indices`` the
    step kernel wrote (used in place). A CUDA-graph wrapper's fixed buffers are the step's own
    device views: its plan copies the same values the kernel writes into them.

    FlashInfer 0.7's ``plan()`` costs about a millisecond of host time (argument audits, buffer
    snapshots, copies). The first plan of a planner is that stock ``plan()``; if it chose the FA2
    backend, the planner checks once that its fast plan of that batch equals the stock plan (plan
    info, the staged int workspace bytes it writes, planned query shape:
    :func:`~batchmeta.attention.fast_plan.verify_fast_plan` with ``written_only``: the stock plan
    stages into a new pinned buffer each time and leaves each array's unused tail as it found it).
    From then on, plans run FlashInfer's own workload checks and the backend's cached planning
    call directly, with the caller's ``kv_indices`` (the kernels read nothing else the stock plan
    copies: the plan info in the workspace holds the rest). FlashInfer 0.7.4's backend also
    records the query shape and the range of pages a plan's ``kv_indices`` span (a device read),
    which ``run()`` checks: both paths set the shape to ``num_tokens`` and the fast path keeps the
    stock plan's page range (the cache it checks is the same).
    Otherwise (another backend, a fast plan that differed, ``BATCHMETA_FAST_PLAN=0``) every plan
    is the stock ``plan()``.

    Parameters
    ----------
    wrapper:
        From :func:`new_mla_wrapper`.
    num_heads, head_dim_ckv, head_dim_kpe, page_size, sm_scale, q_data_type, kv_data_type:
        As for FlashInfer's ``plan()``.

    Attributes
    ----------
    fast:
        Whether plans take the fast path: True once the wrapper's fast plan was found equal to its
        stock plan.
    """

    def __init__(
        self,
        wrapper: Any,
        *,
        num_heads: int,
        head_dim_ckv: int,
        head_dim_kpe: int,
        page_size: int,
        sm_scale: float,
        q_data_type: torch.dtype,
        kv_data_type: torch.dtype,
    ):
        self.wrapper = wrapper
        self._args = dict(
            num_heads=num_heads,
            head_dim_ckv=head_dim_ckv,
            head_dim_kpe=head_dim_kpe,
            page_size=page_size,
            causal=True,
            sm_scale=sm_scale,
            q_data_type=q_data_type,
            kv_data_type=kv_data_type,
        )
        self._canonical = _canonical_api()
        self._undecided = fast_plan_conventions() is not None  # until the fast plan was compared with the stock plan
        self.fast = False
        self._validate: Any = None
        self._geometry = False  # FlashInfer 0.7.4: the backend records the planned query shape run() checks

    def plan(
        self,
        qo_indptr_host: torch.Tensor,
        kv_indptr_host: torch.Tensor,
        kv_len_host: torch.Tensor,
        kv_indices: torch.Tensor,
        num_tokens: int,
    ) -> Any:
        """Plans a batch of ``B`` rows; returns the wrapper.

        ``qo_indptr_host`` ``[B+1]``, ``kv_indptr_host`` ``[B+1]``, ``kv_len_host`` ``[B]``: int32
        pinned CPU tensors; ``kv_indices``: the device pages ``[kv_indptr[B]]`` (a view of the
        buffer the step kernel writes); ``num_tokens``: the query rows run() is given: ``qo_indptr[B]``,
        or for a CUDA-graph wrapper its rows times their query length (padding rows included).
        """
        args = (qo_indptr_host, kv_indptr_host, kv_len_host, kv_indices, num_tokens)
        if self.fast:  # common case
            self._fast_plan(*args)
            return self.wrapper
        self._stock_plan(*args)
        if self._undecided and path_reproduced(self.wrapper, lambda: self._reproducible(kv_indices)):
            self._undecided = False
            self.fast = verify_fast_plan(
                self.wrapper,
                lambda: self._fast_plan(*args),
                lambda: self._stock_plan(*args),
                self._plan_state,
                written_only=True,
            )
        return self.wrapper

    def _stock_plan(
        self,
        qo_indptr_host: torch.Tensor,
        kv_indptr_host: torch.Tensor,
        kv_len_host: torch.Tensor,
        kv_indices: torch.Tensor,
        num_tokens: int,
    ) -> None:
        w = self.wrapper
        if self._canonical:
            from flashinfer.mla import MLAPlanMetadata

            meta = MLAPlanMetadata.csr(qo_indptr_host, kv_indptr_host, kv_indices, kv_len_host)
            w.plan(metadata=meta, query_layout="split", kv_cache_layout="split", **self._args)
        else:
            w.plan(
                qo_indptr=qo_indptr_host,
                kv_indptr=kv_indptr_host,
                kv_indices=kv_indices,
                kv_len_arr=kv_len_host,
                **self._args,
            )
        backend = getattr(w, "_planned_backend", None)
        if hasattr(backend, "_planned_query_shape"):
            # FlashInfer 0.7.4 records qo_indptr[B] query rows, and run() demands exactly that many.
            # A CUDA graph's padding rows carry no query tokens, yet the queries it is captured
            # with span them (num_tokens = rows * query length): its plan must accept those.
            backend._planned_query_shape = (num_tokens, self._args["num_heads"])

    def _fast_plan(
        self,
        qo_indptr_host: torch.Tensor,
        kv_indptr_host: torch.Tensor,
        kv_len_host: torch.Tensor,
        kv_indices: torch.Tensor,
        num_tokens: int,
    ) -> None:
        w = self.wrapper
        backend, a = w._planned_backend, self._args
        b = kv_len_host.shape[0]
        # FlashInfer's checks of what its kernels can run (work items, causal tile bounds) are a
        # Python loop over query tiles; skipped where they provably pass (see _always_valid).
        if not self._always_valid(num_tokens, b):
            self._validate(qo_indptr_host, kv_len_host, a["num_heads"], True, backend.device, "fa2", a["kv_data_type"])
        if not w._use_cuda_graph:
            backend._kv_indices_buf = kv_indices
        if self._geometry:
            backend._planned_query_shape = (num_tokens, a["num_heads"])
        b = backend
        info, staged = b._cached_module.plan_with_staged_workspace_bytes(
            b._float_workspace_buffer,
            b._int_workspace_buffer,
            b._pin_memory_int_workspace_buffer,
            qo_indptr_host,
            kv_indptr_host,
            kv_len_host,
            a["num_heads"],
            a["head_dim_ckv"],
            True,
        )
        backend._plan_info = w._plan_info = info
        backend._staged_int_workspace_bytes = staged

    def _plan_state(self):
        backend = self.wrapper._planned_backend
        scalars = ("_staged_int_workspace_bytes", "_planned_query_shape") if self._geometry else ()
        return plan_state(backend, scalars, workspace_bytes=backend._staged_int_workspace_bytes)

    def _always_valid(self, num_tokens: int, num_rows: int) -> bool:
        """Whether FlashInfer's FA2 MLA checks (the same in 0.7.2.post1 and 0.7.4) must pass for a
        batch of this size.

        Its causal tile check returns at once when the query tile (64 or 128 rows of heads) is a
        multiple of the head count. Its work-item count is at most the query tiles plus one split
        per cluster (each request's splits sum to at most its KV length over the split limit, and
        that limit is at least the average KV length per cluster), and the query tiles are at most
        ``ceil(q * heads / 64)`` per request: below FlashInfer's 16384 work items it passes.
        """
        heads = self._args["num_heads"]
        return 64 % heads == 0 and -(-num_tokens * heads // 64) + num_rows + self._num_sm <= 16384

    def _reproducible(self, kv_indices: torch.Tensor) -> bool:
        """Whether the stock plan left the wrapper on the FA2 backend path :meth:`_fast_plan` reproduces."""
        from flashinfer.mla._batch_mla._backends._fa_common import _validate_fa_plan_workload
        from flashinfer.mla._batch_mla._backends.fa2_backend import _BatchMLAPagedAttentionFa2Backend

        w = self.wrapper
        backend = w._planned_backend
        ok = (
            type(backend) is _BatchMLAPagedAttentionFa2Backend
            and hasattr(backend._cached_module, "plan_with_staged_workspace_bytes")
            and not backend._use_profiler
            and backend._causal
        )
        if ok and w._use_cuda_graph:  # the graph reads the wrapper's buffer: it must be the caller's
            ok = backend._kv_indices_buf.data_ptr() == kv_indices.data_ptr()
        self._validate = _validate_fa_plan_workload
        self._num_sm = torch.cuda.get_device_properties(backend.device).multi_processor_count
        self._geometry = hasattr(backend, "_planned_query_shape")
        return bool(ok)


def mla_run(
    wrapper: Any,
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    ckv_cache: torch.Tensor,
    kpe_cache: torch.Tensor,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """``wrapper.run`` over split queries and caches, in the form this FlashInfer takes."""
    if _canonical_api():
        return wrapper.run(query=(q_nope, q_pe), kv_cache=(ckv_cache, kpe_cache), out=out)
    return wrapper.run(q_nope=q_nope, q_pe=q_pe, ckv_cache=ckv_cache, kpe_cache=kpe_cache, out=out)
