"""``ops.draft``: ``advance_draft`` (a drafted token handed to the history, the next step and the round's
drafts) and ``shift_rows`` (a step's packed rows some positions further), each against a naive loop."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from batchmeta.ops.draft import advance_draft, shift_rows
from batchmeta.ops.step import (
    ROW_CACHE,
    ROW_COUNT,
    ROW_GROUP,
    ROW_IDX,
    ROW_KV_HI,
    ROW_KV_LO,
    ROW_LAST,
    ROW_PER_GROUP,
    ROW_SEQ,
    ROW_SWIDTH,
    row_chunks,
    row_stride,
)


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


def naive_shift(packed, shift, page_sizes, num_rows, pad_row, max_len):
    """Row by row: real rows move ``shift`` further, every kv_indptr is re-summed, counts dropped."""
    out = [list(r) for r in packed]
    longest = max((r[ROW_SEQ] + (shift if r[ROW_IDX] != pad_row else 0) for r in packed[:num_rows]), default=0)
    total = [0] * len(page_sizes)
    for b, row in enumerate(out):
        real = b < num_rows and row[ROW_IDX] != pad_row
        if real:
            row[ROW_CACHE] += shift
            row[ROW_SEQ] += shift
        row[ROW_COUNT] = 0
        row[row_chunks(len(page_sizes))] = 0
        for g, ps in enumerate(page_sizes):
            at = ROW_GROUP + ROW_PER_GROUP * g
            pages = -(-row[ROW_SEQ] // ps) if real else row[at + ROW_KV_HI] - row[at + ROW_KV_LO]
            if real:
                row[at + ROW_LAST] = row[ROW_SEQ] - (pages - 1) * ps
            full = -(-max_len // ps)
            if row[at + ROW_SWIDTH] not in (0, full):
                row[at + ROW_SWIDTH] = min(-(-longest // ps), full)
            row[at + ROW_KV_LO] = total[g]
            total[g] += pages
            row[at + ROW_KV_HI] = total[g]
    return out


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_shift_rows_matches_the_naive_rule(backend, device, data):
    page_sizes = data.draw(st.sampled_from([(1,), (4, 1), (16, 2, 8)]), label="page_sizes")
    ng, pad_row, max_len = len(page_sizes), 6, 64
    stride = row_stride(ng)
    num_rows = data.draw(st.integers(0, 7), label="rows")
    shift = data.draw(st.integers(0, 5), label="shift")
    width = data.draw(st.sampled_from(["none", "full", "eager"]), label="width")
    rows = []
    for b in range(num_rows + 1):
        row = [data.draw(st.integers(-3, 50)) for _ in range(stride)]  # fields no rule touches: kept
        tail = b == num_rows
        padding = not tail and data.draw(st.booleans(), label="padding")
        cache = data.draw(st.integers(0, 40), label="cache")
        row[ROW_IDX] = pad_row if padding else data.draw(st.integers(0, pad_row - 1))
        row[ROW_CACHE], row[ROW_SEQ] = cache, cache + 1
        row[ROW_COUNT] = data.draw(st.integers(-3, 3))
        for g, ps in enumerate(page_sizes):
            at = ROW_GROUP + ROW_PER_GROUP * g
            pages = 0 if tail else data.draw(st.integers(0, 3)) if padding else -(-(cache + 1) // ps)
            row[at + ROW_KV_LO], row[at + ROW_KV_HI] = 0, pages  # not summed yet: the op re-sums them
            row[at + ROW_SWIDTH] = {"none": 0, "full": -(-max_len // ps), "eager": 3}[width]
        rows.append(row)
    rows_at = 5
    src = torch.full((rows_at + (num_rows + 1) * stride + 3,), -7, dtype=torch.int32, device=device)
    src[rows_at : rows_at + (num_rows + 1) * stride] = torch.tensor(rows, dtype=torch.int32).flatten()
    dst = torch.full_like(src, -9)
    sizes = torch.tensor(page_sizes, dtype=torch.int32, device=device)
    shift_rows(
        src,
        dst,
        sizes,
        num_rows,
        shift=shift,
        rows_at=rows_at,
        stride=stride,
        pad_row=pad_row,
        max_len=max_len,
        backend=backend,
    )
    want = naive_shift(rows, shift, page_sizes, num_rows, pad_row, max_len)
    got = dst[rows_at : rows_at + (num_rows + 1) * stride].view(num_rows + 1, stride).tolist()
    assert got == want
    assert (dst[:rows_at] == -9).all() and (dst[rows_at + (num_rows + 1) * stride :] == -9).all()


def test_shift_rows_rejects_bad_input(device):
    src = torch.zeros(64, dtype=torch.int32, device=device)
    sizes = torch.tensor([4], dtype=torch.int32, device=device)
    kw = dict(rows_at=0, stride=row_stride(1), pad_row=4, max_len=16)
    with pytest.raises(ValueError, match="shift"):
        shift_rows(src, src.clone(), sizes, 2, shift=-1, **kw)
    with pytest.raises(ValueError, match="src, dst"):
        shift_rows(src, src.clone(), sizes, 20, shift=1, **kw)
    with pytest.raises(TypeError, match="src"):
        shift_rows(src.long(), src.clone(), sizes, 2, shift=1, **kw)
