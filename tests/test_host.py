"""Tests of ``batchmeta.ops.host``: the host-side arrays FlashInfer's ``plan()`` reads.

Inputs come as lists, numpy arrays or CPU tensors; outputs are numpy arrays or CPU tensors (int32
or int64) pre-filled with a sentinel, so elements past the written prefix show if they are touched.
Each result is compared with a naive per-request Python loop.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from batchmeta.ops import fill_kv_indptr, fill_kv_last_page_len, fill_qo_indptr

SENTINEL = -7777
PAGE_SIZES = (1, 2, 16)


# --------------------------------------------------------------------------------------------------
# Naive references
# --------------------------------------------------------------------------------------------------
def naive_qo_indptr(query_lens: list[int]) -> list[int]:
    indptr = [0]
    for n in query_lens:
        indptr.append(indptr[-1] + n)
    return indptr


def naive_kv_indptr(seq_lens: list[int], page_size: int) -> list[int]:
    indptr = [0]
    for s in seq_lens:
        pages = 0
        while pages * page_size < s:
            pages += 1
        indptr.append(indptr[-1] + pages)
    return indptr


def naive_last_page_len(seq_lens: list[int], page_size: int) -> list[int]:
    """Tokens in each request's last page: 0 for an empty request, page_size on a page boundary."""
    out = []
    for s in seq_lens:
        if s == 0:
            out.append(0)
        else:
            used = s
            while used > page_size:
                used -= page_size
            out.append(used)
    return out


# --------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------
INPUT_KINDS = ("list", "np.int32", "np.int64", "torch.int32", "torch.int64")
OUTPUT_KINDS = ("np.int32", "np.int64", "torch.int32", "torch.int64")


def as_input(values: list[int], kind: str):
    if kind == "list":
        return list(values)
    lib, dtype = kind.split(".")
    if lib == "np":
        return np.array(values, dtype=getattr(np, dtype))
    return torch.tensor(values, dtype=getattr(torch, dtype))


def sentinel_output(n: int, kind: str):
    lib, dtype = kind.split(".")
    if lib == "np":
        return np.full(n, SENTINEL, dtype=getattr(np, dtype))
    return torch.full((n,), SENTINEL, dtype=getattr(torch, dtype))


def as_list(a) -> list[int]:
    return [int(x) for x in (a.tolist() if hasattr(a, "tolist") else a)]


def snapshot(out):
    return out.clone() if isinstance(out, torch.Tensor) else out.copy()


def unchanged(out, before) -> bool:
    return torch.equal(out, before) if isinstance(out, torch.Tensor) else np.array_equal(out, before)


def raises_untouched(exc, match: str, call, out) -> None:
    """``call()`` raises ``exc`` matching ``match`` and leaves ``out`` as it was."""
    before = snapshot(out)
    with pytest.raises(exc, match=match):
        call()
    assert unchanged(out, before), "output written before the error was raised"


@st.composite
def lengths(draw, page_size: int = 16, max_rows: int = 8) -> list[int]:
    """Per-request lengths: empty rows, rows ending exactly on a page boundary, and any other length."""
    one = st.one_of(st.just(0), st.integers(1, 4).map(lambda k: k * page_size), st.integers(0, 4 * page_size + 3))
    return draw(st.lists(one, min_size=0, max_size=max_rows))


def check_result(ret, out, expected: list[int], slack: int) -> None:
    """``out`` holds ``expected`` then ``slack`` untouched sentinels; ``ret`` is a view of that prefix."""
    assert as_list(out) == expected + [SENTINEL] * slack
    assert as_list(ret) == expected
    # The returned array is a view of the caller's buffer, not a copy.
    if len(expected):
        backing = out.numpy() if isinstance(out, torch.Tensor) else out
        assert np.shares_memory(ret, backing)


# --------------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------------
class TestFillQoIndptr:
    """out[:B+1] = [0, cumsum(query_lens)]; the rest of out untouched."""

    @given(
        query_lens=lengths(),
        in_kind=st.sampled_from(INPUT_KINDS),
        out_kind=st.sampled_from(OUTPUT_KINDS),
        slack=st.integers(0, 3),
    )
    def test_matches_naive(self, query_lens, in_kind, out_kind, slack):
        out = sentinel_output(len(query_lens) + 1 + slack, out_kind)
        ret = fill_qo_indptr(as_input(query_lens, in_kind), out)
        check_result(ret, out, naive_qo_indptr(query_lens), slack)

    def test_empty_batch(self):
        out = sentinel_output(3, "torch.int32")
        fill_qo_indptr([], out)
        assert as_list(out) == [0, SENTINEL, SENTINEL]

    def test_int32_lengths_sum_past_int32_in_int64_out(self):
        """Bug 9: the prefix sum of int32 lengths into an int64 buffer does not wrap at 2^31."""
        big = 2**31 - 1
        out = sentinel_output(3, "np.int64")
        fill_qo_indptr(np.array([big, big], dtype=np.int32), out)
        assert as_list(out) == [0, big, 2 * big]


