"""``prepare_position_slot_ids`` (LoRAX meaning) and ``compute_slot_mappings`` (vLLM meaning).

Every result is compared with ``torch.equal`` to a naive per-request Python loop. Outputs are filled
with a sentinel before each call, so an element left unwritten (or written where it must not be)
shows up.
"""

import inspect

import pytest
import torch
from _helpers import case_device, on_host, prefix_sum
from hypothesis import given
from hypothesis import strategies as st

import batchmeta.ops.positions as positions_module
from batchmeta.ops import PAD_SLOT_ID, compute_slot_mappings, prepare_position_slot_ids

SENTINEL = 123_456_789
INDEX_DTYPES = [torch.int32, torch.int64]


# --------------------------------------------------------------------------------------------------
# Naive references
# --------------------------------------------------------------------------------------------------
def naive_position_slot_ids(cache_lens, query_lens, cu_slots, position_ids, slot_indices):
    """LoRAX: ``position_ids[t] = cache_len + j``, ``slot_indices[t] = cu_slots[b] + cache_len + j``;
    elements past the step's tokens keep what they held."""
    position_ids, slot_indices = list(position_ids), list(slot_indices)
    t = 0
    for b, (cache_len, query_len) in enumerate(zip(cache_lens, query_lens, strict=True)):
        for j in range(query_len):
            position_ids[t] = cache_len + j
            slot_indices[t] = cu_slots[b] + cache_len + j
            t += 1
    return position_ids, slot_indices


