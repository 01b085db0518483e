"""Tests of ``batchmeta.ops.block_table``: kv_indices, padded <-> ragged tables and the per-step gather.

Every op is compared, on both backends, with a naive per-row Python loop written here. Outputs are
filled with a sentinel first, so elements an op must leave alone (and elements it forgot to write)
show up.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from batchmeta.ops import block_tables_to_padded, block_tables_to_ragged, gather_block_tables, write_kv_indices

SENTINEL = -7777
I32_MAX = 2**31 - 1
PAGE_SIZES = (1, 2, 16)


# --------------------------------------------------------------------------------------------------
# Naive references: plain loops over rows and entries
# --------------------------------------------------------------------------------------------------
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def naive_kv_indices(table: list[list[int]], rows: list[int], counts: list[int]) -> list[int]:
    """Row b contributes table[rows[b]][0:counts[b]], rows back to back."""
    out = []
    for r, n in zip(rows, counts, strict=True):
        for j in range(n):
            out.append(table[r][j])
    return out


def naive_indptr(counts: list[int]) -> list[int]:
    indptr = [0]
    for n in counts:
        indptr.append(indptr[-1] + n)
    return indptr


def naive_padded(ragged: list[int], cu: list[int], width: int, pad: int) -> list[list[int]]:
    rows = []
    for b in range(len(cu) - 1):
        n = cu[b + 1] - cu[b]
        rows.append([ragged[cu[b] + j] if j < n else pad for j in range(width)])
    return rows


def naive_gather(table: list[list[int]], num_blocks: list[int], idx: list[int], width: int, pad: int):
    rows = []
    for r in idx:
        rows.append([table[r][j] if j < num_blocks[r] else pad for j in range(width)])
    return rows


# --------------------------------------------------------------------------------------------------
# Builders and strategies
# --------------------------------------------------------------------------------------------------
def i32(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def filled(shape, device, dtype=torch.int32) -> torch.Tensor:
    return torch.full(shape, SENTINEL, dtype=dtype, device=device)


def table_tensor(table: list[list[int]], width: int, device, extra_cols: int = 0) -> torch.Tensor:
    """An int32 [R, width] tensor; with extra_cols it is a column slice of a wider buffer."""
    buf = torch.full((len(table), width + extra_cols), 4321, dtype=torch.int32, device=device)
    if width:
        buf[:, :width] = i32(table, device)
    return buf[:, :width]


@st.composite
def page_tables(draw, rows: int, width: int) -> list[list[int]]:
    """Distinct page ids (so a wrong row or column shows); sometimes the largest being 2^31 - 1."""
    n = rows * width
    base = draw(st.sampled_from([0, 1000, I32_MAX + 1 - n]))
    perm = draw(st.permutations(range(n)))
    return [[base + perm[r * width + j] for j in range(width)] for r in range(rows)]


def page_counts(width: int):
    """Pages of one row: empty, full capacity, or anything between."""
    return st.one_of(st.just(0), st.just(width), st.integers(0, width))


def seq_lens_for(page_size: int, width: int):
    """Tokens of one row: empty, full capacity, ending on a page boundary, or anything between."""
    cap = page_size * width
    return st.one_of(st.just(0), st.just(cap), st.integers(0, width).map(lambda k: k * page_size), st.integers(0, cap))


index_dtypes = st.sampled_from([torch.int32, torch.int64])


def raises_untouched(exc, match: str, call, *outputs: torch.Tensor) -> None:
    """``call()`` raises ``exc`` matching ``match`` and leaves every output as it was."""
    before = [o.clone() for o in outputs]
    with pytest.raises(exc, match=match):
        call()
    for o, b in zip(outputs, before, strict=True):
        assert torch.equal(o, b), "output written before the error was raised"


# --------------------------------------------------------------------------------------------------
# write_kv_indices
# --------------------------------------------------------------------------------------------------
class TestWriteKvIndices:
    """kv_indices = each batch row's first n_b pages of its request slot's row, rows back to back."""

    @given(data=st.data())
    def test_matches_naive(self, data, device, backend):
        num_slots = data.draw(st.integers(1, 8), label="R")
        width = data.draw(st.integers(1, 16), label="W")
        table = data.draw(page_tables(num_slots, width), label="table")
        use_mapping = data.draw(st.booleans(), label="use_mapping")
        if use_mapping:
            rows = data.draw(st.lists(st.integers(0, num_slots - 1), min_size=1, max_size=8), label="idx")
        else:
            rows = list(range(data.draw(st.integers(1, num_slots), label="B")))
        counts = data.draw(st.lists(page_counts(width), min_size=len(rows), max_size=len(rows)), label="n")
        slack = data.draw(st.integers(0, 3), label="slack")
        extra_cols = data.draw(st.sampled_from([0, 3]), label="extra_cols")
        indptr_dtype = data.draw(index_dtypes, label="indptr_dtype")

        bt = table_tensor(table, width, device, extra_cols)
        kv_indptr = torch.tensor(naive_indptr(counts), dtype=indptr_dtype, device=device)
        idx = torch.tensor(rows, dtype=data.draw(index_dtypes), device=device) if use_mapping else None
        expected = naive_kv_indices(table, rows, counts)
        out = filled((len(expected) + slack,), device)

        ret = write_kv_indices(bt, kv_indptr, out=out, idx_mapping=idx, backend=backend)

        assert ret is out
        assert torch.equal(out, i32(expected + [SENTINEL] * slack, device))

    def test_empty_batch_writes_nothing(self, device, backend):
        bt = i32([[1, 2], [3, 4]], device)
        out = filled((4,), device)
        write_kv_indices(bt, torch.zeros(1, dtype=torch.int64, device=device), out=out, backend=backend)
        assert torch.equal(out, filled((4,), device))

    def test_bug9_large_page_ids_copied_exactly(self, device, backend):
        """Bug 9: page ids near 2^31 - 1 pass the int32 path unchanged."""
        table = [[I32_MAX, I32_MAX - 1, 7], [I32_MAX - 2, 0, I32_MAX - 3]]
        bt = i32(table, device)
        kv_indptr = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
        idx = torch.tensor([1, 0], dtype=torch.int64, device=device)
        out = filled((6,), device)
        write_kv_indices(bt, kv_indptr, out=out, idx_mapping=idx, backend=backend)
        assert torch.equal(out, i32([I32_MAX - 2, 0, I32_MAX, I32_MAX - 1, 7, SENTINEL], device))


class TestWriteKvIndicesErrors:
    """Bad arguments raise naming the argument, before anything is written."""

    def _args(self, device):
        bt = i32([[1, 2, 3], [4, 5, 6]], device)
        kv_indptr = torch.tensor([0, 2, 3], dtype=torch.int64, device=device)
        return bt, kv_indptr, filled((4,), device)

    def test_int64_block_tables(self, device, backend):
        bt, kv_indptr, out = self._args(device)
        call = lambda: write_kv_indices(bt.long(), kv_indptr, out=out, backend=backend)
        raises_untouched(TypeError, "block_tables", call, out)

    def test_1d_block_tables(self, device, backend):
        bt, kv_indptr, out = self._args(device)
        call = lambda: write_kv_indices(bt.flatten(), kv_indptr, out=out, backend=backend)
        raises_untouched(ValueError, "block_tables", call, out)

    def test_float_kv_indptr(self, device, backend):
        bt, kv_indptr, out = self._args(device)
        call = lambda: write_kv_indices(bt, kv_indptr.float(), out=out, backend=backend)
        raises_untouched(TypeError, "kv_indptr", call, out)

    def test_int64_out(self, device, backend):
        bt, kv_indptr, _ = self._args(device)
        out = filled((4,), device, torch.int64)
        raises_untouched(TypeError, "out", lambda: write_kv_indices(bt, kv_indptr, out=out, backend=backend), out)

    def test_idx_mapping_length_mismatch(self, device, backend):
        bt, kv_indptr, out = self._args(device)
        idx = torch.tensor([0, 1, 1], dtype=torch.int32, device=device)
        call = lambda: write_kv_indices(bt, kv_indptr, out=out, idx_mapping=idx, backend=backend)
        raises_untouched(ValueError, "idx_mapping", call, out)

    @pytest.mark.parametrize("bad_slot", [-1, 2])
    def test_idx_mapping_out_of_range(self, backend, bad_slot):
        bt, kv_indptr, out = self._args("cpu")
        idx = torch.tensor([0, bad_slot], dtype=torch.int64)
        call = lambda: write_kv_indices(bt, kv_indptr, out=out, idx_mapping=idx, backend=backend)
        raises_untouched(ValueError, "idx_mapping", call, out)

    def test_out_too_small_host_indptr(self, backend):
        bt, kv_indptr, _ = self._args("cpu")
        out = filled((2,), "cpu")
        raises_untouched(ValueError, "out", lambda: write_kv_indices(bt, kv_indptr, out=out, backend=backend), out)

    def test_row_wider_than_table_host_indptr(self, backend):
        bt, _, out = self._args("cpu")
        kv_indptr = torch.tensor([0, 4], dtype=torch.int64)
        call = lambda: write_kv_indices(bt, kv_indptr, out=out, backend=backend)
        raises_untouched(ValueError, "kv_indptr", call, out)

    def test_decreasing_host_indptr(self, backend):
        bt, _, out = self._args("cpu")
        kv_indptr = torch.tensor([0, 2, 1], dtype=torch.int64)
        call = lambda: write_kv_indices(bt, kv_indptr, out=out, backend=backend)
        raises_untouched(ValueError, "kv_indptr", call, out)

    def test_more_rows_than_table_without_mapping(self, device, backend):
        bt, _, out = self._args(device)
        kv_indptr = torch.tensor([0, 1, 2, 3], dtype=torch.int64, device=device)
        call = lambda: write_kv_indices(bt, kv_indptr, out=out, backend=backend)
        raises_untouched(ValueError, "kv_indptr", call, out)


# --------------------------------------------------------------------------------------------------
# block_tables_to_ragged (page-aware)
# --------------------------------------------------------------------------------------------------
class TestBlockTablesToRagged:
    """Row b contributes ceil(seq_lens[b] / page_size) pages; kv_indptr_out gets their prefix sum."""

    @given(data=st.data())
    def test_matches_naive(self, data, device, backend):
        page_size = data.draw(st.sampled_from(PAGE_SIZES), label="page_size")
        width = data.draw(st.integers(1, 16), label="W")
        num_rows = data.draw(st.integers(1, 8), label="B")
        table_rows = num_rows + data.draw(st.integers(0, 2), label="extra_rows")
        table = data.draw(page_tables(table_rows, width), label="table")
        lens = data.draw(st.lists(seq_lens_for(page_size, width), min_size=num_rows, max_size=num_rows))
        slack = data.draw(st.integers(0, 3), label="slack")
        extra_cols = data.draw(st.sampled_from([0, 3]), label="extra_cols")

        counts = [cdiv(s, page_size) for s in lens]
        expected = naive_kv_indices(table, list(range(num_rows)), counts)
        bt = table_tensor(table, width, device, extra_cols)
        seq_lens = torch.tensor(lens, dtype=data.draw(index_dtypes, label="lens_dtype"), device=device)
        out = filled((len(expected) + slack,), device)
        indptr_dtype = data.draw(index_dtypes, label="indptr_dtype")
        kv_indptr = filled((num_rows + 1 + slack,), device, indptr_dtype)

        ret = block_tables_to_ragged(bt, seq_lens, page_size, out=out, kv_indptr_out=kv_indptr, backend=backend)

        assert ret is out
        assert torch.equal(out, i32(expected + [SENTINEL] * slack, device))
        expected_indptr = naive_indptr(counts) + [SENTINEL] * slack
        assert torch.equal(kv_indptr, torch.tensor(expected_indptr, dtype=indptr_dtype, device=device))

    def test_bug1_counts_pages_not_tokens(self, device, backend):
        """Bug 1: with page_size 16, 17 tokens are 2 pages (not 17 entries), 32 tokens 2, 1 token 1."""
        table = [[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]]
        seq_lens = torch.tensor([17, 32, 1], dtype=torch.int32, device=device)
        out = filled((60,), device)
        kv_indptr = filled((4,), device, torch.int32)
        block_tables_to_ragged(i32(table, device), seq_lens, 16, out=out, kv_indptr_out=kv_indptr, backend=backend)
        assert torch.equal(kv_indptr, i32([0, 2, 4, 5], device))
        assert torch.equal(out[:5], i32([10, 11, 20, 21, 30], device))
        assert torch.equal(out[5:], filled((55,), device))

    def test_prefix_sum_over_more_rows_than_one_block(self, device, backend):
        """300 rows: each program sums the page counts of the rows before it in chunks of 256."""
        num_rows, width, page_size = 300, 3, 2
        gen = torch.Generator().manual_seed(0)
        lens = torch.randint(0, page_size * width + 1, (num_rows,), generator=gen).tolist()
        table = torch.randint(0, I32_MAX, (num_rows, width), generator=gen, dtype=torch.int64).tolist()
        counts = [cdiv(s, page_size) for s in lens]
        expected = naive_kv_indices(table, list(range(num_rows)), counts)
        out = filled((len(expected) + 1,), device)
        kv_indptr = filled((num_rows + 1,), device, torch.int64)
        seq_lens = torch.tensor(lens, dtype=torch.int64, device=device)
        bt = i32(table, device)
        block_tables_to_ragged(bt, seq_lens, page_size, out=out, kv_indptr_out=kv_indptr, backend=backend)
        assert torch.equal(kv_indptr, torch.tensor(naive_indptr(counts), dtype=torch.int64, device=device))
        assert torch.equal(out, i32([*expected, SENTINEL], device))

    def test_empty_batch_sets_first_indptr_only(self, device, backend):
        out = filled((3,), device)
        kv_indptr = filled((3,), device, torch.int64)
        seq_lens = torch.zeros(0, dtype=torch.int64, device=device)
        block_tables_to_ragged(i32([[1, 2]], device), seq_lens, 16, out=out, kv_indptr_out=kv_indptr, backend=backend)
        assert torch.equal(out, filled((3,), device))
        assert torch.equal(kv_indptr, torch.tensor([0, SENTINEL, SENTINEL], device=device))

    def test_bug9_large_page_ids_copied_exactly(self, device, backend):
        """Bug 9: page ids near 2^31 - 1 pass the int32 path unchanged."""
        table = [[I32_MAX, I32_MAX - 1], [I32_MAX - 2, I32_MAX - 3]]
        out = filled((4,), device)
        kv_indptr = filled((3,), device, torch.int32)
        seq_lens = torch.tensor([32, 17], dtype=torch.int64, device=device)
        block_tables_to_ragged(i32(table, device), seq_lens, 16, out=out, kv_indptr_out=kv_indptr, backend=backend)
        assert torch.equal(out, i32([I32_MAX, I32_MAX - 1, I32_MAX - 2, I32_MAX - 3], device))


class TestBlockTablesToRaggedErrors:
    """Bad arguments raise naming the argument, before anything is written."""

    def _run(self, device, backend, *, bt=None, seq_lens=None, page_size=16, out=None, kv_indptr=None):
        bt = i32([[1, 2, 3], [4, 5, 6]], device) if bt is None else bt
        seq_lens = torch.tensor([20, 33], device=device) if seq_lens is None else seq_lens
        out = filled((5,), device) if out is None else out
        kv_indptr = filled((3,), device, torch.int64) if kv_indptr is None else kv_indptr

        def call():
            block_tables_to_ragged(bt, seq_lens, page_size, out=out, kv_indptr_out=kv_indptr, backend=backend)

        return call, out, kv_indptr

    @pytest.mark.parametrize(
        ("kwargs", "exc", "match"),
        [
            ({"bt": torch.ones(2, 3, dtype=torch.int64)}, TypeError, "block_tables"),
            ({"bt": torch.ones(6, dtype=torch.int32)}, ValueError, "block_tables"),
            ({"seq_lens": torch.tensor([20.0, 33.0])}, TypeError, "seq_lens"),
            ({"seq_lens": torch.tensor([[20, 33]])}, ValueError, "seq_lens"),
            ({"seq_lens": torch.tensor([20, -1])}, ValueError, "seq_lens"),
            (
                {"seq_lens": torch.tensor([1, 2, 3]), "kv_indptr": torch.full((4,), SENTINEL, dtype=torch.int64)},
                ValueError,
                "seq_lens",
            ),
            ({"seq_lens": torch.tensor([20, 49])}, ValueError, "seq_lens"),
            ({"page_size": 0}, ValueError, "page_size"),
            ({"page_size": 16.0}, TypeError, "page_size"),
            ({"out": torch.full((4,), SENTINEL, dtype=torch.int32)}, ValueError, "out"),
            ({"out": torch.full((5,), SENTINEL, dtype=torch.int64)}, TypeError, "out"),
            ({"kv_indptr": torch.full((2,), SENTINEL, dtype=torch.int64)}, ValueError, "kv_indptr_out"),
            ({"kv_indptr": torch.full((3,), SENTINEL, dtype=torch.float32)}, TypeError, "kv_indptr_out"),
        ],
        ids=[
            "int64-table",
            "1d-table",
            "float-lens",
            "2d-lens",
            "negative-len",
            "more-rows-than-table",
            "row-wider-than-table",
            "page-size-0",
            "float-page-size",
            "out-too-small",
            "int64-out",
            "indptr-too-small",
            "float-indptr",
        ],
    )
    def test_rejected(self, backend, kwargs, exc, match):
        # CPU tensors: the length checks read seq_lens on the host when it is a CPU tensor.
        call, out, kv_indptr = self._run("cpu", backend, **kwargs)
        raises_untouched(exc, match, call, out, kv_indptr)


# --------------------------------------------------------------------------------------------------
# block_tables_to_padded
# --------------------------------------------------------------------------------------------------
class TestBlockTablesToPadded:
    """Row b of out = ragged[cu[b]:cu[b+1]], then pad_value to the end of the row (bug 2)."""

    @given(data=st.data())
    def test_matches_naive(self, data, device, backend):
        num_rows = data.draw(st.integers(1, 8), label="B")
        width = data.draw(st.integers(1, 16), label="W")
        counts = data.draw(st.lists(page_counts(width), min_size=num_rows, max_size=num_rows), label="n")
        cu = naive_indptr(counts)
        trailing = data.draw(st.integers(0, 3), label="trailing ragged entries")
        base = data.draw(st.sampled_from([0, I32_MAX - cu[-1] - trailing]), label="base")
        ragged = [base + k for k in range(cu[-1] + trailing)]
        pad = data.draw(st.sampled_from([0, -1, 12345]), label="pad")
        extra_rows = data.draw(st.integers(0, 2), label="extra_rows")
        extra_cols = data.draw(st.sampled_from([0, 3]), label="extra_cols")

        buf = filled((num_rows + extra_rows, width + extra_cols), device)
        out = buf[:, :width]
        cu_t = torch.tensor(cu, dtype=data.draw(index_dtypes, label="cu_dtype"), device=device)
        ret = block_tables_to_padded(i32(ragged, device), cu_t, out=out, pad_value=pad, backend=backend)

        assert ret is out
        expected = [row + [SENTINEL] * extra_cols for row in naive_padded(ragged, cu, width, pad)]
        expected += [[SENTINEL] * (width + extra_cols)] * extra_rows
        assert torch.equal(buf, i32(expected, device))

    def test_bug2_tails_written_not_left_stale(self, device, backend):
        """Bug 2: stale values past each row's length are overwritten by the pad value (default 0)."""
        out = filled((3, 4), device)
        cu = torch.tensor([0, 1, 1, 4], dtype=torch.int32, device=device)
        block_tables_to_padded(i32([5, 6, 7, 8], device), cu, out=out, backend=backend)
        assert torch.equal(out, i32([[5, 0, 0, 0], [0, 0, 0, 0], [6, 7, 8, 0]], device))

    def test_bug9_large_page_ids_copied_exactly(self, device, backend):
        """Bug 9: page ids near 2^31 - 1 pass the int32 path unchanged."""
        out = filled((2, 3), device)
        cu = torch.tensor([0, 2, 3], dtype=torch.int64, device=device)
        ragged = i32([I32_MAX, I32_MAX - 1, I32_MAX - 2], device)
        block_tables_to_padded(ragged, cu, out=out, pad_value=-1, backend=backend)
        assert torch.equal(out, i32([[I32_MAX, I32_MAX - 1, -1], [I32_MAX - 2, -1, -1]], device))

    def test_empty_batch_writes_nothing(self, device, backend):
        out = filled((2, 3), device)
        cu = torch.zeros(1, dtype=torch.int64, device=device)
        block_tables_to_padded(i32([1, 2], device), cu, out=out, backend=backend)
        assert torch.equal(out, filled((2, 3), device))


