"""The buffers a step fills: pinned host staging (with its fixed layout) and the device outputs.

vLLM's ``buffer_utils.py`` counterpart. A step writes its small host arrays into one of two pinned
int32 staging buffers (:class:`PinnedRing`), at offsets fixed once by :class:`StagingLayout`. The
step kernel reads that pinned buffer in place, through its device address (zero-copy: no transfer
to enqueue), with the persistent block tables, and writes :class:`StepBuffers` (positions, slot
mappings, ``kv_indices``, per-batch block tables) and the device mirror of the staged fields that
FlashInfer and CUDA graphs read (``PinnedRing.dev``); none of their addresses ever change.
:meth:`StepBuffers.kernel_layout` tells the kernel where everything is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from batchmeta.block_tables import BlockTables
from batchmeta.config import MetadataConfig
from batchmeta.context_parallel import local_len
from batchmeta.ops.lora import LoraLayout
from batchmeta.ops.speculative import bind_resolve_rows
from batchmeta.ops.step import (
    ROW_CACHE,
    ROW_COUNT,
    ROW_END,
    ROW_GROUP,
    ROW_IDX,
    ROW_KV_HI,
    ROW_KV_LO,
    ROW_LAST,
    ROW_LOGITS,
    ROW_PER_GROUP,
    ROW_SEQ,
    ROW_START,
    ROW_SWIDTH,
    StepLayout,
    bind_step_metadata,
    row_chunks,
    row_device_len,
    row_stride,
)

__all__ = [
    "BUCKET_MIN_WRITES",
    "PinnedRing",
    "StagingLayout",
    "StepBuffers",
    "bind_ring_launches",
    "pack_rows",
    "packed_write_count",
    "stage_prompts",
    "stage_step",
    "stage_writes",
]

_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_record_event = getattr(getattr(torch._C, "_CudaEventBase", None), "record", None) or torch.cuda.Event.record
# Event.query() is a Python method around the C one: call that directly (every step queries an event).
_query_event = getattr(getattr(torch._C, "_CudaEventBase", None), "query", None) or torch.cuda.Event.query


class StagingLayout:
    """Fixed element offsets of the per-step fields in the int32 staging buffers (host and device).

    ``idx`` ``[R]`` request slot of each row, ``qo_indptr`` ``[R + 1]``, ``seq`` / ``cache`` /
    ``logits`` ``[R]``, per group ``kv_indptr`` ``[R + 1]``, ``last_page_len`` ``[R]`` and
    ``step_width`` ``[1]``, the step kernel's packed ``rows`` ``[R + 1, row_stride]`` (the same
    values, row by row: see :mod:`batchmeta.ops.step`), ``num_writes`` ``[1]``, then
    ``(offset, value)`` pairs of staged block-table writes (``[2 * max_writes]``) and, when they
    are many, their CSR over the table rows ``write_rows`` ``[R + 2]`` (:func:`stage_writes`), then (token
    history) staged prompt spans ``chunks`` ``[4 * max_chunks]`` (request slot, first position,
    count, offset) and their tokens ``prompt_tokens`` ``[max_prompt_tokens]``, then (multi-LoRA) the
    ``lora`` region ``[lora_size]`` (:class:`batchmeta.ops.lora.LoraLayout`).
    """

    def __init__(
        self,
        max_reqs: int,
        num_groups: int,
        max_writes: int,
        max_chunks: int = 0,
        max_prompt_tokens: int = 0,
        lora_size: int = 0,
    ):
        r = max_reqs
        pos = 0

        def take(n: int) -> int:
            nonlocal pos
            pos += n
            return pos - n

        self.idx = take(r)
        self.qo_indptr = take(r + 1)
        self.seq = take(r)
        self.cache = take(r)
        self.logits = take(r)
        self.kv_indptr = [take(r + 1) for _ in range(num_groups)]
        self.last_page_len = [take(r) for _ in range(num_groups)]
        self.step_width = [take(1) for _ in range(num_groups)]
        self.row_stride = row_stride(num_groups)
        self.row_device_len = row_device_len(num_groups)  # the packed rows' on-device flag field
        self.rows = take((r + 1) * self.row_stride)
        self.num_writes = take(1)
        self.fixed_end = pos
        self.max_writes = max_writes
        self.pairs = take(2 * max_writes)
        # Staged writes bucketed by table row: their CSR over the rows (the padding row included).
        self.num_table_rows = r + 1
        self.write_rows = take(r + 2)
        self.max_chunks = max_chunks
        self.chunks = take(4 * max_chunks)
        self.max_prompt_tokens = max_prompt_tokens
        self.prompt_tokens = take(max_prompt_tokens)
        self.lora = take(lora_size)
        self.total = pos


class PinnedRing:
    """Two host staging buffers (pinned on CUDA), filled in turn, and one device buffer ``dev``.

    The step kernel reads the current host buffer in place and copies what the device needs into
    ``dev``; :meth:`upload` copies a range instead, for launches that read ``dev``. A host buffer is
    reused only after the work that last read it has finished (an event query; in steady state
    always true, since the engine has synced on the step's sampled tokens). ``memo[current]`` lets
    the caller remember what the current host buffer already holds.
    """

    def __init__(self, numel: int, device: torch.device):
        pin = device.type == "cuda"
        self.host = [torch.zeros(numel, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self.host_np = [h.numpy() for h in self.host]
        self.events = [torch.cuda.Event() if pin else None for _ in range(2)]
        self.dev = torch.zeros(numel, dtype=torch.int32, device=device)
        self.current = 0
        self.memo: list[Any] = [None, None]
        self._device_index = device.index if pin else None
        self._stream: Any = None
        self._stream_raw = None
        self._copies: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def next(self) -> np.ndarray:
        """Switches to the other host buffer (waiting for its last use if needed); returns it."""
        h = self.peek()
        self.advance()
        return h

    def peek(self) -> np.ndarray:
        """The other host buffer, free to write (waiting for its last use if needed), without
        switching to it: a caller that may still reject the step writes it, then :meth:`advance`."""
        ev = self.events[self.current ^ 1]
        if ev is not None and not _query_event(ev):
            ev.synchronize()  # the step of two uses ago is still pending: never in steady state
        return self.host_np[self.current ^ 1]

    def advance(self) -> None:
        """Switches to the other host buffer (after :meth:`peek`)."""
        self.current ^= 1

    def wait_previous(self) -> None:
        """Waits (if needed) until everything enqueued before the previous :meth:`done` has run.

        FlashInfer's planners write a plan into one pinned buffer per wrapper and copy it to the
        device asynchronously: planning a wrapper again must wait until that copy has run. An
        engine that prepares step N+1 while step N runs (the token history's overlapped loop) gets
        here with step N's forward still queued, which this does not wait for.
        """
        ev = self.events[self.current ^ 1]
        if ev is not None and not _query_event(ev):
            ev.synchronize()

    def upload(self, end: int, start: int = 0) -> torch.Tensor:
        """Copies elements ``[start, end)`` of the current host buffer to the device buffer."""
        key = (self.current, start, end)
        views = self._copies.get(key)
        if views is None:
            if len(self._copies) > 4096:
                self._copies.clear()
            views = self._copies[key] = (self.dev[start:end], self.host[self.current][start:end])
        views[0].copy_(views[1], non_blocking=True)
        return self.dev

    def done(self) -> None:
        """Marks the current host buffer busy until everything enqueued so far has run."""
        ev = self.events[self.current]
        if ev is None:
            return
        # Event.record() looks the current stream up in Python each time; keep the Stream object
        # while the raw current stream is unchanged.
        raw = _current_raw_stream(self._device_index)
        if raw != self._stream_raw:
            self._stream = torch.cuda.current_stream(self._device_index)
            self._stream_raw = raw
        _record_event(ev, self._stream)


class StepBuffers:
    """The device outputs of the step kernel, allocated once (addresses never change).

    Parameters
    ----------
    config, device:
        What the buffers are sized for, and where they live.
    token_capacity:
        Tokens per step the token buffers hold (default ``config.max_num_tokens``).
    history:
        ``[max_num_reqs, max_model_len]`` int32 token history to read ``input_ids`` from (with
        ``config.token_history``); default: a new one.

    Attributes
    ----------
    positions:
        ``[max_num_tokens]`` int64 (0 past a step's tokens).
    slot_mappings:
        Per group ``[max_num_tokens]`` int64 (PAD, -1, past a step's tokens).
    kv_indices:
        Per group ``[(max_num_reqs + 1) * W_g]`` int32.
    batch_block_tables:
        Per group ``[max_num_reqs, W_g]`` int32: each batch row's pages (``W_g`` the table width);
        None unless ``config.batch_block_tables``.
    """

    def __init__(
        self,
        config: MetadataConfig,
        device: torch.device,
        *,
        token_capacity: int | None = None,
        history: torch.Tensor | None = None,
    ):
        cfg = config
        r, groups = cfg.max_num_reqs, len(cfg.kv_groups)
        # A draft step (batchmeta.draft) runs one token per row: it sizes its token buffers by the
        # rows and reads the token history of the BatchMetadata it belongs to.
        t = self.token_capacity = cfg.max_num_tokens if token_capacity is None else token_capacity
        self.widths = [cfg.max_pages_per_req(g) for g in range(groups)]
        # int32 outputs: per group kv_indices [(r + 1) * W] then the per-batch table [r, W]. Without
        # config.batch_block_tables every step stages a table width of 0, so the kernel writes no
        # table: its offset then names the kv_indices region (valid, never written) and no memory.
        self.kv_offsets, self.table_offsets, pos = [], [], 0
        for w in self.widths:
            self.kv_offsets.append(pos)
            if cfg.batch_block_tables:
                self.table_offsets.append(pos + (r + 1) * w)
                pos += (2 * r + 1) * w
            else:
                self.table_offsets.append(pos)
                pos += (r + 1) * w
        self.out32 = torch.zeros(pos, dtype=torch.int32, device=device)
        # int64 outputs: positions, then per group the slot mapping, then (token history) input_ids,
        # each [t]; slots start as PAD. The history itself is [r, max_model_len].
        hist = cfg.token_history
        self.out64 = torch.full(((1 + groups + hist) * t,), -1, dtype=torch.int64, device=device)
        self.out64[:t] = 0
        self.positions = self.out64[:t]
        self.slot_mappings = tuple(self.out64[(1 + g) * t : (2 + g) * t] for g in range(groups))
        self.input_ids_offset = (1 + groups) * t if hist else -1
        self.input_ids = self.out64[(1 + groups) * t :].zero_() if hist else None
        if hist and history is None:
            # Token ids fit int32 (vocabularies < 2^31): half the bytes of int64, the largest buffer
            # batchmeta keeps (max_num_reqs x max_model_len).
            history = torch.zeros(r, cfg.max_model_len, dtype=torch.int32, device=device)
        self.token_ids = history if hist else None
        self.kv_indices = tuple(
            self.out32[at : at + (r + 1) * w] for at, w in zip(self.kv_offsets, self.widths, strict=True)
        )
        self.batch_block_tables = (
            tuple(self.out32[at : at + r * w].view(r, w) for at, w in zip(self.table_offsets, self.widths, strict=True))
            if cfg.batch_block_tables
            else None
        )

    def kernel_layout(self, config: MetadataConfig, staging: StagingLayout, block_tables: BlockTables) -> StepLayout:
        """Where the step kernel finds its inputs (staging, block tables) and writes its outputs."""
        r, t, groups = config.max_num_reqs, self.token_capacity, len(config.kv_groups)
        cp = config.context_parallel
        return StepLayout(
            page_size=[grp.page_size for grp in config.kv_groups],
            width=self.widths,
            num_table_rows=r + 1,
            idx=staging.idx,
            qo_indptr=staging.qo_indptr,
            cache_lens=staging.cache,
            seq_lens=staging.seq,
            logits=staging.logits,
            kv_indptr=staging.kv_indptr,
            last_page_len=staging.last_page_len,
            step_width=staging.step_width,
            rows=staging.rows,
            row_stride=staging.row_stride,
            num_writes=staging.num_writes,
            pairs=staging.pairs,
            max_writes=staging.max_writes,
            write_rows=staging.write_rows,
            table=block_tables.table_offsets,
            held=[block_tables.num_blocks_offset + g * (r + 1) for g in range(groups)],
            kv_indices=self.kv_offsets,
            kv_capacity=[(r + 1) * w for w in self.widths],
            step_table=self.table_offsets,
            positions=0,
            slot_mapping=[(1 + g) * t for g in range(groups)],
            token_capacity=t,
            input_ids=self.input_ids_offset,
            chunks=staging.chunks,
            max_chunks=staging.max_chunks,
            prompt_tokens=staging.prompt_tokens,
            max_prompt_tokens=staging.max_prompt_tokens,
            history_len=config.max_model_len if config.token_history else 0,
            cp_size=[cp.world_size if config.sharded(g) else 1 for g in range(groups)] if cp else [],
            cp_rank=cp.rank if cp else 0,
            cp_interleave=cp.interleave if cp else 1,
        )


def bind_ring_launches(
    config: MetadataConfig,
    layout: StagingLayout,
    ring: PinnedRing,
    buffers: StepBuffers,
    block_tables: BlockTables,
    lens: torch.Tensor,
    *,
    lora: tuple[LoraLayout, torch.Tensor] | None = None,
) -> tuple[list[Callable[..., None]], list[Callable[[int], None]]]:
    """The bound launches of a step's buffers, one per pinned host buffer of ``ring`` (each reads
    that buffer's staging in place): the step kernel (:func:`~batchmeta.ops.step.bind_step_metadata`:
    into ``buffers``, mirroring into ``ring.dev``, expanding ``lora = (layout, out)``'s rows) and
    :func:`~batchmeta.ops.speculative.bind_resolve_rows` (packed rows into ``ring.dev`` from the
    per-slot device lengths ``lens``, ``[max_num_reqs + 1]`` int32). Returns ``(fills, resolves)``.
    """
    kernel_layout = buffers.kernel_layout(config, layout, block_tables)
    lora_layout, lora_out = lora if lora is not None else (None, None)
    fills = [
        bind_step_metadata(
            kernel_layout,
            host,
            block_tables.flat,
            buffers.out32,
            buffers.out64,
            max_rows=config.max_num_reqs,
            mirror=ring.dev,
            backend=config.backend,
            history=buffers.token_ids,
            lora=lora_layout,
            lora_out=lora_out,
        )
        for host in ring.host
    ]
    page_sizes = tuple(grp.page_size for grp in config.kv_groups)
    resolves = [
        bind_resolve_rows(
            host,
            ring.dev,
            lens,
            page_sizes,
            rows_at=layout.rows,
            stride=layout.row_stride,
            backend=config.backend,
        )
        for host in ring.host
    ]
    return fills, resolves


def stage_step(
    h: np.ndarray,
    lay: StagingLayout,
    memo: list[Any],
    slot: int,
    config: MetadataConfig,
    rows: np.ndarray,
    idx: np.ndarray,
    qlens: np.ndarray | int,
    clens: np.ndarray,
    seq: np.ndarray,
    pages: list[np.ndarray],
    max_seq: int,
    padded: int,
    graph: bool,
    num_writes: int = 0,
    on_device: np.ndarray | None = None,
) -> tuple[int, tuple[int, ...], int]:
    """Writes a step's host arrays into host staging buffer ``h`` (ring slot ``slot``, whose
    ``memo[slot]`` remembers a decode step's shape); returns ``(num_tokens, widths, max_seq)``.
    The block-table writes themselves are the caller's (:func:`stage_writes`); the packed rows
    carry ``num_writes``, their count as :func:`packed_write_count` gives it, as the compiled host
    path's do.

    ``qlens`` is an int for decode (every row has that many new tokens); ``pages`` per group
    ``ceil(seq / page_size)`` (in a group context parallelism shards, of this rank's ``local_len(seq)``
    tokens, which its ``last_page_len`` counts too: 0 in a row it holds none of); ``rows`` is
    ``arange(max_num_reqs + 1)``. Padding rows (graph steps)
    use the reserved table row and hold one cached token; in a plain decode step they add no new
    token, in a speculative one (``qlens > 1``) as many as a real row, whose slots the step kernel
    makes PAD (a graph of uniform rows: FlashInfer's prefill wrapper plans it with a fixed row
    count). ``widths`` are the per-batch table columns written per group: the longest row's pages
    (eager) or the full width; ``max_seq`` covers the padding rows' lengths too. ``on_device``
    (``[B]``, or None): 1 for rows whose cache length is on the device (``clens`` holds bounds).
    """
    b = idx.shape[0]
    pad_q = qlens if type(qlens) is int and qlens > 1 else 0  # new tokens of each padding row
    h[lay.idx : lay.idx + b] = idx
    h[lay.cache : lay.cache + b] = clens
    seq_h = h[lay.seq : lay.seq + padded]
    seq_h[:b] = seq
    if padded > b:
        h[lay.idx + b : lay.idx + padded] = config.max_num_reqs
        h[lay.cache + b : lay.cache + padded] = 1
        seq_h[b:] = 1 + pad_q
        max_seq = max(max_seq, 1 + pad_q)
    qo = h[lay.qo_indptr : lay.qo_indptr + padded + 1]
    if type(qlens) is int:
        # Decode: qo_indptr and logits_indices depend only on (B, Bp, q); each host buffer
        # remembers what it holds.
        num_tokens = qlens * b
        shape = (b, padded, qlens)
        if memo[slot] != shape:
            np.multiply(rows[: padded + 1], qlens, out=qo)
            if not pad_q:
                qo[b + 1 :] = num_tokens
            np.subtract(qo[1 : b + 1], 1, out=h[lay.logits : lay.logits + b])
            memo[slot] = shape
    else:
        qo[0] = 0
        np.cumsum(qlens, out=qo[1 : b + 1])
        num_tokens = int(qo[b])
        np.subtract(qo[1 : b + 1], 1, out=h[lay.logits : lay.logits + b])
        memo[slot] = None
    widths = []
    for g, grp in enumerate(config.kv_groups):
        ps = grp.page_size
        indptr = h[lay.kv_indptr[g] : lay.kv_indptr[g] + padded + 1]
        indptr[0] = 0
        np.cumsum(pages[g], out=indptr[1 : b + 1])
        last = h[lay.last_page_len[g] : lay.last_page_len[g] + padded]
        if config.sharded(g):  # context parallelism: this rank's tokens, 0 in a row it holds none of
            local = local_len(seq, config.context_parallel)
            np.subtract(local, np.maximum(pages[g] - 1, 0) * ps, out=last[:b])
        elif ps == 1:
            last[:b] = 1
        else:
            np.subtract(seq, (pages[g] - 1) * ps, out=last[:b])
        if padded > b:  # padding rows: the padding page, as often as 1 + pad_q tokens need
            n = -(-(1 + pad_q) // ps)
            np.multiply(rows[1 : padded - b + 1], n, out=indptr[b + 1 :])
            indptr[b + 1 :] += indptr[b]
            last[b:] = 1 + pad_q - (n - 1) * ps
        # Eager steps fill only as many per-batch table columns as the longest row needs; none
        # unless the configuration asks for the tables.
        if not config.batch_block_tables:
            widths.append(0)
        else:
            widths.append(config.max_pages_per_req(g) if graph else -(-max_seq // ps))
        h[lay.step_width[g]] = widths[g]
    pack_rows(h, lay, padded, num_writes, on_device)
    return num_tokens, tuple(widths), max_seq


def pack_rows(
    h: np.ndarray, lay: StagingLayout, padded: int, num_writes: int, on_device: np.ndarray | None = None
) -> None:
    """Writes the step kernel's packed rows ``[0, padded]`` from the fields already in ``h``
    (after the step's arrays), the count of staged block-table writes the step applies and the
    rows' on-device flags (``[B]`` or None): the numpy reference of the compiled path."""
    stride, n = lay.row_stride, padded
    rows = h[lay.rows : lay.rows + (n + 1) * stride].reshape(n + 1, stride)
    rows[:] = 0
    qo = h[lay.qo_indptr : lay.qo_indptr + n + 1]
    rows[:n, ROW_IDX] = h[lay.idx : lay.idx + n]
    rows[:, ROW_START] = qo
    rows[:n, ROW_END] = qo[1:]
    rows[n, ROW_END] = qo[n]
    rows[:n, ROW_CACHE] = h[lay.cache : lay.cache + n]
    rows[:n, ROW_SEQ] = h[lay.seq : lay.seq + n]
    rows[:n, ROW_LOGITS] = h[lay.logits : lay.logits + n]
    rows[:, ROW_COUNT] = num_writes
    for g in range(len(lay.kv_indptr)):
        at = ROW_GROUP + ROW_PER_GROUP * g
        kv = h[lay.kv_indptr[g] : lay.kv_indptr[g] + n + 1]
        rows[:, at + ROW_KV_LO] = kv
        rows[:n, at + ROW_KV_HI] = kv[1:]
        rows[n, at + ROW_KV_HI] = kv[n]
        rows[:n, at + ROW_LAST] = h[lay.last_page_len[g] : lay.last_page_len[g] + n]
        rows[:, at + ROW_SWIDTH] = h[lay.step_width[g]]
    if on_device is not None:
        rows[: on_device.shape[0], lay.row_device_len] = on_device


# Staged writes beyond this many are bucketed by table row (sorted, with their CSR), so that each
# row's program reads only its own: below it, every program scanning them all costs less on the
# GPU than the sort costs on the host.
BUCKET_MIN_WRITES = 64


def packed_write_count(n: int) -> int:
    """The packed rows' count field for ``n`` staged writes: ``n``, or ``-1 - n`` when they are
    bucketed by row (more than :data:`BUCKET_MIN_WRITES`)."""
    return -1 - n if n > BUCKET_MIN_WRITES else n


def stage_writes(
    h: np.ndarray, lay: StagingLayout, offsets: np.ndarray, values: np.ndarray, rows: np.ndarray | None = None
) -> None:
    """Writes the staged block-table writes (``offsets`` into the tables, ``values``; at most
    ``lay.max_writes``) and their count into host staging buffer ``h``. With ``rows`` (the table
    row of each write, :meth:`~batchmeta.block_tables.BlockTables.rows_of`) they are bucketed:
    sorted by row, with their CSR over the rows at ``lay.write_rows`` (the step's packed rows
    then hold the count as ``-1 - n``: :func:`packed_write_count`)."""
    n = len(offsets)
    h[lay.num_writes] = n
    if n:
        if rows is not None:
            order = np.argsort(rows, kind="stable")
            offsets, values = offsets[order], values[order]
            csr = h[lay.write_rows : lay.write_rows + lay.num_table_rows + 1]
            csr[0] = 0
            np.cumsum(np.bincount(rows, minlength=lay.num_table_rows), out=csr[1:])
        pairs = h[lay.pairs : lay.pairs + 2 * n]
        pairs[0::2] = offsets
        pairs[1::2] = values


def stage_prompts(
    h: np.ndarray, lay: StagingLayout, spans: list[tuple[int, int, np.ndarray]], padded: int, num_groups: int
) -> None:
    """Writes the staged prompt spans (``(request slot, first position, tokens)``, at most
    ``lay.max_chunks`` of them and ``lay.max_prompt_tokens`` tokens in all) into host staging buffer
    ``h``, and their count into the packed rows ``[0, padded]`` (after :func:`pack_rows`)."""
    n = len(spans)
    if n:
        chunks = h[lay.chunks : lay.chunks + 4 * n].reshape(n, 4)
        at = 0
        for i, (req, first, tokens) in enumerate(spans):
            chunks[i] = (req, first, len(tokens), at)
            h[lay.prompt_tokens + at : lay.prompt_tokens + at + len(tokens)] = tokens
            at += len(tokens)
    stride = lay.row_stride
    field = lay.rows + row_chunks(num_groups)
    h[field : field + (padded + 1) * stride : stride] = n