def naive_slot_mappings(idx_mapping, cache_lens, query_lens, tables, page_sizes, slot_capacities, pos_capacity):
    """vLLM: slot of position p in group g is ``table_g[req, p // ps_g] * ps_g + p % ps_g``; every
    element from the step's token count to the end is PAD (-1) for slots and 0 for positions."""
    slots = [[PAD_SLOT_ID] * cap for cap in slot_capacities]
    positions = [0] * pos_capacity
    t = 0
    for b, (cache_len, query_len) in enumerate(zip(cache_lens, query_lens, strict=True)):
        req = idx_mapping[b]
        for j in range(query_len):
            p = cache_len + j
            if t < pos_capacity:
                positions[t] = p
            for g, (table, ps) in enumerate(zip(tables, page_sizes, strict=True)):
                slots[g][t] = table[req][p // ps] * ps + p % ps
            t += 1
    return slots, positions


def cdiv(a, b):
    return -(-a // b)


def draw_rows(data, page_sizes, *, max_rows=8, max_query=8, max_tokens=40, max_cache=40):
    """``(query_len, cache_len)`` per row: empty rows, rows ending on a page boundary, any rows."""
    num_rows = data.draw(st.integers(1, max_rows), label="num_rows")
    rows = []
    budget = max_tokens
    for _ in range(num_rows):
        kind = data.draw(st.sampled_from(["any", "empty", "page_end"]), label="row kind")
        query_len = 0 if kind == "empty" or budget == 0 else data.draw(st.integers(1, min(max_query, budget)))
        budget -= query_len
        if kind == "page_end":
            ps = data.draw(st.sampled_from(page_sizes), label="boundary page size")
            pages = data.draw(st.integers(max(1, cdiv(query_len, ps)), cdiv(query_len, ps) + 2))
            cache_len = pages * ps - query_len
        else:
            cache_len = data.draw(st.integers(0, max_cache), label="cache_len")
        rows.append((query_len, cache_len))
    return rows


def t(values, dtype, device):
    return torch.tensor(values, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------
# prepare_position_slot_ids
# --------------------------------------------------------------------------------------------------
@given(data=st.data())
def test_prepare_position_slot_ids_matches_naive(data, device, backend):
    rows = draw_rows(data, [1, 16])
    query_lens = [q for q, _ in rows]
    cache_lens = [c for _, c in rows]
    num_rows = len(rows)
    # The engine's flat slot list: each request owns at least cache_len + query_len slots.
    owned = [c + q + data.draw(st.integers(0, 3)) for q, c in rows]
    cu_slots = prefix_sum(owned)
    if data.draw(st.booleans(), label="cu_slots without its last entry"):
        cu_slots = cu_slots[:num_rows]
    num_tokens = sum(query_lens)
    capacity = num_tokens + data.draw(st.integers(0, 4), label="extra capacity")
    in_dtype = data.draw(st.sampled_from(INDEX_DTYPES), label="input dtype")
    pos_dtype = data.draw(st.sampled_from(INDEX_DTYPES), label="position_ids dtype")
    slot_dtype = data.draw(st.sampled_from(INDEX_DTYPES), label="slot_indices dtype")

    position_ids = torch.full((capacity,), SENTINEL, dtype=pos_dtype, device=device)
    slot_indices = torch.full((capacity + data.draw(st.integers(0, 2)),), SENTINEL, dtype=slot_dtype, device=device)
    expected_pos, expected_slots = naive_position_slot_ids(
        cache_lens, query_lens, cu_slots, position_ids.tolist(), slot_indices.tolist()
    )
    prepare_position_slot_ids(
        t(cache_lens, in_dtype, device),
        t(prefix_sum(query_lens), in_dtype, device),
        t(cu_slots, in_dtype, device),
        position_ids=position_ids,
        slot_indices=slot_indices,
        backend=backend,
    )
    assert torch.equal(position_ids, t(expected_pos, pos_dtype, device))
    assert torch.equal(slot_indices, t(expected_slots, slot_dtype, device))


def test_prepare_position_slot_ids_long_row_and_int64_values(device, backend):
    # One row longer than two kernel blocks, and slot indices past 2^31 in int64 outputs.
    cache_lens = [5, 2**31 + 7, 0]
    query_lens = [600, 3, 0]
    cu_slots = [0, 2**32, 2**33]
    position_ids = torch.full((610,), SENTINEL, dtype=torch.int64, device=device)
    slot_indices = torch.full((610,), SENTINEL, dtype=torch.int64, device=device)
    expected_pos, expected_slots = naive_position_slot_ids(
        cache_lens, query_lens, cu_slots, position_ids.tolist(), slot_indices.tolist()
    )
    prepare_position_slot_ids(
        t(cache_lens, torch.int64, device),
        t(prefix_sum(query_lens), torch.int64, device),
        t(cu_slots, torch.int64, device),
        position_ids=position_ids,
        slot_indices=slot_indices,
        backend=backend,
    )
    assert torch.equal(position_ids, t(expected_pos, torch.int64, device))
    assert torch.equal(slot_indices, t(expected_slots, torch.int64, device))
    assert slot_indices[603].item() == SENTINEL  # past the step's tokens: untouched


def test_prepare_position_slot_ids_empty_batch_writes_nothing(device, backend):
    position_ids = torch.full((4,), SENTINEL, dtype=torch.int32, device=device)
    slot_indices = torch.full((4,), SENTINEL, dtype=torch.int32, device=device)
    empty = torch.zeros(0, dtype=torch.int32, device=device)
    prepare_position_slot_ids(
        empty, t([0], torch.int32, device), empty, position_ids=position_ids, slot_indices=slot_indices, backend=backend
    )
    assert (position_ids == SENTINEL).all() and (slot_indices == SENTINEL).all()


def _position_args(device):
    """A valid call: rows with 2, 0, 3 new tokens."""
    return dict(
        cache_lengths=t([4, 1, 0], torch.int32, device),
        cu_seqlen=t([0, 2, 2, 5], torch.int32, device),
        cu_slots=t([0, 8, 10, 14], torch.int32, device),
        position_ids=torch.full((5,), SENTINEL, dtype=torch.int32, device=device),
        slot_indices=torch.full((5,), SENTINEL, dtype=torch.int32, device=device),
    )


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a, d: {"cache_lengths": a["cache_lengths"].float()}, TypeError, "cache_lengths"),
        (lambda a, d: {"cache_lengths": a["cache_lengths"][:, None]}, ValueError, "cache_lengths"),
        (on_host(lambda a, d: {"cache_lengths": t([4, -1, 0], torch.int32, d)}), ValueError, "cache_lengths"),
        (lambda a, d: {"cu_seqlen": a["cu_seqlen"][:3]}, ValueError, "cu_seqlen"),
        (on_host(lambda a, d: {"cu_seqlen": t([0, 3, 2, 5], torch.int32, d)}), ValueError, "cu_seqlen"),
        (lambda a, d: {"cu_seqlen": a["cu_seqlen"].double()}, TypeError, "cu_seqlen"),
        (lambda a, d: {"cu_slots": a["cu_slots"][:2]}, ValueError, "cu_slots"),
        (on_host(lambda a, d: {"cu_slots": t([0, -8, 10], torch.int32, d)}), ValueError, "cu_slots"),
        (on_host(lambda a, d: {"cu_seqlen": t([-2, 0, 0, 3], torch.int32, d)}), ValueError, "cu_seqlen"),
        (
            on_host(lambda a, d: {"position_ids": torch.full((4,), SENTINEL, dtype=torch.int32, device=d)}),
            ValueError,
            "position_ids",
        ),
        (
            on_host(lambda a, d: {"slot_indices": torch.full((4,), SENTINEL, dtype=torch.int32, device=d)}),
            ValueError,
            "slot_indices",
        ),
        (lambda a, d: {"position_ids": torch.full((5,), 7.0, device=d)}, TypeError, "position_ids"),
        (
            lambda a, d: {"slot_indices": torch.full((5, 1), SENTINEL, dtype=torch.int32, device=d)},
            ValueError,
            "slot_indices",
        ),
    ],
)
def test_prepare_position_slot_ids_rejects_bad_input_before_writing(change, error, match, device, backend):
    device = case_device(change, device)
    args = _position_args(device)
    args.update(change(args, device))
    before = {k: args[k].clone() for k in ("position_ids", "slot_indices")}
    with pytest.raises(error, match=match):
        prepare_position_slot_ids(**args, backend=backend)
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{k} was written before the error"


