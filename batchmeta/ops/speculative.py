"""Speculative decoding on the device: acceptance, drafts, and a step's rows from device lengths.

Three ops, each a Triton kernel with a torch twin (CPU fallback and test oracle):

- :func:`accept_tokens`: the engine's acceptance rule. A row that ran ``q`` query tokens at positions
  ``c .. c+q-1``, the last ``k`` of them drafts, and accepted ``a`` tokens writes them at positions
  ``c+q-k .. c+q-k+a-1`` of its request's token history (never inside its prompt) and leaves its
  request slot's next cache length ``c+q-k+a-1`` (``c+q`` when ``a = 0``) in ``lens``. The counts
  may be device data (a verifier's output): nothing is read on the host.
- :func:`write_drafts`: a drafter's tokens into the history after each row's next cache length
  ``n`` (positions ``n+1 ..``), where the next verify step gathers them.
- :func:`resolve_rows`: a step's packed rows (:mod:`batchmeta.ops.step`) rewritten for rows whose
  cache length is on the device: their cache length from ``lens``, then sequence lengths, page
  counts, ``kv_indptr`` (a prefix sum over every row) and last-page lengths, so the step kernel that
  reads the rewritten rows writes exact positions, slots, ``seq_lens`` and ``kv_*`` metadata.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchmeta.launch import cached_kernel
from batchmeta.ops._common import check_tensor, use_triton
from batchmeta.ops.step import (
    ROW_CACHE,
    ROW_END,
    ROW_GROUP,
    ROW_IDX,
    ROW_KV_HI,
    ROW_KV_LO,
    ROW_LAST,
    ROW_PER_GROUP,
    ROW_SEQ,
    ROW_START,
    row_device_len,
)

__all__ = ["accept_tokens", "resolve_rows", "write_drafts"]

_BLOCK = 128
_ROW_BLOCK = 128


# --------------------------------------------------------------------------------------------------
# resolve_rows
# --------------------------------------------------------------------------------------------------
# Packed-row fields (batchmeta.ops.step), as constants the kernels may read.
_F_IDX, _F_START, _F_END, _F_CACHE, _F_SEQ = (
    tl.constexpr(f) for f in (ROW_IDX, ROW_START, ROW_END, ROW_CACHE, ROW_SEQ)
)
_F_GROUP, _F_PER_GROUP = tl.constexpr(ROW_GROUP), tl.constexpr(ROW_PER_GROUP)
_F_KV_LO, _F_KV_HI, _F_LAST = (tl.constexpr(f) for f in (ROW_KV_LO, ROW_KV_HI, ROW_LAST))


@triton.jit
def packed_column(tile, ar, F):
    """Column ``F`` of a ``[rows, STRIDE]`` tile of packed rows."""
    return tl.sum(tl.where(ar[None, :] == F, tile, 0), axis=1)


@triton.jit
def repage_group(tile, ar, gar, carry, rows, seq, m, ps, g, F):
    """Group ``g``'s fields (from packed-row field ``F``) of a tile of packed rows after new
    sequence lengths: a row in ``rows`` holds ``seq`` tokens (``ceil(seq / ps)`` pages, and the last
    page's length), the others keep their page count; every row's ``kv_indptr`` fields are summed
    again, from ``carry`` (the pages of the tiles before). Returns ``(tile, carry)``."""
    lo = packed_column(tile, ar, F + _F_KV_LO)
    hi = packed_column(tile, ar, F + _F_KV_HI)
    pages = tl.where(rows, (seq + ps - 1) // ps, hi - lo)
    pages = tl.where(m, pages, 0)
    before = tl.sum(tl.where(gar == g, carry, 0))
    new_lo = before + tl.cumsum(pages, 0) - pages
    last = tl.where(rows, seq - (pages - 1) * ps, packed_column(tile, ar, F + _F_LAST))
    tile = tl.where(ar[None, :] == F + _F_KV_LO, new_lo[:, None], tile)
    tile = tl.where(ar[None, :] == F + _F_KV_HI, (new_lo + pages)[:, None], tile)
    tile = tl.where(ar[None, :] == F + _F_LAST, last[:, None], tile)
    return tile, tl.where(gar == g, before + tl.sum(pages, 0), carry)


def repage_group_torch(packed: torch.Tensor, rows: torch.Tensor, seq: torch.Tensor, ps: int, at: int) -> None:
    """:func:`repage_group` on a whole ``[num_rows + 1, stride]`` int64 tensor, in place (group
    fields at ``at``)."""
    pages = torch.where(rows, (seq + ps - 1) // ps, packed[:, at + ROW_KV_HI] - packed[:, at + ROW_KV_LO])
    lo = torch.cumsum(pages, 0) - pages
    packed[:, at + ROW_LAST] = torch.where(rows, seq - (pages - 1) * ps, packed[:, at + ROW_LAST])
    packed[:, at + ROW_KV_LO] = lo
    packed[:, at + ROW_KV_HI] = lo + pages


@triton.jit
def _resolve_rows_kernel(
    src_ptr,  # int32 [*]: packed rows [num_rows + 1, STRIDE] at ROWS (staging, pinned host memory on CUDA)
    dst_ptr,  # int32 [*]: the same layout (a device buffer)
    lens_ptr,  # int32 [R + 1]: each request slot's cache length on the device
    page_sizes_ptr,  # int32 [NUM_GROUPS]
    ROWS: tl.constexpr,
    STRIDE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    NUM_GROUPS_P2: tl.constexpr,
    DEV: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # The grid is num_rows + 1 programs (the row count without a runtime argument, so the launch
    # binds once); program 0 does everything: kv_indptr is a prefix sum over every row, carried
    # across blocks of rows.
    if tl.program_id(0) != 0:
        return
    num_rows = tl.num_programs(0) - 1
    ar = tl.arange(0, STRIDE)
    gar = tl.arange(0, NUM_GROUPS_P2)
    carry = tl.zeros([NUM_GROUPS_P2], dtype=tl.int32)
    for start in range(0, num_rows + 1, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i <= num_rows
        at = ROWS + i[:, None].to(tl.int64) * STRIDE + ar[None, :]
        tile = tl.load(src_ptr + at, mask=m[:, None], other=0)
        on_device = (packed_column(tile, ar, DEV) != 0) & (i < num_rows)
        req = packed_column(tile, ar, _F_IDX)
        cache = tl.where(on_device, tl.load(lens_ptr + req, mask=on_device, other=0), packed_column(tile, ar, _F_CACHE))
        query = packed_column(tile, ar, _F_END) - packed_column(tile, ar, _F_START)
        seq = tl.where(on_device, cache + query, packed_column(tile, ar, _F_SEQ))
        tile = tl.where(ar[None, :] == _F_CACHE, cache[:, None], tile)
        tile = tl.where(ar[None, :] == _F_SEQ, seq[:, None], tile)
        for g in tl.static_range(NUM_GROUPS):
            # Rows whose length is on the host keep their page count (padding rows included; the
            # tail row has none), so only the device rows' counts and everyone's offsets change.
            ps = tl.load(page_sizes_ptr + g)
            tile, carry = repage_group(tile, ar, gar, carry, on_device, seq, m, ps, g, _F_GROUP + _F_PER_GROUP * g)
        tl.store(dst_ptr + at, tile, mask=m[:, None])


_resolve_rows = cached_kernel(_resolve_rows_kernel)


def _resolve_rows_torch(src, dst, lens, page_sizes, num_rows, rows_at, stride) -> None:
    packed = src[rows_at : rows_at + (num_rows + 1) * stride].view(num_rows + 1, stride).to(dst.device).long()
    on_device = packed[:, row_device_len(len(page_sizes))] != 0
    on_device[num_rows] = False
    req = packed[:, ROW_IDX].clamp(0, lens.numel() - 1)
    cache = torch.where(on_device, lens.to(dst.device).long()[req], packed[:, ROW_CACHE])
    seq = torch.where(on_device, cache + packed[:, ROW_END] - packed[:, ROW_START], packed[:, ROW_SEQ])
    packed[:, ROW_CACHE] = cache
    packed[:, ROW_SEQ] = seq
    for g, ps in enumerate(page_sizes):
        repage_group_torch(packed, on_device, seq, ps, ROW_GROUP + ROW_PER_GROUP * g)
    dst[rows_at : rows_at + (num_rows + 1) * stride] = packed.flatten().to(dst.dtype)


def resolve_rows(
    src: torch.Tensor,
    dst: torch.Tensor,
    lens: torch.Tensor,
    page_sizes: torch.Tensor,
    num_rows: int,
    *,
    rows_at: int,
    stride: int,
    backend: str | None = None,
) -> None:
    """Rewrites a step's packed rows for rows whose cache length is on the device.

    For each row ``b < num_rows`` of ``src``'s packed rows ``[num_rows + 1, stride]`` (at element
    ``rows_at``) whose device-length field (:func:`~batchmeta.ops.step.row_device_len`) is 1:
    cache length ``c = lens[req]``, sequence length ``c + q`` (``q`` from its qo_indptr fields), and
    per group ``g`` ``ceil(seq / page_size_g)`` pages and last-page length ``seq - (pages - 1) *
    page_size_g``. Every row's ``kv_indptr`` fields (and the tail row's) become the prefix sum of the
    page counts; other rows keep their counts. The result goes to ``dst`` at the same offset.

    Parameters
    ----------
    src:
        int32 staging buffer (pinned host memory on CUDA: read in place).
    dst:
        int32 device buffer of at least ``rows_at + (num_rows + 1) * stride`` elements.
    lens:
        ``[R + 1]`` int32 device lengths per request slot.
    page_sizes:
        ``[num_groups]`` int32 on ``dst``'s device.
    """
    check_tensor("lens", lens, dtypes=(torch.int32,), ndim=1, device=dst.device, contiguous=True)
    check_tensor("page_sizes", page_sizes, dtypes=(torch.int32,), ndim=1, device=dst.device, contiguous=True)
    if use_triton(backend, dst):
        _resolve_rows.launch((num_rows + 1,), _resolve_args(src, dst, lens, page_sizes, rows_at, stride))
        return
    _resolve_rows_torch(src, dst, lens, [int(p) for p in page_sizes.tolist()], num_rows, rows_at, stride)


def _resolve_args(src, dst, lens, page_sizes: torch.Tensor, rows_at: int, stride: int) -> tuple:
    """The resolve kernel's arguments (``page_sizes``: ``[num_groups]`` int32 on ``dst``'s device)."""
    num_groups = page_sizes.numel()
    return (
        src,
        dst,
        lens,
        page_sizes,
        rows_at,
        stride,
        num_groups,
        triton.next_power_of_2(num_groups),
        row_device_len(num_groups),
        _ROW_BLOCK,
    )


def bind_resolve_rows(
    src: torch.Tensor,
    dst: torch.Tensor,
    lens: torch.Tensor,
    page_sizes: tuple[int, ...],
    *,
    rows_at: int,
    stride: int,
    backend: str | None = None,
):
    """``resolve(num_rows)``: :func:`resolve_rows` over these buffers (bound once on CUDA)."""
    sizes = torch.tensor(page_sizes, dtype=torch.int32, device=dst.device)
    if dst.is_cuda and use_triton(backend, dst):
        bound = _resolve_rows.bind(_resolve_args(src, dst, lens, sizes, rows_at, stride))

        def resolve(num_rows: int) -> None:
            bound((num_rows + 1,))

        return resolve

    if use_triton(backend, dst):  # the interpreter

        def resolve_interpreted(num_rows: int) -> None:
            resolve_rows(src, dst, lens, sizes, num_rows, rows_at=rows_at, stride=stride, backend=backend)

        return resolve_interpreted

    sizes_host = [int(p) for p in page_sizes]  # the torch twin takes them from the host: no read of ``sizes``

    def resolve_torch(num_rows: int) -> None:
        _resolve_rows_torch(src, dst, lens, sizes_host, num_rows, rows_at, stride)

    return resolve_torch


# --------------------------------------------------------------------------------------------------
# accept_tokens
# --------------------------------------------------------------------------------------------------
@triton.jit
def _sum_before(ptr, b, BLOCK: tl.constexpr):
    """``sum(max(ptr[:b], 0))`` as int64."""
    total = b.to(tl.int64) * 0
    for off in range(0, b, BLOCK):
        i = off + tl.arange(0, BLOCK)
        total += tl.sum(tl.maximum(tl.load(ptr + i, mask=i < b, other=0), 0).to(tl.int64))
    return total


@triton.jit
def _accept_kernel(
    hist_ptr,  # [R, width] token history (any int dtype), row stride hist_stride
    hist_stride,
    width,
    rows_ptr,  # int32 [5, B] per batch row: request slot, cache length, query length, prompt length, on-device flag
    num_rows,
    counts_ptr,  # [B] accepted tokens per row (int32/int64: staging or the verifier's device tensor)
    cu_ptr,  # int32 [B + 1] prefix sum of the counts (host counts, ragged tokens)
    ids_ptr,  # accepted tokens: [N] back to back (RAGGED) or [B, ids_cols] with row stride ids_stride
    ids_stride,
    ids_cols,
    ids_numel,
    lens_ptr,  # int32 [R + 1]: each request slot's next cache length (read for on-device rows, written for all)
    k,  # draft tokens per row (the last k query tokens)
    RAGGED: tl.constexpr,
    HOST_CU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    req = tl.load(rows_ptr + b).to(tl.int64)
    query = tl.load(rows_ptr + 2 * num_rows + b)
    prompt = tl.load(rows_ptr + 3 * num_rows + b)
    on_device = tl.load(rows_ptr + 4 * num_rows + b) != 0
    cache = tl.load(rows_ptr + num_rows + b)
    if on_device:
        cache = tl.load(lens_ptr + req)
    # The rule's range: a row that reaches the end of its prompt accepts 1..1+k tokens, one still inside
    # it 0..1 (a token inside the prompt is never written); device counts outside it are clamped.
    ends = cache + query >= prompt
    a = tl.load(counts_ptr + b).to(tl.int32)
    a = tl.minimum(tl.maximum(a, tl.where(ends, 1, 0)), tl.where(ends, 1 + k, 1))
    base = (cache + query - k).to(tl.int64)
    if RAGGED:
        if HOST_CU:
            src = tl.load(cu_ptr + b).to(tl.int64)
        else:
            src = _sum_before(counts_ptr, b, BLOCK)
    else:
        src = b.to(tl.int64) * ids_stride
    row = hist_ptr + req * hist_stride
    for off in range(0, a, BLOCK):
        j = off + tl.arange(0, BLOCK)
        pos = base + j
        m = (j < a) & (pos >= prompt) & (pos >= 0) & (pos < width) & (j < ids_cols) & (src + j < ids_numel)
        tl.store(row + pos, tl.load(ids_ptr + src + j, mask=m).to(row.dtype.element_ty), mask=m)
    tl.store(lens_ptr + req, tl.where((a >= 1) & ends, cache + query - k + a - 1, cache + query))


_accept = cached_kernel(_accept_kernel)


def _accept_torch(hist, rows, num_rows, counts, cu, ids, lens, k, ragged) -> None:
    dev = hist.device
    rows = rows[: 5 * num_rows].view(5, num_rows).to(dev).long()
    req, cache_host, query, prompt, on_device = rows
    cache = torch.where(on_device != 0, lens.to(dev).long()[req], cache_host)
    ends = cache + query >= prompt
    a = counts[:num_rows].to(dev).long()
    a = torch.minimum(torch.maximum(a, ends.long()), torch.where(ends, 1 + k, 1))
    base = cache + query - k
    if ragged:
        src = (
            cu[:num_rows].to(dev).long()
            if cu is not None
            else torch.cumsum(counts[:num_rows].clamp(min=0), 0) - (counts[:num_rows].clamp(min=0))
        )
        cols = ids.numel()
    else:
        src = torch.arange(num_rows, device=dev) * ids.stride(0)
        cols = ids.shape[1]
    flat = ids.reshape(-1) if ragged else ids.as_strided((ids.numel(),), (1,))
    for b in range(num_rows):  # a reference: one row at a time
        for j in range(int(a[b])):
            pos, s = int(base[b]) + j, int(src[b]) + j
            if pos >= int(prompt[b]) and 0 <= pos < hist.shape[1] and j < cols and s < ids.numel():
                hist[int(req[b]), pos] = flat[s]
    nxt = torch.where((a >= 1) & ends, cache + query - k + a - 1, cache + query)
    lens[req.to(lens.device)] = nxt.to(lens.device, lens.dtype)


def accept_tokens(
    token_ids: torch.Tensor,
    rows: torch.Tensor,
    num_rows: int,
    num_accepted: torch.Tensor,
    next_input_ids: torch.Tensor,
    lens: torch.Tensor,
    *,
    num_draft_tokens: int,
    cu_accepted: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """Writes each row's accepted tokens into the token history and its next cache length into ``lens``.

    Row ``b`` (request slot ``r = rows[0, b]``) ran ``q = rows[2, b]`` tokens from cache length
    ``c`` (``rows[1, b]``, or ``lens[r]`` where ``rows[4, b]`` is 1), the last ``k =
    num_draft_tokens`` of them drafts. With ``a = num_accepted[b]`` (clamped to ``1 .. 1 + k`` for a
    row with ``c + q >= prompt_len = rows[3, b]``, else ``0 .. 1``): ``token_ids[r, c+q-k+j]`` is
    the row's ``j``-th accepted token for ``j < a`` and ``c+q-k+j >= prompt_len``, and ``lens[r] =
    c+q-k+a-1`` (``c+q`` when ``a = 0``). Nothing is read on the host.

    Parameters
    ----------
    token_ids:
        ``[R, L]`` token history, unit column stride.
    rows:
        int32 ``[5 * num_rows]`` on the device: request slots, cache lengths, query lengths, prompt
        lengths, on-device flags, each ``[num_rows]``.
    num_accepted:
        ``[num_rows]`` int32/int64 on the device.
    next_input_ids:
        ``[N]`` accepted tokens back to back (row ``b``'s from ``cu_accepted[b]``, or from the sum of
        the earlier counts when ``cu_accepted`` is None), or ``[num_rows, W]`` (row ``b``'s first
        ``a`` tokens); ``token_ids``' dtype.
    lens:
        ``[R + 1]`` int32.
    """
    ragged = next_input_ids.ndim == 1
    if use_triton(backend, token_ids):
        if num_rows:
            stride = 0 if ragged else next_input_ids.stride(0)
            cols = next_input_ids.numel() if ragged else next_input_ids.shape[1]
            if not ragged and next_input_ids.stride(1) != 1:
                next_input_ids = next_input_ids.contiguous()
                stride = next_input_ids.stride(0)
            _accept.launch(
                (num_rows,),
                (
                    token_ids,
                    token_ids.stride(0),
                    token_ids.shape[1],
                    rows,
                    num_rows,
                    num_accepted,
                    cu_accepted if cu_accepted is not None else rows,
                    next_input_ids,
                    stride,
                    cols,
                    next_input_ids.numel(),
                    lens,
                    num_draft_tokens,
                    ragged,
                    cu_accepted is not None,
                    _BLOCK,
                ),
            )
        return
    if num_rows:
        _accept_torch(
            token_ids, rows, num_rows, num_accepted, cu_accepted, next_input_ids, lens, num_draft_tokens, ragged
        )


# --------------------------------------------------------------------------------------------------
# write_drafts
# --------------------------------------------------------------------------------------------------
@triton.jit
def _drafts_kernel(
    hist_ptr,  # [R, width] token history
    hist_stride,
    width,
    slots_ptr,  # int32 [B] request slot of each row
    prompts_ptr,  # int32 [B] prompt length of each row (no draft lands inside the prompt)
    lens_ptr,  # int32 [R + 1] next cache length per slot
    drafts_ptr,  # [B, K] (row stride drafts_stride) or [N] back to back (RAGGED)
    drafts_stride,
    drafts_numel,
    counts_ptr,  # [B] drafts per row (RAGGED)
    cu_ptr,  # int32 [B + 1] prefix sum of host counts (HOST_CU)
    max_drafts,  # K: drafts per row at most
    RAGGED: tl.constexpr,
    HOST_CU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    req = tl.load(slots_ptr + b).to(tl.int64)
    first = tl.load(lens_ptr + req).to(tl.int64) + 1
    prompt = tl.load(prompts_ptr + b)
    if RAGGED:
        count = tl.minimum(tl.maximum(tl.load(counts_ptr + b).to(tl.int32), 0), max_drafts)
        if HOST_CU:
            src = tl.load(cu_ptr + b).to(tl.int64)
        else:
            src = _sum_before(counts_ptr, b, BLOCK)
    else:
        count = max_drafts
        src = b.to(tl.int64) * drafts_stride
    row = hist_ptr + req * hist_stride
    for off in range(0, count, BLOCK):
        j = off + tl.arange(0, BLOCK)
        pos = first + j
        m = (j < count) & (pos >= prompt) & (pos < width) & (src + j < drafts_numel)
        tl.store(row + pos, tl.load(drafts_ptr + src + j, mask=m).to(row.dtype.element_ty), mask=m)


_drafts = cached_kernel(_drafts_kernel)


def write_drafts(
    token_ids: torch.Tensor,
    slots: torch.Tensor,
    prompt_lens: torch.Tensor,
    lens: torch.Tensor,
    draft_token_ids: torch.Tensor,
    *,
    num_drafts: torch.Tensor | None = None,
    cu_drafts: torch.Tensor | None = None,
    max_drafts: int,
    backend: str | None = None,
) -> None:
    """``token_ids[r, lens[r] + 1 + j] = drafts of row b`` (``r = slots[b]``), ``j`` below the row's count,
    except at positions inside the row's prompt (``< prompt_lens[b]``: a request still prefilling).

    ``draft_token_ids`` is ``[B, K]`` (every row ``K = max_drafts`` drafts) or ``[N]`` back to back
    with ``num_drafts`` ``[B]`` per row (clamped to ``0 .. max_drafts``; row ``b``'s start is
    ``cu_drafts[b]`` when given, else the sum of the earlier counts). Positions past the history's
    width are dropped. Nothing is read on the host.
    """
    num_rows = slots.numel()
    ragged = draft_token_ids.ndim == 1
    if use_triton(backend, token_ids):
        if num_rows:
            drafts = draft_token_ids if ragged or draft_token_ids.stride(1) == 1 else draft_token_ids.contiguous()
            _drafts.launch(
                (num_rows,),
                (
                    token_ids,
                    token_ids.stride(0),
                    token_ids.shape[1],
                    slots,
                    prompt_lens,
                    lens,
                    drafts,
                    0 if ragged else drafts.stride(0),
                    drafts.numel(),
                    num_drafts if ragged else slots,
                    cu_drafts if cu_drafts is not None else slots,
                    max_drafts,
                    ragged,
                    cu_drafts is not None,
                    _BLOCK,
                ),
            )
        return
    dev = token_ids.device
    req = slots.to(dev).long()
    first = lens.to(dev).long()[req] + 1
    prompts = prompt_lens.to(dev).long()
    if ragged:
        counts = num_drafts.to(dev).long().clamp(0, max_drafts)  # type: ignore[union-attr]
        raw = num_drafts.to(dev).long().clamp(min=0)  # type: ignore[union-attr]
        src = cu_drafts.to(dev).long()[:num_rows] if cu_drafts is not None else torch.cumsum(raw, 0) - raw
        flat = draft_token_ids
    else:
        counts = torch.full((num_rows,), max_drafts, device=dev)
        src = torch.arange(num_rows, device=dev) * draft_token_ids.shape[1]
        flat = draft_token_ids.reshape(-1)
    for b in range(num_rows):  # a reference: one row at a time
        for j in range(int(counts[b])):
            pos, s = int(first[b]) + j, int(src[b]) + j
            if int(prompts[b]) <= pos < token_ids.shape[1] and s < flat.numel():
                token_ids[int(req[b]), pos] = flat[s]
