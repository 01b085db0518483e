"""Token bookkeeping after sampling: accepted tokens into the history, slot-list compaction."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchmeta.launch import cached_kernel
from batchmeta.ops._common import (
    check_host_index_range,
    check_host_nonnegative,
    check_index_vector,
    check_tensor,
    check_unit_column_stride,
    host_sum,
    is_host,
    use_triton,
)

__all__ = ["copy_next_input_ids_inplace", "slots_filtering"]

_BLOCK = 128


@triton.jit
def _copy_next_kernel(
    all_input_ids_ptr,  # [B, L], row stride ids_stride, unit column stride
    ids_stride,
    ids_width,
    cache_lengths_ptr,  # [B]
    input_lengths_ptr,  # [B]
    prompt_lengths_ptr,  # [B]
    next_input_ids_ptr,  # [N]
    next_numel,
    cu_accepted_ids_ptr,  # [B + 1]
    idx_mapping_ptr,  # [B] row of all_input_ids for batch row b (read when HAS_IDX_MAPPING)
    HAS_IDX_MAPPING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    if HAS_IDX_MAPPING:
        row_idx = tl.load(idx_mapping_ptr + b).to(tl.int64)
    else:
        row_idx = b.to(tl.int64)
    src_start = tl.load(cu_accepted_ids_ptr + b).to(tl.int64)
    n = tl.load(cu_accepted_ids_ptr + b + 1).to(tl.int64) - src_start
    base = tl.load(cache_lengths_ptr + b).to(tl.int64) + tl.load(input_lengths_ptr + b).to(tl.int64)
    prompt_len = tl.load(prompt_lengths_ptr + b).to(tl.int64)
    row = all_input_ids_ptr + row_idx * ids_stride
    for off in range(0, n, BLOCK):
        j = off + tl.arange(0, BLOCK)
        col = base + j
        src = src_start + j
        # A request still inside its prompt (chunked prefill) keeps its prompt tokens; a column outside
        # the row (negative lengths on the device) is dropped, never written into a neighbouring row.
        m = (j < n) & (col >= prompt_len) & (col >= 0) & (col < ids_width) & (src < next_numel)
        v = tl.load(next_input_ids_ptr + src, mask=m)
        tl.store(row + col, v, mask=m)


_copy_next = cached_kernel(_copy_next_kernel)


def copy_next_input_ids_inplace(
    all_input_ids: torch.Tensor,
    cache_lengths: torch.Tensor,
    input_lengths: torch.Tensor,
    prompt_lengths: torch.Tensor,
    next_input_ids: torch.Tensor,
    cu_accepted_ids: torch.Tensor,
    *,
    idx_mapping: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """Writes the accepted tokens of each row into its token history (speculative-decoding aware).

    For row ``b``, ``j < cu_accepted_ids[b+1] - cu_accepted_ids[b]`` and
    ``c = cache_lengths[b] + input_lengths[b] + j``:
    ``all_input_ids[r, c] = next_input_ids[cu_accepted_ids[b] + j]`` where ``c >= prompt_lengths[b]``
    (and ``c`` is inside the row), with ``r = idx_mapping[b]`` (or ``b``). Call it before the lengths
    are advanced.

    Parameters
    ----------
    all_input_ids:
        ``[B, L]`` token history (any integer dtype), unit column stride; ``[R, L]`` persistent
        per-request rows when ``idx_mapping`` is given.
    cache_lengths, input_lengths, prompt_lengths:
        ``[B]`` int32/int64.
    next_input_ids:
        ``[N]`` sampled tokens, accepted ones of each row back to back; same dtype as
        ``all_input_ids``.
    cu_accepted_ids:
        ``[B + 1]`` int32/int64 prefix sum of accepted tokens per row.
    idx_mapping:
        ``[B]`` int32/int64 row of ``all_input_ids`` of each batch row, or None for the identity.

    With CPU inputs every value is checked before anything is written: lengths non-negative,
    ``cu_accepted_ids`` non-decreasing and within ``next_input_ids``, rows of ``idx_mapping`` inside
    ``all_input_ids``, and every row that writes fits: ``cache_lengths[b] + input_lengths[b] +
    accepted_b <= L``. Device inputs are not read (that would sync): their values are the caller's
    responsibility, and a token whose column falls outside its row is dropped.
    """
    check_tensor("all_input_ids", all_input_ids, ndim=2)
    device = all_input_ids.device
    check_unit_column_stride("all_input_ids", all_input_ids)
    num_rows = all_input_ids.shape[0]
    if idx_mapping is not None:
        check_index_vector("idx_mapping", idx_mapping, device=device)
        check_host_index_range("idx_mapping", idx_mapping, all_input_ids.shape[0], "rows of all_input_ids")
        num_rows = idx_mapping.numel()
    for name, t in (
        ("cache_lengths", cache_lengths),
        ("input_lengths", input_lengths),
        ("prompt_lengths", prompt_lengths),
    ):
        check_index_vector(name, t, device=device, min_numel=num_rows)
    check_tensor(
        "next_input_ids", next_input_ids, dtypes=(all_input_ids.dtype,), ndim=1, device=device, contiguous=True
    )
    check_index_vector("cu_accepted_ids", cu_accepted_ids, device=device, min_numel=num_rows + 1)
    if is_host(cu_accepted_ids) and num_rows:  # every input is on this device (checked above)
        cu = cu_accepted_ids[: num_rows + 1].long()
        check_host_nonnegative("cu_accepted_ids", cu, "offsets")
        accepted = cu[1:] - cu[:-1]
        if int(accepted.min()) < 0:
            raise ValueError("cu_accepted_ids: expected a non-decreasing prefix sum")
        if int(cu[-1]) > next_input_ids.numel():
            raise ValueError(
                f"next_input_ids: expected at least {int(cu[-1])} elements (cu_accepted_ids[-1]), "
                f"got {next_input_ids.numel()}"
            )
        cache, inputs, prompts = (t[:num_rows].long() for t in (cache_lengths, input_lengths, prompt_lengths))
        check_host_nonnegative("cache_lengths", cache)
        check_host_nonnegative("input_lengths", inputs)
        check_host_nonnegative("prompt_lengths", prompts)
        # Rows that write: some accepted token lands at or past the prompt's end.
        ends = host_sum("all_input_ids", cache, inputs, accepted)
        writes = (accepted > 0) & (ends > prompts)
        width = all_input_ids.shape[1]
        if bool(writes.any()) and int(ends[writes].max()) > width:
            b = int(writes.nonzero().flatten()[int(ends[writes].argmax())])
            raise ValueError(
                f"all_input_ids: row {b} writes up to column {int(ends[b]) - 1} (cache_lengths + input_lengths + "
                f"accepted - 1), past its {width} columns"
            )
    on_triton = use_triton(backend, all_input_ids)
    if num_rows == 0:
        return
    if on_triton:
        _copy_next.launch(
            (num_rows,),
            (
                all_input_ids,
                all_input_ids.stride(0),
                all_input_ids.shape[1],
                cache_lengths,
                input_lengths,
                prompt_lengths,
                next_input_ids,
                next_input_ids.numel(),
                cu_accepted_ids,
                idx_mapping if idx_mapping is not None else cu_accepted_ids,
                idx_mapping is not None,
                _BLOCK,
            ),
        )
        return
    cu = cu_accepted_ids[: num_rows + 1].long()
    counts = cu[1:] - cu[:-1]
    row = torch.repeat_interleave(torch.arange(num_rows, device=device), counts)
    src = torch.arange(int(cu[0]), int(cu[-1]), device=device)
    j = src - cu[:-1][row]
    col = cache_lengths.long()[row] + input_lengths.long()[row] + j
    keep = (col >= prompt_lengths.long()[row]) & (col >= 0) & (col < all_input_ids.shape[1])
    keep &= src < next_input_ids.numel()
    rows = row if idx_mapping is None else idx_mapping.long()[row]
    all_input_ids[rows[keep], col[keep]] = next_input_ids[src[keep]]


@triton.jit
def _slots_filtering_kernel(
    slots_ptr,  # [S]
    slots_numel,
    filtered_slots_ptr,  # [F]
    filtered_numel,
    cu_slots_ptr,  # [K + 1]
    slots_start_ptr,  # [K]
    BLOCK: tl.constexpr,
):
    k = tl.program_id(0)
    dst_start = tl.load(cu_slots_ptr + k).to(tl.int64)
    n = tl.load(cu_slots_ptr + k + 1).to(tl.int64) - dst_start
    src_start = tl.load(slots_start_ptr + k).to(tl.int64)
    for off in range(0, n, BLOCK):
        j = off + tl.arange(0, BLOCK)
        src = src_start + j
        dst = dst_start + j
        m = (j < n) & (src < slots_numel) & (dst < filtered_numel)
        tl.store(filtered_slots_ptr + dst, tl.load(slots_ptr + src, mask=m), mask=m)


_slots_filtering = cached_kernel(_slots_filtering_kernel)


def slots_filtering(
    slots: torch.Tensor,
    filtered_slots: torch.Tensor,
    cu_slots: torch.Tensor,
    slots_start: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Compacts the slot list after requests leave the batch.

    ``filtered_slots[cu_slots[k]:cu_slots[k+1]] = slots[slots_start[k] : slots_start[k] + n_k]``
    with ``n_k = cu_slots[k+1] - cu_slots[k]``.

    Parameters
    ----------
    slots:
        ``[S]`` old flat slot list.
    filtered_slots:
        ``[>= cu_slots[K]]`` output, same dtype as ``slots``.
    cu_slots:
        ``[K + 1]`` int32/int64 prefix sum of slots per kept request.
    slots_start:
        ``[K]`` int32/int64 where each kept request's slots start in ``slots``.
    """
    check_tensor("slots", slots, ndim=1, contiguous=True)
    device = slots.device
    check_tensor("filtered_slots", filtered_slots, dtypes=(slots.dtype,), ndim=1, device=device, contiguous=True)
    check_index_vector("slots_start", slots_start, device=device)
    num_rows = slots_start.numel()
    check_index_vector("cu_slots", cu_slots, device=device, min_numel=num_rows + 1)
    if not cu_slots.is_cuda and num_rows:
        cu = cu_slots[: num_rows + 1].long()
        counts = cu[1:] - cu[:-1]
        if int(counts.min()) < 0:
            raise ValueError("cu_slots: expected a non-decreasing prefix sum")
        if int(cu[-1]) > filtered_slots.numel():
            raise ValueError(f"filtered_slots: expected at least {int(cu[-1])} elements, got {filtered_slots.numel()}")
        if not slots_start.is_cuda:
            ends = slots_start.long() + counts
            if int(slots_start.min()) < 0 or int(ends.max()) > slots.numel():
                raise ValueError(f"slots_start: a kept request's slots run past the end of slots ({slots.numel()})")
    on_triton = use_triton(backend, slots)
    if num_rows == 0:
        return
    if on_triton:
        _slots_filtering.launch(
            (num_rows,),
            (slots, slots.numel(), filtered_slots, filtered_slots.numel(), cu_slots, slots_start, _BLOCK),
        )
        return
    cu = cu_slots[: num_rows + 1].long()
    counts = cu[1:] - cu[:-1]
    row = torch.repeat_interleave(torch.arange(num_rows, device=device), counts)
    dst = torch.arange(int(cu[0]), int(cu[-1]), device=device)
    src = slots_start.long()[row] + (dst - cu[:-1][row])
    keep = (src < slots.numel()) & (dst < filtered_slots.numel())
    filtered_slots[dst[keep]] = slots[src[keep]]