I32_MAX = 2**31 - 1


@pytest.mark.parametrize(
    ("cache_len", "cu_slot", "pos_dtype", "slot_dtype", "match"),
    [
        (I32_MAX - 1, 0, torch.int32, torch.int64, "position_ids"),  # last position 2^31
        (I32_MAX - 2, 2, torch.int64, torch.int32, "slot_indices"),  # last slot index 2^31
        (2**63 - 2, 0, torch.int64, torch.int64, "position_ids"),  # last position 2^63: not even int64
        (2**62, 2**62, torch.int64, torch.int64, "slot_indices"),  # last slot index past 2^63
    ],
    ids=["int32-positions", "int32-slots", "int64-positions", "int64-slots"],
)
def test_prepare_position_slot_ids_rejects_values_the_outputs_cannot_hold(
    cache_len, cu_slot, pos_dtype, slot_dtype, match, backend
):
    # Host data: the largest value written must fit its output's dtype (it used to wrap silently).
    device = torch.device("cpu")  # a value check: host tensors only (see on_host)
    position_ids = torch.full((3,), SENTINEL, dtype=pos_dtype)
    slot_indices = torch.full((3,), SENTINEL, dtype=slot_dtype)
    with pytest.raises(ValueError, match=match):
        prepare_position_slot_ids(
            t([cache_len], torch.int64, device),
            t([0, 3], torch.int64, device),
            t([cu_slot], torch.int64, device),
            position_ids=position_ids,
            slot_indices=slot_indices,
            backend=backend,
        )
    assert (position_ids == SENTINEL).all() and (slot_indices == SENTINEL).all()


def test_prepare_position_slot_ids_int32_outputs_up_to_their_limit(device, backend):
    # The largest values int32 holds are written; an empty row past the limit writes nothing.
    position_ids = torch.full((4,), SENTINEL, dtype=torch.int32, device=device)
    slot_indices = torch.full((4,), SENTINEL, dtype=torch.int32, device=device)
    prepare_position_slot_ids(
        t([I32_MAX - 2, 2**40], torch.int64, device),
        t([0, 3, 3], torch.int64, device),
        t([0, 2**40], torch.int64, device),
        position_ids=position_ids,
        slot_indices=slot_indices,
        backend=backend,
    )
    assert position_ids.tolist() == [I32_MAX - 2, I32_MAX - 1, I32_MAX, SENTINEL]
    assert slot_indices.tolist() == [I32_MAX - 2, I32_MAX - 1, I32_MAX, SENTINEL]


