"""Host-side (CPU, numpy) helpers for the small arrays FlashInfer's ``plan()`` reads.

``plan()`` copies its indptr arrays to the host; given device tensors it must sync. These helpers
compute them from the scheduler's host-side lengths, with numpy, into caller-given buffers (numpy
arrays or CPU tensors, typically views of pinned staging memory that is later copied to the device
in one transfer). They never touch device data.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["fill_kv_indptr", "fill_kv_last_page_len", "fill_qo_indptr"]

ArrayLike = np.ndarray | torch.Tensor


def _as_numpy(name: str, a: object, *, writable: bool = False) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise ValueError(f"{name}: expected host data (numpy array or CPU tensor), got a tensor on {a.device}")
        a = a.numpy()
    elif isinstance(a, (list, tuple)):
        if writable:
            raise TypeError(f"{name}: expected a numpy array or CPU tensor to write into, got {type(a).__name__}")
        # No dtype forced: a list of floats must fail the integer check below, not be truncated.
        a = np.asarray(a) if len(a) else np.zeros(0, np.int64)
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, CPU tensor or list, got {type(a).__name__}")
    if a.ndim != 1:
        raise ValueError(f"{name}: expected 1 dimension, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name}: expected an integer dtype, got {a.dtype}")
    return a


def _check_page_size(page_size: object) -> int:
    if isinstance(page_size, bool) or not isinstance(page_size, (int, np.integer)):
        raise TypeError(f"page_size: expected an int, got {type(page_size).__name__}")
    if page_size < 1:
        raise ValueError(f"page_size: expected an int >= 1, got {page_size}")
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
    _check_out("out", dst, lens.shape[0] + 1)
    _check_lengths("query_lens", lens)
    total = int(lens.sum(dtype=np.int64))
    _check_fits("out", dst, total)
    dst[0] = 0
    np.cumsum(lens, dtype=np.int64, out=dst[1 : lens.shape[0] + 1])
    return dst[: lens.shape[0] + 1]


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
    # In 64 bits: seq_len + page_size - 1 passes 2^31 for int32 lengths near the top of their range.
    pages = (lens.astype(np.int64) + (ps - 1)) // ps
    _check_fits("out", dst, int(pages.sum()))
    dst[0] = 0
    np.cumsum(pages, out=dst[1 : n + 1])
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
    view[:] = np.where(lens == 0, 0, (lens.astype(np.int64) - 1) % ps + 1)
    return view
