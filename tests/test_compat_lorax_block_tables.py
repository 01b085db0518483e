"""Tests of the LoRAX/TGI block-table functions in ``batchmeta.compat.lorax``.

They keep LoRAX's names, argument names and order, and LoRAX's page-size-1 meaning for
``block_tables_to_ragged``; ``block_tables_to_padded`` writes the whole of each row (tail 0) whatever
``max_blocks`` says. The compat functions take no ``backend``: the ``impl`` fixture runs them through
the Triton kernels and, on CPU, through the torch fallback (what runs when Triton is not usable).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import batchmeta.ops._common as common
from batchmeta.compat import lorax

SENTINEL = -7777
I32_MAX = 2**31 - 1
KW_ONLY = inspect.Parameter.KEYWORD_ONLY
POS_OR_KW = inspect.Parameter.POSITIONAL_OR_KEYWORD


# --------------------------------------------------------------------------------------------------
# Naive references
# --------------------------------------------------------------------------------------------------
def naive_ragged(table: list[list[int]], input_lengths: list[int], cache_lengths: list[int]) -> list[int]:
    """LoRAX's meaning: row b contributes its first cache_len + input_len entries, rows back to back."""
    out = []
    for b, (inp, cache) in enumerate(zip(input_lengths, cache_lengths, strict=True)):
        for j in range(cache + inp):
            out.append(table[b][j])
    return out


def naive_padded(ragged: list[int], cu: list[int], width: int) -> list[list[int]]:
    """Row b = ragged[cu[b]:cu[b+1]] followed by zeros to the row's end."""
    rows = []
    for b in range(len(cu) - 1):
        n = cu[b + 1] - cu[b]
        rows.append([ragged[cu[b] + j] if j < n else 0 for j in range(width)])
    return rows


