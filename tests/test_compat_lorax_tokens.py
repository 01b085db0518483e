"""``batchmeta.compat.lorax``: ``prepare_position_slot_ids``, ``copy_next_input_ids_inplace`` and
``slots_filtering`` with LoRAX's exact positional signatures.

In LoRAX the ``max_*`` argument sizes the grid (``cdiv(max, BLOCK_SIZE)`` programs per row): an
undersized value silently leaves output unwritten (SPEC bug 2). Here it must not.
"""

import inspect

import pytest
import torch
from _helpers import case_device, naive_copy_next, naive_slots_filtering, on_host, prefix_sum
from hypothesis import given
from hypothesis import strategies as st

import batchmeta.ops._common as common
from batchmeta.compat import lorax

SENTINEL = -999


# --------------------------------------------------------------------------------------------------
# Naive references
# --------------------------------------------------------------------------------------------------
def naive_position_slot_ids(cache_lens, query_lens, cu_slots, position_ids, slot_indices):
    position_ids, slot_indices = list(position_ids), list(slot_indices)
    t = 0
    for b, (cache_len, query_len) in enumerate(zip(cache_lens, query_lens, strict=True)):
        for j in range(query_len):
            position_ids[t] = cache_len + j
            slot_indices[t] = cu_slots[b] + cache_len + j
            t += 1
    return position_ids, slot_indices


def t(values, device, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype, device=device)


@pytest.fixture(params=["default", "no-triton"])
def dispatch(request, monkeypatch):
    """The compat functions take no backend: run them with the default dispatch (Triton under the
    interpreter or on CUDA) and, for CPU tensors, as on a machine where Triton cannot run (torch)."""
    if request.param == "no-triton":
        monkeypatch.setattr(common, "INTERPRET", False)
    return request.param


# --------------------------------------------------------------------------------------------------
# Signatures
# --------------------------------------------------------------------------------------------------
LORAX_SIGNATURES = {
    "prepare_position_slot_ids": [
        "max_input_length",
        "cache_lengths",
        "cu_seqlen",
        "cu_slots",
        "position_ids",
        "slot_indices",
    ],
    "copy_next_input_ids_inplace": [
        "max_next_input_ids",
        "all_input_ids",
        "cache_lengths",
        "input_lengths",
        "prompt_lengths",
        "next_input_ids",
        "cu_accepted_ids",
    ],
    "slots_filtering": ["max_slots", "slots", "filtered_slots", "cu_slots", "slots_start"],
}


@pytest.mark.parametrize("name", sorted(LORAX_SIGNATURES))
def test_signature_is_lorax_positional(name):
    params = list(inspect.signature(getattr(lorax, name)).parameters.values())
    assert [p.name for p in params] == LORAX_SIGNATURES[name]
    for p in params:
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, f"{name}({p.name}) is {p.kind}"
        assert p.default is inspect.Parameter.empty, f"{name}({p.name}) has a default LoRAX lacks"
    assert name in lorax.__all__


# --------------------------------------------------------------------------------------------------
# prepare_position_slot_ids
# --------------------------------------------------------------------------------------------------
def _max_arg(data, true_max, label):
    """LoRAX's ``max_*``: exact, larger, or undersized (0 or 1)."""
    return data.draw(st.sampled_from([0, 1, true_max, true_max + 7]), label=label)


@given(data=st.data())
def test_prepare_position_slot_ids_matches_naive(data, device, dispatch):
    query_lens = data.draw(st.lists(st.integers(0, 8), min_size=1, max_size=8), label="query lens")
    cache_lens = data.draw(st.lists(st.integers(0, 20), min_size=len(query_lens), max_size=len(query_lens)))
    cu_slots = prefix_sum([c + q + 2 for c, q in zip(cache_lens, query_lens, strict=True)])
    capacity = sum(query_lens) + data.draw(st.integers(0, 3), label="spare capacity")
    position_ids = torch.full((capacity,), SENTINEL, dtype=torch.int64, device=device)
    slot_indices = torch.full((capacity,), SENTINEL, dtype=torch.int64, device=device)
    expected_pos, expected_slots = naive_position_slot_ids(
        cache_lens, query_lens, cu_slots, position_ids.tolist(), slot_indices.tolist()
    )
    result = lorax.prepare_position_slot_ids(
        _max_arg(data, max(query_lens), "max_input_length"),
        t(cache_lens, device, torch.int32),
        t(prefix_sum(query_lens), device, torch.int32),
        t(cu_slots, device, torch.int32),
        position_ids,
        slot_indices,
    )
    assert result is None
    assert position_ids.tolist() == expected_pos
    assert slot_indices.tolist() == expected_slots


