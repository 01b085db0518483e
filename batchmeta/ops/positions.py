"""Token positions and KV slot mappings.

Two flavours:

- :func:`prepare_position_slot_ids` (LoRAX/TGI meaning): positions and indices into the engine's
  flat per-request slot list.
- :func:`compute_slot_mappings` (vLLM meaning): positions and KV slot ids for several KV-cache groups
  in one launch, read from the persistent block tables, with the buffers' tails set to PAD.

Slot ids are computed in 64 bits: ``page * page_size`` passes 2^31 on large caches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from batchmeta.launch import cached_kernel
from batchmeta.ops._common import (
    INDEX_DTYPES,
    check_fits,
    check_group_lists,
    check_host_index_range,
    check_host_nonnegative,
    check_index_vector,
    check_int,
    check_tensor,
    check_unit_column_stride,
    group_launches,
    host_sum,
    is_host,
    use_triton,
)

__all__ = ["PAD_SLOT_ID", "compute_slot_mappings", "prepare_position_slot_ids"]

#: Slot id of a token that must not be written to the KV cache (padding of a CUDA-graph batch).
PAD_SLOT_ID = -1

_BLOCK = 256


# --------------------------------------------------------------------------------------------------
# LoRAX: positions and slot indices
# --------------------------------------------------------------------------------------------------
@triton.jit
def _position_slot_kernel(
    cache_lengths_ptr,  # [B]
    cu_seqlen_ptr,  # [B + 1]
    cu_slots_ptr,  # [B + 1] (only the first B are read)
    position_ids_ptr,  # [>= cu_seqlen[B]]
    slot_indices_ptr,  # [>= cu_seqlen[B]]
    out_capacity,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.load(cu_seqlen_ptr + b).to(tl.int64)
    n = tl.load(cu_seqlen_ptr + b + 1).to(tl.int64) - start
    cache_len = tl.load(cache_lengths_ptr + b).to(tl.int64)
    slot_start = tl.load(cu_slots_ptr + b).to(tl.int64) + cache_len
    for off in range(0, n, BLOCK):
        j = off + tl.arange(0, BLOCK)
        dst = start + j
        m = (j < n) & (dst < out_capacity)
        tl.store(position_ids_ptr + dst, cache_len + j, mask=m)
        tl.store(slot_indices_ptr + dst, slot_start + j, mask=m)


_position_slot = cached_kernel(_position_slot_kernel)


def prepare_position_slot_ids(
    cache_lengths: torch.Tensor,
    cu_seqlen: torch.Tensor,
    cu_slots: torch.Tensor,
    *,
    position_ids: torch.Tensor,
    slot_indices: torch.Tensor,
    backend: str | None = None,
) -> None:
    """For row ``b`` and ``j < cu_seqlen[b+1] - cu_seqlen[b]``, with ``t = cu_seqlen[b] + j``:
    ``position_ids[t] = cache_lengths[b] + j`` and
    ``slot_indices[t] = cu_slots[b] + cache_lengths[b] + j``.

    ``slot_indices`` index the engine's flat per-request slot list, not the KV cache. Elements past
    ``cu_seqlen[B]`` are untouched.

    Parameters
    ----------
    cache_lengths:
        ``[B]`` int32/int64 tokens already cached per row.
    cu_seqlen:
        ``[B + 1]`` int32/int64 prefix sum of new tokens per row.
    cu_slots:
        ``[>= B]`` int32/int64 start of each row in the flat slot list.
    position_ids, slot_indices:
        ``[>= cu_seqlen[B]]`` int32/int64 outputs.

    With CPU inputs every value is checked before anything is written: lengths and offsets
    non-negative, ``cu_seqlen`` non-decreasing, the outputs long enough, and the largest position
    and slot index held by the outputs' dtypes (never wrapped). Device inputs are not read (that would
    sync): their values are the caller's responsibility; writes past the outputs' end are dropped,
    and a value past an int32 output's range wraps.
    """
    check_index_vector("cache_lengths", cache_lengths, device=None)
    device = cache_lengths.device
    num_rows = cache_lengths.numel()
    check_index_vector("cu_seqlen", cu_seqlen, device=device, min_numel=num_rows + 1)
    check_index_vector("cu_slots", cu_slots, device=device, min_numel=num_rows)
    check_index_vector("position_ids", position_ids, device=device)
    check_index_vector("slot_indices", slot_indices, device=device)
    capacity = min(position_ids.numel(), slot_indices.numel())
    if is_host(cu_seqlen) and num_rows:  # every input is on this device (checked above)
        cu = cu_seqlen[: num_rows + 1].long()
        check_host_nonnegative("cu_seqlen", cu, "offsets")
        counts = cu[1:] - cu[:-1]
        if int(counts.min()) < 0:
            raise ValueError("cu_seqlen: expected a non-decreasing prefix sum")
        if int(cu[-1]) > capacity:
            name = "position_ids" if position_ids.numel() == capacity else "slot_indices"
            raise ValueError(f"{name}: expected at least {int(cu[-1])} elements, got {capacity}")
        check_host_nonnegative("cache_lengths", cache_lengths)
        check_host_nonnegative("cu_slots", cu_slots[:num_rows], "offsets")
        active = counts > 0
        if bool(active.any()):
            # The largest values written: a row's last position and slot index.
            last = host_sum("position_ids", cache_lengths.long()[active], counts[active] - 1)
            check_fits("position_ids", position_ids.dtype, int(last.max()))
            last_slot = host_sum("slot_indices", cu_slots[:num_rows].long()[active], last)
            check_fits("slot_indices", slot_indices.dtype, int(last_slot.max()))
    on_triton = use_triton(backend, cache_lengths)
    if num_rows == 0:
        return
    if on_triton:
        _position_slot.launch(
            (num_rows,),
            (cache_lengths, cu_seqlen, cu_slots, position_ids, slot_indices, capacity, _BLOCK),
        )
        return
    cu = cu_seqlen[: num_rows + 1].long()
    counts = cu[1:] - cu[:-1]
    total = min(int(cu[-1]), capacity)
    start = int(cu[0])
    if total <= start:
        return
    row = torch.repeat_interleave(torch.arange(num_rows, device=device), counts)
    j = torch.arange(row.numel(), device=device) - (cu[:-1] - cu[0])[row]
    pos = cache_lengths.long()[row] + j
    n = total - start
    position_ids[start:total] = pos[:n].to(position_ids.dtype)
    slot_indices[start:total] = (cu_slots.long()[row] + pos)[:n].to(slot_indices.dtype)


# --------------------------------------------------------------------------------------------------
# vLLM: positions and slot mappings for several KV-cache groups, PAD tail
# --------------------------------------------------------------------------------------------------
@triton.jit
def _slot_row(
    table_ptr,
    table_stride,
    table_width,
    page_size,
    slot_ptr,
    slot_capacity,
    req,
    start,
    n,
    cache_len,
    BLOCK: tl.constexpr,
):
    row = table_ptr + req * table_stride
    for off in range(0, n, BLOCK):
        j = off + tl.arange(0, BLOCK)
        dst = start + j
        m = (j < n) & (dst < slot_capacity)
        pos = cache_len + j
        # A position outside the row's table (device data the host could not check) gets PAD: never a
        # page read past the row, which would be another request's.
        inside = (pos >= 0) & (pos // page_size < table_width)
        page = tl.load(row + pos // page_size, mask=m & inside, other=0).to(tl.int64)
        tl.store(slot_ptr + dst, tl.where(inside, page * page_size + pos % page_size, -1), mask=m)


@triton.jit
def _pad_tail(ptr, start, capacity, value, BLOCK: tl.constexpr):
    for off in range(start, capacity, BLOCK):
        i = off + tl.arange(0, BLOCK)
        tl.store(ptr + i, value, mask=i < capacity)


@triton.jit
def _slot_mapping_kernel(
    idx_mapping_ptr,  # [B] request slot of each batch row
    qo_indptr_ptr,  # [B + 1] prefix sum of new tokens
    cache_lens_ptr,  # [B] tokens cached before this step, per batch row
    positions_ptr,  # [P] int32/int64 (written by group-0 programs when WRITE_POSITIONS)
    positions_capacity,
    num_rows,
    # Group g: persistent block table [R, W_g] (row stride, width), page size, slot mapping [S_g].
    t0,
    ts0,
    tw0,
    ps0,
    o0,
    oc0,
    t1,
    ts1,
    tw1,
    ps1,
    o1,
    oc1,
    t2,
    ts2,
    tw2,
    ps2,
    o2,
    oc2,
    t3,
    ts3,
    tw3,
    ps3,
    o3,
    oc3,
    NUM_GROUPS: tl.constexpr,
    WRITE_POSITIONS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    g = tl.program_id(1)
    if b == num_rows:
        # One extra program per group fills every element past the step's tokens, so a CUDA graph
        # captured for more tokens than this step has writes nothing for the padding.
        num_tokens = tl.load(qo_indptr_ptr + num_rows).to(tl.int64)
        if g == 0:
            _pad_tail(o0, num_tokens, oc0, -1, BLOCK)
            if WRITE_POSITIONS:
                _pad_tail(positions_ptr, num_tokens, positions_capacity, 0, BLOCK)
        if NUM_GROUPS > 1:
            if g == 1:
                _pad_tail(o1, num_tokens, oc1, -1, BLOCK)
        if NUM_GROUPS > 2:
            if g == 2:
                _pad_tail(o2, num_tokens, oc2, -1, BLOCK)
        if NUM_GROUPS > 3:
            if g == 3:
                _pad_tail(o3, num_tokens, oc3, -1, BLOCK)
    else:
        req = tl.load(idx_mapping_ptr + b).to(tl.int64)
        start = tl.load(qo_indptr_ptr + b).to(tl.int64)
        n = tl.load(qo_indptr_ptr + b + 1).to(tl.int64) - start
        cache_len = tl.load(cache_lens_ptr + b).to(tl.int64)
        if g == 0:
            _slot_row(t0, ts0, tw0, ps0, o0, oc0, req, start, n, cache_len, BLOCK)
            if WRITE_POSITIONS:
                for off in range(0, n, BLOCK):
                    j = off + tl.arange(0, BLOCK)
                    dst = start + j
                    tl.store(positions_ptr + dst, cache_len + j, mask=(j < n) & (dst < positions_capacity))
        if NUM_GROUPS > 1:
            if g == 1:
                _slot_row(t1, ts1, tw1, ps1, o1, oc1, req, start, n, cache_len, BLOCK)
        if NUM_GROUPS > 2:
            if g == 2:
                _slot_row(t2, ts2, tw2, ps2, o2, oc2, req, start, n, cache_len, BLOCK)
        if NUM_GROUPS > 3:
            if g == 3:
                _slot_row(t3, ts3, tw3, ps3, o3, oc3, req, start, n, cache_len, BLOCK)


_slot_mapping = cached_kernel(_slot_mapping_kernel)


def _slots_torch(table: torch.Tensor, page_size: int, reqs: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Slot id (int64) of each ``(request slot, position)``; PAD where the position is outside the
    request's table row, like the kernel."""
    width = table.shape[1]
    page_idx = pos // page_size
    inside = (pos >= 0) & (page_idx < width)
    if width == 0 or pos.numel() == 0:
        return torch.full_like(pos, PAD_SLOT_ID)
    page = table[reqs, page_idx.clamp(0, width - 1)].long()
    return torch.where(inside, page * page_size + pos % page_size, PAD_SLOT_ID)


