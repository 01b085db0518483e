"""Draft loops on the device: a drafted token carried from one draft step to the next.

A draft round (:mod:`batchmeta.draft`) has every step's metadata written before its first forward;
the one thing a step depends on that the host cannot know is the token the drafter chose in the
step before. :func:`advance_draft` writes it, for every real row of step ``j``:

- into the token history at the row's position + 1 (where the next verify step gathers its drafts);
- into step ``j + 1``'s ``input_ids`` (which its launch gathered from the history before the token
  existed);
- into column ``j`` of the round's ``[R, K]`` draft tokens (row ``b``: the batch row).

A Triton kernel and a torch twin (the CPU fallback and test oracle). The op reads everything it
needs from the device (the step's request slots and positions, exact also where the host planned
from upper bounds), so a round replays under a CUDA graph with no host work between its steps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchmeta.launch import cached_kernel
from batchmeta.ops._common import check_tensor, use_triton

__all__ = ["advance_draft"]

_BLOCK = 128


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
