"""``ops.draft.advance_draft``: a drafted token handed to the history, the next step and the round's drafts."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from batchmeta.ops.draft import advance_draft


def naive(chosen, idx, positions, history, next_ids, drafts, column):
    history, drafts = history.clone(), drafts.clone()
    next_ids = None if next_ids is None else next_ids.clone()
    for b, r in enumerate(idx.tolist()):
        if not 0 <= r < history.shape[0]:
            continue  # a padding row
        tok = int(chosen[b])
        p = int(positions[b]) + 1
        if p < history.shape[1]:
            history[r, p] = tok
        if next_ids is not None:
            next_ids[b] = tok
        drafts[b, column] = tok
    return history, next_ids, drafts


@settings(max_examples=20)
@given(data=st.data())
def test_advance_matches_the_naive_rule(backend, device, data):
    num_slots, width, k = 5, 12, 3
    rows = data.draw(st.integers(0, num_slots + 2), label="rows")
    real = data.draw(st.lists(st.integers(0, num_slots - 1), min_size=0, max_size=min(rows, num_slots), unique=True))
    idx = real + [num_slots] * (rows - len(real))  # the rest are padding rows
    positions = data.draw(st.lists(st.integers(0, width - 1), min_size=rows, max_size=rows), label="positions")
    chosen = torch.tensor(data.draw(st.lists(st.integers(0, 999), min_size=rows, max_size=rows)), device=device)
    dtype = data.draw(st.sampled_from([torch.int32, torch.int64]), label="dtype")
    column = data.draw(st.integers(0, k - 1), label="column")
    with_next = data.draw(st.booleans(), label="next")
    hist_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]), label="history dtype")
    history = (torch.arange(num_slots * width, device=device).view(num_slots, width) * -1).to(hist_dtype)
    next_ids = torch.full((rows + 1,), -5, dtype=torch.int64, device=device) if with_next else None
    drafts = torch.full((num_slots + 2, k), -9, dtype=torch.int64, device=device)
    idx_t = torch.tensor(idx, dtype=torch.int32, device=device)
    pos_t = torch.tensor(positions, dtype=torch.int64, device=device)
    want = naive(chosen, idx_t, pos_t, history, next_ids, drafts, column)
    advance_draft(chosen.to(dtype), idx_t, pos_t, history, next_ids, drafts, column=column, backend=backend)
    assert torch.equal(history, want[0])
    if with_next:
        assert torch.equal(next_ids, want[1])
    assert torch.equal(drafts, want[2])


def test_advance_rejects_bad_input_before_writing(device):
    history = torch.zeros(4, 8, dtype=torch.int64, device=device)
    idx = torch.tensor([0, 1], dtype=torch.int32, device=device)
    pos = torch.tensor([2, 3], device=device)
    drafts = torch.zeros(4, 2, dtype=torch.int64, device=device)
    tok = torch.tensor([7, 8], device=device)
    bad = [
        (dict(chosen=tok[:1]), ValueError, "chosen"),
        (dict(chosen=tok.float()), TypeError, "chosen"),
        (dict(idx_mapping=idx.long()), TypeError, "idx_mapping"),
        (dict(positions=pos[:1]), ValueError, "positions"),
        (dict(history=history.float()), TypeError, "history"),
        (dict(drafts=drafts[:1]), ValueError, "drafts"),
        (dict(drafts=drafts.t()), ValueError, "drafts"),
        (dict(column=2), ValueError, "column"),
        (dict(column=True), ValueError, "column"),
        (dict(next_input_ids=pos.int()), TypeError, "next_input_ids"),
    ]
    for change, error, name in bad:
        args = dict(
            chosen=tok, idx_mapping=idx, positions=pos, history=history, next_input_ids=None, drafts=drafts, column=0
        )
        args.update(change)
        column = args.pop("column")
        with pytest.raises(error, match=name):
            advance_draft(**args, column=column)
    assert not history.any() and not drafts.any()
