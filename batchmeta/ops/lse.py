"""Context-parallel attention: merging partial outputs by their log-sum-exp.

When a request's KV cache is split over ``N`` ranks, rank ``i`` computes attention over its share
and returns ``out_i`` and ``lse_i``. The full output is ``sum_i exp(lse_i - lse) * out_i`` with
``lse = logsumexp_i(lse_i)``. :func:`correct_attn_out` scales this rank's ``out`` by its weight; a
sum over ranks (all-reduce or reduce-scatter) then gives the merged output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchmeta.launch import cached_kernel
from batchmeta.ops._common import check_int, check_tensor, next_power_of_2, use_triton

__all__ = ["correct_attn_out"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK_D = 128


@triton.jit
def _correct_kernel(
    out_ptr,  # [B, H, D] float, strides so_b, so_h, so_d
    so_b,
    so_h,
    so_d,
    lses_ptr,  # [N, B, H] float, strides sl_n, sl_b, sl_h
    sl_n,
    sl_b,
    sl_h,
    lse_out_ptr,  # [B, H] float32, strides sm_b, sm_h
    sm_b,
    sm_h,
    num_ranks,
    num_heads,
    head_dim,
    rank,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // num_heads).to(tl.int64)
    h = (pid % num_heads).to(tl.int64)
    r = tl.arange(0, BLOCK_N)
    lse = tl.load(lses_ptr + r * sl_n + b * sl_b + h * sl_h, mask=r < num_ranks, other=float("-inf"))
    lse = lse.to(tl.float32)
    # NaN and +inf come from ranks with nothing to attend to in some kernels: they count as -inf.
    lse = tl.where((lse != lse) | (lse == float("inf")), float("-inf"), lse)
    m = tl.max(lse, axis=0)
    all_empty = m == float("-inf")
    m_safe = tl.where(all_empty, 0.0, m)
    total = tl.sum(tl.exp(lse - m_safe), axis=0)
    merged = tl.where(all_empty, float("-inf"), m_safe + tl.log(tl.where(all_empty, 1.0, total)))
    mine = tl.max(tl.where(r == rank, lse, float("-inf")), axis=0)
    scale = tl.where(all_empty, 0.0, tl.exp(mine - tl.where(all_empty, 0.0, merged)))
    tl.store(lse_out_ptr + b * sm_b + h * sm_h, merged)
    row = out_ptr + b * so_b + h * so_h
    for d0 in range(0, head_dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < head_dim
        o = tl.load(row + d * so_d, mask=dm, other=0.0).to(tl.float32)
        # A zero weight must give 0 even where this rank's partial output is NaN or inf.
        o = tl.where(scale == 0.0, 0.0, o * scale)
        tl.store(row + d * so_d, o.to(out_ptr.dtype.element_ty), mask=dm)


_correct = cached_kernel(_correct_kernel)


def _correct_torch(out: torch.Tensor, lses: torch.Tensor, rank: int, lse_out: torch.Tensor) -> None:
    lse = lses.float()
    lse = torch.where(torch.isnan(lse) | (lse == float("inf")), float("-inf"), lse)
    m = lse.max(dim=0).values
    empty = m == float("-inf")
    m_safe = torch.where(empty, 0.0, m)
    merged = torch.where(empty, float("-inf"), m_safe + torch.log(torch.exp(lse - m_safe).sum(0)))
    scale = torch.where(empty, 0.0, torch.exp(lse[rank] - torch.where(empty, 0.0, merged)))
    scaled = torch.where(scale[..., None] == 0, 0.0, out.float() * scale[..., None])
    out.copy_(scaled.to(out.dtype))
    lse_out.copy_(merged)


def correct_attn_out(
    out: torch.Tensor,
    lses: torch.Tensor,
    rank: int,
    *,
    lse_out: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales this rank's partial attention output by its share of the merged softmax, in place.

    ``out *= exp(lses[rank] - logsumexp(lses, dim=0))`` per (row, head). NaN or +inf entries of
    ``lses`` count as -inf; a (row, head) whose lses are all -inf gets output 0 and lse -inf. Any
    number of ranks and any head size.

    Parameters
    ----------
    out:
        ``[B, H, D]`` float16/bfloat16/float32 partial output of this rank; modified in place.
    lses:
        ``[N, B, H]`` float lse of every rank (natural log).
    rank:
        This rank's index in ``[0, N)``.
    lse_out:
        ``[B, H]`` float32 receiving the merged lse; allocated when None.

    Returns
    -------
    ``(out, lse_out)``.
    """
    check_tensor("out", out, dtypes=_FLOATS, ndim=3)
    device = out.device
    check_tensor("lses", lses, dtypes=_FLOATS, ndim=3, device=device)
    num_rows, num_heads, head_dim = out.shape
    num_ranks = lses.shape[0]
    if tuple(lses.shape[1:]) != (num_rows, num_heads):
        raise ValueError(f"lses: expected shape (N, {num_rows}, {num_heads}) to match out, got {tuple(lses.shape)}")
    if num_ranks == 0:
        raise ValueError("lses: expected at least one rank, got shape with N = 0")
    check_int("rank", rank, minimum=0)
    if rank >= num_ranks:
        raise ValueError(f"rank: expected a value in [0, {num_ranks}), got {rank}")
    if lse_out is None:
        lse_out = torch.empty((num_rows, num_heads), dtype=torch.float32, device=device)
    check_tensor("lse_out", lse_out, dtypes=(torch.float32,), ndim=2, device=device)
    if tuple(lse_out.shape) != (num_rows, num_heads):
        raise ValueError(f"lse_out: expected shape {(num_rows, num_heads)}, got {tuple(lse_out.shape)}")
    on_triton = use_triton(backend, out)
    if num_rows * num_heads == 0:
        return out, lse_out
    if on_triton:
        _correct.launch(
            (num_rows * num_heads,),
            (
                out,
                *out.stride(),
                lses,
                *lses.stride(),
                lse_out,
                *lse_out.stride(),
                num_ranks,
                num_heads,
                head_dim,
                rank,
                next_power_of_2(num_ranks),
                _BLOCK_D,
            ),
        )
    else:
        _correct_torch(out, lses, rank, lse_out)
    return out, lse_out