def i32(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def filled(shape, device, dtype=torch.int32) -> torch.Tensor:
    return torch.full(shape, SENTINEL, dtype=dtype, device=device)


def raises_untouched(exc, match: str, call, *outputs: torch.Tensor) -> None:
    """``call()`` raises ``exc`` matching ``match`` and leaves every output as it was."""
    before = [o.clone() for o in outputs]
    with pytest.raises(exc, match=match):
        call()
    for o, b in zip(outputs, before, strict=True):
        assert torch.equal(o, b), "output written before the error was raised"


@st.composite
def page_tables(draw, rows: int, width: int) -> list[list[int]]:
    """Distinct page ids; sometimes the largest is 2^31 - 1."""
    n = rows * width
    base = draw(st.sampled_from([0, 1000, I32_MAX + 1 - n]))
    perm = draw(st.permutations(range(n)))
    return [[base + perm[r * width + j] for j in range(width)] for r in range(rows)]


index_dtypes = st.sampled_from([torch.int32, torch.int64])


@pytest.fixture(params=["triton", "torch"])
def impl(request, device, monkeypatch) -> str:
    """Which implementation the compat call (backend None) dispatches to."""
    if request.param == "torch":
        if device.type == "cuda":
            pytest.skip("CUDA tensors always take the Triton path")
        # Backend None on CPU tensors picks Triton only because the interpreter is on.
        monkeypatch.setattr(common, "INTERPRET", False)
    return request.param


# --------------------------------------------------------------------------------------------------
# Signatures and has_triton
# --------------------------------------------------------------------------------------------------
class TestSignatures:
    """An engine written against LoRAX must be able to switch by changing the import."""

    def test_block_tables_to_ragged_is_keyword_only_with_lorax_names(self):
        params = list(inspect.signature(lorax.block_tables_to_ragged).parameters.values())
        assert [p.name for p in params] == [
            "block_tables",
            "input_lengths",
            "cache_lengths",
            "input_lengths_tensor",
            "cache_lengths_tensor",
            "max_current_length",
        ]
        assert all(p.kind is KW_ONLY for p in params)
        assert all(p.default is inspect.Parameter.empty for p in params)

    def test_block_tables_to_padded_positional_with_lorax_names(self):
        params = list(inspect.signature(lorax.block_tables_to_padded).parameters.values())
        assert [p.name for p in params] == ["max_blocks", "cu_seqlen", "block_tables", "block_tables_ragged"]
        assert all(p.kind is POS_OR_KW for p in params)
        assert all(p.default is inspect.Parameter.empty for p in params)

    def test_has_triton_is_a_cached_bool(self):
        first = lorax.has_triton()
        assert type(first) is bool
        assert lorax.has_triton() is first
        # Here Triton runs on CUDA, or under the interpreter the test setup turns on without CUDA.
        assert first is True

    def test_ragged_rejects_positional_call(self, device):
        with pytest.raises(TypeError):
            lorax.block_tables_to_ragged(i32([[1]], device), [1], [0], i32([1], device), i32([0], device), 1)


# --------------------------------------------------------------------------------------------------
# block_tables_to_ragged
# --------------------------------------------------------------------------------------------------
class TestBlockTablesToRagged:
    """Page-size-1 meaning: cache_len + input_len entries per row, in a new int32 tensor."""

    @given(data=st.data())
    def test_matches_naive(self, data, device, impl):
        num_rows = data.draw(st.integers(1, 8), label="B")
        width = data.draw(st.integers(1, 16), label="W")
        table_rows = num_rows + data.draw(st.integers(0, 2), label="extra_rows")
        table = data.draw(page_tables(table_rows, width), label="table")
        one_len = st.one_of(st.just(0), st.just(width), st.integers(0, width))
        seq_lens = data.draw(st.lists(one_len, min_size=num_rows, max_size=num_rows), label="seq_lens")
        cache_lengths = [data.draw(st.integers(0, s), label="cache_len") for s in seq_lens]
        input_lengths = [s - c for s, c in zip(seq_lens, cache_lengths, strict=True)]
        # LoRAX passes the longest row; a wrong value only sized LoRAX's grid and must not matter here.
        max_current_length = data.draw(st.sampled_from([max(seq_lens), 0, 1]), label="max_current_length")

        result = lorax.block_tables_to_ragged(
            block_tables=i32(table, device),
            input_lengths=input_lengths,
            cache_lengths=cache_lengths,
            input_lengths_tensor=torch.tensor(input_lengths, dtype=data.draw(index_dtypes), device=device),
            cache_lengths_tensor=torch.tensor(cache_lengths, dtype=data.draw(index_dtypes), device=device),
            max_current_length=max_current_length,
        )

        assert result.dtype == torch.int32 and result.device == device
        assert torch.equal(result, i32(naive_ragged(table, input_lengths, cache_lengths), device))

    def test_page_size_one_meaning_kept(self, device, impl):
        """Bug 1 is fixed in batchmeta.ops; this compat entry point keeps LoRAX's token count."""
        table = [[10, 11, 12, 13, 14], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34]]
        result = lorax.block_tables_to_ragged(
            block_tables=i32(table, device),
            input_lengths=[1, 3, 0],
            cache_lengths=[4, 0, 0],
            input_lengths_tensor=i32([1, 3, 0], device),
            cache_lengths_tensor=i32([4, 0, 0], device),
            max_current_length=5,
        )
        assert torch.equal(result, i32([10, 11, 12, 13, 14, 20, 21, 22], device))

    def test_bug9_large_page_ids_copied_exactly(self, device, impl):
        table = [[I32_MAX, I32_MAX - 1], [I32_MAX - 2, I32_MAX - 3]]
        result = lorax.block_tables_to_ragged(
            block_tables=i32(table, device),
            input_lengths=[1, 1],
            cache_lengths=[1, 0],
            input_lengths_tensor=i32([1, 1], device),
            cache_lengths_tensor=i32([1, 0], device),
            max_current_length=2,
        )
        assert torch.equal(result, i32([I32_MAX, I32_MAX - 1, I32_MAX - 2], device))

    def test_empty_batch(self, device, impl):
        result = lorax.block_tables_to_ragged(
            block_tables=i32([[1, 2]], device),
            input_lengths=[],
            cache_lengths=[],
            input_lengths_tensor=torch.zeros(0, dtype=torch.int32, device=device),
            cache_lengths_tensor=torch.zeros(0, dtype=torch.int32, device=device),
            max_current_length=0,
        )
        assert result.dtype == torch.int32 and result.numel() == 0