class TestBlockTablesToPaddedErrors:
    """Bad arguments raise naming the argument, before anything is written."""

    @pytest.mark.parametrize(
        ("ragged", "cu", "out_shape", "out_dtype", "pad", "exc", "match"),
        [
            ([1, 2, 3], [0, 1, 3], (2, 4), torch.int64, 0, TypeError, "out"),
            ([1, 2, 3], [0, 1, 3], (8,), torch.int32, 0, ValueError, "out"),
            ([1, 2, 3], [0, 1, 3], (1, 4), torch.int32, 0, ValueError, "out"),
            ([1, 2, 3], [0.0, 1.0, 3.0], (2, 4), torch.int32, 0, TypeError, "cu_pages"),
            ([1, 2, 3], [0, 3, 1], (2, 4), torch.int32, 0, ValueError, "cu_pages"),
            ([1, 2, 3], [0, 3, 3], (2, 2), torch.int32, 0, ValueError, "cu_pages"),
            ([1, 2, 3], [0, 1, 4], (2, 4), torch.int32, 0, ValueError, "block_tables_ragged"),
            ([1, 2, 3], [0, 1, 3], (2, 4), torch.int32, 0.5, TypeError, "pad_value"),
            ([1, 2, 3], [0, 1, 3], (2, 4), torch.int32, 2**31, ValueError, "pad_value"),
        ],
        ids=[
            "int64-out",
            "1d-out",
            "too-few-rows",
            "float-cu",
            "decreasing-cu",
            "row-wider-than-out",
            "cu-past-ragged",
            "float-pad",
            "pad-outside-int32",
        ],
    )
    def test_rejected(self, backend, ragged, cu, out_shape, out_dtype, pad, exc, match):
        out = torch.full(out_shape, SENTINEL, dtype=out_dtype)
        cu_t = torch.tensor(cu)
        call = lambda: block_tables_to_padded(i32(ragged, "cpu"), cu_t, out=out, pad_value=pad, backend=backend)
        raises_untouched(exc, match, call, out)

    def test_int64_ragged(self, device, backend):
        out = filled((1, 2), device)
        cu = torch.tensor([0, 2], device=device)
        call = lambda: block_tables_to_padded(torch.tensor([1, 2], device=device), cu, out=out, backend=backend)
        raises_untouched(TypeError, "block_tables_ragged", call, out)