# --------------------------------------------------------------------------------------------------
# copy_next_input_ids_inplace
# --------------------------------------------------------------------------------------------------
@given(data=st.data())
def test_copy_next_input_ids_matches_naive(data, device, dispatch):
    num_rows = data.draw(st.integers(1, 8), label="rows")
    prompt_lens = data.draw(st.lists(st.integers(1, 10), min_size=num_rows, max_size=num_rows), label="prompts")
    cache_lens = data.draw(st.lists(st.integers(0, 12), min_size=num_rows, max_size=num_rows), label="cache")
    input_lens = data.draw(st.lists(st.integers(1, 4), min_size=num_rows, max_size=num_rows), label="input")
    accepted = data.draw(st.lists(st.integers(0, 5), min_size=num_rows, max_size=num_rows), label="accepted")
    width = max(max(p, c + i + a) for p, c, i, a in zip(prompt_lens, cache_lens, input_lens, accepted, strict=True))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    all_input_ids = torch.randint(0, 2**40, (num_rows, width), generator=gen).to(device)
    next_ids = torch.randint(0, 2**40, (sum(accepted),), generator=gen).to(device)
    expected = naive_copy_next(all_input_ids.tolist(), cache_lens, input_lens, prompt_lens, next_ids.tolist(), accepted)
    result = lorax.copy_next_input_ids_inplace(
        _max_arg(data, max(accepted), "max_next_input_ids"),
        all_input_ids,
        t(cache_lens, device, torch.int32),
        t(input_lens, device, torch.int32),
        t(prompt_lens, device, torch.int32),
        next_ids,
        t(prefix_sum(accepted), device, torch.int32),
    )
    assert result is None
    assert all_input_ids.tolist() == expected


# --------------------------------------------------------------------------------------------------
# slots_filtering
# --------------------------------------------------------------------------------------------------
@given(data=st.data())
def test_slots_filtering_matches_naive(data, device, dispatch):
    old_counts = data.draw(st.lists(st.integers(0, 9), min_size=1, max_size=8), label="old counts")
    old_starts = prefix_sum(old_counts)
    kept = data.draw(st.lists(st.sampled_from(range(len(old_counts))), unique=True, min_size=1), label="kept")
    counts = [old_counts[k] for k in kept]
    starts = [old_starts[k] for k in kept]
    slots = torch.arange(2**32, 2**32 + old_starts[-1], dtype=torch.int64, device=device)
    filtered = torch.full((sum(counts) + data.draw(st.integers(0, 2)),), SENTINEL, dtype=torch.int64, device=device)
    expected = naive_slots_filtering(slots.tolist(), filtered.tolist(), counts, starts)
    result = lorax.slots_filtering(
        _max_arg(data, max(counts), "max_slots"),
        slots,
        filtered,
        t(prefix_sum(counts), device, torch.int32),
        t(starts, device, torch.int32),
    )
    assert result is None
    assert filtered.tolist() == expected


# --------------------------------------------------------------------------------------------------
# SPEC bug 2: an undersized max_* must not leave output unwritten
# --------------------------------------------------------------------------------------------------
# (max value, row lengths): 0 gives LoRAX's grid no program at all; 1 with a 300-token row gives it one
# 256-wide block per row, too few for the row (LoRAX's blocks: 256 here, 16 for copy_next).
UNDERSIZED = [(0, [3, 1, 2]), (1, [300, 2, 17])]


@pytest.mark.parametrize(("max_value", "lengths"), UNDERSIZED)
def test_prepare_position_slot_ids_undersized_max(max_value, lengths, device, dispatch):
    cache_lens = [4, 0, 9]
    cu_slots = prefix_sum([c + q for c, q in zip(cache_lens, lengths, strict=True)])
    total = sum(lengths)
    position_ids = torch.full((total,), SENTINEL, dtype=torch.int32, device=device)
    slot_indices = torch.full((total,), SENTINEL, dtype=torch.int64, device=device)
    lorax.prepare_position_slot_ids(
        max_value,
        t(cache_lens, device),
        t(prefix_sum(lengths), device),
        t(cu_slots, device),
        position_ids,
        slot_indices,
    )
    expected_pos, expected_slots = naive_position_slot_ids(cache_lens, lengths, cu_slots, [0] * total, [0] * total)
    assert position_ids.tolist() == expected_pos
    assert slot_indices.tolist() == expected_slots


@pytest.mark.parametrize(("max_value", "lengths"), UNDERSIZED)
def test_copy_next_input_ids_undersized_max(max_value, lengths, device, dispatch):
    cache_lens, input_lens, prompt_lens = [5, 2, 0], [1, 1, 4], [3, 3, 4]
    width = max(c + i + a for c, i, a in zip(cache_lens, input_lens, lengths, strict=True))
    all_input_ids = torch.full((3, width), SENTINEL, dtype=torch.int64, device=device)
    next_ids = torch.arange(10_000, 10_000 + sum(lengths), dtype=torch.int64, device=device)
    lorax.copy_next_input_ids_inplace(
        max_value,
        all_input_ids,
        t(cache_lens, device),
        t(input_lens, device),
        t(prompt_lens, device),
        next_ids,
        t(prefix_sum(lengths), device),
    )
    expected = naive_copy_next(
        [[SENTINEL] * width] * 3, cache_lens, input_lens, prompt_lens, next_ids.tolist(), lengths
    )
    assert all_input_ids.tolist() == expected