def test_prepare_position_slot_ids_rejects_unknown_backend(device):
    args = _position_args(device)
    with pytest.raises(ValueError, match="backend"):
        prepare_position_slot_ids(**args, backend="cuda")
    assert (args["position_ids"] == SENTINEL).all() and (args["slot_indices"] == SENTINEL).all()


# --------------------------------------------------------------------------------------------------
# compute_slot_mappings
# --------------------------------------------------------------------------------------------------
def _run_slot_mappings(
    device,
    backend,
    *,
    rows,
    idx_mapping,
    tables,
    page_sizes,
    slot_caps,
    pos_cap,
    pos_dtype=torch.int64,
    slot_dtypes=None,
    in_dtype=torch.int32,
    num_tokens=None,
):
    """Calls compute_slot_mappings on sentinel-filled outputs and checks them against the naive loop."""
    query_lens = [q for q, _ in rows]
    cache_lens = [c for _, c in rows]
    slot_dtypes = slot_dtypes or [torch.int64] * len(tables)
    slot_mappings = [
        torch.full((cap,), SENTINEL, dtype=dt, device=device) for cap, dt in zip(slot_caps, slot_dtypes, strict=True)
    ]
    positions = None if pos_cap is None else torch.full((pos_cap,), SENTINEL, dtype=pos_dtype, device=device)
    compute_slot_mappings(
        t(idx_mapping, in_dtype, device),
        t(prefix_sum(query_lens), in_dtype, device),
        t(cache_lens, in_dtype, device),
        [t(table, torch.int32, device) for table in tables],
        page_sizes,
        slot_mappings=slot_mappings,
        positions=positions,
        num_tokens=num_tokens,
        backend=backend,
    )
    expected_slots, expected_pos = naive_slot_mappings(
        idx_mapping, cache_lens, query_lens, tables, page_sizes, slot_caps, pos_cap or 0
    )
    for g, (sm, exp, dt) in enumerate(zip(slot_mappings, expected_slots, slot_dtypes, strict=True)):
        assert torch.equal(sm, t(exp, dt, device)), f"group {g}: {sm.tolist()} != {exp}"
    if positions is not None:
        assert torch.equal(positions, t(expected_pos, pos_dtype, device))


