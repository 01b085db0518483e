"""Block tables: padded ↔ ragged conversion, FlashInfer ``kv_indices``, and per-step gathers.

Shapes use ``B`` for the batch rows of this step, ``R`` for the rows of a persistent per-request
table (``max_num_reqs``) and ``W`` for a table's width in pages. Page ids are int32, as FlashInfer
wants them.

Padded-table tail policy: every element of a padded output row past the row's valid pages holds
``pad_value`` (default 0). Page 0 is a real page, so a kernel that reads a padded entry reads valid
memory; attention must mask by sequence length as it always does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from batchmeta.launch import cached_kernel
from batchmeta.ops._common import (
    check_group_lists,
    check_host_index_range,
    check_index_vector,
    check_int,
    check_int32,
    check_tensor,
    check_unit_column_stride,
    group_launches,
    use_triton,
)

__all__ = [
    "block_tables_to_padded",
    "block_tables_to_ragged",
    "gather_block_tables",
    "scatter_int32",
    "write_kv_indices",
]

_BLOCK = 256
_I32 = (torch.int32,)


# --------------------------------------------------------------------------------------------------
# Ragged: kv_indices from a padded table
# --------------------------------------------------------------------------------------------------
@triton.jit
def _ragged_kernel(
    table_ptr,  # [R, W] int32, row stride table_stride, unit column stride
    table_stride,
    table_width,
    idx_mapping_ptr,  # [B] int32/int64, read when HAS_IDX_MAPPING
    kv_indptr_ptr,  # [B + 1]: read (FROM_SEQ_LENS=0) or written (FROM_SEQ_LENS=1)
    seq_lens_ptr,  # [B], read when FROM_SEQ_LENS
    page_size,
    out_ptr,  # [capacity] int32
    out_capacity,
    HAS_IDX_MAPPING: tl.constexpr,
    FROM_SEQ_LENS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    if HAS_IDX_MAPPING:
        row = tl.load(idx_mapping_ptr + b).to(tl.int64)
    else:
        row = b.to(tl.int64)
    if FROM_SEQ_LENS:
        # Each program sums the page counts of the rows before it: B^2 / BLOCK loads in all, which
        # for a batch of a few hundred rows is cheaper than a second launch for a prefix sum.
        start = tl.zeros([], dtype=tl.int64)
        for off in range(0, b, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            s = tl.load(seq_lens_ptr + cols, mask=cols < b, other=0).to(tl.int64)
            start += tl.sum((s + page_size - 1) // page_size, axis=0)
        n = (tl.load(seq_lens_ptr + b).to(tl.int64) + page_size - 1) // page_size
        tl.store(kv_indptr_ptr + b + 1, start + n)
        tl.store(kv_indptr_ptr + b, start, mask=b == 0)
    else:
        start = tl.load(kv_indptr_ptr + b).to(tl.int64)
        n = tl.load(kv_indptr_ptr + b + 1).to(tl.int64) - start
    src = table_ptr + row * table_stride
    for off in range(0, n, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        m = cols < n
        # A row claiming more pages than the table is wide reads -1 there, never past the row.
        v = tl.load(src + cols, mask=m & (cols < table_width), other=-1)
        dst = start + cols
        tl.store(out_ptr + dst, v, mask=m & (dst < out_capacity))


_ragged = cached_kernel(_ragged_kernel)


def _check_host_indptr(name: str, indptr: torch.Tensor, capacity: int, out_name: str, width: int) -> None:
    """Host-side checks of a CPU indptr: monotone, starts at 0, fits ``out``, rows fit the table."""
    if indptr.is_cuda or indptr.numel() == 0:
        return
    counts = indptr[1:] - indptr[:-1]
    if int(indptr[0]) != 0:
        raise ValueError(f"{name}: expected {name}[0] == 0, got {int(indptr[0])}")
    if counts.numel() and int(counts.min()) < 0:
        raise ValueError(f"{name}: expected a non-decreasing prefix sum, got a negative row count")
    if counts.numel() and int(counts.max()) > width:
        raise ValueError(f"{name}: a row has {int(counts.max())} pages but the table is {width} pages wide")
    if int(indptr[-1]) > capacity:
        raise ValueError(f"{out_name}: expected at least {int(indptr[-1])} elements, got {capacity}")


def _kv_indices_torch(table: torch.Tensor, rows: torch.Tensor, indptr: torch.Tensor, out: torch.Tensor) -> None:
    indptr = indptr.long()
    counts = indptr[1:] - indptr[:-1]
    total = int(indptr[-1]) if indptr.numel() else 0
    if total == 0:
        return
    row_of = torch.repeat_interleave(torch.arange(counts.numel(), device=out.device), counts, output_size=total)
    col = torch.arange(total, device=out.device) - indptr[:-1][row_of]
    width = table.shape[1]
    vals = table[rows.long()[row_of], col.clamp(max=max(width - 1, 0))] if width else col.new_full((total,), -1)
    vals = torch.where(col < width, vals, -1)
    n = min(total, out.numel())
    out[:n] = vals[:n].to(out.dtype)


def write_kv_indices(
    block_tables: torch.Tensor,
    kv_indptr: torch.Tensor,
    *,
    out: torch.Tensor,
    idx_mapping: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Writes FlashInfer's ``kv_indices``: the valid pages of each batch row, back to back.

    Row ``b`` copies ``block_tables[r, :n_b]`` to ``out[kv_indptr[b]:kv_indptr[b+1]]`` where
    ``r = idx_mapping[b]`` (or ``b`` when ``idx_mapping`` is None) and
    ``n_b = kv_indptr[b+1] - kv_indptr[b]``. Elements of ``out`` past ``kv_indptr[B]`` are untouched.

    Parameters
    ----------
    block_tables:
        ``[R, W]`` int32, unit column stride: the persistent per-request table (or a padded
        per-step one).
    kv_indptr:
        ``[B + 1]`` int32/int64 prefix sum of pages per row (``ceil(seq_len / page_size)``).
    out:
        ``[>= kv_indptr[B]]`` int32. Writes past its end are dropped (checked on the host when
        ``kv_indptr`` is a CPU tensor).
    idx_mapping:
        ``[B]`` int32/int64 request slot of each batch row, or None for the identity.
    backend:
        None (Triton on CUDA or under the interpreter, torch otherwise), ``"triton"`` or ``"torch"``.
    """
    check_tensor("block_tables", block_tables, dtypes=_I32, ndim=2)
    device = block_tables.device
    check_unit_column_stride("block_tables", block_tables)
    check_index_vector("kv_indptr", kv_indptr, device=device, min_numel=1)
    check_index_vector("out", out, device=device)
    check_tensor("out", out, dtypes=_I32)
    num_rows = kv_indptr.numel() - 1
    if idx_mapping is not None:
        check_index_vector("idx_mapping", idx_mapping, device=device)
        if idx_mapping.numel() != num_rows:
            raise ValueError(
                f"idx_mapping: expected {num_rows} elements (len(kv_indptr) - 1), got {idx_mapping.numel()}"
            )
        check_host_index_range("idx_mapping", idx_mapping, block_tables.shape[0])
    elif num_rows > block_tables.shape[0]:
        raise ValueError(f"kv_indptr: describes {num_rows} rows but block_tables has {block_tables.shape[0]}")
    _check_host_indptr("kv_indptr", kv_indptr, out.numel(), "out", block_tables.shape[1])

    on_triton = use_triton(backend, block_tables)
    if num_rows == 0:
        return out
    if on_triton:
        _ragged.launch(
            (num_rows,),
            (
                block_tables,
                block_tables.stride(0),
                block_tables.shape[1],
                idx_mapping if idx_mapping is not None else kv_indptr,
                kv_indptr,
                kv_indptr,
                1,
                out,
                out.numel(),
                idx_mapping is not None,
                False,
                _BLOCK,
            ),
        )
    else:
        rows = idx_mapping if idx_mapping is not None else torch.arange(num_rows, device=device)
        _kv_indices_torch(block_tables, rows, kv_indptr, out)
    return out


