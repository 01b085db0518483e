"""Context parallelism (decode context parallelism, vLLM's DCP): each rank's share of every request's KV.

The ``world_size`` ranks of a process group each store a share of every request's tokens: token
``p`` lives on rank ``(p // I) % N`` at local position ``(p // (I * N)) * I + p % I`` (``N`` the
world size, ``I`` the interleave). Each rank's block tables hold its own pages, for its local
positions; each rank's step writes only the tokens it owns (PAD elsewhere) and its KV lengths, page
counts, ``kv_indptr``, ``kv_indices`` and ``kv_last_page_len`` are its local ones, while positions
and queries are the same on every rank. A sliding-window group is not sharded: each rank keeps its
whole window (as vLLM does), so its metadata is the same on every rank.

The trap (vLLM #47181): a rank's local count of ``G - k`` tokens is not its local count of ``G``
minus ``k``; and page counts must come from local lengths, never global ones (vLLM #48003). Every
local length here is computed from a global length by :func:`local_len`.

Built so far: each rank's metadata. Not yet: attention merged across ranks for every step kind
(``step.attention`` raises for a sharded group), CUDA-graph decode, draft loops, speculative
acceptance on the device, MLA groups and multi-LoRA under context parallelism (each rejected with
a ``ValueError`` naming ``context_parallel``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import numpy as np
import torch

if TYPE_CHECKING:
    from batchmeta.config import KVGroup

__all__ = ["ContextParallel", "is_sharded", "local_len", "local_position", "owner"]

_MAX_INT32 = 2**31 - 1


def _int_at_least(lo: int):
    def check(inst, attribute, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{attribute.name}: expected an int, got {type(value).__name__}")
        if not lo <= value <= _MAX_INT32:
            raise ValueError(f"{attribute.name}: expected an int in [{lo}, {_MAX_INT32}], got {value}")

    return check


@attrs.frozen
class ContextParallel:
    """This rank's place in a context-parallel group. Frozen; validated on creation.

    Parameters
    ----------
    world_size:
        Ranks sharing every request's KV cache, ``>= 1`` (1: no sharding, today's behaviour).
    rank:
        This rank, in ``[0, world_size)``.
    interleave:
        Consecutive tokens a rank stores before the next rank's turn, ``>= 1`` (vLLM's
        ``cp_kv_cache_interleave_size``; 1: round robin token by token).
    """

    world_size: int = attrs.field(validator=_int_at_least(1))
    rank: int = attrs.field(validator=_int_at_least(0))
    interleave: int = attrs.field(default=1, validator=_int_at_least(1), kw_only=True)

    @rank.validator
    def _check_rank(self, attribute, value) -> None:
        if value >= self.world_size:
            raise ValueError(f"rank: expected a rank in [0, {self.world_size}) (world_size), got {value}")


def is_sharded(cp: ContextParallel | None, group: KVGroup) -> bool:
    """Whether ``group``'s KV is spread over the ranks: a context-parallel group of several ranks,
    and full attention (a sliding-window group keeps its whole window on every rank)."""
    return cp is not None and cp.world_size > 1 and group.window_left < 0


def owner(positions, cp: ContextParallel):
    """The rank holding each token position: ``(p // interleave) % world_size`` (numpy or torch)."""
    return (positions // cp.interleave) % cp.world_size


def local_position(positions, cp: ContextParallel):
    """Each position's place in its owner's share: ``(p // (I * N)) * I + p % I`` (numpy or torch)."""
    i = cp.interleave
    return (positions // (i * cp.world_size)) * i + positions % i


def local_len(lens, cp: ContextParallel):
    """Tokens of positions ``[0, L)`` this rank (``cp.rank``) owns, for each ``L`` in ``lens``.

    Vectorised over numpy arrays or torch tensors (and plain ints). ``L`` full rounds of ``I * N``
    tokens give each rank ``I`` apiece; of the partial round, this rank owns the tokens from
    ``rank * I`` on, at most ``I``. Never ``local_len(G) - k`` for ``G - k`` tokens: compute it again.
    """
    i, n = cp.interleave, cp.world_size
    span = i * n
    rest = lens % span - cp.rank * i
    if isinstance(lens, torch.Tensor):
        extra = rest.clamp(0, i)
    else:
        extra = np.clip(rest, 0, i)
    return (lens // span) * i + extra
