"""``copy_next_input_ids_inplace`` (speculative-decoding aware) and ``slots_filtering``.

Every result is compared with ``torch.equal`` to a naive per-request Python loop. The token history
and the filtered slot list start full of values that must survive wherever nothing is to be written.
"""

import pytest
import torch
from _helpers import case_device, naive_copy_next, naive_slots_filtering, on_host, prefix_sum
from hypothesis import given
from hypothesis import strategies as st

import batchmeta.ops.tokens as tokens_module
from batchmeta.ops import copy_next_input_ids_inplace, slots_filtering

SENTINEL = -777
INDEX_DTYPES = [torch.int32, torch.int64]


# --------------------------------------------------------------------------------------------------
# Naive references
# --------------------------------------------------------------------------------------------------


def t(values, dtype, device):
    return torch.tensor(values, dtype=dtype, device=device)


def random_ids(gen, shape, dtype):
    hi = 2**40 if dtype == torch.int64 else 2**31 - 1  # int64 tokens must keep every bit
    return torch.randint(0, hi, shape, generator=gen, dtype=torch.int64).to(dtype)


# --------------------------------------------------------------------------------------------------
# copy_next_input_ids_inplace
# --------------------------------------------------------------------------------------------------
@st.composite
def speculative_rows(draw):
    """``(prompt_len, cache_len, input_len, accepted)`` per row: decode rows with several accepted
    tokens, rows still inside their prompt (chunked prefill), a row crossing the prompt's end this step,
    and rows with nothing accepted."""
    rows = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["decode", "prefill", "crossing", "none"]))
        prompt = draw(st.integers(1, 12))
        accepted = 0 if kind == "none" else draw(st.integers(1, 5))
        if kind == "decode":
            cache = draw(st.integers(prompt - 1, prompt + 6))
            inp = draw(st.integers(max(1, prompt - cache), 4))
        elif kind == "prefill":  # the whole step stays inside the prompt
            cache = draw(st.integers(0, prompt - 1))
            inp = draw(st.integers(1, max(1, prompt - cache - accepted)))
        else:  # the first accepted columns are prompt, the later ones are not
            cache = draw(st.integers(0, prompt - 1))
            inp = prompt - cache - 1 if prompt - cache > 1 else 1
        rows.append((prompt, cache, inp, accepted))
    return rows


@given(rows=speculative_rows(), data=st.data())
def test_copy_next_input_ids_matches_naive(rows, data, device, backend):
    prompt_lens = [r[0] for r in rows]
    cache_lens = [r[1] for r in rows]
    input_lens = [r[2] for r in rows]
    accepted = [r[3] for r in rows]
    needed = max(max(p, c + i + a) for p, c, i, a in rows)
    width = needed + data.draw(st.integers(0, 3), label="spare columns")  # 0: some row fills its history
    ids_dtype = data.draw(st.sampled_from(INDEX_DTYPES), label="token dtype")
    len_dtype = data.draw(st.sampled_from(INDEX_DTYPES), label="length dtype")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    all_input_ids = random_ids(gen, (len(rows), width), ids_dtype).to(device)
    next_ids = random_ids(gen, (sum(accepted) + data.draw(st.integers(0, 2)),), ids_dtype).to(device)
    expected = naive_copy_next(all_input_ids.tolist(), cache_lens, input_lens, prompt_lens, next_ids.tolist(), accepted)

    copy_next_input_ids_inplace(
        all_input_ids,
        t(cache_lens, len_dtype, device),
        t(input_lens, len_dtype, device),
        t(prompt_lens, len_dtype, device),
        next_ids,
        t(prefix_sum(accepted), len_dtype, device),
        backend=backend,
    )
    assert torch.equal(all_input_ids, t(expected, ids_dtype, device))


def test_copy_next_input_ids_spelled_out(device, backend):
    # Row 0: decode with 3 accepted tokens (1 + 2 drafts). Row 1: chunked prefill still inside its
    # 10-token prompt. Row 2: nothing accepted. Row 3: crosses the prompt's end: column 4 is prompt,
    # column 5 is new. Tokens past 2^24 and 2^31 keep their exact value.
    big = 2**40 + 3
    history = [[10 * r + c for c in range(8)] for r in range(4)]
    all_input_ids = t(history, torch.int64, device)
    copy_next_input_ids_inplace(
        all_input_ids,
        t([3, 2, 1, 0], torch.int32, device),  # cache
        t([1, 4, 1, 4], torch.int32, device),  # input
        t([4, 10, 2, 5], torch.int32, device),  # prompt
        t([big, 2**24 + 1, 2**31 + 5, 91, 92, 93, 94], torch.int64, device),
        t([0, 3, 5, 5, 7], torch.int32, device),
        backend=backend,
    )
    expected = [row[:] for row in history]
    expected[0][4:7] = [big, 2**24 + 1, 2**31 + 5]
    expected[3][5] = 94  # its first accepted token (93) would land on column 4, still prompt
    assert all_input_ids.tolist() == expected