def block_tables_to_ragged(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    *,
    out: torch.Tensor,
    kv_indptr_out: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """Flattens the valid pages of each row of a padded table (page-aware), computing ``kv_indptr``.

    Row ``b`` contributes ``ceil(seq_lens[b] / page_size)`` entries (the fix for counting tokens
    instead of pages). The prefix sum is computed on the device inside the same launch, so no host
    sync is needed.

    Parameters
    ----------
    block_tables:
        ``[B', W]`` int32 with ``B' >= B``, unit column stride.
    seq_lens:
        ``[B]`` int32/int64 tokens per row (cached + new).
    page_size:
        Tokens per page, ``>= 1``.
    out:
        ``[>= sum ceil(seq_lens / page_size)]`` int32; elements past the total are untouched.
    kv_indptr_out:
        ``[>= B + 1]`` int32/int64; receives the prefix sum of pages (first element 0).

    Returns ``out``.
    """
    check_tensor("block_tables", block_tables, dtypes=_I32, ndim=2)
    device = block_tables.device
    check_unit_column_stride("block_tables", block_tables)
    check_index_vector("seq_lens", seq_lens, device=device)
    check_int("page_size", page_size, minimum=1)
    num_rows = seq_lens.numel()
    check_index_vector("kv_indptr_out", kv_indptr_out, device=device, min_numel=num_rows + 1)
    check_index_vector("out", out, device=device)
    check_tensor("out", out, dtypes=_I32)
    if num_rows > block_tables.shape[0]:
        raise ValueError(f"seq_lens: describes {num_rows} rows but block_tables has {block_tables.shape[0]}")
    if not seq_lens.is_cuda and num_rows:
        if int(seq_lens.min()) < 0:
            raise ValueError("seq_lens: expected non-negative lengths")
        pages = (seq_lens.long() + page_size - 1) // page_size
        if int(pages.max()) > block_tables.shape[1]:
            raise ValueError(
                f"seq_lens: a row needs {int(pages.max())} pages but block_tables is {block_tables.shape[1]} pages wide"
            )
        if int(pages.sum()) > out.numel():
            raise ValueError(f"out: expected at least {int(pages.sum())} elements, got {out.numel()}")

    on_triton = use_triton(backend, block_tables)
    if num_rows == 0:
        kv_indptr_out[:1].zero_()
        return out
    if on_triton:
        _ragged.launch(
            (num_rows,),
            (
                block_tables,
                block_tables.stride(0),
                block_tables.shape[1],
                seq_lens,  # idx_mapping unused
                kv_indptr_out,
                seq_lens,
                page_size,
                out,
                out.numel(),
                False,
                True,
                _BLOCK,
            ),
        )
    else:
        pages = (seq_lens.long() + page_size - 1) // page_size
        kv_indptr_out[0] = 0
        kv_indptr_out[1 : num_rows + 1] = torch.cumsum(pages, 0)
        _kv_indices_torch(block_tables, torch.arange(num_rows, device=device), kv_indptr_out[: num_rows + 1], out)
    return out


# --------------------------------------------------------------------------------------------------
# Padded: ragged back to a padded table
# --------------------------------------------------------------------------------------------------
@triton.jit
def _padded_kernel(
    ragged_ptr,  # [N] int32
    ragged_numel,
    cu_ptr,  # [B + 1] int32/int64
    out_ptr,  # [B, W] int32, row stride out_stride
    out_stride,
    out_width,
    pad_value,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b).to(tl.int64)
    n = tl.load(cu_ptr + b + 1).to(tl.int64) - start
    dst = out_ptr + b.to(tl.int64) * out_stride
    # The whole row is written, so the tail never keeps stale or uninitialised values.
    for off in range(0, out_width, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        m = cols < out_width
        src = start + cols
        v = tl.load(ragged_ptr + src, mask=m & (cols < n) & (src < ragged_numel), other=pad_value)
        tl.store(dst + cols, v, mask=m)


_padded = cached_kernel(_padded_kernel)


def block_tables_to_padded(
    block_tables_ragged: torch.Tensor,
    cu_pages: torch.Tensor,
    *,
    out: torch.Tensor,
    pad_value: int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """Inverse of the ragged flattening: row ``b`` of ``out`` gets ``ragged[cu[b]:cu[b+1]]``.

    Every element of each row past its valid entries is set to ``pad_value``; a row with more
    entries than ``out`` is wide keeps its first ``W`` (checked on the host when ``cu_pages`` is a
    CPU tensor).

    Parameters
    ----------
    block_tables_ragged:
        ``[N]`` int32 pages back to back.
    cu_pages:
        ``[B + 1]`` int32/int64 prefix sum of entries per row.
    out:
        ``[B, W]`` int32, unit column stride; every element of the first ``B`` rows is written.
    pad_value:
        Value of the tail of each row (default 0, a page that is always safe to read).
    """
    check_tensor("block_tables_ragged", block_tables_ragged, dtypes=_I32, ndim=1, contiguous=True)
    device = block_tables_ragged.device
    check_index_vector("cu_pages", cu_pages, device=device, min_numel=1)
    check_tensor("out", out, dtypes=_I32, ndim=2, device=device)
    check_unit_column_stride("out", out)
    check_int32("pad_value", pad_value)
    num_rows = cu_pages.numel() - 1
    if out.shape[0] < num_rows:
        raise ValueError(f"out: expected at least {num_rows} rows (len(cu_pages) - 1), got {out.shape[0]}")
    _check_host_indptr("cu_pages", cu_pages, block_tables_ragged.numel(), "block_tables_ragged", out.shape[1])
    on_triton = use_triton(backend, block_tables_ragged)
    if num_rows == 0 or out.shape[1] == 0:
        return out
    if on_triton:
        _padded.launch(
            (num_rows,),
            (
                block_tables_ragged,
                block_tables_ragged.numel(),
                cu_pages,
                out,
                out.stride(0),
                out.shape[1],
                pad_value,
                _BLOCK,
            ),
        )
    else:
        cu = cu_pages.long()
        cols = torch.arange(out.shape[1], device=device)
        src = cu[:-1, None] + cols[None, :]
        valid = (cols[None, :] < (cu[1:] - cu[:-1])[:, None]) & (src < block_tables_ragged.numel())
        vals = (
            block_tables_ragged[src.clamp(0, max(block_tables_ragged.numel() - 1, 0))]
            if block_tables_ragged.numel()
            else src.new_zeros(src.shape)
        )
        out[:num_rows] = torch.where(valid, vals, pad_value).to(out.dtype)
    return out


# --------------------------------------------------------------------------------------------------
# Gather: persistent per-request rows → per-step table, several KV-cache groups per launch
# --------------------------------------------------------------------------------------------------
@triton.jit
def _gather_row(
    src_ptr,
    src_stride,
    src_width,
    num_blocks_ptr,
    dst_ptr,
    dst_stride,
    dst_width,
    req,
    b,
    pad_value,
    BLOCK: tl.constexpr,
):
    n = tl.load(num_blocks_ptr + req)
    src = src_ptr + req * src_stride
    dst = dst_ptr + b.to(tl.int64) * dst_stride
    for off in range(0, dst_width, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        m = cols < dst_width
        v = tl.load(src + cols, mask=m & (cols < n) & (cols < src_width), other=pad_value)
        tl.store(dst + cols, v, mask=m)


@triton.jit
def _gather_kernel(
    idx_mapping_ptr,  # [B] int32/int64
    pad_value,
    # Group g: persistent table [R, W_g] (row stride, width), num_blocks [R], per-step table
    # [>= B, Wo_g] (row stride, width). Unused group argument sets repeat group 0 and are never read.
    s0,
    ss0,
    sw0,
    n0,
    d0,
    ds0,
    dw0,
    s1,
    ss1,
    sw1,
    n1,
    d1,
    ds1,
    dw1,
    s2,
    ss2,
    sw2,
    n2,
    d2,
    ds2,
    dw2,
    s3,
    ss3,
    sw3,
    n3,
    d3,
    ds3,
    dw3,
    NUM_GROUPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    g = tl.program_id(1)
    req = tl.load(idx_mapping_ptr + b).to(tl.int64)
    if g == 0:
        _gather_row(s0, ss0, sw0, n0, d0, ds0, dw0, req, b, pad_value, BLOCK)
    if NUM_GROUPS > 1:
        if g == 1:
            _gather_row(s1, ss1, sw1, n1, d1, ds1, dw1, req, b, pad_value, BLOCK)
    if NUM_GROUPS > 2:
        if g == 2:
            _gather_row(s2, ss2, sw2, n2, d2, ds2, dw2, req, b, pad_value, BLOCK)
    if NUM_GROUPS > 3:
        if g == 3:
            _gather_row(s3, ss3, sw3, n3, d3, ds3, dw3, req, b, pad_value, BLOCK)


_gather = cached_kernel(_gather_kernel)


def gather_block_tables(
    idx_mapping: torch.Tensor,
    block_tables: Sequence[torch.Tensor],
    num_blocks: Sequence[torch.Tensor],
    *,
    out: Sequence[torch.Tensor],
    pad_value: int = 0,
    backend: str | None = None,
) -> Sequence[torch.Tensor]:
    """Gathers each batch row's persistent block-table row into per-step tables, for every group.

    For group ``g`` and batch row ``b`` with ``r = idx_mapping[b]`` and ``n = num_blocks[g][r]``:
    ``out[g][b, j] = block_tables[g][r, j]`` for ``j < n`` and ``pad_value`` for ``n <= j < Wo_g``.
    Up to four groups share one launch.

    Parameters
    ----------
    idx_mapping:
        ``[B]`` int32/int64 request slot of each batch row.
    block_tables:
        Per group, ``[R, W_g]`` int32 persistent tables (unit column stride).
    num_blocks:
        Per group, ``[R]`` int32 valid pages of each request slot.
    out:
        Per group, ``[>= B, Wo_g]`` int32 per-step tables; the first ``B`` rows are fully written.
        Make ``Wo_g`` the step's widest row (a column slice of a larger buffer) to copy less.
    """
    check_index_vector("idx_mapping", idx_mapping, device=None)
    device = idx_mapping.device
    num_groups = check_group_lists("block_tables", block_tables, num_blocks=num_blocks, out=out)
    check_int32("pad_value", pad_value)
    num_rows = idx_mapping.numel()
    for g, (bt, nb, o) in enumerate(zip(block_tables, num_blocks, out, strict=True)):
        check_tensor(f"block_tables[{g}]", bt, dtypes=_I32, ndim=2, device=device)
        check_tensor(f"num_blocks[{g}]", nb, dtypes=_I32, ndim=1, device=device, contiguous=True)
        check_tensor(f"out[{g}]", o, dtypes=_I32, ndim=2, device=device)
        check_unit_column_stride(f"block_tables[{g}]", bt)
        check_unit_column_stride(f"out[{g}]", o)
        if nb.numel() < bt.shape[0]:
            raise ValueError(
                f"num_blocks[{g}]: expected {bt.shape[0]} elements (rows of block_tables[{g}]), got {nb.numel()}"
            )
        if o.shape[0] < num_rows:
            raise ValueError(f"out[{g}]: expected at least {num_rows} rows (len(idx_mapping)), got {o.shape[0]}")
        check_host_index_range("idx_mapping", idx_mapping, bt.shape[0])
        if not nb.is_cuda and nb.numel() and int(nb.max()) > bt.shape[1]:
            raise ValueError(
                f"num_blocks[{g}]: a request holds {int(nb.max())} pages but block_tables[{g}] is {bt.shape[1]} wide"
            )
    on_triton = use_triton(backend, idx_mapping)
    if num_rows == 0:
        return out
    if on_triton:
        for n, arg_groups in group_launches(num_groups):
            args: list = [idx_mapping, pad_value]
            for g in arg_groups:
                bt, o = block_tables[g], out[g]
                args += [bt, bt.stride(0), bt.shape[1], num_blocks[g], o, o.stride(0), o.shape[1]]
            _gather.launch((num_rows, n), (*args, n, _BLOCK))
    else:
        rows = idx_mapping.long()
        for bt, nb, o in zip(block_tables, num_blocks, out, strict=True):
            width = o.shape[1]
            cols = torch.arange(width, device=device)
            n = nb.long()[rows]
            valid = (cols[None, :] < n[:, None]) & (cols[None, :] < bt.shape[1])
            vals = bt[rows][:, : min(width, bt.shape[1])]
            if vals.shape[1] < width:
                vals = torch.nn.functional.pad(vals, (0, width - vals.shape[1]), value=pad_value)
            o[:num_rows] = torch.where(valid, vals, pad_value).to(o.dtype)
    return out


# --------------------------------------------------------------------------------------------------
# Scatter: staged host writes into persistent tables, one launch
# --------------------------------------------------------------------------------------------------
@triton.jit
def _scatter_kernel(
    dst_ptr,  # [M] int32 flat persistent storage
    dst_numel,
    offsets_ptr,  # [N] int32 element offsets into dst
    values_ptr,  # [N] int32
    num_writes,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < num_writes
    off = tl.load(offsets_ptr + i, mask=m, other=0).to(tl.int64)
    v = tl.load(values_ptr + i, mask=m)
    tl.store(dst_ptr + off, v, mask=m & (off >= 0) & (off < dst_numel))


_scatter = cached_kernel(_scatter_kernel)


def scatter_int32(
    dst: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """``dst[offsets[i]] = values[i]`` for every ``i`` (later writes to one offset win on torch;
    Triton gives no order, so callers keep offsets unique). Offsets outside ``dst`` are dropped.

    Parameters
    ----------
    dst:
        ``[M]`` int32, contiguous (flat persistent storage, e.g. every group's block table).
    offsets, values:
        ``[N]`` int32.
    """
    check_tensor("dst", dst, dtypes=_I32, ndim=1, contiguous=True)
    device = dst.device
    check_tensor("offsets", offsets, dtypes=_I32, ndim=1, device=device, contiguous=True)
    check_tensor("values", values, dtypes=_I32, ndim=1, device=device, contiguous=True)
    if values.numel() != offsets.numel():
        raise ValueError(f"values: expected {offsets.numel()} elements (len(offsets)), got {values.numel()}")
    on_triton = use_triton(backend, dst)
    n = offsets.numel()
    if n == 0:
        return dst
    if on_triton:
        _scatter.launch((triton.cdiv(n, 1024),), (dst, dst.numel(), offsets, values, n, 1024))
    else:
        off = offsets.long()
        keep = (off >= 0) & (off < dst.numel())
        dst[off[keep]] = values[keep]
    return dst
