"""The public ops namespace: exactly the ops of README's ops table, no internals."""

import batchmeta.ops

PUBLIC_OPS = {
    "PAD_SLOT_ID",
    "has_triton",
    "block_tables_to_ragged",
    "write_kv_indices",
    "block_tables_to_padded",
    "gather_block_tables",
    "compute_slot_mappings",
    "prepare_position_slot_ids",
    "copy_next_input_ids_inplace",
    "slots_filtering",
    "pack_seq",
    "unpack_seq",
    "correct_attn_out",
    "store_kv",
    "store_mla_kv",
    "fill_qo_indptr",
    "fill_kv_indptr",
    "fill_kv_last_page_len",
}

INTERNALS = ["StepLayout", "bind_step_metadata", "bind_scatter_pairs", "fill_step_metadata", "scatter_int32"]


def test_ops_all_is_exactly_the_public_ops():
    assert len(PUBLIC_OPS) == 18
    assert len(batchmeta.ops.__all__) == len(set(batchmeta.ops.__all__))
    assert set(batchmeta.ops.__all__) == PUBLIC_OPS
    for name in PUBLIC_OPS:
        assert hasattr(batchmeta.ops, name), name


def test_ops_namespace_has_no_internals():
    for name in INTERNALS:
        assert not hasattr(batchmeta.ops, name), name


def test_internals_importable_from_their_modules():
    from batchmeta.ops.block_table import scatter_int32
    from batchmeta.ops.step import StepLayout, bind_scatter_pairs, bind_step_metadata, fill_step_metadata

    assert all(
        callable(f) for f in (scatter_int32, StepLayout, bind_scatter_pairs, bind_step_metadata, fill_step_metadata)
    )