def _token_rows(qo_indptr: torch.Tensor, cache_lens: torch.Tensor, idx_mapping: torch.Tensor, num_rows: int):
    """Request slot and position of every token ``qo_indptr[0] <= t < qo_indptr[B]``."""
    qo = qo_indptr[: num_rows + 1].long()
    counts = qo[1:] - qo[:-1]
    row = torch.repeat_interleave(torch.arange(num_rows, device=qo.device), counts)
    tok = torch.arange(int(qo[0]), int(qo[-1]), device=qo.device)
    return idx_mapping.long()[row], cache_lens.long()[row] + (tok - qo[:-1][row])


def _check_host_slot_values(
    idx_mapping: torch.Tensor,
    qo_indptr: torch.Tensor,
    cache_lens: torch.Tensor,
    block_tables: Sequence[torch.Tensor],
    page_sizes: Sequence[int],
    slot_mappings: Sequence[torch.Tensor],
    positions: torch.Tensor | None,
    num_rows: int,
) -> None:
    """Host data: every new token's position inside its request's table row in every group, and the
    largest position and slot ids held by the outputs' dtypes."""
    qo = qo_indptr[: num_rows + 1].long()
    counts = qo[1:] - qo[:-1]
    active = (counts > 0).nonzero().flatten()
    if active.numel() == 0:
        return
    # Each row's last position, cache_lens + query length - 1 (the rows' largest).
    last = host_sum("cache_lens", cache_lens.long()[active], counts[active] - 1)
    top = int(last.max())
    row = int(active[int(last.argmax())])
    for g, (bt, ps) in enumerate(zip(block_tables, page_sizes, strict=True)):
        needed = top // ps + 1
        if needed > bt.shape[1]:
            raise ValueError(
                f"cache_lens: row {row} reaches position {top} (cache_lens + query length - 1), which needs "
                f"{needed} pages of {ps} tokens in group {g}, but block_tables[{g}] is {bt.shape[1]} pages wide"
            )
    if positions is not None:
        check_fits("positions", positions.dtype, top)
    narrow = [g for g, sm in enumerate(slot_mappings) if sm.dtype != torch.int64]
    if narrow:
        reqs, pos = _token_rows(qo_indptr, cache_lens, idx_mapping, num_rows)
        for g in narrow:
            slots = _slots_torch(block_tables[g], page_sizes[g], reqs, pos)
            check_fits(f"slot_mappings[{g}]", slot_mappings[g].dtype, int(slots.max()), int(slots.min()))