# --------------------------------------------------------------------------------------------------
# gather_block_tables
# --------------------------------------------------------------------------------------------------
def make_group(rng: torch.Generator, num_slots: int, page_size: int, lens: list[int], max_len: int):
    """One KV-cache group: a persistent table with stale garbage past each request's valid pages."""
    width = cdiv(max_len, page_size)
    table = torch.randint(0, I32_MAX, (num_slots, width), generator=rng, dtype=torch.int64).tolist()
    num_blocks = [cdiv(s, page_size) for s in lens]
    return table, num_blocks, width


class TestGatherBlockTables:
    """out[g][b, j] = block_tables[g][idx[b], j] for j < num_blocks[g][idx[b]], else pad_value."""

    @given(data=st.data())
    def test_matches_naive(self, data, device, backend):
        num_slots = data.draw(st.integers(1, 8), label="R")
        max_len = data.draw(st.integers(1, 16), label="max_model_len")
        one_len = st.one_of(st.just(0), st.just(max_len), st.integers(0, max_len))
        lens = data.draw(st.lists(one_len, min_size=num_slots, max_size=num_slots), label="seq_lens")
        idx = data.draw(st.lists(st.integers(0, num_slots - 1), min_size=1, max_size=8), label="idx_mapping")
        num_groups = data.draw(st.integers(1, 5), label="groups")
        pad = data.draw(st.sampled_from([0, -1]), label="pad")
        rng = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))

        tables, nbs, bufs, outs, expected = [], [], [], [], []
        for _ in range(num_groups):
            page_size = data.draw(st.sampled_from(PAGE_SIZES), label="page_size")
            table, num_blocks, width = make_group(rng, num_slots, page_size, lens, max_len)
            widest = max(num_blocks[r] for r in idx)
            out_width = data.draw(st.sampled_from([widest, width, width + 2]), label="Wo")
            extra_rows = data.draw(st.integers(0, 2), label="extra_rows")
            extra_cols = data.draw(st.sampled_from([0, 3]), label="extra_cols")
            tables.append(table_tensor(table, width, device, data.draw(st.sampled_from([0, 2]))))
            nbs.append(i32(num_blocks, device))
            buf = filled((len(idx) + extra_rows, out_width + extra_cols), device)
            bufs.append(buf)
            outs.append(buf[:, :out_width])
            rows = [row + [SENTINEL] * extra_cols for row in naive_gather(table, num_blocks, idx, out_width, pad)]
            expected.append(rows + [[SENTINEL] * (out_width + extra_cols)] * extra_rows)

        idx_t = torch.tensor(idx, dtype=data.draw(index_dtypes, label="idx_dtype"), device=device)
        ret = gather_block_tables(idx_t, tables, nbs, out=outs, pad_value=pad, backend=backend)

        assert ret is outs
        for g in range(num_groups):
            assert torch.equal(bufs[g], i32(expected[g], device)), f"group {g}"

    def test_five_groups_cross_launch_chunks(self, device, backend):
        """Five groups (more than the four one launch serves), each with its own page size and width."""
        seq_lens = [0, 33, 16, 5, 48]  # per request slot: empty, odd, page boundary, short, full capacity
        idx = [4, 1, 0, 2, 3]
        page_sizes = [1, 16, 2, 16, 1]
        rng = torch.Generator().manual_seed(1)
        tables, nbs, outs, expected = [], [], [], []
        for g, page_size in enumerate(page_sizes):
            max_len = 48 if page_size > 1 else 16 + g  # page size 1: keep tables narrow
            lens = [min(s, max_len) for s in seq_lens]
            table, num_blocks, width = make_group(rng, len(seq_lens), page_size, lens, max_len)
            tables.append(i32(table, device))
            nbs.append(i32(num_blocks, device))
            outs.append(filled((len(idx), width), device))
            expected.append(naive_gather(table, num_blocks, idx, width, -1))
        idx_t = torch.tensor(idx, dtype=torch.int32, device=device)
        gather_block_tables(idx_t, tables, nbs, out=outs, pad_value=-1, backend=backend)
        for g in range(len(page_sizes)):
            assert torch.equal(outs[g], i32(expected[g], device)), f"group {g}"

    def test_bug9_large_page_ids_copied_exactly(self, device, backend):
        """Bug 9: page ids near 2^31 - 1 pass the int32 path unchanged."""
        table = i32([[I32_MAX, I32_MAX - 1, I32_MAX - 2], [1, 2, 3]], device)
        nb = i32([3, 1], device)
        out = filled((2, 3), device)
        idx = torch.tensor([0, 1], dtype=torch.int64, device=device)
        gather_block_tables(idx, [table], [nb], out=[out], backend=backend)
        assert torch.equal(out, i32([[I32_MAX, I32_MAX - 1, I32_MAX - 2], [1, 0, 0]], device))

    def test_empty_batch_writes_nothing(self, device, backend):
        out = filled((2, 3), device)
        idx = torch.zeros(0, dtype=torch.int64, device=device)
        gather_block_tables(idx, [i32([[1, 2, 3]], device)], [i32([3], device)], out=[out], backend=backend)
        assert torch.equal(out, filled((2, 3), device))


