"""host_ints (batchmeta.batch): every accepted input gives the same new int64 array; the int64 numpy fast path too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchmeta.batch import host_ints

VALUES = [3, 0, 7, 2**40, 5]


@pytest.mark.parametrize(
    "value",
    [
        VALUES,
        tuple(VALUES),
        np.array(VALUES, np.int64),
        np.array(VALUES, np.uint64),
        np.array(VALUES, ">i8"),  # non-native byte order: not the fast path's dtype
        np.array(VALUES[::-1], np.int64)[::-1],  # negative stride
        np.array([v for v in VALUES for _ in range(2)], np.int64)[::2],  # strided
        torch.tensor(VALUES),
    ],
    ids=["list", "tuple", "int64", "uint64", "big-endian", "reversed", "strided", "tensor"],
)
def test_host_ints_same_result_from_every_input(value):
    out = host_ints("x", value, length=len(VALUES))
    assert out.dtype == np.int64 and out.flags.c_contiguous and out.flags.writeable
    assert out.tolist() == VALUES
    assert not np.shares_memory(out, value if isinstance(value, np.ndarray) else np.zeros(1))


def test_host_ints_int64_array_is_copied():
    a = np.array(VALUES, np.int64)
    out = host_ints("x", a)
    a[0] = 99
    assert out[0] == VALUES[0]


@pytest.mark.parametrize("value", [np.arange(3), list(range(3))], ids=["int64", "list"])
def test_host_ints_length_message(value):
    with pytest.raises(ValueError, match=r"^cache_lens: expected 4 elements \(one per batch row\), got 3$"):
        host_ints("cache_lens", value, length=4)


def test_host_ints_rejects_2d_and_floats():
    with pytest.raises(ValueError, match="1 dimension"):
        host_ints("x", np.zeros((2, 2), np.int64))
    with pytest.raises(TypeError, match="integers"):
        host_ints("x", np.zeros(2))
