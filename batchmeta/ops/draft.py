"""Draft loops on the device: one draft step's metadata and drafted token carried to the next.

A draft round (:mod:`batchmeta.draft`) has its first step written by the host's launch; every later
step is advanced from it on the device, between the drafter's forwards, so a round replays under a
CUDA graph with no host work between its steps. Two ops, each a Triton kernel and a torch twin (the
CPU fallback and test oracle), both reading everything they need from the device:

- :func:`advance_draft` writes the token the drafter chose for every real row of step ``j``: into
  the token history at the row's position + 1 (where step ``j + 1``'s launch and the next verify
  step gather it), into step ``j + 1``'s ``input_ids`` when given, and into column ``j`` of the
  round's ``[R, K]`` draft tokens (row ``b``: the batch row).
- :func:`shift_rows` rewrites a step's packed rows (:mod:`batchmeta.ops.step`) ``shift`` positions
  further: every real row's cache and sequence length grow by ``shift``, its page counts, last-page
  lengths and ``kv_indptr`` follow, and the staged writes and prompt spans are dropped (the first
  step applied them). The step kernel then reads the result in place of staging (its ``resolved``
  launch) and writes the later step's positions, slots, ``kv_indices`` and ``input_ids``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from batchmeta.launch import cached_kernel
from batchmeta.ops._common import check_tensor, use_triton
from batchmeta.ops.speculative import packed_column, repage_group, repage_group_torch
from batchmeta.ops.step import (
    ROW_CACHE,
    ROW_COUNT,
    ROW_GROUP,
    ROW_IDX,
    ROW_PER_GROUP,
    ROW_SEQ,
    ROW_SWIDTH,
    row_chunks,
)

__all__ = ["advance_draft", "bind_shift_rows", "shift_rows"]

_BLOCK = 128
_ROW_BLOCK = 128


@triton.jit
def _advance_kernel(
    chosen_ptr,  # [>= num_rows] int32/int64: the token the drafter chose for each row of step j
    idx_ptr,  # int32 [num_rows]: request slot of each row (num_slots for a padding row)
    pos_ptr,  # int64 [num_rows]: position of each row's token in step j
    hist_ptr,  # int64 [num_slots, width]: token history, row stride hist_stride
    hist_stride,
    width,
    num_slots,
    next_ptr,  # int64 [num_rows]: input_ids of step j + 1 (when HAS_NEXT)
    drafts_ptr,  # int64 [>= num_rows, drafts_stride]: the round's draft tokens, by batch row
    drafts_stride,
    column,  # j: the drafts' column
    num_rows,
    HAS_NEXT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_grid = b < num_rows
    req = tl.load(idx_ptr + b, mask=in_grid, other=0).to(tl.int64)
    real = in_grid & (req >= 0) & (req < num_slots)  # a padding row (the reserved slot) writes nothing
    tok = tl.load(chosen_ptr + b, mask=real, other=0).to(tl.int64)
    pos = tl.load(pos_ptr + b, mask=real, other=0) + 1
    tl.store(hist_ptr + req * hist_stride + pos, tok.to(hist_ptr.dtype.element_ty), mask=real & (pos < width))
    if HAS_NEXT:
        tl.store(next_ptr + b, tok, mask=real)
    tl.store(drafts_ptr + b.to(tl.int64) * drafts_stride + column, tok, mask=real)


_advance = cached_kernel(_advance_kernel)


def _advance_torch(chosen, idx, positions, history, next_input_ids, drafts, column: int, num_rows: int) -> None:
    req = idx[:num_rows].long()
    real = (req >= 0) & (req < history.shape[0])
    tok = chosen[:num_rows].long()
    pos = positions[:num_rows] + 1
    keep = real & (pos < history.shape[1])
    history[req[keep], pos[keep]] = tok[keep].to(history.dtype)
    if next_input_ids is not None:
        next_input_ids[:num_rows][real] = tok[real].to(next_input_ids.dtype)
    drafts[:num_rows, column][real] = tok[real].to(drafts.dtype)


def advance_draft(
    chosen: torch.Tensor,
    idx_mapping: torch.Tensor,
    positions: torch.Tensor,
    history: torch.Tensor,
    next_input_ids: torch.Tensor | None,
    drafts: torch.Tensor,
    *,
    column: int,
    backend: str | None = None,
) -> None:
    """Writes the token each row of a single-token step chose where the next draft step and the
    next verify step read it.

    For row ``b < Bp`` with request slot ``r = idx_mapping[b] < R`` (padding rows, ``r = R``, write
    nothing) and position ``p = positions[b]``: ``history[r, p + 1] = chosen[b]`` (dropped past the
    history's width), ``next_input_ids[b] = chosen[b]`` and ``drafts[b, column] = chosen[b]``. One
    launch, nothing read on the host (the torch twin indexes with masks: on CUDA it syncs).

    Parameters
    ----------
    chosen:
        ``[>= Bp]`` int32 or int64 on ``history``'s device: the drafter's token for each row
        (greedy or sampled).
    idx_mapping:
        ``[Bp]`` int32: the step's request slot of each row.
    positions:
        ``[>= Bp]`` int64: the step's positions (one token per row: row ``b``'s is ``positions[b]``).
    history:
        ``[R, L]`` int32 or int64 token history, contiguous.
    next_input_ids:
        ``[>= Bp]`` int64: the next draft step's ``input_ids``, or None after the round's last step.
    drafts:
        ``[>= Bp, K]`` int64 with unit column stride: the round's draft tokens by batch row, column
        ``column < K``.
    """
    device = history.device
    check_tensor("history", history, dtypes=(torch.int32, torch.int64), ndim=2, device=device, contiguous=True)
    check_tensor("idx_mapping", idx_mapping, dtypes=(torch.int32,), ndim=1, device=device, contiguous=True)
    num_rows = idx_mapping.numel()
    check_tensor("chosen", chosen, dtypes=(torch.int32, torch.int64), ndim=1, device=device, contiguous=True)
    if chosen.numel() < num_rows:
        raise ValueError(f"chosen: expected at least {num_rows} tokens (one per row), got {chosen.numel()}")
    check_tensor("positions", positions, dtypes=(torch.int64,), ndim=1, device=device, min_numel=num_rows)
    if next_input_ids is not None:
        check_tensor("next_input_ids", next_input_ids, dtypes=(torch.int64,), ndim=1, device=device, min_numel=num_rows)
    check_tensor("drafts", drafts, dtypes=(torch.int64,), ndim=2, device=device)
    if drafts.shape[0] < num_rows or drafts.stride(1) != 1:
        raise ValueError(
            f"drafts: expected at least {num_rows} rows and unit column stride, got shape "
            f"{tuple(drafts.shape)} with strides {drafts.stride()}"
        )
    if type(column) is not int or not 0 <= column < drafts.shape[1]:
        raise ValueError(f"column: expected an int in [0, {drafts.shape[1]}), got {column!r}")
    if not num_rows:
        return
    if use_triton(backend, history):
        _advance.launch(
            (triton.cdiv(num_rows, _BLOCK),),
            (
                chosen,
                idx_mapping,
                positions,
                history,
                history.stride(0),
                history.shape[1],
                history.shape[0],
                positions if next_input_ids is None else next_input_ids,
                drafts,
                drafts.stride(0),
                column,
                num_rows,
                next_input_ids is not None,
                _BLOCK,
            ),
        )
        return
    _advance_torch(chosen, idx_mapping, positions, history, next_input_ids, drafts, column, num_rows)


# --------------------------------------------------------------------------------------------------
# shift_rows
# --------------------------------------------------------------------------------------------------
_F_IDX, _F_CACHE, _F_SEQ, _F_COUNT = (tl.constexpr(f) for f in (ROW_IDX, ROW_CACHE, ROW_SEQ, ROW_COUNT))
_F_GROUP, _F_PER_GROUP = tl.constexpr(ROW_GROUP), tl.constexpr(ROW_PER_GROUP)
_F_SWIDTH = tl.constexpr(ROW_SWIDTH)


@triton.jit
def _shift_rows_kernel(
    src_ptr,  # int32 [*]: packed rows [num_rows + 1, STRIDE] at ROWS (a device buffer)
    dst_ptr,  # int32 [*]: the same layout (another device buffer)
    page_sizes_ptr,  # int32 [NUM_GROUPS]
    shift,  # positions to move every real row by
    ROWS: tl.constexpr,
    STRIDE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    NUM_GROUPS_P2: tl.constexpr,
    PAD_ROW: tl.constexpr,  # a padding row's request slot (it keeps its fields)
    CHUNKS_F: tl.constexpr,  # the packed rows' prompt-span count field
    MAX_LEN: tl.constexpr,  # max_model_len: a group's full table width is ceil(MAX_LEN / page size)
    BLOCK: tl.constexpr,
):
    # num_rows + 1 programs (the row count without a runtime argument, so one bound launch serves
    # every batch size); program 0 does everything: kv_indptr is a prefix sum over every row.
    if tl.program_id(0) != 0:
        return
    num_rows = tl.num_programs(0) - 1
    ar = tl.arange(0, STRIDE)
    gar = tl.arange(0, NUM_GROUPS_P2)
    # First pass: the longest row after the shift (an eager step's tables are that many pages wide).
    max_seq = num_rows * 0
    for start in range(0, num_rows, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < num_rows
        seq = tl.load(src_ptr + ROWS + i.to(tl.int64) * STRIDE + _F_SEQ, mask=m, other=0)
        req = tl.load(src_ptr + ROWS + i.to(tl.int64) * STRIDE + _F_IDX, mask=m, other=PAD_ROW)
        max_seq = tl.maximum(max_seq, tl.max(tl.where(m, seq + tl.where(req != PAD_ROW, shift, 0), 0), 0))
    carry = tl.zeros([NUM_GROUPS_P2], dtype=tl.int32)
    for start in range(0, num_rows + 1, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i <= num_rows
        at = ROWS + i[:, None].to(tl.int64) * STRIDE + ar[None, :]
        tile = tl.load(src_ptr + at, mask=m[:, None], other=0)
        real = (i < num_rows) & (packed_column(tile, ar, _F_IDX) != PAD_ROW)
        moved = tl.where(real, shift, 0)
        seq = packed_column(tile, ar, _F_SEQ) + moved
        tile = tl.where(ar[None, :] == _F_CACHE, (packed_column(tile, ar, _F_CACHE) + moved)[:, None], tile)
        tile = tl.where(ar[None, :] == _F_SEQ, seq[:, None], tile)
        # The first step applied the staged block-table writes and prompt spans: none here.
        tile = tl.where((ar[None, :] == _F_COUNT) | (ar[None, :] == CHUNKS_F), 0, tile)
        for g in tl.static_range(NUM_GROUPS):
            # Padding rows keep their page count (the tail row has none); real rows hold seq tokens.
            ps = tl.load(page_sizes_ptr + g)
            f = _F_GROUP + _F_PER_GROUP * g
            tile, carry = repage_group(tile, ar, gar, carry, real, seq, m, ps, g, f)
            # Per-step table width: 0 (none) and a graph's full width stay; an eager step's is its
            # longest row's pages.
            width = packed_column(tile, ar, f + _F_SWIDTH)
            full = (MAX_LEN + ps - 1) // ps
            width = tl.where((width == 0) | (width == full), width, tl.minimum((max_seq + ps - 1) // ps, full))
            tile = tl.where(ar[None, :] == f + _F_SWIDTH, width[:, None], tile)
        tl.store(dst_ptr + at, tile, mask=m[:, None])


_shift_rows = cached_kernel(_shift_rows_kernel)


def _shift_rows_torch(src, dst, shift: int, page_sizes, num_rows, rows_at, stride, pad_row, max_len) -> None:
    n = (num_rows + 1) * stride
    packed = src[rows_at : rows_at + n].view(num_rows + 1, stride).long()
    real = packed[:, ROW_IDX] != pad_row
    real[num_rows] = False
    moved = real.long() * shift
    packed[:, ROW_CACHE] += moved
    packed[:, ROW_SEQ] += moved
    seq = packed[:, ROW_SEQ]
    max_seq = seq[:num_rows].max() if num_rows else seq.new_zeros(())
    packed[:, ROW_COUNT] = 0
    packed[:, row_chunks(len(page_sizes))] = 0
    for g, ps in enumerate(page_sizes):
        at = ROW_GROUP + ROW_PER_GROUP * g
        repage_group_torch(packed, real, seq, ps, at)
        full = -(-max_len // ps)
        width = packed[:, at + ROW_SWIDTH]
        keep = (width == 0) | (width == full)
        packed[:, at + ROW_SWIDTH] = torch.where(keep, width, ((max_seq + ps - 1) // ps).clamp(max=full))
    dst[rows_at : rows_at + n] = packed.flatten().to(dst.dtype)


def _shift_args(
    src, dst, sizes: torch.Tensor, shift: int, rows_at: int, stride: int, pad_row: int, max_len: int
) -> tuple:
    num_groups = sizes.numel()
    return (
        src,
        dst,
        sizes,
        shift,
        rows_at,
        stride,
        num_groups,
        triton.next_power_of_2(num_groups),
        pad_row,
        row_chunks(num_groups),
        max_len,
        _ROW_BLOCK,
    )


def shift_rows(
    src: torch.Tensor,
    dst: torch.Tensor,
    page_sizes: torch.Tensor,
    num_rows: int,
    *,
    shift: int,
    rows_at: int,
    stride: int,
    pad_row: int,
    max_len: int,
    backend: str | None = None,
) -> None:
    """Writes a step's packed rows ``shift`` positions further: the next draft steps' rows.

    For each row ``b < num_rows`` of ``src``'s packed rows ``[num_rows + 1, stride]`` (at element
    ``rows_at``) whose request slot is not ``pad_row``: cache length ``c + shift``, sequence length
    ``s + shift``, and per group ``g`` ``ceil((s + shift) / page_size_g)`` pages and last-page length
    ``s + shift - (pages - 1) * page_size_g``. Padding rows keep their counts; every row's
    ``kv_indptr`` fields (and the tail row's) become the prefix sum of the page counts; the staged
    write and prompt-span counts become 0; a per-step table width other than 0 and the group's full
    width (``ceil(max_len / page_size_g)``: a CUDA graph's) becomes the longest row's pages. The
    result goes to ``dst`` at the same offset.

    Parameters
    ----------
    src, dst:
        int32 device buffers of at least ``rows_at + (num_rows + 1) * stride`` elements (``src``
        holds packed rows whose lengths are exact: a launch's resolved rows).
    page_sizes:
        ``[num_groups]`` int32 on ``dst``'s device.
    shift:
        Positions to move each real row by, ``>= 0``.
    pad_row:
        The padding rows' request slot (``max_num_reqs``).
    max_len:
        ``max_model_len``.
    """
    check_tensor("src", src, dtypes=(torch.int32,), ndim=1, device=dst.device, contiguous=True)
    check_tensor("dst", dst, dtypes=(torch.int32,), ndim=1, device=dst.device, contiguous=True)
    check_tensor("page_sizes", page_sizes, dtypes=(torch.int32,), ndim=1, device=dst.device, contiguous=True)
    if type(shift) is not int or shift < 0:
        raise ValueError(f"shift: expected an int >= 0, got {shift!r}")
    need = rows_at + (num_rows + 1) * stride
    if min(src.numel(), dst.numel()) < need:
        raise ValueError(f"src, dst: expected at least {need} elements, got {src.numel()} and {dst.numel()}")
    if use_triton(backend, dst):
        args = _shift_args(src, dst, page_sizes, shift, rows_at, stride, pad_row, max_len)
        _shift_rows.launch((num_rows + 1,), args)
        return
    sizes = [int(p) for p in page_sizes.tolist()]
    _shift_rows_torch(src, dst, shift, sizes, num_rows, rows_at, stride, pad_row, max_len)


def bind_shift_rows(
    src: torch.Tensor,
    dst: torch.Tensor,
    page_sizes: tuple[int, ...],
    *,
    shift: int,
    rows_at: int,
    stride: int,
    pad_row: int,
    max_len: int,
    backend: str | None = None,
) -> Callable[[int], None]:
    """``shift(num_rows)``: :func:`shift_rows` over these buffers by a fixed ``shift`` (bound once
    on CUDA: a call costs the driver launch)."""
    sizes = torch.tensor(page_sizes, dtype=torch.int32, device=dst.device)
    if dst.is_cuda and use_triton(backend, dst):
        bound = _shift_rows.bind(_shift_args(src, dst, sizes, shift, rows_at, stride, pad_row, max_len))

        def shift_bound(num_rows: int) -> None:
            bound((num_rows + 1,))

        return shift_bound

    if use_triton(backend, dst):  # the interpreter

        def shift_interpreted(num_rows: int) -> None:
            kw = dict(shift=shift, rows_at=rows_at, stride=stride, pad_row=pad_row, max_len=max_len)
            shift_rows(src, dst, sizes, num_rows, backend=backend, **kw)

        return shift_interpreted

    sizes_host = [int(p) for p in page_sizes]  # the torch twin takes them from the host: no read of ``sizes``

    def shift_torch(num_rows: int) -> None:
        _shift_rows_torch(src, dst, shift, sizes_host, num_rows, rows_at, stride, pad_row, max_len)

    return shift_torch