def _random_tables(data, rows, page_sizes, num_reqs, *, big):
    """One persistent ``[num_reqs, W_g]`` table per group, wide enough for every row (some exactly)."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="table seed"))
    lo = 2**28 if big else 0
    tables = []
    for ps in page_sizes:
        width = max(1, max(cdiv(q + c, ps) for q, c in rows)) + data.draw(st.integers(0, 1), label="extra width")
        tables.append(torch.randint(lo, lo + 100_000, (num_reqs, width), generator=gen).tolist())
    return tables


@given(data=st.data())
def test_compute_slot_mappings_matches_naive(data, device, backend):
    num_groups = data.draw(st.integers(1, 5), label="num_groups")
    page_sizes = data.draw(st.lists(st.sampled_from([1, 16, 2, 5]), min_size=num_groups, max_size=num_groups))
    rows = draw_rows(data, page_sizes)
    num_reqs = len(rows) + data.draw(st.integers(0, 3), label="spare request slots")
    idx_mapping = data.draw(st.permutations(range(num_reqs)), label="request slots")[: len(rows)]
    big = data.draw(st.booleans(), label="page ids near 2^28")
    tables = _random_tables(data, rows, page_sizes, num_reqs, big=big)
    num_tokens = sum(q for q, _ in rows)
    slot_caps = [num_tokens + data.draw(st.integers(0, 5), label="slot capacity") for _ in page_sizes]
    pos_cap = data.draw(st.one_of(st.none(), st.integers(num_tokens, num_tokens + 5)), label="positions capacity")
    slot_dtypes = [
        torch.int64 if big else data.draw(st.sampled_from(INDEX_DTYPES), label="slot dtype") for _ in page_sizes
    ]
    _run_slot_mappings(
        device,
        backend,
        rows=rows,
        idx_mapping=idx_mapping,
        tables=tables,
        page_sizes=page_sizes,
        slot_caps=slot_caps,
        pos_cap=pos_cap,
        pos_dtype=data.draw(st.sampled_from(INDEX_DTYPES), label="positions dtype"),
        slot_dtypes=slot_dtypes,
        in_dtype=data.draw(st.sampled_from(INDEX_DTYPES), label="input dtype"),
    )


@pytest.mark.parametrize("with_positions", [True, False])
def test_compute_slot_mappings_five_groups_cross_launch_chunks(with_positions, device, backend):
    # 5 groups (more than one launch serves) with distinct page sizes; rows: a prefill chunk, a decode
    # row ending on a 16-page boundary, an empty row, a row starting at position 0. Padded buffers.
    rows = [(7, 9), (1, 31), (0, 4), (5, 0)]
    idx_mapping = [3, 0, 1, 2]
    page_sizes = [16, 1, 2, 5, 16]
    tables = []
    for g, ps in enumerate(page_sizes):
        width = max(cdiv(q + c, ps) for q, c in rows)
        tables.append([[1000 * g + 100 * r + i for i in range(width)] for r in range(4)])
    _run_slot_mappings(
        device,
        backend,
        rows=rows,
        idx_mapping=idx_mapping,
        tables=tables,
        page_sizes=page_sizes,
        slot_caps=[13, 16, 20, 13, 30],
        pos_cap=17 if with_positions else None,
        num_tokens=13 if with_positions else None,  # the host-side count, as a CUDA caller passes it
    )


def test_compute_slot_mappings_slots_past_2_pow_31(device, backend):
    # SPEC bug 9: page ids around 2^28 (and the largest int32 page id) with page size 16.
    rows = [(3, 14), (2, 0)]
    tables = [[[2**28 + 5, 2**28 + 9], [2**31 - 1, 0]]]
    _run_slot_mappings(
        device, backend, rows=rows, idx_mapping=[0, 1], tables=tables, page_sizes=[16], slot_caps=[8], pos_cap=8
    )
    # Spelled out: row 0 position 16 is on page 2^28 + 9, slot (2^28 + 9) * 16 + 0.
    sm = torch.full((5,), SENTINEL, dtype=torch.int64, device=device)
    compute_slot_mappings(
        t([0, 1], torch.int32, device),
        t([0, 3, 5], torch.int32, device),
        t([14, 0], torch.int32, device),
        [t(tables[0], torch.int32, device)],
        [16],
        slot_mappings=[sm],
        backend=backend,
    )
    assert sm.tolist() == [
        (2**28 + 5) * 16 + 14,
        (2**28 + 5) * 16 + 15,
        (2**28 + 9) * 16,
        (2**31 - 1) * 16,
        (2**31 - 1) * 16 + 1,
    ]


def test_compute_slot_mappings_empty_batch_pads_everything(device, backend):
    # A CUDA-graph replay with no real request: every element is padding.
    sms = [torch.full((6,), SENTINEL, dtype=torch.int64, device=device) for _ in range(2)]
    positions = torch.full((6,), SENTINEL, dtype=torch.int32, device=device)
    empty = torch.zeros(0, dtype=torch.int32, device=device)
    table = torch.zeros((2, 3), dtype=torch.int32, device=device)
    compute_slot_mappings(
        empty,
        t([0], torch.int32, device),
        empty,
        [table, table],
        [16, 1],
        slot_mappings=sms,
        positions=positions,
        backend=backend,
    )
    for sm in sms:
        assert sm.tolist() == [PAD_SLOT_ID] * 6
    assert positions.tolist() == [0] * 6


def _slot_args(device):
    """A valid call: rows with 2 and 1 new tokens, two groups."""
    return dict(
        idx_mapping=t([1, 0], torch.int32, device),
        qo_indptr=t([0, 2, 3], torch.int32, device),
        cache_lens=t([3, 0], torch.int32, device),
        block_tables=[
            t([[5, 6], [7, 8]], torch.int32, device),
            t([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], torch.int32, device),
        ],
        page_sizes=[4, 1],
        slot_mappings=[torch.full((4,), SENTINEL, dtype=torch.int64, device=device) for _ in range(2)],
        positions=torch.full((4,), SENTINEL, dtype=torch.int64, device=device),
    )


def _full(n, device, dtype=torch.int64):
    return torch.full((n,), SENTINEL, dtype=dtype, device=device)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a, d: {"idx_mapping": a["idx_mapping"].float()}, TypeError, "idx_mapping"),
        (on_host(lambda a, d: {"idx_mapping": t([1, 2], torch.int32, d)}), ValueError, "idx_mapping"),
        (on_host(lambda a, d: {"idx_mapping": t([-1, 0], torch.int32, d)}), ValueError, "idx_mapping"),
        (lambda a, d: {"qo_indptr": a["qo_indptr"][:2]}, ValueError, "qo_indptr"),
        (lambda a, d: {"qo_indptr": a["qo_indptr"][None]}, ValueError, "qo_indptr"),
        (lambda a, d: {"cache_lens": a["cache_lens"][:1]}, ValueError, "cache_lens"),
        (on_host(lambda a, d: {"cache_lens": t([3, -1], torch.int32, d)}), ValueError, "cache_lens"),
        (lambda a, d: {"block_tables": []}, ValueError, "block_tables"),
        (
            lambda a, d: {"block_tables": [a["block_tables"][0].long(), a["block_tables"][1]]},
            TypeError,
            r"block_tables\[0\]",
        ),
        (
            lambda a, d: {"block_tables": [a["block_tables"][0], a["block_tables"][1][0]]},
            ValueError,
            r"block_tables\[1\]",
        ),
        (lambda a, d: {"page_sizes": [4]}, ValueError, "page_sizes"),
        (lambda a, d: {"page_sizes": [4, 0]}, ValueError, r"page_sizes\[1\]"),
        (lambda a, d: {"page_sizes": [4.0, 1]}, TypeError, r"page_sizes\[0\]"),
        (lambda a, d: {"page_sizes": [2**31, 1]}, ValueError, r"page_sizes\[0\]"),
        (on_host(lambda a, d: {"qo_indptr": t([-1, 2, 3], torch.int32, d)}), ValueError, "qo_indptr"),
        (on_host(lambda a, d: {"slot_mappings": [_full(4, d), _full(2, d)]}), ValueError, r"slot_mappings\[1\]"),
        (
            lambda a, d: {"slot_mappings": [_full(4, d, torch.float32), _full(4, d)]},
            TypeError,
            r"slot_mappings\[0\]",
        ),
        (on_host(lambda a, d: {"positions": _full(2, d)}), ValueError, "positions"),
        (lambda a, d: {"positions": _full(4, d, torch.float64)}, TypeError, "positions"),
        (lambda a, d: {"num_tokens": -1}, ValueError, "num_tokens"),
        (lambda a, d: {"num_tokens": 3.0}, TypeError, "num_tokens"),
        (lambda a, d: {"num_tokens": 5}, ValueError, "slot_mappings"),  # host count past the 4-element outputs
    ],
)
def test_compute_slot_mappings_rejects_bad_input_before_writing(change, error, match, device, backend):
    device = case_device(change, device)
    args = _slot_args(device)
    args.update(change(args, device))
    outputs = [*args["slot_mappings"], args["positions"]]
    before = [o.clone() for o in outputs]
    with pytest.raises(error, match=match):
        compute_slot_mappings(**args, backend=backend)
    for o, b in zip(outputs, before, strict=True):
        assert torch.equal(o, b), "an output was written before the error"


@pytest.mark.parametrize(
    ("cache_lens", "group"),
    [([5, 0], 1), ([7, 0], 0), ([3, 5], 1)],
    ids=["past-group-1-only", "past-both-groups", "second-row"],
)
def test_compute_slot_mappings_rejects_rows_past_the_table_width(cache_lens, group, backend):
    # _slot_args: group 0 is 2 pages of 4 tokens wide, group 1 is 5 pages of 1 token. Row 0 (2 new
    # tokens over 5 cached) reaches position 6: page 1 of group 0 (fits), page 6 of group 1 (does not).
    # The torch path used to raise IndexError and the kernel to read the next request's row: with
    # host data it is a ValueError naming cache_lens and the group, before anything is written.
    device = torch.device("cpu")  # a value check: host tensors only (see on_host)
    args = _slot_args(device)
    args["cache_lens"] = t(cache_lens, torch.int32, device)
    outputs = [*args["slot_mappings"], args["positions"]]
    with pytest.raises(ValueError, match=rf"cache_lens: .*group {group}.*block_tables\[{group}\] is \d+ pages wide"):
        compute_slot_mappings(**args, backend=backend)
    for o in outputs:
        assert (o == SENTINEL).all(), f"written before the error: {o.tolist()}"


def test_compute_slot_mappings_rows_filling_the_table_exactly(device, backend):
    # The boundary of the check above: positions up to W * ps - 1 are inside the table.
    args = _slot_args(device)
    args["cache_lens"] = t([3, 4], torch.int32, device)  # row 0: positions 3, 4; row 1: position 4
    compute_slot_mappings(**args, backend=backend)
    assert args["slot_mappings"][0].tolist() == [7 * 4 + 3, 8 * 4, 6 * 4, PAD_SLOT_ID]
    assert args["slot_mappings"][1].tolist() == [9, 10, 5, PAD_SLOT_ID]


def test_compute_slot_mappings_device_data_past_the_table_gets_pad(monkeypatch, device, backend):
    # Device inputs are not read by the checks (a sync): a row past its table is the caller's
    # responsibility, but its slots are PAD, never the pages of the next request slot's row. Without a
    # GPU, simulated by making the op treat its CPU inputs as device data.
    monkeypatch.setattr(positions_module, "is_host", lambda _t: False)
    args = _slot_args(device)
    args["cache_lens"] = t([7, 0], torch.int32, device)  # row 0 (request slot 1): positions 7, 8
    compute_slot_mappings(**args, backend=backend)
    assert args["slot_mappings"][0].tolist() == [8 * 4 + 3, PAD_SLOT_ID, 5 * 4 + 0, PAD_SLOT_ID]
    assert args["slot_mappings"][1].tolist() == [PAD_SLOT_ID, PAD_SLOT_ID, 1, PAD_SLOT_ID]
    assert args["positions"].tolist() == [7, 8, 0, 0]


@pytest.mark.parametrize(
    ("table", "page_size", "cache_len", "pos_dtype", "slot_dtype", "match"),
    [
        ([[2**28]], 16, 0, torch.int64, torch.int32, r"slot_mappings\[0\]"),  # slot 2^32
        ([[0, 1]], I32_MAX, I32_MAX, torch.int32, torch.int64, "positions"),  # position 2^31
    ],
    ids=["int32-slot-mapping", "int32-positions"],
)
def test_compute_slot_mappings_rejects_values_int32_outputs_cannot_hold(
    table, page_size, cache_len, pos_dtype, slot_dtype, match, backend
):
    # Host data: an int32 output whose largest value passes 2^31 - 1 is a ValueError naming it (it
    # used to wrap silently), before anything is written.
    device = torch.device("cpu")  # a value check: host tensors only (see on_host)
    sm = torch.full((2,), SENTINEL, dtype=slot_dtype)
    positions = torch.full((2,), SENTINEL, dtype=pos_dtype)
    with pytest.raises(ValueError, match=match):
        compute_slot_mappings(
            t([0], torch.int32, device),
            t([0, 2], torch.int32, device),
            t([cache_len], torch.int64, device),
            [t(table, torch.int32, device)],
            [page_size],
            slot_mappings=[sm],
            positions=positions,
            backend=backend,
        )
    assert (sm == SENTINEL).all() and (positions == SENTINEL).all()


def test_compute_slot_mappings_int32_outputs_up_to_their_limit(device, backend):
    # Page (2^31 - 1) // 16 of 16 tokens: its last slot is 2^31 - 1 - 15 + 15 = int32's largest.
    page = (I32_MAX - 15) // 16
    sm = torch.full((3,), SENTINEL, dtype=torch.int32, device=device)
    positions = torch.full((3,), SENTINEL, dtype=torch.int32, device=device)
    compute_slot_mappings(
        t([0], torch.int32, device),
        t([0, 2], torch.int32, device),
        t([14], torch.int32, device),
        [t([[page]], torch.int32, device)],
        [16],
        slot_mappings=[sm],
        positions=positions,
        backend=backend,
    )
    assert sm.tolist() == [page * 16 + 14, page * 16 + 15, PAD_SLOT_ID] and page * 16 + 15 == I32_MAX
    assert positions.tolist() == [14, 15, 0]


def test_compute_slot_mappings_rejects_negative_query_length(backend):
    device = torch.device("cpu")  # a value check: host tensors only (see on_host)
    # qo_indptr [0, 3, 1]: row 0 has 3 tokens, row 1 has -2. Like prepare_position_slot_ids with its
    # cu_seqlen, this must raise a ValueError naming qo_indptr before anything is written (the CPU
    # prefix sum makes the check free of host syncs).
    args = _slot_args(device)
    args["qo_indptr"] = t([0, 3, 1], torch.int32, device)
    outputs = [*args["slot_mappings"], args["positions"]]
    with pytest.raises(ValueError, match="qo_indptr"):
        compute_slot_mappings(**args, backend=backend)
    for o in outputs:
        assert (o == SENTINEL).all(), f"written before the error: {o.tolist()}"


def test_compute_slot_mappings_names_qo_indptr():
    # FlashInfer's vocabulary: the [B + 1] prefix sum of new tokens is ``qo_indptr``, second positional.
    params = list(inspect.signature(compute_slot_mappings).parameters)
    assert params[1] == "qo_indptr"
    assert "query_start_loc" not in params


@pytest.mark.parametrize(
    "bad",
    [
        lambda d: t([0, 2], torch.int32, d),  # too short for two rows
        lambda d: t([0, 2, 3], torch.int32, d)[None],  # not a vector
        lambda d: t([0, 3, 1], torch.int32, d),  # decreasing
    ],
)
def test_compute_slot_mappings_bad_qo_indptr_names_it(bad, backend):
    device = torch.device("cpu")  # the decreasing case is a host value check
    args = _slot_args(device)
    args["qo_indptr"] = bad(device)
    with pytest.raises(ValueError, match="qo_indptr"):
        compute_slot_mappings(**args, backend=backend)
    # Positionally too: the second parameter.
    qo = args.pop("qo_indptr")
    with pytest.raises(ValueError, match="qo_indptr"):
        compute_slot_mappings(args.pop("idx_mapping"), qo, **args, backend=backend)


def test_compute_slot_mappings_rejects_unknown_backend(device):
    args = _slot_args(device)
    with pytest.raises(ValueError, match="backend"):
        compute_slot_mappings(**args, backend="cuda")
    assert all((o == SENTINEL).all() for o in [*args["slot_mappings"], args["positions"]])


def test_unknown_backend_rejected_on_an_empty_batch_too(device):
    empty = torch.zeros(0, dtype=torch.int32, device=device)
    position_ids = torch.full((2,), SENTINEL, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="backend"):
        prepare_position_slot_ids(
            empty,
            t([0], torch.int32, device),
            empty,
            position_ids=position_ids,
            slot_indices=position_ids,
            backend="cuda",
        )
    sm = torch.full((2,), SENTINEL, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="backend"):
        compute_slot_mappings(
            empty,
            t([0], torch.int32, device),
            empty,
            [torch.zeros((1, 1), dtype=torch.int32, device=device)],
            [16],
            slot_mappings=[sm],
            positions=position_ids,
            backend="cuda",
        )
    assert (sm == SENTINEL).all() and (position_ids == SENTINEL).all()