class TestGatherBlockTablesErrors:
    """Bad arguments raise naming the argument (and group), before any group's output is written."""

    def _args(self, device):
        idx = torch.tensor([1, 0], dtype=torch.int32, device=device)
        tables = [i32([[1, 2, 3], [4, 5, 6]], device), i32([[7], [8]], device)]
        nbs = [i32([3, 2], device), i32([1, 0], device)]
        outs = [filled((2, 3), device), filled((2, 1), device)]
        return idx, tables, nbs, outs

    def _check(self, backend, exc, match, idx, tables, nbs, outs):
        call = lambda: gather_block_tables(idx, tables, nbs, out=outs, backend=backend)
        raises_untouched(exc, match, call, *outs)

    def test_float_idx_mapping(self, device, backend):
        idx, tables, nbs, outs = self._args(device)
        self._check(backend, TypeError, "idx_mapping", idx.float(), tables, nbs, outs)

    @pytest.mark.parametrize("bad_slot", [-1, 2])
    def test_idx_mapping_out_of_range(self, backend, bad_slot):
        _, tables, nbs, outs = self._args("cpu")
        self._check(backend, ValueError, "idx_mapping", torch.tensor([0, bad_slot]), tables, nbs, outs)

    def test_int64_block_table_in_second_group(self, device, backend):
        idx, tables, nbs, outs = self._args(device)
        tables[1] = tables[1].long()
        self._check(backend, TypeError, re.escape("block_tables[1]"), idx, tables, nbs, outs)

    def test_int64_num_blocks(self, device, backend):
        idx, tables, nbs, outs = self._args(device)
        nbs[1] = nbs[1].long()
        self._check(backend, TypeError, re.escape("num_blocks[1]"), idx, tables, nbs, outs)

    def test_num_blocks_too_short(self, device, backend):
        idx, tables, nbs, outs = self._args(device)
        nbs[0] = nbs[0][:1]
        self._check(backend, ValueError, re.escape("num_blocks[0]"), idx, tables, nbs, outs)

    def test_num_blocks_wider_than_table(self, backend):
        idx, tables, nbs, outs = self._args("cpu")
        nbs[1] = i32([2, 0], "cpu")
        self._check(backend, ValueError, re.escape("num_blocks[1]"), idx, tables, nbs, outs)

    def test_out_too_few_rows(self, device, backend):
        idx, tables, nbs, outs = self._args(device)
        outs[1] = filled((1, 1), device)
        self._check(backend, ValueError, re.escape("out[1]"), idx, tables, nbs, outs)

    def test_group_count_mismatch(self, device, backend):
        idx, tables, nbs, outs = self._args(device)
        self._check(backend, ValueError, "num_blocks", idx, tables, nbs[:1], outs)

    def test_no_groups(self, device, backend):
        idx, _, _, _ = self._args(device)
        self._check(backend, ValueError, "block_tables", idx, [], [], [])

    def test_pad_value_outside_int32(self, device, backend):
        idx, tables, nbs, outs = self._args(device)
        call = lambda: gather_block_tables(idx, tables, nbs, out=outs, pad_value=2**31, backend=backend)
        raises_untouched(ValueError, "pad_value", call, *outs)


