"""The metadata ops: each a Triton kernel, its launcher, and a torch implementation.

Every op writes into caller-given output tensors, makes no host sync when its inputs are on the
device, and dispatches by ``backend``: None picks Triton for CUDA tensors (or under
``TRITON_INTERPRET=1``) and the torch implementation otherwise; ``"triton"`` and ``"torch"`` force
one. The torch implementations are the CPU fallback and the tests' oracle; on CUDA tensors they may
sync.

This namespace holds only the public ops. Internals (the fused per-step launch
:mod:`batchmeta.ops.step`, ``scatter_int32`` in :mod:`batchmeta.ops.block_table`) live in their
modules and are imported from there.
"""

from batchmeta.ops._common import has_triton
from batchmeta.ops.block_table import (
    block_tables_to_padded,
    block_tables_to_ragged,
    gather_block_tables,
    write_kv_indices,
)
from batchmeta.ops.host import fill_kv_indptr, fill_kv_last_page_len, fill_qo_indptr
from batchmeta.ops.kv_cache import store_kv, store_mla_kv
from batchmeta.ops.lse import correct_attn_out
from batchmeta.ops.pack import pack_seq, unpack_seq
from batchmeta.ops.positions import PAD_SLOT_ID, compute_slot_mappings, prepare_position_slot_ids
from batchmeta.ops.tokens import copy_next_input_ids_inplace, slots_filtering

__all__ = [
    "PAD_SLOT_ID",
    "block_tables_to_padded",
    "block_tables_to_ragged",
    "compute_slot_mappings",
    "copy_next_input_ids_inplace",
    "correct_attn_out",
    "fill_kv_indptr",
    "fill_kv_last_page_len",
    "fill_qo_indptr",
    "gather_block_tables",
    "has_triton",
    "pack_seq",
    "prepare_position_slot_ids",
    "slots_filtering",
    "store_kv",
    "store_mla_kv",
    "unpack_seq",
    "write_kv_indices",
]
