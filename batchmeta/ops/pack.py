"""``pack_seq`` / ``unpack_seq``: ragged token-major tensors ↔ padded batch-major tensors.

Sizes (tokens, features, maximum length) are passed to the kernel unspecialized and the tile sizes
are fixed, so a new shape never triggers a recompilation; one binary per dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from batchmeta.launch import cached_kernel
from batchmeta.ops._common import check_fill_value, check_index_vector, check_int, check_tensor, use_triton

__all__ = ["pack_seq", "unpack_seq"]

_BLOCK_T = 16
_BLOCK_F = 128


@triton.jit(do_not_specialize=["num_tokens", "num_features", "max_len", "pad_value"])
def _pack_kernel(
    x_ptr,  # [N, F] contiguous
    num_tokens,
    num_features,
    lengths_ptr,  # [B]
    packed_ptr,  # [B, max_len, F] contiguous
    max_len,
    pad_value,
    PACK: tl.constexpr,  # 1: x -> packed (pad written), 0: packed -> x
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    # Start of row b in x: the sum of the lengths before it, summed here rather than passed in so
    # callers need no prefix sum (and no host sync to make one).
    start = tl.zeros([], dtype=tl.int64)
    for off in range(0, b, BLOCK_B):
        i = off + tl.arange(0, BLOCK_B)
        start += tl.sum(tl.load(lengths_ptr + i, mask=i < b, other=0).to(tl.int64), axis=0)
    n = tl.load(lengths_ptr + b).to(tl.int64)
    src_tok = start + t
    valid_t = (t < n) & (src_tok < num_tokens)
    in_rows = t < max_len
    packed_row = packed_ptr + (b.to(tl.int64) * max_len + t)[:, None] * num_features
    x_row = x_ptr + src_tok[:, None] * num_features
    for f0 in range(0, num_features, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        fm = (f < num_features)[None, :]
        if PACK:
            v = tl.load(x_row + f[None, :], mask=valid_t[:, None] & fm)
            # Cast the pad, not the data: int64 tokens must not round-trip through fp32.
            pad = tl.full([BLOCK_T, BLOCK_F], pad_value, dtype=packed_ptr.dtype.element_ty)
            v = tl.where(valid_t[:, None], v, pad)
            tl.store(packed_row + f[None, :], v, mask=in_rows[:, None] & fm)
        else:
            m = (valid_t & in_rows)[:, None] & fm
            tl.store(x_row + f[None, :], tl.load(packed_row + f[None, :], mask=m), mask=m)


_pack = cached_kernel(_pack_kernel)


def _check_lengths(lengths: torch.Tensor, device: torch.device) -> None:
    check_index_vector("lengths", lengths, device=device)
    if not lengths.is_cuda and lengths.numel() and int(lengths.min()) < 0:
        raise ValueError("lengths: expected non-negative lengths")


def pack_seq(
    x: torch.Tensor,
    lengths: torch.Tensor,
    *,
    max_len: int | None = None,
    pad_value: float = 0.0,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Packs ``x`` (rows of ``B`` sequences back to back) into a padded ``[B, Lmax, ...]`` tensor.

    ``out[b, t] = x[sum(lengths[:b]) + t]`` for ``t < lengths[b]`` and ``pad_value`` elsewhere;
    sequences longer than ``Lmax`` are cut.

    Parameters
    ----------
    x:
        ``[N, ...]`` contiguous.
    lengths:
        ``[B]`` int32/int64 tokens per sequence (``sum <= N``).
    max_len:
        ``Lmax``. When None it is ``out.shape[1]``, or ``lengths.max()``: a host sync if ``lengths``
        is on the GPU.
    pad_value:
        A number the dtype of ``x`` holds: finite, not rounding to an infinity in a float dtype, an
        integral value inside the range of an integer dtype.
    out:
        ``[B, Lmax, ...]`` contiguous, dtype of ``x``; allocated when None.
    """
    check_tensor("x", x, contiguous=True)
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension, got a scalar")
    # As stored: an int for integer data (exact past 2^24, where a float kernel argument would round).
    pad = check_fill_value("pad_value", pad_value, x.dtype)
    device = x.device
    _check_lengths(lengths, device)
    num_seqs = lengths.numel()
    if max_len is None:
        if out is not None:
            max_len = out.shape[1] if out.dim() >= 2 else 0
        else:
            max_len = int(lengths.max()) if num_seqs else 0
    check_int("max_len", max_len, minimum=0)
    if out is None:
        out = torch.empty((num_seqs, max_len, *x.shape[1:]), dtype=x.dtype, device=device)
    check_tensor("out", out, dtypes=(x.dtype,), device=device, contiguous=True)
    if tuple(out.shape) != (num_seqs, max_len, *x.shape[1:]):
        raise ValueError(f"out: expected shape {(num_seqs, max_len, *x.shape[1:])}, got {tuple(out.shape)}")
    if not lengths.is_cuda and num_seqs and int(lengths.sum()) > x.shape[0]:
        raise ValueError(f"lengths: sum {int(lengths.sum())} exceeds the {x.shape[0]} rows of x")
    on_triton = use_triton(backend, x)
    if out.numel() == 0:
        return out
    features = math.prod(x.shape[1:])
    if on_triton:
        grid = (num_seqs, triton.cdiv(max_len, _BLOCK_T))
        _pack.launch(grid, (x, x.shape[0], features, lengths, out, max_len, pad, True, 256, _BLOCK_T, _BLOCK_F))
        return out
    starts = torch.cumsum(lengths.long(), 0) - lengths.long()
    t = torch.arange(max_len, device=device)
    src = starts[:, None] + t[None, :]
    valid = (t[None, :] < lengths.long()[:, None]) & (src < x.shape[0])
    flat = x.reshape(x.shape[0], features)
    vals = flat[src.clamp(0, max(x.shape[0] - 1, 0))] if x.shape[0] else flat.new_zeros((*src.shape, features))
    pad_t = torch.full((), pad, dtype=x.dtype, device=device)
    out.view(num_seqs, max_len, features).copy_(torch.where(valid[..., None], vals, pad_t))
    return out