class TestFillKvIndptr:
    """out[:B+1] = [0, cumsum(ceil(seq_lens / page_size))] (pages, not tokens)."""

    @given(data=st.data())
    def test_matches_naive(self, data):
        page_size = data.draw(st.sampled_from(PAGE_SIZES), label="page_size")
        seq_lens = data.draw(lengths(page_size), label="seq_lens")
        in_kind = data.draw(st.sampled_from(INPUT_KINDS), label="in_kind")
        out_kind = data.draw(st.sampled_from(OUTPUT_KINDS), label="out_kind")
        slack = data.draw(st.integers(0, 3), label="slack")
        ps_arg = data.draw(st.sampled_from([page_size, np.int64(page_size)]), label="page_size type")

        out = sentinel_output(len(seq_lens) + 1 + slack, out_kind)
        ret = fill_kv_indptr(as_input(seq_lens, in_kind), ps_arg, out)
        check_result(ret, out, naive_kv_indptr(seq_lens, page_size), slack)

    def test_bug1_counts_pages_not_tokens(self):
        """Bug 1: 17 tokens at page size 16 are 2 pages, 32 tokens 2, 1 token 1, 0 tokens 0."""
        out = sentinel_output(5, "torch.int32")
        fill_kv_indptr([17, 32, 1, 0], 16, out)
        assert as_list(out) == [0, 2, 4, 5, 5]

    @pytest.mark.parametrize(
        ("seq_len", "in_dtype", "out_kind"),
        [
            (2**31 - 1, np.int32, "np.int64"),
            (2**31 - 1, np.int32, "torch.int32"),
            (2**31 + 5, np.int64, "np.int32"),
        ],
        ids=["int32-lens-int64-out", "int32-lens-int32-out", "int64-lens-int32-out"],
    )
    def test_bug9_no_int32_overflow_in_page_count(self, seq_len, in_dtype, out_kind):
        """Bug 9: ceil(seq_len / page_size) fits the output, so adding page_size - 1 must not wrap."""
        out = sentinel_output(2, out_kind)
        fill_kv_indptr(np.array([seq_len], dtype=in_dtype), 16, out)
        assert as_list(out) == [0, -(-seq_len // 16)]

    @pytest.mark.parametrize("in_dtype", [np.int64, np.uint64])
    def test_bug9_no_int64_overflow_in_page_count(self, in_dtype):
        """Bug 9 in 64 bits: seq_len + page_size - 1 passed 2^63 and wrapped to a negative count."""
        out = sentinel_output(3, "np.int64")
        fill_kv_indptr(np.array([2**63 - 1, 1], dtype=in_dtype), 16, out)
        assert as_list(out) == [0, 2**59, 2**59 + 1]


class TestFillKvLastPageLen:
    """out[:B] = tokens in each request's last page (0 for seq_len 0); the rest of out untouched."""

    @given(data=st.data())
    def test_matches_naive(self, data):
        page_size = data.draw(st.sampled_from(PAGE_SIZES), label="page_size")
        seq_lens = data.draw(lengths(page_size), label="seq_lens")
        in_kind = data.draw(st.sampled_from(INPUT_KINDS), label="in_kind")
        out_kind = data.draw(st.sampled_from(OUTPUT_KINDS), label="out_kind")
        slack = data.draw(st.integers(0, 3), label="slack")

        out = sentinel_output(len(seq_lens) + slack, out_kind)
        ret = fill_kv_last_page_len(as_input(seq_lens, in_kind), page_size, out)
        check_result(ret, out, naive_last_page_len(seq_lens, page_size), slack)

    def test_empty_sequence_and_page_boundary(self):
        out = sentinel_output(6, "torch.int32")
        fill_kv_last_page_len([0, 16, 17, 1, 32], 16, out)
        assert as_list(out) == [0, 16, 1, 1, 16, SENTINEL]

    def test_page_size_one(self):
        out = sentinel_output(3, "np.int64")
        fill_kv_last_page_len(np.array([0, 1, 9]), 1, out)
        assert as_list(out) == [0, 1, 1]


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def _call(fn: str, lens, out, page_size=16):
    if fn == "fill_qo_indptr":
        return lambda: fill_qo_indptr(lens, out)
    if fn == "fill_kv_indptr":
        return lambda: fill_kv_indptr(lens, page_size, out)
    return lambda: fill_kv_last_page_len(lens, page_size, out)


LENS_NAME = {"fill_qo_indptr": "query_lens", "fill_kv_indptr": "seq_lens", "fill_kv_last_page_len": "seq_lens"}
ALL_FNS = list(LENS_NAME)
PAGED_FNS = ["fill_kv_indptr", "fill_kv_last_page_len"]


class TestErrors:
    """Bad arguments raise naming the argument, before anything is written."""

    @pytest.mark.parametrize("fn", ALL_FNS)
    @pytest.mark.parametrize(
        "lens",
        [np.array([1.0, 2.0]), torch.tensor([1.0, 2.0]), [1.5, 2.0], np.array([True, False])],
        ids=["np-float", "torch-float", "list-float", "np-bool"],
    )
    def test_non_integer_lengths(self, fn, lens):
        out = sentinel_output(4, "np.int64")
        raises_untouched(TypeError, LENS_NAME[fn], _call(fn, lens, out), out)

    @pytest.mark.parametrize("fn", ALL_FNS)
    def test_2d_lengths(self, fn):
        out = sentinel_output(8, "torch.int64")
        raises_untouched(ValueError, LENS_NAME[fn], _call(fn, np.ones((2, 2), dtype=np.int64), out), out)

    @pytest.mark.parametrize("fn", ALL_FNS)
    def test_negative_length(self, fn):
        out = sentinel_output(4, "np.int32")
        raises_untouched(ValueError, LENS_NAME[fn], _call(fn, [3, -1, 2], out), out)

    @pytest.mark.parametrize("fn", ALL_FNS)
    def test_unsupported_lengths_container(self, fn):
        out = sentinel_output(4, "np.int32")
        raises_untouched(TypeError, LENS_NAME[fn], _call(fn, "123", out), out)

    @pytest.mark.parametrize(
        ("fn", "size"), [("fill_qo_indptr", 3), ("fill_kv_indptr", 3), ("fill_kv_last_page_len", 2)]
    )
    def test_out_too_small(self, fn, size):
        out = sentinel_output(size, "torch.int32")
        raises_untouched(ValueError, "out", _call(fn, [1, 2, 3], out), out)

    @pytest.mark.parametrize("fn", ALL_FNS)
    def test_float_out(self, fn):
        out = torch.full((4,), float(SENTINEL))
        raises_untouched(TypeError, "out", _call(fn, [1, 2], out), out)

    @pytest.mark.parametrize("fn", ALL_FNS)
    def test_2d_out(self, fn):
        out = np.full((2, 4), SENTINEL, dtype=np.int64)
        raises_untouched(ValueError, "out", _call(fn, [1, 2], out), out)

    @pytest.mark.parametrize("fn", ALL_FNS)
    def test_list_out(self, fn):
        with pytest.raises(TypeError, match="out"):
            _call(fn, [1, 2], [0, 0, 0, 0])()

    @pytest.mark.parametrize("fn", ALL_FNS)
    @pytest.mark.parametrize(
        "lens",
        [
            np.array([2**63, 1], dtype=np.uint64),
            np.array([1, 2**64 - 1], dtype=np.uint64),
            torch.tensor([2**63], dtype=torch.uint64),
            [2**63, 1],
            [1, 2**64],
            [-1, 2**63],
        ],
        ids=["np-uint64-2^63", "np-uint64-max", "torch-uint64", "list-2^63", "list-2^64", "list-mixed-sign"],
    )
    def test_lengths_past_int64(self, fn, lens):
        """Values int64 cannot hold are rejected, never wrapped to negatives (or floats)."""
        out = sentinel_output(4, "np.int64")
        raises_untouched(ValueError, LENS_NAME[fn], _call(fn, lens, out), out)

    @pytest.mark.parametrize(("fn", "page_size"), [("fill_qo_indptr", 16), ("fill_kv_indptr", 1)])
    def test_sum_past_int64(self, fn, page_size):
        """Each length fits int64 but the prefix sum does not: an error, not a wrapped negative sum."""
        out = sentinel_output(4, "np.int64")
        raises_untouched(ValueError, LENS_NAME[fn], _call(fn, [2**62, 2**62, 1], out, page_size=page_size), out)

    @pytest.mark.parametrize("fn", ALL_FNS)
    def test_read_only_out(self, fn):
        out = np.full(4, SENTINEL, dtype=np.int64)
        out.flags.writeable = False
        raises_untouched(ValueError, "out", _call(fn, [1, 2], out), out)

    @pytest.mark.parametrize("fn", ALL_FNS)
    @pytest.mark.parametrize("lens", [[1, None], [[1], [1, 2]]], ids=["none", "ragged"])
    def test_list_of_non_ints(self, fn, lens):
        out = sentinel_output(4, "np.int64")
        raises_untouched(TypeError, LENS_NAME[fn], _call(fn, lens, out), out)

    @pytest.mark.parametrize("fn", PAGED_FNS)
    def test_page_size_past_int64(self, fn):
        out = sentinel_output(4, "np.int64")
        raises_untouched(ValueError, "page_size", _call(fn, [1, 2], out, page_size=2**63), out)

    @pytest.mark.parametrize("fn", PAGED_FNS)
    @pytest.mark.parametrize(
        ("page_size", "exc"),
        [(0, ValueError), (-16, ValueError), (16.0, TypeError), (True, TypeError), ("16", TypeError)],
        ids=["zero", "negative", "float", "bool", "str"],
    )
    def test_bad_page_size(self, fn, page_size, exc):
        out = sentinel_output(4, "np.int64")
        raises_untouched(exc, "page_size", _call(fn, [1, 2], out, page_size=page_size), out)
