"""A step's host work in one compiled call: the batch checks and the staging writes.

Why: a step's host side was ~30 numpy calls (:meth:`~batchmeta.batch.BatchChecker.check`, then
:func:`~batchmeta.staging.stage_step`), each costing 1–1.5 µs of dispatch for arrays of a few
hundred elements. :class:`HostPath` does the same work in one ``numba`` function (a check loop,
then a write loop), so a decode step of 256 rows costs a few µs. ``cache=True`` keeps the compiled
code on disk, and :class:`HostPath` compiles (or loads) it when made, not in a step.

What is checked (the verdict of ``BatchChecker.check``, not its messages):

- at most ``max_num_reqs`` rows;
- every request slot in ``[0, max_num_reqs)``, none twice;
- every ``cache_lens`` in ``[0, max_model_len]``;
- the step's tokens ``<= max_num_tokens`` (each row's query length bounded first, so the sum
  cannot overflow int64);
- every row's ``cache_len + query_len <= max_model_len`` (no overflow: both terms bounded);
- in every KV-cache group, each row's slot holds at least ``ceil(seq_len / page_size)`` pages
  (under context parallelism, in a sharded group, ``seq_len`` is this rank's share: ``local_len``).

On any failure nothing is written and :meth:`HostPath.stage` returns ``None``: the caller then
runs ``BatchChecker.check`` on the same input, which raises the precise message. Query lengths
must be ``>= 1`` (``prepare_prefill`` checks it; a decode step's is ``1 + num_draft_tokens``): a
negative one is rejected here, where ``check`` might not reject it.

``BATCHMETA_HOST_PATH=numpy`` in the environment (read at import), or numba missing, leaves
:data:`COMPILED` ``False``; :meth:`HostPath.stage` then raises ``RuntimeError`` and the caller
keeps the numpy path (``check`` + ``stage_step``).
"""

from __future__ import annotations

import os

import numpy as np

from batchmeta.config import MetadataConfig
from batchmeta.ops.step import ROW_CACHE as _ROW_CACHE
from batchmeta.ops.step import ROW_COUNT as _ROW_COUNT
from batchmeta.ops.step import ROW_END as _ROW_END
from batchmeta.ops.step import ROW_GROUP as _ROW_GROUP
from batchmeta.ops.step import ROW_IDX as _ROW_IDX
from batchmeta.ops.step import ROW_KV_HI as _ROW_KV_HI
from batchmeta.ops.step import ROW_KV_LO as _ROW_KV_LO
from batchmeta.ops.step import ROW_LAST as _ROW_LAST
from batchmeta.ops.step import ROW_LOGITS as _ROW_LOGITS
from batchmeta.ops.step import ROW_PER_GROUP as _ROW_PER_GROUP
from batchmeta.ops.step import ROW_SEQ as _ROW_SEQ
from batchmeta.ops.step import ROW_START as _ROW_START
from batchmeta.ops.step import ROW_SWIDTH as _ROW_SWIDTH
from batchmeta.staging import StagingLayout

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install usable
    numba = None

__all__ = ["COMPILED", "HostPath", "plan_fits"]

COMPILED: bool = numba is not None and os.environ.get("BATCHMETA_HOST_PATH", "") != "numpy"
"""Whether :class:`HostPath` can stage (numba imported and ``BATCHMETA_HOST_PATH`` is not ``"numpy"``)."""