class TestBlockTablesToRaggedErrors:
    """Bad arguments raise naming the (LoRAX) argument."""

    def _kwargs(self, device, **changes):
        kwargs = {
            "block_tables": i32([[1, 2, 3], [4, 5, 6]], device),
            "input_lengths": [2, 1],
            "cache_lengths": [1, 0],
            "input_lengths_tensor": i32([2, 1], device),
            "cache_lengths_tensor": i32([1, 0], device),
            "max_current_length": 3,
        }
        kwargs.update(changes)
        return kwargs

    def test_int64_block_tables(self, device):
        kwargs = self._kwargs(device, block_tables=torch.ones(2, 3, dtype=torch.int64, device=device))
        with pytest.raises(TypeError, match="block_tables"):
            lorax.block_tables_to_ragged(**kwargs)

    def test_row_longer_than_table(self, device):
        kwargs = self._kwargs(device, input_lengths=[3, 1], input_lengths_tensor=i32([3, 1], device))
        with pytest.raises(ValueError, match="block_tables"):
            lorax.block_tables_to_ragged(**kwargs)

    def test_list_lengths_mismatch(self, device):
        with pytest.raises(ValueError, match="cache_lengths"):
            lorax.block_tables_to_ragged(**self._kwargs(device, cache_lengths=[1]))

    @pytest.mark.parametrize("name", ["input_lengths_tensor", "cache_lengths_tensor"])
    def test_tensor_length_mismatch(self, device, name):
        with pytest.raises(ValueError, match=name):
            lorax.block_tables_to_ragged(**self._kwargs(device, **{name: i32([0, 0, 0], device)}))

    @pytest.mark.parametrize("name", ["input_lengths_tensor", "cache_lengths_tensor"])
    def test_float_length_tensor(self, device, name):
        with pytest.raises(TypeError, match=name):
            lorax.block_tables_to_ragged(**self._kwargs(device, **{name: torch.zeros(2, device=device)}))

    @pytest.mark.parametrize(
        ("name", "bad"),
        [
            ("input_lengths", [2.0, 1]),  # used to size the output as a float
            ("input_lengths", [2.7, 1]),
            ("cache_lengths", [1, None]),
            ("cache_lengths", [True, 0]),
            ("input_lengths", None),
            ("cache_lengths", torch.tensor([1, 0])),  # a tensor belongs in cache_lengths_tensor
        ],
        ids=["integral-float", "float", "none-entry", "bool-entry", "none", "tensor"],
    )
    def test_non_int_list_lengths(self, device, name, bad):
        # Floats must not be truncated, None not compared: a TypeError naming the list.
        with pytest.raises(TypeError, match=name):
            lorax.block_tables_to_ragged(**self._kwargs(device, **{name: bad}))

    def test_numpy_int_lengths(self, device):
        # Lengths built with numpy are ints too.
        kwargs = self._kwargs(device, input_lengths=[np.int64(2), np.int32(1)], cache_lengths=list(np.array([1, 0])))
        assert lorax.block_tables_to_ragged(**kwargs).tolist() == [1, 2, 3, 4]

    @pytest.mark.parametrize(
        ("inp", "cache"),
        [([2, -1], [1, 0]), ([-2, 1], [0, 0])],
        ids=["negative-row-positive-total", "negative-total"],
    )
    def test_negative_lengths(self, device, inp, cache):
        kwargs = self._kwargs(
            device,
            input_lengths=inp,
            cache_lengths=cache,
            input_lengths_tensor=i32(inp, device),
            cache_lengths_tensor=i32(cache, device),
        )
        with pytest.raises(ValueError, match="input_lengths"):
            lorax.block_tables_to_ragged(**kwargs)