# --------------------------------------------------------------------------------------------------
# Unknown backend
# --------------------------------------------------------------------------------------------------
def _backend_call(op: str, num_rows: int, device, backend: str):
    """A call of ``op`` on a valid batch of ``num_rows`` rows, and the outputs it writes."""
    bt = i32([[1, 2], [3, 4]], device)
    if op == "write_kv_indices":
        out = filled((4,), device)
        return lambda: write_kv_indices(bt, torch.arange(num_rows + 1, device=device), out=out, backend=backend), [out]
    if op == "block_tables_to_ragged":
        out, kv_indptr = filled((4,), device), filled((3,), device, torch.int64)
        seq_lens = torch.ones(num_rows, dtype=torch.int64, device=device)
        call = lambda: block_tables_to_ragged(bt, seq_lens, 16, out=out, kv_indptr_out=kv_indptr, backend=backend)
        return call, [out, kv_indptr]
    if op == "block_tables_to_padded":
        out = filled((2, 2), device)
        cu = torch.arange(num_rows + 1, device=device)
        return lambda: block_tables_to_padded(i32([5, 6], device), cu, out=out, backend=backend), [out]
    out = filled((2, 2), device)
    idx = torch.arange(num_rows, device=device)
    return lambda: gather_block_tables(idx, [bt], [i32([2, 1], device)], out=[out], backend=backend), [out]


@pytest.mark.parametrize("num_rows", [2, 0], ids=["batch", "empty-batch"])
@pytest.mark.parametrize(
    "op", ["write_kv_indices", "block_tables_to_ragged", "block_tables_to_padded", "gather_block_tables"]
)
def test_unknown_backend_rejected(device, op, num_rows):
    """An unknown backend string is an error whatever the batch holds (a typo must not pass silently)."""
    call, _ = _backend_call(op, num_rows, device, "torch")
    call()  # the arguments themselves are valid
    call, outputs = _backend_call(op, num_rows, device, "cuda-graph")
    raises_untouched(ValueError, "backend", call, *outputs)