# The kernel's int64 workspace (`ws`), one array so that a call unboxes one argument, not three
# (~80 ns each): parameters fixed at init, then outputs, then per-call scratch. Parameters first:
(
    _R,
    _MNT,
    _MML,
    _IDX,
    _QO,
    _SEQ,
    _CACHE,
    _LOGITS,
    _FIXED_END,
    _TABLES,
    _NUM_GROUPS,
    _OUT,
    _SEEN,
    _ROWS,
    _PACKED,
    _STRIDE,
    _ROW_DEVICE,
    _CP_SIZE,
    _CP_RANK,
    _CP_INTERLEAVE,
    _GROUPS,
) = range(21)
# then per group g, _PER_GROUP entries from _GROUPS + g * _PER_GROUP (_SHIFT: log2 of a power-of-two
# page size, else -1: a shift is cheaper than a division, and page sizes are powers of two in practice;
# _SHARDED: 1 where context parallelism shards the group, whose KV lengths are then this rank's):
_KV_INDPTR, _LAST, _STEP_WIDTH, _PAGE, _SHIFT, _MAX_PAGES, _SHARDED = range(7)
_PER_GROUP = 7
# At ws[_OUT]: max_seq, then each group's table width ([1 + G]). At ws[_SEEN]: the row number of
# each request slot ([R], for duplicates). At ws[_ROWS]: ``[1 + G, R]``, each row's seq_len, then
# per group its pages, kept by the checks for the writes.

# Kernel statuses (its return value when negative; else the step's num_tokens).
_INVALID = -1  # the batch fails a check: the caller's BatchChecker.check raises the message
_MISUSE = -2  # padded outside [b, max_num_reqs], a short staging buffer or mismatched arrays


