"""One launch for a step's device-side metadata, over a fixed buffer layout.

:class:`~batchmeta.metadata.BatchMetadata` keeps its per-step inputs and outputs in a few flat
buffers whose layout never changes. :class:`StepLayout` describes that layout, and
:func:`fill_step_metadata` computes, for every KV-cache group, in one launch:

- ``positions`` and the group's KV ``slot_mapping`` of every new token, with PAD tails;
- the group's ragged ``kv_indices`` (FlashInfer's paged layout);
- the group's per-step block table (each batch row's persistent row, 0 past the pages it holds).

Every offset, width and page size of the layout is a compile-time constant of the kernel: a launch
passes five base addresses and nothing else, so binding it once (:func:`bind_step_metadata`) leaves
a per-step launch of a few microseconds. The values that change per step (the rows, their lengths,
the indptrs, the per-step table width, the count of staged writes) are read from the staging
buffer's packed rows, one contiguous block per program (on CUDA the buffer may be pinned host
memory, read in place); the grid gives the padded row count and the column programs per row.

The general, separately callable ops (``compute_slot_mappings``, ``write_kv_indices``,
``gather_block_tables``) compute the same things for arbitrary tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch
import triton
import triton.language as tl

from batchmeta.context_parallel import ContextParallel, local_position, owner
from batchmeta.launch import cached_kernel
from batchmeta.ops._common import check_tensor, group_launches, use_triton
from batchmeta.ops.lora import LoraLayout, fill_lora_torch, lora_row_program, lora_tail_program
from batchmeta.ops.positions import _pad_tail

__all__ = [
    "StepLayout",
    "bind_scatter_pairs",
    "bind_step_metadata",
    "fill_step_metadata",
    "row_chunks",
    "row_device_len",
]

_BLOCK = 1024
_NUM_WARPS = 4
_COLS = 4096  # columns of a row per program: a row of 32K pages takes 8 programs (bandwidth, not latency)


# A step's packed rows: row b of ``[Bp + 1, row_stride]`` int32 holds everything program b reads,
# so it reads one contiguous block (one bus transaction when staging is pinned host memory, where
# eleven scattered 4-byte reads per program cost 5x the kernel). Per row: request slot, qo_indptr[b],
# qo_indptr[b + 1], cache_len, seq_len, logits index, num_writes (-1 - num_writes: bucketed by row,
# see StepLayout.write_rows), then per group g at
# ROW_GROUP + ROW_PER_GROUP * g: kv_indptr[b], kv_indptr[b + 1], last page length, step width.
# After the groups: the number of staged prompt spans (:func:`row_chunks`), then 1 where the row's
# cache length is on the device (:func:`row_device_len`: speculative acceptance left it there; the
# other fields then hold host upper bounds, and ``batchmeta.ops.speculative.resolve_rows`` rewrites
# them before the launch). Row Bp (the tail program's): qo_indptr[Bp] as start and end,
# kv_indptr[Bp] as both kv fields, num_writes and the step widths; its other fields and every
# row's padding are 0.
ROW_IDX, ROW_START, ROW_END, ROW_CACHE, ROW_SEQ, ROW_LOGITS, ROW_COUNT, ROW_GROUP = range(8)
ROW_KV_LO, ROW_KV_HI, ROW_LAST, ROW_SWIDTH = range(4)
ROW_PER_GROUP = 4


# The same, as constants the kernel may read (Triton kernels read only constexpr globals).
_F_IDX, _F_START, _F_END, _F_CACHE, _F_SEQ, _F_LOGITS, _F_COUNT = (tl.constexpr(f) for f in range(7))
_F_KV_LO, _F_KV_HI, _F_LAST, _F_SWIDTH = (tl.constexpr(f) for f in range(4))


def row_stride(num_groups: int) -> int:
    """int32 elements of a packed row for ``num_groups`` groups: a multiple of 16 (64 bytes)."""
    return -(-(row_device_len(num_groups) + 1) // 16) * 16


def row_chunks(num_groups: int) -> int:
    """Field of a packed row holding the number of staged prompt spans (token history), after the
    groups' fields."""
    return ROW_GROUP + ROW_PER_GROUP * num_groups


def row_device_len(num_groups: int) -> int:
    """Field of a packed row that is 1 where the row's cache length is on the device (its request
    slot's speculative acceptance ran there), else 0."""
    return row_chunks(num_groups) + 1


def _ints(value: object) -> tuple[int, ...]:
    return tuple(int(v) for v in value)  # type: ignore[union-attr]