def test_copy_next_input_ids_through_idx_mapping(device, backend):
    """Batch row b writes persistent row idx_mapping[b]; other rows stay untouched."""
    gen = torch.Generator().manual_seed(3)
    history = torch.full((6, 12), -5, dtype=torch.int64)
    idx = [4, 0, 2]
    cache, inputs, prompts, accepted = [2, 0, 5], [3, 1, 1], [0, 4, 0], [2, 3, 1]
    nxt = torch.randint(0, 1000, (sum(accepted),), generator=gen)
    expected = history.clone()
    rows = naive_copy_next(history[idx].clone(), cache, inputs, prompts, nxt, accepted)
    expected[idx] = torch.tensor(rows)
    out = history.to(device)
    copy_next_input_ids_inplace(
        out,
        t(cache, torch.int32, device),
        t(inputs, torch.int32, device),
        t(prompts, torch.int64, device),
        nxt.to(device),
        t(prefix_sum(accepted), torch.int32, device),
        idx_mapping=t(idx, torch.int64, device),
        backend=backend,
    )
    assert torch.equal(out.cpu(), expected)


def test_copy_next_input_ids_idx_mapping_out_of_range(backend):
    history = torch.zeros(2, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="idx_mapping"):
        copy_next_input_ids_inplace(
            history,
            torch.zeros(1, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32),
            torch.zeros(1, dtype=torch.int32),
            torch.zeros(1, dtype=torch.int64),
            torch.tensor([0, 1]),
            idx_mapping=torch.tensor([2]),
            backend=backend,
        )
    assert (history == 0).all()


def test_copy_next_input_ids_strided_history_and_long_row(device, backend):
    # A view with a row stride larger than its width (the rest of each row must stay untouched), and a
    # row with more accepted tokens than one kernel block.
    base = torch.full((2, 400), SENTINEL, dtype=torch.int64, device=device)
    view = base[:, :350]
    next_ids = torch.arange(1000, 1000 + 300 + 2, dtype=torch.int64, device=device)
    copy_next_input_ids_inplace(
        view,
        t([10, 3], torch.int64, device),
        t([1, 1], torch.int64, device),
        t([5, 5], torch.int64, device),
        next_ids,
        t([0, 300, 302], torch.int64, device),
        backend=backend,
    )
    expected = naive_copy_next(
        [[SENTINEL] * 400] * 2, [10, 3], [1, 1], [5, 5], next_ids.tolist(), [300, 2]
    )  # columns 350.. are never targets here
    assert base.tolist() == expected