def _local_len(seq_len, ws):
    """This rank's tokens of positions ``[0, seq_len)`` (:func:`batchmeta.context_parallel.local_len`)."""
    interleave = ws[_CP_INTERLEAVE]
    span = interleave * ws[_CP_SIZE]
    rest = seq_len % span - ws[_CP_RANK] * interleave
    return (seq_len // span) * interleave + min(max(rest, 0), interleave)


def _num_pages(kv, ps, shift):
    """Pages of ``ps`` tokens for ``kv`` tokens (``shift``: log2 of ``ps`` where a power of two, else -1)."""
    return (kv + ps - 1) >> shift if shift >= 0 else (kv + ps - 1) // ps


def _stage_kernel(h, held, ws, idx, clens, qlens, q, decode, padded, graph, num_writes, on_device, ahead):
    """Checks the batch, then (only if valid) writes its staging fields into ``h``.

    ``ahead`` (``>= 0``): the checks also hold for every row ``ahead`` tokens longer (a draft
    round's last step), the staged fields are this batch's.

    Returns the step's ``num_tokens`` (``>= 0``), or ``_INVALID`` / ``_MISUSE`` with ``h``
    untouched. ``ws`` is the workspace (module constants above); its scratch entries are written
    before they are read in each call. ``qlens`` is read only when ``decode`` is false; else every
    row has ``q`` new tokens. ``num_writes`` goes into the packed rows (the caller writes the count
    and the pairs themselves); so does ``on_device`` (``[B]``: 1 for rows whose cache length is on
    the device), unless it is empty (no such row).
    """
    r = ws[_R]
    mnt = ws[_MNT]
    mml = ws[_MML]
    groups = ws[_NUM_GROUPS]
    b = idx.shape[0]
    # ---- checks: no write into h before all pass ----
    if b > r:
        return _INVALID
    if padded < b or padded > r or h.shape[0] < ws[_FIXED_END] or clens.shape[0] != b or ahead < 0:
        return _MISUSE
    if held.shape[0] != groups or held.shape[1] != r + 1 or (not decode and qlens.shape[0] != b):
        return _MISUSE
    # Views (no copies) indexed by loop counters: numba then skips its negative-index fix-up.
    seen = ws[ws[_SEEN] : ws[_SEEN] + r]
    o_rows = ws[_ROWS]
    seq = ws[o_rows : o_rows + r]
    num_tokens = 0
    max_seq = 0
    if b:  # BatchChecker.check accepts an empty batch before looking at anything else
        for i in range(b):
            s = idx[i]
            if s < 0 or s >= r:
                return _INVALID
            seen[s] = i
        # A repeated slot reads back the number of its later row.
        for i in range(b):
            if seen[idx[i]] != i:
                return _INVALID
        # Each query length bounded by max_num_tokens first: the sum then stays below 2^62.
        if decode:
            if q < 0 or q > mnt:
                return _INVALID
            num_tokens = q * b
        else:
            for i in range(b):
                ql = qlens[i]
                if ql < 0 or ql > mnt:
                    return _INVALID
                num_tokens += ql
        if num_tokens > mnt:
            return _INVALID
        for i in range(b):
            c = clens[i]
            if c < 0 or c > mml:
                return _INVALID
            s = c + (q if decode else qlens[i])  # both terms < 2^31: no overflow
            if s + ahead > mml:
                return _INVALID
            max_seq = max(max_seq, s)
            seq[i] = s
        for g in range(groups):
            ps = ws[_GROUPS + g * _PER_GROUP + _PAGE]
            shift = ws[_GROUPS + g * _PER_GROUP + _SHIFT]
            sharded = ws[_GROUPS + g * _PER_GROUP + _SHARDED]
            held_g = held[g]
            pages = ws[o_rows + (1 + g) * r : o_rows + (2 + g) * r]
            for i in range(b):
                kv = _local_len(seq[i], ws) if sharded else seq[i]  # context parallelism: local pages
                need = _num_pages(kv, ps, shift)
                if ahead:  # the check with every row `ahead` tokens longer also covers this one
                    kv = _local_len(seq[i] + ahead, ws) if sharded else seq[i] + ahead
                if held_g[idx[i]] < (_num_pages(kv, ps, shift) if ahead else need):
                    return _INVALID
                pages[i] = need
    # Padding rows (graph steps) hold one cached token and, in a speculative step, q new ones.
    pad_q = q if decode and q > 1 else 0
    if padded > b:
        max_seq = max(max_seq, 1 + pad_q)
    # ---- writes: the same elements and values as stage_step ----
    h_idx = h[ws[_IDX] : ws[_IDX] + padded]
    h_cache = h[ws[_CACHE] : ws[_CACHE] + b]
    h_seq = h[ws[_SEQ] : ws[_SEQ] + padded]
    qo = h[ws[_QO] : ws[_QO] + padded + 1]
    logits = h[ws[_LOGITS] : ws[_LOGITS] + b]
    for i in range(b):
        h_idx[i] = idx[i]
    for i in range(b):
        h_cache[i] = clens[i]
    for i in range(b):
        h_seq[i] = seq[i]
    h_cache_pad = h[ws[_CACHE] : ws[_CACHE] + padded]
    for i in range(b, padded):  # padding rows: the reserved table row, one cached token
        h_idx[i] = r
        h_cache_pad[i] = 1
        h_seq[i] = 1 + pad_q
    if decode:
        for i in range(b + 1):
            qo[i] = i * q
        for i in range(b + 1, padded + 1):  # padding rows add pad_q tokens (none in plain decode)
            qo[i] = num_tokens + (i - b) * pad_q
        for i in range(b):
            logits[i] = (i + 1) * q - 1
    else:
        # stage_step leaves a prefill's qo_indptr past row b as it was: so does this.
        qo[0] = 0
        acc = 0
        for i in range(b):
            acc += qlens[i]
            qo[1 + i] = acc
            logits[i] = acc - 1
    for g in range(groups):
        base = _GROUPS + g * _PER_GROUP
        ps = ws[base + _PAGE]
        pages = ws[o_rows + (1 + g) * r : o_rows + (2 + g) * r]
        indptr = h[ws[base + _KV_INDPTR] : ws[base + _KV_INDPTR] + padded + 1]
        last = h[ws[base + _LAST] : ws[base + _LAST] + padded]
        indptr[0] = 0
        acc = 0
        for i in range(b):
            acc += pages[i]
            indptr[1 + i] = acc
        if ws[base + _SHARDED]:  # this rank's tokens: 0 in a row it holds none of
            for i in range(b):
                last[i] = _local_len(seq[i], ws) - max(pages[i] - 1, 0) * ps
        else:  # common case
            for i in range(b):
                last[i] = seq[i] - (pages[i] - 1) * ps  # 1 when ps == 1, as stage_step writes it
        n_pad = (1 + pad_q + ps - 1) // ps  # padding rows: the padding page, as often as their tokens need
        for j in range(padded - b):
            indptr[b + 1 + j] = acc + (j + 1) * n_pad
            last[b + j] = 1 + pad_q - (n_pad - 1) * ps
        # Eager steps fill only as many per-batch table columns as the longest row needs; none
        # without config.batch_block_tables.
        if not ws[_TABLES]:
            width = 0
        elif graph:
            width = ws[base + _MAX_PAGES]
        else:
            width = (max_seq + ps - 1) // ps
        h[ws[base + _STEP_WIDTH]] = width
        ws[ws[_OUT] + 1 + g] = width
    ws[ws[_OUT]] = max_seq
    # The step kernel's packed rows (staging.pack_rows is the reference): row i < padded from the
    # fields just written; row padded holds the indptrs' last elements; everything else 0.
    stride = ws[_STRIDE]
    rows = h[ws[_PACKED] : ws[_PACKED] + (padded + 1) * stride]
    for k in range((padded + 1) * stride):
        rows[k] = 0
    h_cache_all = h[ws[_CACHE] : ws[_CACHE] + padded]
    h_logits_all = h[ws[_LOGITS] : ws[_LOGITS] + padded]
    for i in range(padded):
        o = i * stride
        rows[o + _ROW_IDX] = h_idx[i]
        rows[o + _ROW_START] = qo[i]
        rows[o + _ROW_END] = qo[i + 1]
        rows[o + _ROW_CACHE] = h_cache_all[i]
        rows[o + _ROW_SEQ] = h_seq[i]
        rows[o + _ROW_LOGITS] = h_logits_all[i]
        rows[o + _ROW_COUNT] = num_writes
    if on_device.shape[0] == b:
        dev_field = ws[_ROW_DEVICE]
        for i in range(b):
            rows[i * stride + dev_field] = on_device[i]
    o = padded * stride
    rows[o + _ROW_START] = qo[padded]
    rows[o + _ROW_END] = qo[padded]
    rows[o + _ROW_COUNT] = num_writes
    for g in range(groups):
        base = _GROUPS + g * _PER_GROUP
        at = _ROW_GROUP + _ROW_PER_GROUP * g
        indptr = h[ws[base + _KV_INDPTR] : ws[base + _KV_INDPTR] + padded + 1]
        last = h[ws[base + _LAST] : ws[base + _LAST] + padded]
        width = ws[ws[_OUT] + 1 + g]
        for i in range(padded):
            o = i * stride + at
            rows[o + _ROW_KV_LO] = indptr[i]
            rows[o + _ROW_KV_HI] = indptr[i + 1]
            rows[o + _ROW_LAST] = last[i]
            rows[o + _ROW_SWIDTH] = width
        o = padded * stride + at
        rows[o + _ROW_KV_LO] = indptr[padded]
        rows[o + _ROW_KV_HI] = indptr[padded]
        rows[o + _ROW_SWIDTH] = width
    return num_tokens


def plan_fits(seq: np.ndarray, bounds: np.ndarray, num_reqs: int, ahead: int, limit: int) -> bool:
    """Whether a plan made for lengths ``bounds`` (``[padded]`` int64) still serves a step whose
    staged sequence lengths are ``seq`` (``[padded]`` int32, a staging buffer's view), its first
    ``num_reqs`` rows ``ahead`` tokens further (a draft round's last step): every row's
    ``bounds - need`` in ``[0, limit]``. One compiled loop where :data:`COMPILED` (a draft round
    that keeps its plan asks this every round), else numpy."""
    if not COMPILED:
        need = seq.astype(np.int64)
        need[:num_reqs] += ahead
        spare = bounds - need
        return bool(spare.min() >= 0 and spare.max() <= limit) if spare.shape[0] else True
    return _plan_fits(seq, bounds, num_reqs, ahead, limit)


def _plan_fits(seq, bounds, num_reqs, ahead, limit):
    for i in range(seq.shape[0]):
        spare = bounds[i] - seq[i] - (ahead if i < num_reqs else 0)
        if spare < 0 or spare > limit:
            return False
    return True


if COMPILED:
    _local_len = numba.njit(cache=True)(_local_len)
    _num_pages = numba.njit(cache=True)(_num_pages)
    _stage_kernel = numba.njit(cache=True)(_stage_kernel)
    _plan_fits = numba.njit(cache=True)(_plan_fits)


class HostPath:
    """Checks a batch and writes its staging arrays in one compiled call.

    Parameters
    ----------
    config:
        Capacities and KV-cache groups.
    layout:
        Where each field lies in the staging buffers.
    held:
        ``[num_groups, max_num_reqs + 1]`` int64 pages each request slot holds
        (``BlockTables.host_num_blocks()``, the live mirror: read at each call, never copied).

    Notes
    -----
    Made while :data:`COMPILED` is ``False``, a ``HostPath`` is inert: :meth:`stage` raises
    ``RuntimeError``. Not thread-safe (its scratch is shared by calls), like ``BatchChecker``.
    """

    def __init__(self, config: MetadataConfig, layout: StagingLayout, held: np.ndarray):
        groups, r = len(config.kv_groups), config.max_num_reqs
        if held.dtype != np.int64 or held.shape != (groups, r + 1) or not held.flags.c_contiguous:
            raise ValueError(
                f"held: expected a C-contiguous int64 array of shape {(groups, r + 1)}, got {held.dtype} {held.shape}"
            )
        self.config = config
        self.layout = layout
        self._held = held
        tables = config.batch_block_tables  # without them every step stages table widths of 0
        params = [
            r,
            config.max_num_tokens,
            config.max_model_len,
            layout.idx,
            layout.qo_indptr,
            layout.seq,
            layout.cache,
            layout.logits,
            layout.fixed_end,
            tables,
            groups,
        ]
        n = _GROUPS + groups * _PER_GROUP
        params += [n, n + 1 + groups, n + 1 + groups + r]  # _OUT, _SEEN, _ROWS
        params += [layout.rows, layout.row_stride, layout.row_device_len]  # _PACKED, _STRIDE, _ROW_DEVICE
        cp = config.context_parallel
        params += [cp.world_size, cp.rank, cp.interleave] if cp else [1, 0, 1]  # _CP_SIZE, _CP_RANK, _CP_INTERLEAVE
        assert len(params) == _GROUPS
        for g, grp in enumerate(config.kv_groups):
            ps = grp.page_size
            shift = ps.bit_length() - 1 if ps & (ps - 1) == 0 else -1
            params += [
                layout.kv_indptr[g],
                layout.last_page_len[g],
                layout.step_width[g],
                ps,
                shift,
                config.max_pages_per_req(g),
                config.sharded(g),
            ]
        self._ws = np.zeros(n + 1 + groups + r + (1 + groups) * r, np.int64)
        self._ws[:n] = params
        self._out = self._ws[n : n + 1 + groups]  # a view: max_seq, then each group's width
        self._no_qlens = np.zeros(0, np.int64)  # the qlens argument of a decode step (not read)
        if COMPILED:
            # Compile (or load from the cache) both uses now rather than in the first step: an empty
            # batch on a scratch buffer of the staging layout.
            scratch = np.zeros(layout.fixed_end, np.int32)
            empty = self._no_qlens
            _stage_kernel(scratch, held, self._ws, empty, empty, empty, 1, True, 0, False, 0, empty, 0)
            _stage_kernel(scratch, held, self._ws, empty, empty, empty, 0, False, 0, False, 0, empty, 0)

    def stage(
        self,
        h: np.ndarray,
        idx: np.ndarray,
        qlens: np.ndarray | int,
        clens: np.ndarray,
        padded: int,
        graph: bool,
        num_writes: int = 0,
        on_device: np.ndarray | None = None,
        ahead: int = 0,
    ) -> tuple[int, tuple[int, ...], int] | None:
        """Checks a batch and, if valid, writes its staging fields into ``h``.

        Parameters
        ----------
        h:
            ``int32`` host staging buffer (``PinnedRing.host_np[k]``), at least ``layout.fixed_end``.
        idx, clens:
            ``[B]`` int64 request slots and cached tokens per row (as :func:`~batchmeta.batch.host_ints`
            returns them).
        qlens:
            An int (decode: every row has that many new tokens) or ``[B]`` int64 (prefill), ``>= 1``.
        padded:
            Rows staged, ``B <= padded <= max_num_reqs``; rows past ``B`` are padding rows.
        graph:
            A CUDA-graph step: the per-batch tables' widths are the full table widths (0 without
            ``config.batch_block_tables``, as in an eager step).
        num_writes:
            The packed rows' count of the staged block-table writes the caller will write into
            ``h`` (:func:`~batchmeta.staging.packed_write_count`: ``-1 - n`` when bucketed by row).
        on_device:
            ``[B]`` int64, 1 for rows whose cache length is on the device (``clens`` holds their
            bounds), or None.
        ahead:
            ``>= 0``: the checks also hold with every row ``ahead`` tokens longer (pages held, the
            model length); what is written is this batch's.

        Returns
        -------
        tuple or None
            ``(num_tokens, widths, max_seq)`` as :func:`~batchmeta.staging.stage_step` returns
            them, after writing the same ``idx``, ``cache``, ``seq``, ``qo_indptr``, ``logits``,
            per-group ``kv_indptr``, ``last_page_len`` and ``step_width`` elements (the decode
            ``qo_indptr`` / ``logits`` always: no memo) and the step kernel's packed rows
            (:func:`~batchmeta.staging.pack_rows`). Not ``num_writes`` nor the pairs. ``None``
            when the batch fails a check, with nothing written: ``BatchChecker.check`` on the same
            input raises the message.

        Raises
        ------
        RuntimeError
            When :data:`COMPILED` is ``False``.
        ValueError
            ``padded`` outside ``[B, max_num_reqs]``, ``h`` shorter than the layout, or ``clens`` /
            ``qlens`` not ``B`` long (caller bugs; nothing written).
        """
        if not COMPILED:
            raise RuntimeError(
                "HostPath.stage: the compiled host path is off (numba missing or "
                "BATCHMETA_HOST_PATH=numpy); use BatchChecker.check and stage_step"
            )
        flags = self._no_qlens if on_device is None else on_device
        if type(qlens) is int:
            no_q, held, ws = self._no_qlens, self._held, self._ws
            n = _stage_kernel(h, held, ws, idx, clens, no_q, qlens, True, padded, graph, num_writes, flags, ahead)
        else:
            n = _stage_kernel(
                h, self._held, self._ws, idx, clens, qlens, 0, False, padded, graph, num_writes, flags, ahead
            )
        if n < 0:
            if n == _INVALID:
                return None
            raise ValueError(
                f"HostPath.stage: padded={padded} outside [{idx.shape[0]}, {self.config.max_num_reqs}], "
                f"a staging buffer of {h.shape[0]} < {self.layout.fixed_end} elements, input arrays "
                f"of mismatched lengths, or ahead={ahead} < 0"
            )
        out = self._out.tolist()
        return n, tuple(out[1:]), out[0]