@attrs.frozen(kw_only=True)
class StepLayout:
    """Element offsets of every field :func:`fill_step_metadata` reads and writes.

    The Triton kernel reads a step's values from the packed ``rows`` ``[Bp + 1, row_stride]`` (the
    format is described at ``ROW_IDX`` above; :func:`batchmeta.staging.pack_rows` writes it from the
    fields) and the pairs; the torch implementation reads the fields. They must agree.

    ``staging`` (int32, written on the host each step): ``idx`` ``[Bp]`` request slot of each row,
    ``qo_indptr`` ``[Bp + 1]``, ``cache_lens`` ``[Bp]``, ``seq_lens`` and ``logits`` ``[Bp]``
    (only copied to the mirror), per group ``kv_indptr`` ``[Bp + 1]``, ``last_page_len`` ``[Bp]``
    (only copied) and ``step_width`` ``[1]`` (columns of the per-step table to write,
    ``<= width``), and the staged table writes: their count ``num_writes`` ``[1]`` and
    ``(offset, value)`` ``pairs`` ``[2 * max_writes]`` (offsets into ``tables``, unique). With
    ``write_rows >= 0`` they may come bucketed: sorted by the table row they write, with
    ``write_rows`` ``[num_table_rows + 1]`` their CSR over the rows (pairs ``[w[r], w[r + 1])``
    write row ``r``, the table's columns or its held count; writes to no row after
    ``w[num_table_rows]``), which the packed rows' count field says by holding ``-1 - num_writes``:
    each row's program then applies its own writes only, instead of scanning every one. The
    ``mirror`` buffer, when given, has the same layout: the launch copies the step's rows of
    ``idx``, ``qo_indptr``, ``seq_lens``, ``cache_lens``, ``logits``, ``kv_indptr`` and
    ``last_page_len`` into it.

    ``tables`` (int32, persistent): per group ``table`` ``[num_table_rows, width]`` and ``held``
    ``[num_table_rows]`` (pages each request slot holds).

    ``out32`` (int32): per group ``kv_indices`` ``[kv_capacity]`` and ``step_table``
    ``[>= Bp, width]``.

    ``out64`` (int64): ``positions`` ``[token_capacity]`` and per group ``slot_mapping``
    ``[token_capacity]``; with a token history, ``input_ids`` ``[token_capacity]``.

    Token history (``input_ids >= 0``): a ``history`` tensor ``[num_table_rows - 1, history_len]``
    int32 or int64, staged prompt spans in ``staging``: ``chunks`` ``[4 * n]`` (request slot, first
    position, count, offset into ``prompt_tokens``) with ``n`` in every packed row's
    :func:`row_chunks` field, and their tokens ``prompt_tokens`` (int32).

    Context parallelism (:mod:`batchmeta.context_parallel`): group ``g`` is sharded over
    ``cp_size[g]`` ranks (1, or ``cp_size`` empty: not sharded), this one ``cp_rank``, ``cp_interleave``
    tokens at a time: a token is given its slot only on the rank that owns its position, at its local
    position (PAD elsewhere); the staged ``kv_indptr`` / ``last_page_len`` are the rank's own.

    Per-group tuples have one entry per group.
    """

    page_size: tuple[int, ...] = attrs.field(converter=_ints)
    width: tuple[int, ...] = attrs.field(converter=_ints)
    num_table_rows: int
    idx: int
    qo_indptr: int
    cache_lens: int
    seq_lens: int
    logits: int
    kv_indptr: tuple[int, ...] = attrs.field(converter=_ints)
    last_page_len: tuple[int, ...] = attrs.field(converter=_ints)
    step_width: tuple[int, ...] = attrs.field(converter=_ints)
    rows: int
    row_stride: int
    num_writes: int
    pairs: int
    max_writes: int
    write_rows: int = -1
    table: tuple[int, ...] = attrs.field(converter=_ints)
    held: tuple[int, ...] = attrs.field(converter=_ints)
    kv_indices: tuple[int, ...] = attrs.field(converter=_ints)
    kv_capacity: tuple[int, ...] = attrs.field(converter=_ints)
    step_table: tuple[int, ...] = attrs.field(converter=_ints)
    positions: int
    slot_mapping: tuple[int, ...] = attrs.field(converter=_ints)
    token_capacity: int
    input_ids: int = -1
    chunks: int = 0
    max_chunks: int = 0
    prompt_tokens: int = 0
    max_prompt_tokens: int = 0
    history_len: int = 0
    cp_size: tuple[int, ...] = attrs.field(default=(), converter=_ints)
    cp_rank: int = 0
    cp_interleave: int = 1

    def group_cp_size(self, g: int) -> int:
        """Ranks group ``g``'s KV is sharded over (1: not sharded; ``cp_size`` empty: none is)."""
        return self.cp_size[g] if self.cp_size else 1

    @property
    def has_history(self) -> bool:
        return self.input_ids >= 0

    @property
    def num_groups(self) -> int:
        return len(self.page_size)

    def check(
        self,
        staging: torch.Tensor,
        tables: torch.Tensor,
        out32: torch.Tensor,
        out64: torch.Tensor,
        max_rows: int,
        mirror: torch.Tensor | None = None,
    ) -> None:
        """Raises ``ValueError`` unless every field of ``max_rows`` rows fits its buffer.

        ``staging`` is on the device of ``tables``, or pinned host memory when that is CUDA (the
        kernel reads it through its device address); ``mirror`` (if given) on that device.
        """
        check_tensor("staging", staging, dtypes=(torch.int32,), ndim=1, contiguous=True)
        device = tables.device
        if staging.device != device and not (device.type == "cuda" and staging.is_pinned()):
            raise ValueError(
                f"staging: expected a tensor on {device} or pinned host memory, got one on "
                f"{staging.device}{'' if staging.device.type != 'cpu' else ' (not pinned)'}"
            )
        check_tensor("tables", tables, dtypes=(torch.int32,), ndim=1, contiguous=True)
        if mirror is not None:
            check_tensor("mirror", mirror, dtypes=(torch.int32,), ndim=1, device=device, contiguous=True)
            if mirror.numel() < staging.numel():
                raise ValueError(
                    f"mirror: expected at least {staging.numel()} elements (staging's), got {mirror.numel()}"
                )
        check_tensor("out32", out32, dtypes=(torch.int32,), ndim=1, device=device, contiguous=True)
        check_tensor("out64", out64, dtypes=(torch.int64,), ndim=1, device=device, contiguous=True)
        g = self.num_groups
        fields = (
            "width",
            "kv_indptr",
            "last_page_len",
            "step_width",
            "table",
            "held",
            "kv_indices",
            "kv_capacity",
            "step_table",
            "slot_mapping",
        )
        if self.cp_size and len(self.cp_size) != g:
            raise ValueError(f"layout.cp_size: expected {g} entries (one per group) or none, got {len(self.cp_size)}")
        for name in fields:
            if len(getattr(self, name)) != g:
                raise ValueError(f"layout.{name}: expected {g} entries (one per group), got {len(getattr(self, name))}")
        r, rows = max_rows, self.num_table_rows
        ends = {
            "staging": (
                staging,
                [
                    self.idx + r,
                    self.qo_indptr + r + 1,
                    self.cache_lens + r,
                    self.seq_lens + r,
                    self.logits + r,
                    self.num_writes + 1,
                    self.pairs + 2 * self.max_writes,
                    self.rows + (r + 1) * self.row_stride,
                ]
                + [o + r + 1 for o in self.kv_indptr]
                + [o + r for o in self.last_page_len]
                + [o + 1 for o in self.step_width],
            ),
            "tables": (
                tables,
                [t + rows * w for t, w in zip(self.table, self.width, strict=True)] + [h + rows for h in self.held],
            ),
            "out32": (
                out32,
                [k + c for k, c in zip(self.kv_indices, self.kv_capacity, strict=True)]
                + [s + r * w for s, w in zip(self.step_table, self.width, strict=True)],
            ),
            "out64": (
                out64,
                [self.positions + self.token_capacity]
                + [s + self.token_capacity for s in self.slot_mapping]
                + ([self.input_ids + self.token_capacity] if self.has_history else []),
            ),
        }
        if self.has_history:
            ends["staging"][1].extend([self.chunks + 4 * self.max_chunks, self.prompt_tokens + self.max_prompt_tokens])
        for name, (buf, stops) in ends.items():
            if max(stops) > buf.numel():
                raise ValueError(f"{name}: the layout needs {max(stops)} elements, got {buf.numel()}")


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _num_writes(count):
    """The staged writes' count from a packed row's count field (``-1 - n`` when bucketed by row)."""
    return tl.where(count < 0, -1 - count, count)


@triton.jit
def _apply_writes(staging_ptr, tables_ptr, lo, hi, extra, num_writes, PAIRS: tl.constexpr, BLOCK: tl.constexpr):
    """Applies the first ``num_writes`` staged writes whose offsets fall in ``[lo, hi)`` or equal ``extra``."""
    _apply_write_range(staging_ptr, tables_ptr, lo, hi, extra, num_writes * 0, num_writes, PAIRS, BLOCK)