def _copy_args(device):
    return dict(
        all_input_ids=torch.full((2, 6), SENTINEL, dtype=torch.int64, device=device),
        cache_lengths=t([1, 0], torch.int32, device),
        input_lengths=t([1, 2], torch.int32, device),
        prompt_lengths=t([1, 2], torch.int32, device),
        next_input_ids=t([5, 6, 7], torch.int64, device),
        cu_accepted_ids=t([0, 2, 3], torch.int32, device),
    )


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a, d: {"all_input_ids": a["all_input_ids"][0]}, ValueError, "all_input_ids"),
        (lambda a, d: {"all_input_ids": a["all_input_ids"].t()}, ValueError, "all_input_ids"),
        (lambda a, d: {"cache_lengths": a["cache_lengths"].float()}, TypeError, "cache_lengths"),
        (lambda a, d: {"input_lengths": a["input_lengths"][:1]}, ValueError, "input_lengths"),
        (lambda a, d: {"prompt_lengths": a["prompt_lengths"][None]}, ValueError, "prompt_lengths"),
        (lambda a, d: {"next_input_ids": a["next_input_ids"].int()}, TypeError, "next_input_ids"),
        (on_host(lambda a, d: {"next_input_ids": a["next_input_ids"][:2]}), ValueError, "next_input_ids"),
        (lambda a, d: {"cu_accepted_ids": a["cu_accepted_ids"][:2]}, ValueError, "cu_accepted_ids"),
        (on_host(lambda a, d: {"cu_accepted_ids": t([0, 2, 1], torch.int32, d)}), ValueError, "cu_accepted_ids"),
        (lambda a, d: {"cu_accepted_ids": a["cu_accepted_ids"].double()}, TypeError, "cu_accepted_ids"),
        # Negative lengths: torch used to wrap the column, the kernel to write into the previous row.
        (on_host(lambda a, d: {"cache_lengths": t([1, -1], torch.int32, d)}), ValueError, "cache_lengths"),
        (on_host(lambda a, d: {"input_lengths": t([-1, 2], torch.int32, d)}), ValueError, "input_lengths"),
        (on_host(lambda a, d: {"prompt_lengths": t([1, -2], torch.int32, d)}), ValueError, "prompt_lengths"),
        # Row 0 writes columns 5 and 6 (4 cached + 1 input + 2 accepted) of a 6-column history.
        (on_host(lambda a, d: {"cache_lengths": t([4, 0], torch.int32, d)}), ValueError, "all_input_ids"),
    ],
)
def test_copy_next_input_ids_rejects_bad_input_before_writing(change, error, match, device, backend):
    device = case_device(change, device)
    args = _copy_args(device)
    args.update(change(args, device))
    before = args["all_input_ids"].clone()
    with pytest.raises(error, match=match):
        copy_next_input_ids_inplace(**args, backend=backend)
    assert torch.equal(args["all_input_ids"], before)


def test_copy_next_input_ids_rows_up_to_the_last_column(device, backend):
    # The boundary of the width check: row 0 fills its history to the last column; row 1's accepted
    # token lands on column 5, still inside its 6-token prompt, so it writes nothing.
    args = _copy_args(device)
    args.update(cache_lengths=t([3, 3], torch.int32, device), prompt_lengths=t([1, 6], torch.int32, device))
    copy_next_input_ids_inplace(**args, backend=backend)
    assert args["all_input_ids"].tolist() == [[SENTINEL] * 4 + [5, 6], [SENTINEL] * 6]


def test_copy_next_input_ids_device_data_never_writes_outside_a_row(monkeypatch, device, backend):
    # Device inputs are not read by the checks (a sync): negative lengths are the caller's
    # responsibility, but a column before the row's start is dropped, never written into the previous
    # row (the kernel) or wrapped to the row's end (torch). Without a GPU, simulated by making the op
    # treat its CPU inputs as device data.
    monkeypatch.setattr(tokens_module, "is_host", lambda _t: False)
    args = _copy_args(device)
    args.update(cache_lengths=t([1, -3], torch.int32, device), prompt_lengths=t([1, -5], torch.int32, device))
    copy_next_input_ids_inplace(**args, backend=backend)
    # Row 1: one accepted token at column -3 + 2 + 0 = -1: dropped.
    assert args["all_input_ids"].tolist() == [[SENTINEL, SENTINEL, 5, 6, SENTINEL, SENTINEL], [SENTINEL] * 6]


def test_copy_next_input_ids_rejects_unknown_backend(device):
    args = _copy_args(device)
    with pytest.raises(ValueError, match="backend"):
        copy_next_input_ids_inplace(**args, backend="gpu")
    assert (args["all_input_ids"] == SENTINEL).all()


# --------------------------------------------------------------------------------------------------
# slots_filtering
# --------------------------------------------------------------------------------------------------
@given(data=st.data())
def test_slots_filtering_matches_naive(data, device, backend):
    # The old batch: requests with 0..9 slots each, back to back. Some leave; the kept ones, in any
    # order, are compacted.
    old_counts = data.draw(st.lists(st.integers(0, 9), min_size=1, max_size=8), label="old slot counts")
    old_starts = prefix_sum(old_counts)
    kept = data.draw(st.lists(st.sampled_from(range(len(old_counts))), unique=True, min_size=1), label="kept")
    counts = [old_counts[k] for k in kept]
    starts = [old_starts[k] for k in kept]
    dtype = data.draw(st.sampled_from(INDEX_DTYPES), label="slot dtype")
    idx_dtype = data.draw(st.sampled_from(INDEX_DTYPES), label="index dtype")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    slots = random_ids(gen, (old_starts[-1] + data.draw(st.integers(0, 2)),), dtype).to(device)
    filtered = torch.full((sum(counts) + data.draw(st.integers(0, 3)),), SENTINEL, dtype=dtype, device=device)
    expected = naive_slots_filtering(slots.tolist(), filtered.tolist(), counts, starts)

    slots_filtering(
        slots, filtered, t(prefix_sum(counts), idx_dtype, device), t(starts, idx_dtype, device), backend=backend
    )
    assert torch.equal(filtered, t(expected, dtype, device))


