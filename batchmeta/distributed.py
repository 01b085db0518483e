"""Context-parallel attention merge over ``torch.distributed``.

With context parallelism each rank of a process group holds a share of every request's KV cache,
computes attention of the (replicated) queries over its share, and returns a partial output and its
log-sum-exp. The merged output is ``sum_r exp(lse_r - lse) * out_r`` with
``lse = logsumexp_r(lse_r)``: each rank all-gathers the lses, rescales its own output with
:func:`batchmeta.ops.correct_attn_out`, and a sum over ranks finishes the merge. Ranks with an empty
share return lse -inf (or NaN / +inf from some kernels) and contribute nothing.

Works with NCCL on GPUs and gloo on CPUs. Collectives gloo lacks are composed from those it has:
``all_gather_into_tensor`` from ``all_gather``, and ``reduce_scatter_tensor`` from ``all_reduce``
followed by taking this rank's heads.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from batchmeta.ops import correct_attn_out
from batchmeta.ops._common import check_tensor

__all__ = ["cp_lse_ag_out_ar", "cp_lse_ag_out_rs"]

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LSE_BASES = ("e", "2")


def _check(out: torch.Tensor, lse: torch.Tensor, lse_base: str) -> None:
    check_tensor("out", out, dtypes=_OUT_DTYPES, ndim=3, contiguous=True)
    check_tensor("lse", lse, dtypes=(torch.float32,), ndim=2, device=out.device)
    if tuple(lse.shape) != tuple(out.shape[:2]):
        raise ValueError(f"lse: expected shape {tuple(out.shape[:2])} (out's [B, H]), got {tuple(lse.shape)}")
    if lse_base not in _LSE_BASES:
        raise ValueError(f"lse_base: expected 'e' (natural log) or '2' (FlashInfer's default), got {lse_base!r}")


def _is_gloo(group) -> bool:
    return dist.get_backend(group) == dist.Backend.GLOO


def _gather_lses(lse: torch.Tensor, lse_base: str, group, world: int) -> torch.Tensor:
    """``[N, B, H]`` natural-log lses of every rank."""
    lse = lse.contiguous()
    lses = torch.empty((world, *lse.shape), dtype=lse.dtype, device=lse.device)
    if _is_gloo(group):
        dist.all_gather(list(lses.unbind(0)), lse, group=group)
    else:
        dist.all_gather_into_tensor(lses, lse, group=group)
    if lse_base == "2":
        lses.mul_(math.log(2.0))
    return lses


def cp_lse_ag_out_rs(
    out: torch.Tensor,
    lse: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    lse_base: str = "e",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Merges context-parallel partial attention; each rank keeps its share of the heads.

    All-gathers the lses over ``group``, rescales this rank's ``out`` in place, and reduce-scatters
    the outputs over heads: rank ``r`` of ``N`` returns heads ``[r * H / N, (r + 1) * H / N)`` of the
    merged output. A group of one rank returns ``out`` unchanged.

    Parameters
    ----------
    out:
        ``[B, H, D]`` float16/bfloat16/float32 partial output of this rank (overwritten).
    lse:
        ``[B, H]`` float32 log-sum-exp of this rank's partial attention.
    group:
        The context-parallel process group (default: the world).
    lse_base:
        ``"e"`` for natural-log lses, ``"2"`` for base-2 ones (FlashInfer's ``lse_base="log2"``).
    return_lse:
        Also return the merged lse of the kept heads, ``[B, H / N]`` float32, natural log.

    Returns
    -------
    ``[B, H / N, D]`` merged output (and its lse with ``return_lse``).
    """
    _check(out, lse, lse_base)
    world = dist.get_world_size(group)
    if world == 1:
        return (out, lse) if return_lse else out
    b, h, d = out.shape
    if h % world:
        raise ValueError(f"out: {h} heads cannot be split evenly over {world} ranks")
    rank = dist.get_rank(group)
    lses = _gather_lses(lse, lse_base, group, world)
    out, merged = correct_attn_out(out, lses, rank)
    hr = h // world
    if _is_gloo(group):
        dist.all_reduce(out, group=group)
        result = out[:, rank * hr : (rank + 1) * hr].contiguous()
    else:
        # reduce_scatter_tensor splits dim 0: put the rank (head chunk) dimension first.
        chunks = out.view(b, world, hr, d).transpose(0, 1).contiguous()
        result = torch.empty((b, hr, d), dtype=out.dtype, device=out.device)
        dist.reduce_scatter_tensor(result, chunks.view(world * b, hr, d), group=group)
    if return_lse:
        return result, merged[:, rank * hr : (rank + 1) * hr]
    return result


def cp_lse_ag_out_ar(
    out: torch.Tensor,
    lse: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    lse_base: str = "e",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Merges context-parallel partial attention; every rank gets all heads.

    As :func:`cp_lse_ag_out_rs`, with an all-reduce instead of the reduce-scatter: returns the
    merged ``[B, H, D]`` output (``out`` itself, rescaled and summed in place), and with
    ``return_lse`` the merged ``[B, H]`` lse. A group of one rank returns ``out`` unchanged.
    """
    _check(out, lse, lse_base)
    world = dist.get_world_size(group)
    if world == 1:
        return (out, lse) if return_lse else out
    lses = _gather_lses(lse, lse_base, group, world)
    out, merged = correct_attn_out(out, lses, dist.get_rank(group))
    dist.all_reduce(out, group=group)
    return (out, merged) if return_lse else out