@pytest.mark.parametrize(("max_value", "lengths"), UNDERSIZED)
def test_slots_filtering_undersized_max(max_value, lengths, device, dispatch):
    slots = torch.arange(7, 7 + sum(lengths) + 5, dtype=torch.int64, device=device)
    starts = [5, 0, sum(lengths) - lengths[2] + 5]  # out of order, with gaps
    starts[1] = starts[0] + lengths[0]
    filtered = torch.full((sum(lengths),), SENTINEL, dtype=torch.int64, device=device)
    lorax.slots_filtering(max_value, slots, filtered, t(prefix_sum(lengths), device), t(starts, device))
    expected = naive_slots_filtering(slots.tolist(), [SENTINEL] * sum(lengths), lengths, starts)
    assert filtered.tolist() == expected
    assert SENTINEL not in filtered.tolist()


# --------------------------------------------------------------------------------------------------
# Bad input: raised before anything is written, naming the argument
# --------------------------------------------------------------------------------------------------
def _position_call(device, max_value=4, capacity=5):
    position_ids = torch.full((capacity,), SENTINEL, dtype=torch.int64, device=device)
    slot_indices = torch.full((5,), SENTINEL, dtype=torch.int64, device=device)
    args = (max_value, t([1, 0], device), t([0, 4, 5], device), t([0, 6, 8], device), position_ids, slot_indices)
    return lorax.prepare_position_slot_ids, args, [position_ids, slot_indices]


def _copy_call(device, max_value=2, next_len=3, cache=(1, 1), inputs=(1, 1), prompts=(1, 1)):
    ids = torch.full((2, 6), SENTINEL, dtype=torch.int64, device=device)
    next_ids = torch.arange(next_len, dtype=torch.int64, device=device)
    lens = [t(list(v), device) for v in (cache, inputs, prompts)]
    args = (max_value, ids, *lens, next_ids, t([0, 2, 3], device))
    return lorax.copy_next_input_ids_inplace, args, [ids]


def _filter_call(device, max_value=3, capacity=4):
    filtered = torch.full((capacity,), SENTINEL, dtype=torch.int64, device=device)
    args = (max_value, torch.arange(8, device=device), filtered, t([0, 3, 4], device), t([4, 0], device))
    return lorax.slots_filtering, args, [filtered]


@pytest.mark.parametrize(
    ("make_call", "error", "match"),
    [
        (lambda d: _position_call(d, max_value="4"), TypeError, "max_input_length"),
        (lambda d: _position_call(d, max_value=-1), ValueError, "max_input_length"),
        (lambda d: _position_call(d, max_value=4.0), TypeError, "max_input_length"),
        (on_host(lambda d: _position_call(d, capacity=4)), ValueError, "position_ids"),
        (lambda d: _copy_call(d, max_value=None), TypeError, "max_next_input_ids"),
        (lambda d: _copy_call(d, max_value=-3), ValueError, "max_next_input_ids"),
        (on_host(lambda d: _copy_call(d, next_len=2)), ValueError, "next_input_ids"),
        # Negative lengths (torch wrapped the column, the kernel wrote into the previous row) and a row
        # past the history's 6 columns (4 cached + 1 input + 2 accepted), under LoRAX's names.
        (on_host(lambda d: _copy_call(d, cache=(1, -1))), ValueError, "cache_lengths"),
        (on_host(lambda d: _copy_call(d, inputs=(-1, 1))), ValueError, "input_lengths"),
        (on_host(lambda d: _copy_call(d, prompts=(1, -4))), ValueError, "prompt_lengths"),
        (on_host(lambda d: _copy_call(d, cache=(4, 1))), ValueError, "all_input_ids"),
        (lambda d: _filter_call(d, max_value=torch.tensor(3)), TypeError, "max_slots"),
        (lambda d: _filter_call(d, max_value=-1), ValueError, "max_slots"),
        (on_host(lambda d: _filter_call(d, capacity=3)), ValueError, "filtered_slots"),
    ],
)
def test_bad_input_raises_before_writing(make_call, error, match, device, dispatch):
    fn, args, outputs = make_call(case_device(make_call, device))
    before = [o.clone() for o in outputs]
    with pytest.raises(error, match=match):
        fn(*args)
    for o, b in zip(outputs, before, strict=True):
        assert torch.equal(o, b), "an output was written before the error"


def test_valid_calls_of_the_bad_input_cases_succeed(device):
    # The baselines of the cases above are valid, so each failure there comes from the one change.
    for make_call in (_position_call, _copy_call, _filter_call):
        fn, args, outputs = make_call(device)
        fn(*args)
        assert all((o != SENTINEL).any() for o in outputs)