def unpack_seq(
    packed: torch.Tensor,
    lengths: torch.Tensor,
    *,
    num_tokens: int | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Inverse of :func:`pack_seq`: ``out[sum(lengths[:b]) + t] = packed[b, t]`` for
    ``t < min(lengths[b], Lmax)``. Rows of ``out`` that no sequence covers are untouched.

    Parameters
    ----------
    packed:
        ``[B, Lmax, ...]`` contiguous.
    lengths:
        ``[B]`` int32/int64.
    num_tokens:
        ``N``, rows of ``out``. When None it is ``out.shape[0]``, or ``lengths.sum()``: a host sync if
        ``lengths`` is on the GPU.
    out:
        ``[N, ...]`` contiguous, dtype of ``packed``; allocated when None.
    """
    check_tensor("packed", packed, contiguous=True)
    if packed.dim() < 2:
        raise ValueError(f"packed: expected at least 2 dimensions, got shape {tuple(packed.shape)}")
    device = packed.device
    _check_lengths(lengths, device)
    num_seqs, max_len = packed.shape[0], packed.shape[1]
    if lengths.numel() != num_seqs:
        raise ValueError(f"lengths: expected {num_seqs} elements (packed.shape[0]), got {lengths.numel()}")
    if num_tokens is None:
        num_tokens = out.shape[0] if out is not None else (int(lengths.sum()) if num_seqs else 0)
    check_int("num_tokens", num_tokens, minimum=0)
    feat_shape = tuple(packed.shape[2:])
    if out is None:
        out = torch.empty((num_tokens, *feat_shape), dtype=packed.dtype, device=device)
    check_tensor("out", out, dtypes=(packed.dtype,), device=device, contiguous=True)
    if tuple(out.shape) != (num_tokens, *feat_shape):
        raise ValueError(f"out: expected shape {(num_tokens, *feat_shape)}, got {tuple(out.shape)}")
    if not lengths.is_cuda and num_seqs and int(lengths.sum()) > num_tokens:
        raise ValueError(f"out: expected at least {int(lengths.sum())} rows (sum of lengths), got {num_tokens}")
    on_triton = use_triton(backend, packed)
    if num_seqs == 0 or max_len == 0 or out.numel() == 0:
        return out
    features = math.prod(feat_shape)
    if on_triton:
        grid = (num_seqs, triton.cdiv(max_len, _BLOCK_T))
        _pack.launch(grid, (out, num_tokens, features, lengths, packed, max_len, 0.0, False, 256, _BLOCK_T, _BLOCK_F))
        return out
    starts = torch.cumsum(lengths.long(), 0) - lengths.long()
    t = torch.arange(max_len, device=device)
    dst = starts[:, None] + t[None, :]
    valid = (t[None, :] < lengths.long()[:, None]) & (dst < num_tokens)
    out.view(num_tokens, features)[dst[valid]] = packed.reshape(num_seqs, max_len, features)[valid]
    return out
