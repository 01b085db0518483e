"""Host-side (CPU, numpy) helpers for the small arrays FlashInfer's ``plan()`` reads.

``plan()`` copies its indptr arrays to the host; given device tensors it must sync. These helpers
compute them from the scheduler's host-side lengths, with numpy, into caller-given buffers (numpy
arrays or CPU tensors, typically views of pinned staging memory that is later copied to the device
in one transfer). They never touch device data.
"""

from __future__ import annotations

import numpy as np
import torch

from batchmeta.ops._common import check_int_list

__all__ = ["fill_kv_indptr", "fill_kv_last_page_len", "fill_qo_indptr"]

ArrayLike = np.ndarray | torch.Tensor


_INT64_MAX = int(np.iinfo(np.int64).max)


def _as_numpy(name: str, a: object, *, writable: bool = False) -> np.ndarray:
    """A 1-D integer numpy view of ``a``. An input comes back as int64 (a value int64 cannot hold is a
    ``ValueError``, never wrapped); an output (``writable``) as the caller's own, writable, array."""
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise ValueError(f"{name}: expected host data (numpy array or CPU tensor), got a tensor on {a.device}")
        if a.dtype.is_floating_point or a.dtype.is_complex or a.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer dtype, got {str(a.dtype).replace('torch.', '')}")
        a = a.numpy()
    elif isinstance(a, (list, tuple)):
        if writable:
            raise TypeError(f"{name}: expected a numpy array or CPU tensor to write into, got {type(a).__name__}")
        try:
            arr = np.asarray(a) if len(a) else np.zeros(0, np.int64)
        except (TypeError, ValueError, OverflowError):  # ragged nesting, a device tensor...
            arr = None
        if arr is None or arr.dtype.kind not in "iub":
            # Floats, None, or ints numpy could not hold as int64/uint64 (it makes those floats or
            # objects): element by element, so a float fails rather than being truncated.
            values = check_int_list(name, a)
            if max(values) > _INT64_MAX or min(values) < -_INT64_MAX - 1:
                raise ValueError(f"{name}: values must fit int64, got {max(values, key=abs)}")
            arr = np.array(values, dtype=np.int64)
        a = arr
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, CPU tensor or list, got {type(a).__name__}")
    if a.ndim != 1:
        raise ValueError(f"{name}: expected 1 dimension, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name}: expected an integer dtype, got {a.dtype}")
    if writable:
        if not a.flags.writeable:
            raise ValueError(f"{name}: expected a writable array, got a read-only one")
        return a
    if a.dtype.kind == "u" and a.size and int(a.max()) > _INT64_MAX:
        raise ValueError(f"{name}: values must fit int64, got {int(a.max())}")
    return a.astype(np.int64, copy=False)


def _check_page_size(page_size: object) -> int:
    if isinstance(page_size, bool) or not isinstance(page_size, (int, np.integer)):
        raise TypeError(f"page_size: expected an int, got {type(page_size).__name__}")
    if not 1 <= page_size <= _INT64_MAX:
        raise ValueError(f"page_size: expected an int in [1, 2**63 - 1], got {page_size}")
    return int(page_size)


def _check_out(name: str, out: np.ndarray, needed: int) -> None:
    if out.shape[0] < needed:
        raise ValueError(f"{name}: expected at least {needed} elements, got {out.shape[0]}")


def _check_fits(name: str, out: np.ndarray, largest: int) -> None:
    if largest > np.iinfo(out.dtype).max:
        raise ValueError(f"{name}: {out.dtype} cannot hold {largest}")


def _check_lengths(name: str, lens: np.ndarray) -> None:
    if lens.size and lens.min() < 0:
        raise ValueError(f"{name}: expected non-negative lengths, got minimum {lens.min()}")


def _prefix_sum(name: str, counts: np.ndarray) -> np.ndarray:
    """Inclusive int64 prefix sum of non-negative int64 ``counts``; ``ValueError`` naming ``name`` where
    it passes int64 (a wrap shows as a negative partial sum)."""
    sums = np.cumsum(counts, dtype=np.int64)
    if sums.size and sums.min() < 0:
        raise ValueError(f"{name}: the sum passes the int64 range")
    return sums


def fill_qo_indptr(query_lens: ArrayLike, out: ArrayLike) -> np.ndarray:
    """``out[:B+1] = [0, cumsum(query_lens)]`` (FlashInfer's ``qo_indptr``); returns that view.

    Parameters
    ----------
    query_lens:
        ``[B]`` new tokens per request (numpy, CPU tensor or list).
    out:
        ``[>= B + 1]`` integer numpy array or CPU tensor.
    """
    lens = _as_numpy("query_lens", query_lens)
    dst = _as_numpy("out", out, writable=True)
    n = lens.shape[0]
    _check_out("out", dst, n + 1)
    _check_lengths("query_lens", lens)
    sums = _prefix_sum("query_lens", lens)
    _check_fits("out", dst, int(sums[-1]) if n else 0)
    dst[0] = 0
    dst[1 : n + 1] = sums
    return dst[: n + 1]


def fill_kv_indptr(seq_lens: ArrayLike, page_size: int, out: ArrayLike) -> np.ndarray:
    """``out[:B+1] = [0, cumsum(ceil(seq_lens / page_size))]`` (FlashInfer's ``kv_indptr``).

    Parameters
    ----------
    seq_lens:
        ``[B]`` tokens per request after this step (cached + new).
    page_size:
        Tokens per page.
    out:
        ``[>= B + 1]`` integer numpy array or CPU tensor.
    """
    lens = _as_numpy("seq_lens", seq_lens)
    ps = _check_page_size(page_size)
    dst = _as_numpy("out", out, writable=True)
    n = lens.shape[0]
    _check_out("out", dst, n + 1)
    _check_lengths("seq_lens", lens)
    # ceil without adding page_size - 1 first, which would wrap for lengths near the top of int64.
    pages = lens // ps + (lens % ps != 0)
    sums = _prefix_sum("seq_lens", pages)
    _check_fits("out", dst, int(sums[-1]) if n else 0)
    dst[0] = 0
    dst[1 : n + 1] = sums
    return dst[: n + 1]


def fill_kv_last_page_len(seq_lens: ArrayLike, page_size: int, out: ArrayLike) -> np.ndarray:
    """``out[:B] = (seq_lens - 1) % page_size + 1`` (0 for an empty sequence), FlashInfer's
    ``kv_last_page_len``.

    Parameters
    ----------
    seq_lens:
        ``[B]`` tokens per request after this step.
    page_size:
        Tokens per page.
    out:
        ``[>= B]`` integer numpy array or CPU tensor.
    """
    lens = _as_numpy("seq_lens", seq_lens)
    ps = _check_page_size(page_size)
    dst = _as_numpy("out", out, writable=True)
    n = lens.shape[0]
    _check_out("out", dst, n)
    _check_lengths("seq_lens", lens)
    _check_fits("out", dst, ps)
    view = dst[:n]
    # An empty sequence has no last page; (0 - 1) % ps + 1 would claim a full one.
    view[:] = np.where(lens == 0, 0, (lens - 1) % ps + 1)
    return view