# --------------------------------------------------------------------------------------------------
# block_tables_to_padded
# --------------------------------------------------------------------------------------------------
class TestBlockTablesToPadded:
    """Row b of block_tables = ragged[cu_seqlen[b]:cu_seqlen[b+1]], then 0 to the row's end."""

    @given(data=st.data())
    def test_matches_naive(self, data, device, impl):
        num_rows = data.draw(st.integers(1, 8), label="B")
        width = data.draw(st.integers(1, 16), label="W")
        one_count = st.one_of(st.just(0), st.just(width), st.integers(0, width))
        counts = data.draw(st.lists(one_count, min_size=num_rows, max_size=num_rows), label="counts")
        cu = [0]
        for n in counts:
            cu.append(cu[-1] + n)
        base = data.draw(st.sampled_from([1, I32_MAX - cu[-1]]), label="base")
        ragged = [base + k for k in range(cu[-1])]
        # LoRAX sizes its grid with max_blocks; too small a value must still write every row in full.
        max_blocks = data.draw(st.sampled_from([max(counts), width, 0, 1]), label="max_blocks")

        out = filled((num_rows, width), device)
        cu_t = torch.tensor(cu, dtype=data.draw(index_dtypes, label="cu_dtype"), device=device)
        lorax.block_tables_to_padded(max_blocks, cu_t, out, i32(ragged, device))

        assert torch.equal(out, i32(naive_padded(ragged, cu, width), device))

    def test_bug2_small_max_blocks_still_writes_whole_rows(self, device, impl):
        """Bug 2: max_blocks = 1 while a row holds 10 pages: all 10 copied, the tail zeroed."""
        ragged = [*range(100, 110), 200]
        out = filled((2, 16), device)
        cu = torch.tensor([0, 10, 11], dtype=torch.int32, device=device)
        lorax.block_tables_to_padded(1, cu, out, i32(ragged, device))
        expected = [list(range(100, 110)) + [0] * 6, [200] + [0] * 15]
        assert torch.equal(out, i32(expected, device))

    def test_bug2_stale_tail_zeroed(self, device, impl):
        """Bug 2: a table reused from the previous step has its stale tail overwritten with 0."""
        out = i32([[9, 9, 9, 9], [9, 9, 9, 9]], device)
        cu = torch.tensor([0, 1, 3], dtype=torch.int32, device=device)
        lorax.block_tables_to_padded(4, cu, out, i32([5, 6, 7], device))
        assert torch.equal(out, i32([[5, 0, 0, 0], [6, 7, 0, 0]], device))

    def test_bug9_large_page_ids_copied_exactly(self, device, impl):
        out = filled((2, 2), device)
        cu = torch.tensor([0, 2, 3], dtype=torch.int32, device=device)
        lorax.block_tables_to_padded(2, cu, out, i32([I32_MAX, I32_MAX - 1, I32_MAX - 2], device))
        assert torch.equal(out, i32([[I32_MAX, I32_MAX - 1], [I32_MAX - 2, 0]], device))


class TestBlockTablesToPaddedErrors:
    """Bad arguments raise naming the (LoRAX) argument, before anything is written."""

    def _check(self, exc, match, *, max_blocks=4, cu=None, out=None, ragged=None):
        cu = torch.tensor([0, 1, 3], dtype=torch.int32) if cu is None else cu
        out = filled((2, 4), "cpu") if out is None else out
        ragged = i32([5, 6, 7], "cpu") if ragged is None else ragged
        raises_untouched(exc, match, lambda: lorax.block_tables_to_padded(max_blocks, cu, out, ragged), out)

    @pytest.mark.parametrize(("max_blocks", "exc"), [(-1, ValueError), (4.0, TypeError)], ids=["negative", "float"])
    def test_bad_max_blocks(self, max_blocks, exc):
        self._check(exc, "max_blocks", max_blocks=max_blocks)

    def test_int64_ragged(self):
        self._check(TypeError, "block_tables_ragged", ragged=torch.tensor([5, 6, 7]))

    def test_float_cu_seqlen(self):
        self._check(TypeError, "cu_seqlen", cu=torch.tensor([0.0, 1.0, 3.0]))

    def test_cu_seqlen_past_ragged(self):
        self._check(ValueError, "cu_seqlen|block_tables_ragged", cu=torch.tensor([0, 1, 4], dtype=torch.int32))

    def test_row_wider_than_table(self):
        self._check(ValueError, "cu_seqlen|block_tables", out=filled((2, 1), "cpu"))

    def test_int64_block_tables(self):
        """The output table is LoRAX's ``block_tables`` argument: the message must say so."""
        self._check(TypeError, r"block_tables\b", out=filled((2, 4), "cpu", torch.int64))

    def test_too_few_rows_in_block_tables(self):
        self._check(ValueError, r"block_tables\b", out=filled((1, 4), "cpu"))