def test_slots_filtering_long_request_and_int64_slots(device, backend):
    # One request with more slots than a kernel block, slot ids past 2^31.
    slots = torch.arange(2**33, 2**33 + 400, dtype=torch.int64, device=device)
    filtered = torch.full((305,), SENTINEL, dtype=torch.int64, device=device)
    slots_filtering(
        slots, filtered, t([0, 3, 303], torch.int32, device), t([390, 50], torch.int32, device), backend=backend
    )
    expected = naive_slots_filtering(slots.tolist(), [SENTINEL] * 305, [3, 300], [390, 50])
    assert filtered.tolist() == expected


def test_slots_filtering_no_kept_request_writes_nothing(device, backend):
    slots = torch.arange(5, dtype=torch.int64, device=device)
    filtered = torch.full((3,), SENTINEL, dtype=torch.int64, device=device)
    empty = torch.zeros(0, dtype=torch.int32, device=device)
    slots_filtering(slots, filtered, t([0], torch.int32, device), empty, backend=backend)
    assert (filtered == SENTINEL).all()


def _filter_args(device):
    return dict(
        slots=torch.arange(10, 20, dtype=torch.int64, device=device),
        filtered_slots=torch.full((5,), SENTINEL, dtype=torch.int64, device=device),
        cu_slots=t([0, 2, 5], torch.int32, device),
        slots_start=t([7, 0], torch.int32, device),
    )


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a, d: {"slots": a["slots"][None]}, ValueError, "slots"),
        (
            lambda a, d: {"filtered_slots": torch.full((5,), SENTINEL, dtype=torch.int32, device=d)},
            TypeError,
            "filtered_slots",
        ),
        (
            on_host(lambda a, d: {"filtered_slots": torch.full((4,), SENTINEL, dtype=torch.int64, device=d)}),
            ValueError,
            "filtered_slots",
        ),
        (lambda a, d: {"cu_slots": a["cu_slots"][:2]}, ValueError, "cu_slots"),
        (on_host(lambda a, d: {"cu_slots": t([0, 3, 2], torch.int32, d)}), ValueError, "cu_slots"),
        (lambda a, d: {"cu_slots": a["cu_slots"].float()}, TypeError, "cu_slots"),
        (on_host(lambda a, d: {"slots_start": t([9, 0], torch.int32, d)}), ValueError, "slots_start"),
        (on_host(lambda a, d: {"slots_start": t([-1, 0], torch.int32, d)}), ValueError, "slots_start"),
        (lambda a, d: {"slots_start": a["slots_start"][None]}, ValueError, "slots_start"),
    ],
)
def test_slots_filtering_rejects_bad_input_before_writing(change, error, match, device, backend):
    device = case_device(change, device)
    args = _filter_args(device)
    args.update(change(args, device))
    before = args["filtered_slots"].clone()
    with pytest.raises(error, match=match):
        slots_filtering(**args, backend=backend)
    assert torch.equal(args["filtered_slots"], before)


def test_slots_filtering_rejects_unknown_backend(device):
    args = _filter_args(device)
    with pytest.raises(ValueError, match="backend"):
        slots_filtering(**args, backend="Triton")
    assert (args["filtered_slots"] == SENTINEL).all()


def test_unknown_backend_rejected_on_an_empty_batch_too(device):
    empty = torch.zeros(0, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="backend"):
        copy_next_input_ids_inplace(
            torch.zeros((0, 4), dtype=torch.int64, device=device),
            empty,
            empty,
            empty,
            torch.zeros(0, dtype=torch.int64, device=device),
            t([0], torch.int32, device),
            backend="cuda",
        )
    filtered = torch.full((2,), SENTINEL, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="backend"):
        slots_filtering(torch.arange(3, device=device), filtered, t([0], torch.int32, device), empty, backend="cuda")
    assert (filtered == SENTINEL).all()