def compute_slot_mappings(
    idx_mapping: torch.Tensor,
    qo_indptr: torch.Tensor,
    cache_lens: torch.Tensor,
    block_tables: Sequence[torch.Tensor],
    page_sizes: Sequence[int],
    *,
    slot_mappings: Sequence[torch.Tensor],
    positions: torch.Tensor | None = None,
    num_tokens: int | None = None,
    backend: str | None = None,
) -> None:
    """Positions and per-group KV slot ids of every new token, with PAD tails.

    For batch row ``b`` (request slot ``r = idx_mapping[b]``), token ``j`` of its
    ``qo_indptr[b+1] - qo_indptr[b]`` new tokens sits at ``t = qo_indptr[b] + j`` and position
    ``p = cache_lens[b] + j``:

    - ``positions[t] = p``; ``positions[t] = 0`` for every ``t >= qo_indptr[B]``;
    - ``slot_mappings[g][t] = block_tables[g][r, p // ps_g] * ps_g + p % ps_g``;
      ``slot_mappings[g][t] = -1`` (PAD) for every ``t >= qo_indptr[B]`` up to the end.

    With CPU inputs every value is checked before anything is written: request slots inside the
    tables, offsets and lengths non-negative, every token's page inside its request's table row
    (``cache_lens[b] + query_len_b <= W_g * ps_g`` for each group), the outputs long enough, and the
    largest position and slot id held by the outputs' dtypes. Device inputs are not read (that would
    sync): their values are the caller's responsibility. A token whose page lies outside the table
    row then gets PAD (never a page of another request); a value past an int32 output's range wraps.

    Parameters
    ----------
    idx_mapping:
        ``[B]`` int32/int64 request slot of each batch row.
    qo_indptr:
        ``[B + 1]`` int32/int64 exclusive prefix sum of new tokens per row (FlashInfer's
        ``qo_indptr``, vLLM's ``query_start_loc``).
    cache_lens:
        ``[B]`` int32/int64 tokens cached before this step, per batch row.
    block_tables:
        Per group, ``[R, W_g]`` int32 persistent table (unit column stride).
    page_sizes:
        Per group, tokens per page (at most ``2**31 - 1``).
    slot_mappings:
        Per group, ``[S_g]`` int64 (or int32 for small caches) output, written to its end.
    positions:
        ``[P]`` int32/int64 output written to its end, or None to skip positions.
    num_tokens:
        Host-side ``qo_indptr[B]`` when known; checked against the outputs' sizes.
    """
    check_index_vector("idx_mapping", idx_mapping, device=None)
    device = idx_mapping.device
    num_rows = idx_mapping.numel()
    check_index_vector("qo_indptr", qo_indptr, device=device, min_numel=num_rows + 1)
    check_index_vector("cache_lens", cache_lens, device=device, min_numel=num_rows)
    num_groups = check_group_lists("block_tables", block_tables, page_sizes=page_sizes, slot_mappings=slot_mappings)
    for g, (bt, ps, sm) in enumerate(zip(block_tables, page_sizes, slot_mappings, strict=True)):
        check_tensor(f"block_tables[{g}]", bt, dtypes=(torch.int32,), ndim=2, device=device)
        check_unit_column_stride(f"block_tables[{g}]", bt)
        # An int32 page id times a page size below 2^31 stays inside int64.
        check_int(f"page_sizes[{g}]", ps, minimum=1, maximum=2**31 - 1)
        check_tensor(f"slot_mappings[{g}]", sm, dtypes=INDEX_DTYPES, ndim=1, device=device, contiguous=True)
    if positions is not None:
        check_index_vector("positions", positions, device=device)
    outputs = [(f"slot_mappings[{g}]", sm) for g, sm in enumerate(slot_mappings)]
    if positions is not None:
        outputs.append(("positions", positions))
    host = is_host(qo_indptr)  # every input is on this device (checked above)
    if host and num_rows:
        qo = qo_indptr[: num_rows + 1]
        check_host_nonnegative("qo_indptr", qo, "offsets")
        if int((qo[1:].long() - qo[:-1].long()).min()) < 0:
            raise ValueError("qo_indptr: expected a non-decreasing prefix sum")
    if num_tokens is None and host:
        num_tokens = int(qo_indptr[num_rows])
    if num_tokens is not None:
        check_int("num_tokens", num_tokens, minimum=0)
        for name, t in outputs:
            if t.numel() < num_tokens:
                raise ValueError(f"{name}: expected at least {num_tokens} elements, got {t.numel()}")
    for bt in block_tables:
        check_host_index_range("idx_mapping", idx_mapping, bt.shape[0])
    check_host_nonnegative("cache_lens", cache_lens[:num_rows])
    if host and num_rows:
        _check_host_slot_values(
            idx_mapping, qo_indptr, cache_lens, block_tables, page_sizes, slot_mappings, positions, num_rows
        )

    if use_triton(backend, idx_mapping):
        pos = positions if positions is not None else slot_mappings[0]
        for n, arg_groups in group_launches(num_groups):
            args: list = [idx_mapping, qo_indptr, cache_lens, pos, pos.numel(), num_rows]
            for g in arg_groups:
                bt, sm = block_tables[g], slot_mappings[g]
                args += [bt, bt.stride(0), bt.shape[1], page_sizes[g], sm, sm.numel()]
            write_positions = positions is not None and arg_groups[0] == 0
            _slot_mapping.launch((num_rows + 1, n), (*args, n, write_positions, _BLOCK))
        return

    start = int(qo_indptr[0])
    total = int(qo_indptr[num_rows])
    reqs, pos_vals = _token_rows(qo_indptr, cache_lens, idx_mapping, num_rows)
    if positions is not None:
        positions[start:total] = pos_vals[: max(0, positions.numel() - start)].to(positions.dtype)
        positions[total:] = 0
    for bt, ps, sm in zip(block_tables, page_sizes, slot_mappings, strict=True):
        slots = _slots_torch(bt, ps, reqs, pos_vals)
        sm[start:total] = slots[: max(0, sm.numel() - start)].to(sm.dtype)
        sm[total:] = PAD_SLOT_ID