@triton.jit
def _apply_write_range(staging_ptr, tables_ptr, lo, hi, extra, first, end, PAIRS: tl.constexpr, BLOCK: tl.constexpr):
    """Applies staged writes ``[first, end)`` whose offsets fall in ``[lo, hi)`` or equal ``extra``."""
    for off in range(first, end, BLOCK):
        i = off + tl.arange(0, BLOCK)
        m = i < end
        dst = tl.load(staging_ptr + PAIRS + 2 * i, mask=m, other=-1).to(tl.int64)
        v = tl.load(staging_ptr + PAIRS + 2 * i + 1, mask=m)
        tl.store(tables_ptr + dst, v, mask=m & (((dst >= lo) & (dst < hi)) | (dst == extra)))


@triton.jit
def _apply_prompts(
    staging_ptr,
    hist_ptr,
    num_chunks,
    CHUNKS: tl.constexpr,
    PROMPT: tl.constexpr,
    HLEN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Writes every staged prompt span into the token history (the tail program: rows read spans
    of this step from staging, never from the history this writes)."""
    for c in range(0, num_chunks):
        at = staging_ptr + CHUNKS + 4 * c
        req = tl.load(at).to(tl.int64)
        first = tl.load(at + 1).to(tl.int64)
        count = tl.load(at + 2)
        src = tl.load(at + 3).to(tl.int64)
        for off in range(0, count, BLOCK):
            j = off + tl.arange(0, BLOCK)
            m = j < count
            tok = tl.load(staging_ptr + PROMPT + src + j, mask=m, other=0)
            tl.store(hist_ptr + req * HLEN + first + j, tok.to(hist_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gather_input_ids(
    staging_ptr,
    hist_ptr,
    out64_ptr,
    req,
    start,
    n,
    cache_len,
    num_chunks,
    CHUNKS: tl.constexpr,
    PROMPT: tl.constexpr,
    HLEN: tl.constexpr,
    IDS: tl.constexpr,
    TOKEN_CAP: tl.constexpr,
    PAD_ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``input_ids[t]`` of the row's tokens: the staged prompt span of its request where one covers
    the position, else the history (written by earlier launches); 0 for a padding row."""
    first = req * 0
    count = req * 0
    src = req * 0
    for off in range(0, num_chunks, BLOCK):  # this request's span, if staged (at most one)
        c = off + tl.arange(0, BLOCK)
        m = c < num_chunks
        hit = m & (tl.load(staging_ptr + CHUNKS + 4 * c, mask=m, other=-1).to(tl.int64) == req)
        first += tl.sum(tl.where(hit, tl.load(staging_ptr + CHUNKS + 4 * c + 1, mask=hit, other=0), 0)).to(tl.int64)
        count += tl.sum(tl.where(hit, tl.load(staging_ptr + CHUNKS + 4 * c + 2, mask=hit, other=0), 0)).to(tl.int64)
        src += tl.sum(tl.where(hit, tl.load(staging_ptr + CHUNKS + 4 * c + 3, mask=hit, other=0), 0)).to(tl.int64)
    for off in range(0, n, BLOCK):
        j = off + tl.arange(0, BLOCK)
        t = start + j
        m = (j < n) & (t < TOKEN_CAP)
        pos = cache_len + j
        staged = (pos >= first) & (pos < first + count)
        outside = (pos < first) | (pos >= first + count)
        from_span = tl.load(staging_ptr + PROMPT + src + pos - first, mask=m & staged, other=0).to(tl.int64)
        # A padding row (the reserved slot past the history's rows) reads nothing: its ids are 0.
        row_ok = (pos * 0 + req) < PAD_ROW
        from_hist = tl.load(hist_ptr + req * HLEN + pos, mask=m & outside & row_ok & (pos < HLEN), other=0).to(tl.int64)
        tl.store(out64_ptr + IDS + t, tl.where(staged, from_span, from_hist), mask=m)


@triton.jit
def _field(v, ar, F: tl.constexpr):
    """Element ``F`` of a packed row held in registers."""
    return tl.sum(tl.where(ar == F, v, 0), axis=0)


@triton.jit
def _group_row(
    staging_ptr,
    tables_ptr,
    out32_ptr,
    out64_ptr,
    b,
    req,
    start,
    n,
    cache_len,
    v,
    ar,
    TOKEN_CAP: tl.constexpr,
    BLOCK: tl.constexpr,
    PAIRS: tl.constexpr,
    WROWS: tl.constexpr,
    PS: tl.constexpr,
    W: tl.constexpr,
    TAB: tl.constexpr,
    HELD: tl.constexpr,
    INDPTR: tl.constexpr,
    RF: tl.constexpr,
    KV: tl.constexpr,
    KV_CAP: tl.constexpr,
    STEP: tl.constexpr,
    SLOTS: tl.constexpr,
    LAST: tl.constexpr,
    mirror_ptr,
    MIRROR: tl.constexpr,
    ch,
    COLS: tl.constexpr,
    PAD_ROW: tl.constexpr,
    CPN: tl.constexpr,
    CPR: tl.constexpr,
    CPI: tl.constexpr,
):
    # Program ``ch`` of the row writes its columns [ch * COLS, (ch + 1) * COLS); program 0 also its
    # slots and mirror fields. ``v`` is the row's packed staging (fields of this group from ``RF``).
    lo32 = _field(v, ar, RF + _F_KV_LO)
    hi = _field(v, ar, RF + _F_KV_HI).to(tl.int64)
    width = _field(v, ar, RF + _F_SWIDTH).to(tl.int64)
    count = _field(v, ar, _F_COUNT)
    first = count * 0
    end = _num_writes(count)
    if WROWS >= 0:
        # Bucketed by row: this row's own writes only (two reads instead of every pair, which on
        # pinned staging all cross the bus, once per row program).
        bucketed = count < 0
        first = tl.load(staging_ptr + WROWS + req, mask=bucketed, other=0)
        end = tl.where(bucketed, tl.load(staging_ptr + WROWS + req + 1, mask=bucketed, other=0), end)
    if MIRROR:
        if ch == 0:
            tl.store(mirror_ptr + INDPTR + b, lo32)
            tl.store(mirror_ptr + LAST + b, _field(v, ar, RF + _F_LAST))
    # This step's staged writes to the row (new pages, the held count) first, by this program: its
    # reads below then see them. The tail program applies every write (rows not in the batch too);
    # where several write, they write the same value.
    _apply_write_range(
        staging_ptr, tables_ptr, TAB + req * W, TAB + (req + 1) * W, HELD + req, first, end, PAIRS, BLOCK
    )
    tl.debug_barrier()
    row = tables_ptr + TAB + req * W
    # Slot ids in 64 bits: page * page_size passes 2^31 on large caches. The tokens of a padding
    # row (the reserved last table row) get PAD: it reads the padding page and never writes it.
    for off in range(0, tl.where(ch == 0, n, 0), BLOCK):
        j = off + tl.arange(0, BLOCK)
        t = start + j
        m = (j < n) & (t < TOKEN_CAP)
        pos = cache_len + j
        if CPN > 1:
            # Context parallelism: only the rank owning the position writes it, at its local position.
            mine = ((pos // CPI) % CPN) == CPR
            loc = (pos // (CPI * CPN)) * CPI + pos % CPI
            page = tl.load(row + loc // PS, mask=m & mine, other=0).to(tl.int64)
            tl.store(out64_ptr + SLOTS + t, tl.where((req < PAD_ROW) & mine, page * PS + loc % PS, -1), mask=m)
        else:  # common case
            page = tl.load(row + pos // PS, mask=m, other=0).to(tl.int64)
            tl.store(out64_ptr + SLOTS + t, tl.where(req < PAD_ROW, page * PS + pos % PS, -1), mask=m)
    # One pass over the row's columns feeds both the ragged kv_indices and the per-step table.
    lo = lo32.to(tl.int64)
    cnt = hi - lo
    held = tl.load(tables_ptr + HELD + req).to(tl.int64)
    step_row = out32_ptr + STEP + b.to(tl.int64) * W
    end = (ch + 1) * COLS  # this program's columns only: a grid too small for a row must show
    for off in range(ch * COLS, tl.minimum(tl.maximum(width, cnt), end), BLOCK):
        c = off + tl.arange(0, BLOCK)
        pages = tl.load(row + c, mask=(c < held) & (c < W) & (c < end), other=0)
        tl.store(step_row + c, pages, mask=(c < width) & (c < end))
        k = lo + c
        tl.store(out32_ptr + KV + k, pages, mask=(c < cnt) & (k < KV_CAP) & (c < end))


@triton.jit
def _step_kernel(
    staging_ptr,  # int32 [*]: rows, lengths, indptrs of this step (offsets below); pinned host memory on CUDA
    tables_ptr,  # int32 [*]: persistent block tables and pages held
    out32_ptr,  # int32 [*]: kv_indices, per-step block tables
    out64_ptr,  # int64 [*]: positions, slot mappings
    mirror_ptr,  # int32 [*]: device copy of the step's staging fields (same layout), when MIRROR
    hist_ptr,  # int32/int64 [R, HLEN]: the token history, when HIST
    rows_ptr,  # int32 [*]: the packed rows at ROWS: staging's, or the mirror's where resolve_rows rewrote them
    lora_ptr,  # int32 [*]: the multi-LoRA outputs (batchmeta.ops.lora.LoraLayout), when LORA
    IDX: tl.constexpr,
    QO_INDPTR: tl.constexpr,
    CACHE: tl.constexpr,
    SEQ: tl.constexpr,
    LOGITS: tl.constexpr,
    POS: tl.constexpr,
    TOKEN_CAP: tl.constexpr,
    COUNT: tl.constexpr,
    PAIRS: tl.constexpr,
    WROWS: tl.constexpr,
    TABLES_NUMEL: tl.constexpr,
    WRITE_POSITIONS: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    BLOCK: tl.constexpr,
    MIRROR: tl.constexpr,
    COLS: tl.constexpr,
    ROWS: tl.constexpr,
    STRIDE: tl.constexpr,
    PAD_ROW: tl.constexpr,
    MIRROR_ROWS: tl.constexpr,  # also copy the packed rows to the mirror (a draft round's first step)
    # Token history: on/off, the packed-row field of the span count, spans, their tokens, the
    # history's row length, input_ids in out64.
    HIST: tl.constexpr,
    HF: tl.constexpr,
    CHUNKS: tl.constexpr,
    PROMPT: tl.constexpr,
    HLEN: tl.constexpr,
    IDS: tl.constexpr,
    # Context parallelism: this rank and the interleave (each group's rank count is in its set).
    CPR: tl.constexpr,
    CPI: tl.constexpr,
    # Multi-LoRA (first launch only): on/off, the staged LoRA rows and segment block, their size, the
    # outputs' token capacity and rows (batchmeta.ops.lora.LoraLayout).
    LORA: tl.constexpr,
    LROWS: tl.constexpr,
    LSEGS: tl.constexpr,
    LSEG_BLOCK: tl.constexpr,
    LTOKEN_CAP: tl.constexpr,
    LMAX_ROWS: tl.constexpr,
    # Group argument set g: page size, table width, offsets of table, held, kv_indptr, its fields in
    # a packed row, kv_indices (and its capacity), step table, slot mapping, last page length, ranks
    # its KV is sharded over (1: not sharded).
    # Unused argument sets repeat the first.
    PS0: tl.constexpr,
    W0: tl.constexpr,
    TAB0: tl.constexpr,
    HELD0: tl.constexpr,
    INDPTR0: tl.constexpr,
    RF0: tl.constexpr,
    KV0: tl.constexpr,
    KVCAP0: tl.constexpr,
    STEP0: tl.constexpr,
    SLOTS0: tl.constexpr,
    LAST0: tl.constexpr,
    CPN0: tl.constexpr,
    PS1: tl.constexpr,
    W1: tl.constexpr,
    TAB1: tl.constexpr,
    HELD1: tl.constexpr,
    INDPTR1: tl.constexpr,
    RF1: tl.constexpr,
    KV1: tl.constexpr,
    KVCAP1: tl.constexpr,
    STEP1: tl.constexpr,
    SLOTS1: tl.constexpr,
    LAST1: tl.constexpr,
    CPN1: tl.constexpr,
    PS2: tl.constexpr,
    W2: tl.constexpr,
    TAB2: tl.constexpr,
    HELD2: tl.constexpr,
    INDPTR2: tl.constexpr,
    RF2: tl.constexpr,
    KV2: tl.constexpr,
    KVCAP2: tl.constexpr,
    STEP2: tl.constexpr,
    SLOTS2: tl.constexpr,
    LAST2: tl.constexpr,
    CPN2: tl.constexpr,
    PS3: tl.constexpr,
    W3: tl.constexpr,
    TAB3: tl.constexpr,
    HELD3: tl.constexpr,
    INDPTR3: tl.constexpr,
    RF3: tl.constexpr,
    KV3: tl.constexpr,
    KVCAP3: tl.constexpr,
    STEP3: tl.constexpr,
    SLOTS3: tl.constexpr,
    LAST3: tl.constexpr,
    CPN3: tl.constexpr,
):
    b = tl.program_id(0)
    g = tl.program_id(1)
    ch = tl.program_id(2)  # column chunk: long rows are split over several programs
    num_rows = tl.num_programs(0) - 1
    # Everything this program reads from staging, in one contiguous load (its packed row).
    ar = tl.arange(0, STRIDE)
    v = tl.load(rows_ptr + ROWS + b.to(tl.int64) * STRIDE + ar)
    if MIRROR_ROWS:
        if g == 0:
            if ch == 0:
                tl.store(mirror_ptr + ROWS + b.to(tl.int64) * STRIDE + ar, v)
    if b == num_rows and ch == 0:
        # The last program of each group fills every slot past the step's tokens with PAD (and
        # positions with 0), so a graph captured for more tokens writes nothing for its padding;
        # and copies the indptrs' last elements to the mirror.
        num_tokens32 = _field(v, ar, _F_START)
        num_tokens = num_tokens32.to(tl.int64)
        if g == 0:
            _pad_tail(out64_ptr + SLOTS0, num_tokens, TOKEN_CAP, -1, BLOCK)
            if MIRROR:
                tl.store(mirror_ptr + INDPTR0 + num_rows, _field(v, ar, RF0 + _F_KV_LO))
            if WRITE_POSITIONS:
                _pad_tail(out64_ptr + POS, num_tokens, TOKEN_CAP, 0, BLOCK)
                if MIRROR:
                    tl.store(mirror_ptr + QO_INDPTR + num_rows, num_tokens32)
                # Every staged write, including those to request slots not in this batch.
                num_writes = _num_writes(_field(v, ar, _F_COUNT))
                _apply_writes(staging_ptr, tables_ptr, 0, TABLES_NUMEL, 0, num_writes, PAIRS, BLOCK)
                if HIST:
                    _pad_tail(out64_ptr + IDS, num_tokens, TOKEN_CAP, 0, BLOCK)
                    _apply_prompts(staging_ptr, hist_ptr, _field(v, ar, HF), CHUNKS, PROMPT, HLEN, BLOCK)
                if LORA:
                    lora_tail_program(
                        staging_ptr, lora_ptr, num_rows, LROWS, LSEGS, LSEG_BLOCK, LTOKEN_CAP, LMAX_ROWS, BLOCK
                    )
        if NUM_GROUPS > 1:
            if g == 1:
                _pad_tail(out64_ptr + SLOTS1, num_tokens, TOKEN_CAP, -1, BLOCK)
                if MIRROR:
                    tl.store(mirror_ptr + INDPTR1 + num_rows, _field(v, ar, RF1 + _F_KV_LO))
        if NUM_GROUPS > 2:
            if g == 2:
                _pad_tail(out64_ptr + SLOTS2, num_tokens, TOKEN_CAP, -1, BLOCK)
                if MIRROR:
                    tl.store(mirror_ptr + INDPTR2 + num_rows, _field(v, ar, RF2 + _F_KV_LO))
        if NUM_GROUPS > 3:
            if g == 3:
                _pad_tail(out64_ptr + SLOTS3, num_tokens, TOKEN_CAP, -1, BLOCK)
                if MIRROR:
                    tl.store(mirror_ptr + INDPTR3 + num_rows, _field(v, ar, RF3 + _F_KV_LO))
    elif b < num_rows:
        req32 = _field(v, ar, _F_IDX)
        start32 = _field(v, ar, _F_START)
        cache32 = _field(v, ar, _F_CACHE)
        req = req32.to(tl.int64)
        start = start32.to(tl.int64)
        n = _field(v, ar, _F_END).to(tl.int64) - start
        cache_len = cache32.to(tl.int64)
        if g == 0:
            if WRITE_POSITIONS:
                if MIRROR:  # the row's fields that plan, attention and graphs read on the device
                    if ch == 0:
                        tl.store(mirror_ptr + IDX + b, req32)
                        tl.store(mirror_ptr + QO_INDPTR + b, start32)
                        tl.store(mirror_ptr + CACHE + b, cache32)
                        tl.store(mirror_ptr + SEQ + b, _field(v, ar, _F_SEQ))
                        tl.store(mirror_ptr + LOGITS + b, _field(v, ar, _F_LOGITS))
                for off in range(0, tl.where(ch == 0, n, 0), BLOCK):
                    j = off + tl.arange(0, BLOCK)
                    t = start + j
                    tl.store(out64_ptr + POS + t, cache_len + j, mask=(j < n) & (t < TOKEN_CAP))
                if HIST:
                    if ch == 0:
                        _gather_input_ids(
                            staging_ptr,
                            hist_ptr,
                            out64_ptr,
                            req,
                            start,
                            n,
                            cache_len,
                            _field(v, ar, HF),
                            CHUNKS,
                            PROMPT,
                            HLEN,
                            IDS,
                            TOKEN_CAP,
                            PAD_ROW,
                            BLOCK,
                        )
                if LORA:
                    if ch == 0:
                        lora_row_program(staging_ptr, lora_ptr, b, LROWS, LTOKEN_CAP, BLOCK)
            _group_row(
                staging_ptr,
                tables_ptr,
                out32_ptr,
                out64_ptr,
                b,
                req,
                start,
                n,
                cache_len,
                v,
                ar,
                TOKEN_CAP,
                BLOCK,
                PAIRS,
                WROWS,
                PS0,
                W0,
                TAB0,
                HELD0,
                INDPTR0,
                RF0,
                KV0,
                KVCAP0,
                STEP0,
                SLOTS0,
                LAST0,
                mirror_ptr,
                MIRROR,
                ch,
                COLS,
                PAD_ROW,
                CPN0,
                CPR,
                CPI,
            )
        if NUM_GROUPS > 1:
            if g == 1:
                _group_row(
                    staging_ptr,
                    tables_ptr,
                    out32_ptr,
                    out64_ptr,
                    b,
                    req,
                    start,
                    n,
                    cache_len,
                    v,
                    ar,
                    TOKEN_CAP,
                    BLOCK,
                    PAIRS,
                    WROWS,
                    PS1,
                    W1,
                    TAB1,
                    HELD1,
                    INDPTR1,
                    RF1,
                    KV1,
                    KVCAP1,
                    STEP1,
                    SLOTS1,
                    LAST1,
                    mirror_ptr,
                    MIRROR,
                    ch,
                    COLS,
                    PAD_ROW,
                    CPN1,
                    CPR,
                    CPI,
                )
        if NUM_GROUPS > 2:
            if g == 2:
                _group_row(
                    staging_ptr,
                    tables_ptr,
                    out32_ptr,
                    out64_ptr,
                    b,
                    req,
                    start,
                    n,
                    cache_len,
                    v,
                    ar,
                    TOKEN_CAP,
                    BLOCK,
                    PAIRS,
                    WROWS,
                    PS2,
                    W2,
                    TAB2,
                    HELD2,
                    INDPTR2,
                    RF2,
                    KV2,
                    KVCAP2,
                    STEP2,
                    SLOTS2,
                    LAST2,
                    mirror_ptr,
                    MIRROR,
                    ch,
                    COLS,
                    PAD_ROW,
                    CPN2,
                    CPR,
                    CPI,
                )
        if NUM_GROUPS > 3:
            if g == 3:
                _group_row(
                    staging_ptr,
                    tables_ptr,
                    out32_ptr,
                    out64_ptr,
                    b,
                    req,
                    start,
                    n,
                    cache_len,
                    v,
                    ar,
                    TOKEN_CAP,
                    BLOCK,
                    PAIRS,
                    WROWS,
                    PS3,
                    W3,
                    TAB3,
                    HELD3,
                    INDPTR3,
                    RF3,
                    KV3,
                    KVCAP3,
                    STEP3,
                    SLOTS3,
                    LAST3,
                    mirror_ptr,
                    MIRROR,
                    ch,
                    COLS,
                    PAD_ROW,
                    CPN3,
                    CPR,
                    CPI,
                )


_step = cached_kernel(_step_kernel)


def _num_chunks(layout: StepLayout, max_cols: int | None) -> int:
    """Column programs per row: enough for ``max_cols`` columns (default: the widest table)."""
    cols = max(layout.width) if max_cols is None else min(max_cols, max(layout.width))
    return max(1, -(-cols // _COLS))


def _launch_args(
    layout: StepLayout,
    staging,
    tables,
    out32,
    out64,
    mirror=None,
    history=None,
    rows=None,
    lora: LoraLayout | None = None,
    lora_out=None,
    mirror_rows: bool = False,
) -> list[tuple[int, tuple]]:
    """``(groups in launch, kernel arguments)`` per launch: up to four groups each. ``rows``: where the
    packed rows are read (default ``staging``); ``mirror_rows``: copied to ``mirror`` too. The first
    launch expands the LoRA rows (``lora``)."""
    launches = []
    lay = layout
    for n, arg_groups in group_launches(layout.num_groups):
        first = arg_groups[0] == 0
        args: list = [
            staging,
            tables,
            out32,
            out64,
            staging if mirror is None else mirror,
            out64 if history is None else history,
            staging if rows is None else rows,
            out32 if lora_out is None else lora_out,
            layout.idx,
            layout.qo_indptr,
            layout.cache_lens,
            layout.seq_lens,
            layout.logits,
            layout.positions,
            layout.token_capacity,
            layout.num_writes,
            layout.pairs,
            layout.write_rows,
            tables.numel(),
            first,
            n,
            _BLOCK,
            mirror is not None,
            _COLS,
            layout.rows,
            layout.row_stride,
            layout.num_table_rows - 1,
            mirror_rows,
            lay.has_history,
            row_chunks(lay.num_groups),
            lay.chunks,
            lay.prompt_tokens,
            lay.history_len,
            max(lay.input_ids, 0),
            lay.cp_rank,
            lay.cp_interleave,
        ]
        if lora is not None and first:
            args += [True, lora.rows, lora.segments, lora.segment_block, lora.token_capacity, lora.max_rows]
        else:
            args += [False, 0, 0, 1, 1, 1]
        for g in arg_groups:
            args += [
                layout.page_size[g],
                layout.width[g],
                layout.table[g],
                layout.held[g],
                layout.kv_indptr[g],
                ROW_GROUP + ROW_PER_GROUP * g,
                layout.kv_indices[g],
                layout.kv_capacity[g],
                layout.step_table[g],
                layout.slot_mapping[g],
                layout.last_page_len[g],
                layout.group_cp_size(g),
            ]
        launches.append((n, tuple(args)))
    return launches


# --------------------------------------------------------------------------------------------------
# Torch implementation (CPU fallback, oracle)
# --------------------------------------------------------------------------------------------------
def _apply_writes_torch(staging: torch.Tensor, dst: torch.Tensor, pairs_at: int, n: int) -> None:
    """``dst[offset] = value`` for the first ``n`` pairs at ``pairs_at``; offsets outside ``dst`` dropped."""
    pairs = staging[pairs_at : pairs_at + 2 * n].view(n, 2).long()
    keep = (pairs[:, 0] >= 0) & (pairs[:, 0] < dst.numel())
    dst[pairs[keep, 0]] = pairs[keep, 1].to(dst.dtype)


def _history_torch(
    lay: StepLayout, staging, history, out64, idx, row, pos, start: int, end: int, total: int, num_spans: int
) -> None:
    """Token history: input_ids of the step's tokens (from the staged spans or the history as it was),
    then every staged span written into the history."""
    cap = lay.token_capacity
    ids = out64[lay.input_ids : lay.input_ids + cap]
    spans = staging[lay.chunks : lay.chunks + 4 * num_spans].view(num_spans, 4).long().tolist()
    req = idx[row]
    got = torch.zeros_like(pos)
    real = (req < lay.num_table_rows - 1) & (pos < lay.history_len)
    got[real] = history[req[real], pos[real]].long()
    for r, first, count, src in spans:
        hit = (req == r) & (pos >= first) & (pos < first + count)
        got[hit] = staging[lay.prompt_tokens + src + pos[hit] - first].long()
    ids[start:end] = got[: end - start]
    ids[total:] = 0
    for r, first, count, src in spans:
        history[r, first : first + count] = staging[lay.prompt_tokens + src : lay.prompt_tokens + src + count].to(
            history.dtype
        )


def _rank_positions(lay: StepLayout, g: int, pos: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(owned, local)``: which positions this rank owns (None: all, group ``g`` not sharded) and where
    they lie in its share (:mod:`batchmeta.context_parallel`)."""
    n = lay.group_cp_size(g)
    if n == 1:
        return None, pos
    cp = ContextParallel(n, lay.cp_rank, interleave=lay.cp_interleave)
    return owner(pos, cp) == cp.rank, local_position(pos, cp)


def _fill_torch(
    layout: StepLayout,
    staging,
    tables,
    out32,
    out64,
    num_rows: int,
    mirror=None,
    history=None,
    rows=None,
    mirror_rows: bool = False,
) -> None:
    """The kernel's work in torch, reading the same packed rows (from ``rows``, default ``staging``)."""
    lay, dev = layout, tables.device
    staging = staging.to(dev)  # pinned host staging of a CUDA step: the reference path reads a copy
    src = staging if rows is None else rows.to(dev)
    at_rows = slice(lay.rows, lay.rows + (num_rows + 1) * lay.row_stride)
    packed = src[at_rows].view(num_rows + 1, lay.row_stride).long()
    if mirror_rows:
        mirror[at_rows] = src[at_rows]
    idx = packed[:num_rows, ROW_IDX]
    qo = packed[:, ROW_START]
    cache = packed[:num_rows, ROW_CACHE]
    per_group = [ROW_GROUP + ROW_PER_GROUP * g for g in range(lay.num_groups)]
    if mirror is not None:
        copied = [
            (lay.idx, idx),
            (lay.qo_indptr, qo),
            (lay.cache_lens, cache),
            (lay.seq_lens, packed[:num_rows, ROW_SEQ]),
            (lay.logits, packed[:num_rows, ROW_LOGITS]),
        ]
        copied += [(lay.kv_indptr[g], packed[:, at + ROW_KV_LO]) for g, at in enumerate(per_group)]
        copied += [(lay.last_page_len[g], packed[:num_rows, at + ROW_LAST]) for g, at in enumerate(per_group)]
        for at, values in copied:
            mirror[at : at + values.numel()] = values.to(mirror.dtype)
    count = int(packed[num_rows, ROW_COUNT])
    _apply_writes_torch(staging, tables, lay.pairs, -1 - count if count < 0 else count)
    cap = lay.token_capacity
    start, total = int(qo[0]), int(qo[-1])
    row = torch.repeat_interleave(torch.arange(num_rows, device=dev), qo[1:] - qo[:-1])
    pos = cache[row] + torch.arange(start, total, device=dev) - qo[:-1][row]
    end = min(total, cap)
    positions = out64[lay.positions : lay.positions + cap]
    positions[start:end] = pos[: end - start]
    positions[total:] = 0
    if lay.has_history:
        num_spans = int(packed[num_rows, row_chunks(lay.num_groups)])
        _history_torch(lay, staging, history, out64, idx, row, pos, start, end, total, num_spans)
    for g, at in enumerate(per_group):
        ps, w = lay.page_size[g], lay.width[g]
        table = tables[lay.table[g] : lay.table[g] + lay.num_table_rows * w].view(lay.num_table_rows, w)
        held = tables[lay.held[g] : lay.held[g] + lay.num_table_rows].long()[idx]
        slots = out64[lay.slot_mapping[g] : lay.slot_mapping[g] + cap]
        mine, loc = _rank_positions(lay, g, pos)
        page = table[idx[row], loc // ps].long() if pos.numel() else pos
        keep = idx[row] < lay.num_table_rows - 1  # padding rows: PAD
        slot = torch.where(keep if mine is None else keep & mine, page * ps + loc % ps, -1)
        slots[start:end] = slot[: end - start]
        slots[total:] = -1
        width = int(packed[num_rows, at + ROW_SWIDTH])
        cols = torch.arange(w, device=dev)
        table_rows = torch.where(cols[None, :] < held[:, None], table[idx], 0)
        step = out32[lay.step_table[g] : lay.step_table[g] + num_rows * w].view(num_rows, w)
        step[:, :width] = table_rows[:, :width]
        indptr = packed[:, at + ROW_KV_LO]
        ragged = table_rows[cols[None, :] < (indptr[1:] - indptr[:-1])[:, None]]
        lo = lay.kv_indices[g] + int(indptr[0])
        n = max(0, min(ragged.numel(), lay.kv_capacity[g] - int(indptr[0])))
        out32[lo : lo + n] = ragged[:n]


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------
def fill_step_metadata(
    layout: StepLayout,
    staging: torch.Tensor,
    tables: torch.Tensor,
    out32: torch.Tensor,
    out64: torch.Tensor,
    num_rows: int,
    *,
    mirror: torch.Tensor | None = None,
    max_cols: int | None = None,
    backend: str | None = None,
    history: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    lora: LoraLayout | None = None,
    lora_out: torch.Tensor | None = None,
    mirror_rows: bool = False,
) -> None:
    """Positions, slot mappings, kv_indices and per-step block tables of ``num_rows`` batch rows.

    For batch row ``b < num_rows`` (request slot ``r = idx[b]``), group ``g``, new token ``j`` at
    ``t = qo_indptr[b] + j``, position ``p = cache_lens[b] + j``:

    - ``positions[t] = p`` and ``slot_mapping_g[t] = table_g[r, p // ps_g] * ps_g + p % ps_g``
      (-1, PAD, for rows of the reserved padding slot ``r = num_table_rows - 1``); from
      ``qo_indptr[num_rows]`` to ``token_capacity``: positions 0, slots -1 (PAD);
    - ``kv_indices_g[kv_indptr_g[b] + c] = table_g[r, c]`` for ``c < kv_indptr_g[b+1] - kv_indptr_g[b]``;
    - ``step_table_g[b, c] = table_g[r, c]`` if ``c < held_g[r]`` else 0, for ``c < step_width_g``;

    after applying the staged writes ``tables[pairs[2i]] = pairs[2i + 1]`` for ``i < num_writes``
    (offsets outside ``tables`` dropped); and with ``mirror``, copies the ``num_rows`` rows of the
    staged fields into it (``qo_indptr`` and ``kv_indptr`` with their last element). With a token
    history (``layout.input_ids >= 0``, ``history`` given): ``input_ids[t]`` is the token at
    position ``p`` of request ``r`` (its staged span's where one covers ``p``, else
    ``history[r, p]``; 0 for padding rows and past the step's tokens), and every staged span is
    written into ``history``. Buffers as described by :class:`StepLayout` (checked). On CUDA
    ``staging`` may be pinned host memory: the kernel reads it in place (zero-copy), so it must not
    change until the launch has run.
    ``max_cols`` bounds the columns any row writes (``kv_indices`` pages, per-step table width) in
    every group; the launch sizes its column programs by it. Default: the widest table.
    The kernel reads every per-row value from the packed rows (``layout.rows``), in ``staging``
    or, when given, in ``rows`` (a device buffer of staging's layout, for rows
    :func:`batchmeta.ops.speculative.resolve_rows` rewrote from device lengths); ``mirror_rows``
    copies the ``num_rows + 1`` packed rows read into ``mirror`` too (where
    :func:`batchmeta.ops.draft.shift_rows` reads a draft round's first step).
    With ``lora`` (a :class:`~batchmeta.ops.lora.LoraLayout` over the same ``staging``) and
    ``lora_out``, the same launch also expands the staged multi-LoRA rows into ``lora_out``, as
    :func:`batchmeta.ops.lora.fill_lora_metadata` does.
    """
    layout.check(staging, tables, out32, out64, num_rows, mirror)
    _check_history(layout, history, tables.device)
    _check_lora(lora, lora_out, staging, num_rows)
    if mirror_rows and (mirror is None or rows is not None):
        raise ValueError("mirror_rows: copies the staged packed rows into mirror; give mirror, and no rows")
    if rows is not None:
        check_tensor("rows", rows, dtypes=(torch.int32,), ndim=1, device=tables.device, contiguous=True)
        if rows.numel() < layout.rows + (num_rows + 1) * layout.row_stride:
            raise ValueError(
                f"rows: expected at least {layout.rows + (num_rows + 1) * layout.row_stride} elements, "
                f"got {rows.numel()}"
            )
    if use_triton(backend, tables):
        chunks = _num_chunks(layout, max_cols)
        launches = _launch_args(
            layout, staging, tables, out32, out64, mirror, history, rows, lora, lora_out, mirror_rows
        )
        for n, args in launches:
            _step.launch((num_rows + 1, n, chunks), args, num_warps=_NUM_WARPS)
        return
    _fill_torch(layout, staging, tables, out32, out64, num_rows, mirror, history, rows, mirror_rows)
    if lora is not None:
        fill_lora_torch(lora, staging, lora_out, num_rows)  # type: ignore[arg-type]


def _check_lora(lora: LoraLayout | None, lora_out: torch.Tensor | None, staging: torch.Tensor, num_rows: int) -> None:
    if (lora is None) != (lora_out is None):
        raise ValueError("lora, lora_out: give both (multi-LoRA expanded in the launch) or neither")
    if lora is not None:
        lora.check(staging, lora_out, num_rows)  # type: ignore[arg-type]


def _check_history(layout: StepLayout, history: torch.Tensor | None, device: torch.device) -> None:
    if not layout.has_history:
        if history is not None:
            raise ValueError("history: given, but the layout has no input_ids (layout.input_ids < 0)")
        return
    check_tensor("history", history, dtypes=(torch.int32, torch.int64), ndim=2, device=device, contiguous=True)
    want = (layout.num_table_rows - 1, layout.history_len)
    if tuple(history.shape) != want:  # type: ignore[union-attr]
        raise ValueError(f"history: expected shape {want}, got {tuple(history.shape)}")  # type: ignore[union-attr]


def bind_step_metadata(
    layout: StepLayout,
    staging: torch.Tensor,
    tables: torch.Tensor,
    out32: torch.Tensor,
    out64: torch.Tensor,
    *,
    max_rows: int,
    mirror: torch.Tensor | None = None,
    backend: str | None = None,
    history: torch.Tensor | None = None,
    lora: LoraLayout | None = None,
    lora_out: torch.Tensor | None = None,
) -> Callable[..., None]:
    """``fill(num_rows, max_cols=None, resolved=False, mirror_rows=False)``: :func:`fill_step_metadata`
    over these buffers, checked once here. ``resolved``: read the packed rows from ``mirror`` (where
    :func:`batchmeta.ops.speculative.resolve_rows` wrote them) instead of ``staging``;
    ``mirror_rows``: copy the staged packed rows into ``mirror`` (not with ``resolved``). With ``lora``
    and ``lora_out``, the launch also expands the staged multi-LoRA rows.

    On CUDA (``backend`` None or ``"triton"``) the launches are bound
    (:meth:`~batchmeta.launch.CachedKernel.bind`): a call costs the driver launch and little else.
    Otherwise it runs :func:`fill_step_metadata` with ``backend`` (the interpreter or torch).
    """
    layout.check(staging, tables, out32, out64, max_rows, mirror)
    _check_history(layout, history, tables.device)
    _check_lora(lora, lora_out, staging, max_rows)
    use_triton(backend, tables)  # raises for an unknown backend, or "triton" where it cannot run
    if tables.is_cuda and backend != "torch":

        def bind(resolved: bool, mirrored: bool) -> list:
            rows = mirror if resolved else None
            args = _launch_args(layout, staging, tables, out32, out64, mirror, history, rows, lora, lora_out, mirrored)
            return [(n, _step.bind(a, num_warps=_NUM_WARPS)) for n, a in args]

        # (resolved, mirror_rows) -> the bound launches; the mirrored ones (draft rounds) on first use
        bound = {(False, False): bind(False, False)}
        if mirror is not None:
            bound[True, False] = bind(True, False)

        def launches(resolved: bool, mirrored: bool) -> list:
            if (resolved, mirrored) not in bound:
                if mirror is None or (resolved and mirrored):
                    raise ValueError("mirror_rows: copies the staged packed rows into mirror; not with resolved")
                bound[resolved, mirrored] = bind(resolved, mirrored)
            return bound[resolved, mirrored]

        if len(bound[False, False]) == 1:
            ((n0, launch0),) = bound[False, False]
            launch_resolved = bound[True, False][0][1] if mirror is not None else None
            widest = max(layout.width)

            def fill(num_rows: int, max_cols: int | None = None, resolved: bool = False, mirror_rows: bool = False):
                # _num_chunks(layout, max_cols), written out: this runs every step.
                cols = widest if max_cols is None or max_cols > widest else max_cols
                grid = (num_rows + 1, n0, 1 if cols <= _COLS else -(-cols // _COLS))
                if resolved:  # rare: speculative acceptance on the device
                    launch_resolved(grid)  # type: ignore[misc]
                elif mirror_rows:  # a draft round's first step
                    launches(False, True)[0][1](grid)
                else:  # common case
                    launch0(grid)

            return fill

        def fill_many(num_rows: int, max_cols: int | None = None, resolved: bool = False, mirror_rows: bool = False):
            chunks = _num_chunks(layout, max_cols)
            for n, launch in launches(resolved, mirror_rows):
                launch((num_rows + 1, n, chunks))

        return fill_many

    def fill_host(num_rows: int, max_cols: int | None = None, resolved: bool = False, mirror_rows: bool = False):
        fill_step_metadata(
            layout,
            staging,
            tables,
            out32,
            out64,
            num_rows,
            mirror=mirror,
            max_cols=max_cols,
            backend=backend,
            history=history,
            rows=mirror if resolved else None,
            lora=lora,
            lora_out=lora_out,
            mirror_rows=mirror_rows,
        )

    return fill_host


# --------------------------------------------------------------------------------------------------
# Staged block-table writes: (offset, value) pairs at a fixed place in the staging buffer
# --------------------------------------------------------------------------------------------------
@triton.jit
def _scatter_pairs_kernel(
    staging_ptr,  # int32 [*]: num_writes at COUNT, then (offset, value) pairs from PAIRS
    dst_ptr,  # int32 [DST_NUMEL]
    COUNT: tl.constexpr,
    PAIRS: tl.constexpr,
    DST_NUMEL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program: only the rare writes beyond what one step's staging holds come here.
    _apply_writes(staging_ptr, dst_ptr, 0, DST_NUMEL, 0, tl.load(staging_ptr + COUNT), PAIRS, BLOCK)


_scatter_pairs = cached_kernel(_scatter_pairs_kernel)


def bind_scatter_pairs(
    staging: torch.Tensor, dst: torch.Tensor, *, count: int, pairs: int, max_writes: int, backend: str | None = None
) -> Callable[[int], None]:
    """``scatter(n)``: ``dst[staging[pairs + 2i]] = staging[pairs + 2i + 1]`` for
    ``i < staging[count]`` (``n`` is that count, known on the host; 0 launches nothing). Offsets
    outside ``dst`` are dropped; offsets must be unique (Triton gives writes no order).

    Parameters
    ----------
    staging:
        int32 device buffer holding the count and ``max_writes`` pairs at the given offsets.
    dst:
        ``[M]`` int32 contiguous destination (the persistent block tables).
    """
    check_tensor("staging", staging, dtypes=(torch.int32,), ndim=1, contiguous=True)
    check_tensor("dst", dst, dtypes=(torch.int32,), ndim=1, device=staging.device, contiguous=True)
    if max(count + 1, pairs + 2 * max_writes) > staging.numel():
        raise ValueError(
            f"staging: {max_writes} pairs at {pairs} need {pairs + 2 * max_writes} elements, got {staging.numel()}"
        )
    args = (staging, dst, count, pairs, dst.numel(), _BLOCK)
    on_triton = use_triton(backend, staging)
    if staging.is_cuda and on_triton:
        bound = _scatter_pairs.bind(args)

        def scatter(n: int) -> None:
            if n:
                bound((1,))

        return scatter

    def scatter_host(n: int) -> None:
        if not n:
            return
        if on_triton:
            _scatter_pairs.launch((1,), args)
        else:
            _apply_writes_torch(staging, dst, pairs, n)

    return scatter_host
