"""LoRAX/TGI ``metadata_kernels`` with the same names, keyword arguments and meaning.

An engine written against LoRAX switches by changing one import::

    from batchmeta.compat.lorax import block_tables_to_ragged, prepare_position_slot_ids, ...

Differences, all in the direction of safety:

- the ``max_*`` arguments only size the grid in LoRAX; here every kernel loops over the real lengths
  on the device, so an undersized ``max_*`` can never leave output unwritten (it is still
  type-checked);
- :func:`block_tables_to_padded` writes the whole of each row: entries past a row's length are 0
  (LoRAX leaves them as they were; its callers zero the table first, so the result is the same);
- :func:`block_tables_to_ragged` keeps LoRAX's meaning of ``cache_len + input_len`` entries per row,
  which is right for page size 1 only; the page-aware version is
  :func:`batchmeta.ops.block_tables_to_ragged`.
"""

from __future__ import annotations

import torch

from batchmeta import ops
from batchmeta.ops._common import check_index_vector, check_int, check_int_list, check_tensor

__all__ = [
    "block_tables_to_padded",
    "block_tables_to_ragged",
    "copy_next_input_ids_inplace",
    "has_triton",
    "prepare_position_slot_ids",
    "slots_filtering",
]


def has_triton() -> bool:
    """Whether the Triton kernels run here (CUDA present, or the interpreter is on); cached."""
    return ops.has_triton()


def block_tables_to_ragged(
    *,
    block_tables: torch.Tensor,
    input_lengths: list[int],
    cache_lengths: list[int],
    input_lengths_tensor: torch.Tensor,
    cache_lengths_tensor: torch.Tensor,
    max_current_length: int,
) -> torch.Tensor:
    """Flattens row ``b``'s first ``cache_lengths[b] + input_lengths[b]`` entries of ``block_tables``
    (``[B, W]`` int32) into a new 1-D int32 tensor, rows back to back (page size 1 semantics).

    ``input_lengths``/``cache_lengths`` are host lists of ints sizing the output (a float or None in
    them is a ``TypeError``, never truncated); the tensors (``[B]`` on the table's device) give the
    same lengths to the kernel.
    """
    del max_current_length  # sizes LoRAX's grid only; this kernel loops over the real lengths
    check_tensor("block_tables", block_tables, dtypes=(torch.int32,), ndim=2)
    device = block_tables.device
    input_lengths = check_int_list("input_lengths", input_lengths, minimum=0)
    cache_lengths = check_int_list("cache_lengths", cache_lengths, minimum=0)
    if len(input_lengths) != len(cache_lengths):
        raise ValueError(
            f"cache_lengths: expected {len(input_lengths)} entries (len(input_lengths)), got {len(cache_lengths)}"
        )
    num_rows = len(input_lengths)
    check_index_vector("input_lengths_tensor", input_lengths_tensor, device=device)
    check_index_vector("cache_lengths_tensor", cache_lengths_tensor, device=device)
    for name, t in (("input_lengths_tensor", input_lengths_tensor), ("cache_lengths_tensor", cache_lengths_tensor)):
        if t.numel() != num_rows:
            raise ValueError(f"{name}: expected {num_rows} elements (len(input_lengths)), got {t.numel()}")
    total = sum(input_lengths) + sum(cache_lengths)
    longest = max((i + c for i, c in zip(input_lengths, cache_lengths, strict=True)), default=0)
    if longest > block_tables.shape[1]:
        raise ValueError(f"block_tables: a row needs {longest} entries but the table is {block_tables.shape[1]} wide")
    out = torch.empty(total, dtype=torch.int32, device=device)
    indptr = torch.empty(num_rows + 1, dtype=torch.int64, device=device)
    ops.block_tables_to_ragged(
        block_tables, input_lengths_tensor + cache_lengths_tensor, 1, out=out, kv_indptr_out=indptr
    )
    return out


def block_tables_to_padded(
    max_blocks: int,
    cu_seqlen: torch.Tensor,
    block_tables: torch.Tensor,
    block_tables_ragged: torch.Tensor,
) -> None:
    """Row ``b`` of ``block_tables`` (output, ``[B, W]`` int32) gets
    ``block_tables_ragged[cu_seqlen[b]:cu_seqlen[b+1]]``; the rest of the row is set to 0."""
    check_int("max_blocks", max_blocks, minimum=0)
    # Checked here under LoRAX's argument names; the op re-checks under its own.
    check_tensor("block_tables_ragged", block_tables_ragged, dtypes=(torch.int32,), ndim=1, contiguous=True)
    device = block_tables_ragged.device
    check_index_vector("cu_seqlen", cu_seqlen, device=device, min_numel=1)
    check_tensor("block_tables", block_tables, dtypes=(torch.int32,), ndim=2, device=device)
    num_rows = cu_seqlen.numel() - 1
    if block_tables.shape[0] < num_rows:
        raise ValueError(
            f"block_tables: expected at least {num_rows} rows (len(cu_seqlen) - 1), got {block_tables.shape[0]}"
        )
    if not cu_seqlen.is_cuda and num_rows:
        counts = cu_seqlen[1:] - cu_seqlen[:-1]
        if int(counts.min()) < 0:
            raise ValueError("cu_seqlen: expected a non-decreasing prefix sum")
        if int(counts.max()) > block_tables.shape[1]:
            raise ValueError(
                f"cu_seqlen: a row has {int(counts.max())} entries but block_tables is {block_tables.shape[1]} wide"
            )
    ops.block_tables_to_padded(block_tables_ragged, cu_seqlen, out=block_tables, pad_value=0)


def copy_next_input_ids_inplace(
    max_next_input_ids: int,
    all_input_ids: torch.Tensor,
    cache_lengths: torch.Tensor,
    input_lengths: torch.Tensor,
    prompt_lengths: torch.Tensor,
    next_input_ids: torch.Tensor,
    cu_accepted_ids: torch.Tensor,
) -> None:
    """Writes accepted tokens into ``all_input_ids`` past each row's current length, except inside
    the prompt; see :func:`batchmeta.ops.copy_next_input_ids_inplace`."""
    check_int("max_next_input_ids", max_next_input_ids, minimum=0)
    ops.copy_next_input_ids_inplace(
        all_input_ids, cache_lengths, input_lengths, prompt_lengths, next_input_ids, cu_accepted_ids
    )


def prepare_position_slot_ids(
    max_input_length: int,
    cache_lengths: torch.Tensor,
    cu_seqlen: torch.Tensor,
    cu_slots: torch.Tensor,
    position_ids: torch.Tensor,
    slot_indices: torch.Tensor,
) -> None:
    """``position_ids`` and ``slot_indices`` of each new token; see
    :func:`batchmeta.ops.prepare_position_slot_ids`."""
    check_int("max_input_length", max_input_length, minimum=0)
    ops.prepare_position_slot_ids(
        cache_lengths, cu_seqlen, cu_slots, position_ids=position_ids, slot_indices=slot_indices
    )


def slots_filtering(
    max_slots: int,
    slots: torch.Tensor,
    filtered_slots: torch.Tensor,
    cu_slots: torch.Tensor,
    slots_start: torch.Tensor,
) -> None:
    """Compacts the slot list; see :func:`batchmeta.ops.slots_filtering`."""
    check_int("max_slots", max_slots, minimum=0)
    ops.slots_filtering(slots, filtered_slots, cu_slots, slots_start)
