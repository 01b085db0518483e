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

Attention across the ranks (:class:`CPAttention`, what ``step.attention`` runs for a sharded group)
is exact for every step kind without a custom mask. Every query of a step comes after all of its
row's *cached* tokens and the step's *new* tokens are the same on every rank, so a row's attention
splits in two parts merged by their log-sum-exp:

- (A) each rank attends over its share of the cached context (positions ``< c``, ``local_len(c)``
  local tokens) with no mask: paged arrays over those tokens alone (``kv_indptr`` /
  ``kv_indices`` / ``kv_last_page_len`` of the cached context, built per step from the host's
  cache lengths and gathered from the step's ``kv_indices`` on the device, no sync);
- (B) one rank (rank 0) attends over the step's new keys and values ``k`` / ``v`` ``[T, Hkv, D]``,
  which the model holds before ``store_kv``, causally (a ragged prefill: queries and keys share
  ``qo_indptr``), and folds it into its partial;

then the ranks' partials merge through the process group (:func:`~batchmeta.distributed.cp_lse_ag_out_ar`:
every rank gets every head). Why this split rather than the alternatives considered (reasoned,
not yet measured on a GPU): one causal pass over each rank's local KV *including* its new tokens
needs a custom mask per rank (its new tokens sit at interleaved positions, so FlashInfer's causal
mask, which takes the queries to be the last keys, is wrong for them; a packed custom mask costs
``T x L`` bits per step and the slower masked kernels), and gathering every new token's KV onto
every rank first is a collective per layer before attention. Here part B runs once, over ``T``
keys only, and part A is a plain unmasked paged attention (FlashInfer's decode or prefill
kernels). A step with nothing cached (``"ragged_prefill"``) has no part A: every rank computes
part B itself and no collective runs.

A decode step (one query per row) needs no kernel for part B: a query over its own key alone
has the value as output and the logit as log-sum-exp. Its part A is a decode plan
(:class:`~batchmeta.attention.decode_planner.DecodePlanner`) in which every row holds at least one
page: a row with none of its cached context on this rank (and a CUDA graph's padding row) reads
the padding page instead and its partial is masked. So every row runs the same kernels, and decode
steps capture and replay as CUDA graphs (a CUDA-graph wrapper per batch size over fixed buffers,
written by :meth:`CPAttention.prepare` outside the graph).

The token history and multi-LoRA work as on one rank (positions and adapter segments are per
token). Not yet under context parallelism: CUDA graphs of speculative verify steps, draft loops,
speculative acceptance on the device and MLA groups (each rejected with a ``ValueError`` naming
``context_parallel``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import torch

from batchmeta.ops.block_table import write_kv_indices

if TYPE_CHECKING:
    from batchmeta.config import KVGroup

__all__ = ["CPAttention", "ContextParallel", "cp_process_group", "is_sharded", "local_len", "local_position", "owner"]

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
        return (lens // span) * i + rest.clamp(0, i)
    if isinstance(rest, np.ndarray):  # every step, over the batch: in place (np.clip costs more than the math)
        np.maximum(rest, 0, out=rest)
        np.minimum(rest, i, out=rest)
        out = lens // span
        out *= i
        out += rest
        return out
    return (lens // span) * i + min(max(rest, 0), i)


# --------------------------------------------------------------------------------------------------
# Attention across the ranks
# --------------------------------------------------------------------------------------------------
_LN2 = math.log(2.0)


def cp_process_group(group: Any, cp: ContextParallel) -> Any:
    """The process group a sharded group's attention merges over: ``group``, or the world when None.

    Raises
    ------
    ValueError
        Naming ``cp_group``: ``torch.distributed`` is not initialised and no group was given, or
        the group's size or this process's rank in it differ from ``cp``'s ``world_size`` / ``rank``.
    """
    import torch.distributed as dist

    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "cp_group: torch.distributed is not initialised and no process group was given "
                "(BatchMetadata(config, cp_group=...) or step.attention(..., cp_group=...)); "
                "step.cp_partial_attention returns this rank's partial without a collective"
            )
        group = dist.group.WORLD
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if (size, rank) != (cp.world_size, cp.rank):
        raise ValueError(
            f"cp_group: expected a process group of context_parallel.world_size {cp.world_size} ranks in "
            f"which this process is rank {cp.rank}, got {size} ranks with this process at rank {rank}"
        )
    return group


class CPGroupStep:
    """One sharded KV-cache group's context-parallel arrays and wrappers for one step.

    Attributes
    ----------
    kv_indptr_cached:
        ``[n + 1]`` int32 numpy (``n`` = ``B``, or a decode graph's padded rows): this rank's pages
        of each row's cached context, prefix-summed. In a decode step a row holding none of it (and
        a padding row) has one page, the padding page.
    kv_last_page_len_cached:
        ``[n]`` int32 numpy: tokens in the last of those pages (decode: 1 for such a row; other
        kinds: 0 for a row with none).
    kv_indices_cached:
        ``[kv_indptr_cached[n]]`` int32 device: those pages, back to back (the first pages of each
        row's block-table row: a rank's local positions only grow).
    no_cached:
        ``[queries]`` bool device: the queries whose row has none of its cached context on this
        rank (and a decode graph's padding rows): their part-A partial is masked.
    cached_wrapper, new_wrapper:
        FlashInfer wrappers planned for part A (paged, no mask: a decode wrapper in a decode step)
        and part B (ragged, causal; none in a decode step, whose part B needs no kernel), or None
        where that part does not run on this rank or nothing plans FlashInfer.
    """

    __slots__ = (
        "cached_wrapper",
        "kv_indices_cached",
        "kv_indptr_cached",
        "kv_last_page_len_cached",
        "new_wrapper",
        "no_cached",
    )

    def __init__(self, **fields: Any):
        for k, v in fields.items():
            setattr(self, k, v)

    @property
    def num_cached_pages(self) -> int:
        return int(self.kv_indptr_cached[-1])


class _GroupViews:
    """One sharded group's views for one shape of step (:meth:`CPAttention._group_views`): host
    numpy arrays (``indptr``, ``last``, ``rows``, ``seqs``, ``empty``), the same as pinned tensors
    for the plan and the copies (``*_t``, ``copied``), and device views (``dev_*``, ``no_cached``)."""

    __slots__ = (
        "copied",
        "dev_arrays",
        "dev_indptr",
        "dev_last",
        "dev_rows",
        "empty",
        "empty_t",
        "indptr",
        "indptr_t",
        "last",
        "last_t",
        "no_cached",
        "rows",
        "seqs",
        "seqs_t",
    )

    def __init__(self, **views: Any):
        for k, v in views.items():
            setattr(self, k, v)


class CPAttention:
    """A ``BatchMetadata``'s context-parallel attention: per step, the cached-context arrays of each
    sharded group (and their FlashInfer plans); per layer, the partial and merged attention.

    Parameters
    ----------
    config:
        The :class:`~batchmeta.MetadataConfig`; its ``context_parallel`` shards at least one group.
    block_tables:
        Per group, the ``[max_num_reqs + 1, W]`` int32 device block table (this rank's pages); a
        row's cached pages are its first ones.
    device:
        Where the step's tensors live.
    cp_group:
        The process group ``attention`` merges over (None: the world, looked up when attending).

    Note
    ----
    Buffers are made once: per group and per host staging buffer (two, used in turn with the
    step's) pinned host arrays on CUDA, and device arrays (the cached part's ``kv_indptr`` and
    ``kv_indices``). A step writes the ``[B + 1]`` indptr on the host, copies it asynchronously and
    gathers the cached pages from the block table on the device (:func:`batchmeta.ops.write_kv_indices`):
    host work per row, not per page. The staging ring's events keep a host buffer from being
    rewritten before its copies ran.
    """

    def __init__(self, config: Any, block_tables: tuple[torch.Tensor, ...], device: torch.device, cp_group: Any = None):
        self.config = config
        self.cp: ContextParallel = config.context_parallel
        self.cp_group = cp_group
        self.groups = tuple(g for g in range(len(config.kv_groups)) if config.sharded(g))
        self._tables = block_tables
        self._device = device
        pin = device.type == "cuda"
        r, t = config.max_num_reqs, config.max_num_tokens
        self._r1 = r1 = r + 1  # each array's stride in the packed buffers: [R + 1] slots
        self._host: dict[int, list[dict[str, np.ndarray]]] = {}
        self._host_t: dict[int, list[dict[str, torch.Tensor]]] = {}
        self._dev: dict[int, dict[str, torch.Tensor]] = {}
        for g in self.groups:
            cap = (r + 1) * block_tables[g].shape[1]  # every row's pages, at most
            # "arrays": kv_indptr, kv_last_page_len and the table row of each row (copied to the
            # device in one transfer), then the KV lengths (host only: the decode plan's).
            sizes = {"arrays": (4 * r1, torch.int32), "empty": (t, torch.bool)}
            self._host_t[g] = [
                {k: torch.zeros(n, dtype=dt, pin_memory=pin) for k, (n, dt) in sizes.items()} for _ in range(2)
            ]
            self._host[g] = [{k: v.numpy() for k, v in bufs.items()} for bufs in self._host_t[g]]
            self._dev[g] = {
                "arrays": torch.zeros(3 * r1, dtype=torch.int32, device=device),
                "indices": torch.zeros(cap, dtype=torch.int32, device=device),
                "empty": torch.zeros(t, dtype=torch.bool, device=device),
            }
        self._wrappers: dict[tuple[str, int], Any] = {}
        self._decode_planners: dict[tuple, Any] = {}
        self._views: dict[tuple[int, int, int, int], _GroupViews] = {}

    def prepare(
        self,
        kind: str,
        idx: np.ndarray,
        cache_lens: np.ndarray,
        query_lens: np.ndarray,
        qo_indptr_pinned: torch.Tensor,
        slot: int,
        *,
        plan: bool,
        padded: int | None = None,
        graph: bool = False,
    ) -> dict[int, CPGroupStep]:
        """Each sharded group's :class:`CPGroupStep` for a step of ``B`` rows (``padded``: with a
        CUDA graph's padding rows, decode only): ``idx``, ``cache_lens`` and ``query_lens`` ``[B]``
        (host; global lengths), ``qo_indptr_pinned`` ``[padded + 1]``; ``slot``: the staging ring's
        current host buffer. With ``plan``, FlashInfer's wrappers are planned from host arrays
        (``graph``: a decode graph's wrapper of ``padded`` rows, over fixed device buffers).

        In a decode step every row attends over at least one page: a row holding none of its
        cached context on this rank (and a padding row) reads the padding page instead (table row
        ``max_num_reqs``) and its partial is masked (``no_cached``), so every row of a decode plan
        has a length and a graph's rows always run the same kernels.
        """
        cp, b, backend = self.cp, cache_lens.shape[0], self.config.backend
        n = b if padded is None else padded
        decode = kind == "decode"
        # Queries: one per row in a decode step (a graph's padding rows' too), else the step's tokens.
        num_tokens = n if decode else int(qo_indptr_pinned[n]) if n else 0
        local = local_len(cache_lens, cp)  # never the step's local lengths minus its new tokens (#47181)
        pad_row = self.config.max_num_reqs
        out = {}
        for g in self.groups:
            ps = self.config.kv_groups[g].page_size
            v = self._group_views(g, slot, n, num_tokens)
            indptr, last, rows, seqs, empty = v.indptr, v.last, v.rows, v.seqs, v.empty
            rows[:b] = idx
            rows[b:] = pad_row
            if decode:
                standin = local == 0
                np.copyto(rows[:b], pad_row, where=standin)
                seqs[:b] = np.where(standin, 1, local)
                seqs[b:] = 1
                empty[:b] = standin
                empty[b:] = True
            else:
                seqs[:] = local
                empty[:] = np.repeat(local == 0, query_lens)
            pages = -(-seqs // ps)
            indptr[0] = 0
            np.cumsum(pages, out=indptr[1:])
            np.copyto(last, np.where(seqs > 0, (seqs - 1) % ps + 1, 0))
            total = int(indptr[n])
            # A row's cached pages are the first of its pages in the block table (which the step's
            # launch has just brought up to date): gathered there on the device, from the indptr.
            v.dev_arrays.copy_(v.copied, non_blocking=True)
            indices = self._dev[g]["indices"]
            write_kv_indices(self._tables[g], v.dev_indptr, out=indices, idx_mapping=v.dev_rows, backend=backend)
            v.no_cached.copy_(v.empty_t, non_blocking=True)
            part = CPGroupStep(
                kv_indptr_cached=indptr,
                kv_last_page_len_cached=last,
                kv_indices_cached=indices[:total],
                no_cached=v.no_cached,
                cached_wrapper=None,
                new_wrapper=None,
            )
            if plan and n:
                self._plan(g, kind, part, v, qo_indptr_pinned, n, total, graph, int(seqs.max()))
            out[g] = part
        return out

    def _group_views(self, g: int, slot: int, n: int, num_tokens: int) -> _GroupViews:
        """Group ``g``'s views of host buffer ``slot`` and the device buffers for ``n`` rows and
        ``num_tokens`` queries (made once per shape: a step slices nothing)."""
        key = (g, slot, n, num_tokens)
        views = self._views.get(key)
        if views is None:
            if len(self._views) > 4096:  # many distinct prefill shapes: start over rather than grow
                self._views.clear()
            r1, host, host_t, dev = self._r1, self._host[g][slot], self._host_t[g][slot], self._dev[g]
            spans = [(i * r1, i * r1 + n + (i == 0)) for i in range(4)]  # indptr [n + 1], last, rows, seqs [n]
            arrays, arrays_t, dev_arrays = host["arrays"], host_t["arrays"], dev["arrays"]
            views = self._views[key] = _GroupViews(
                indptr=arrays[spans[0][0] : spans[0][1]],
                last=arrays[spans[1][0] : spans[1][1]],
                rows=arrays[spans[2][0] : spans[2][1]],
                seqs=arrays[spans[3][0] : spans[3][1]],
                empty=host["empty"][:num_tokens],
                indptr_t=arrays_t[spans[0][0] : spans[0][1]],
                last_t=arrays_t[spans[1][0] : spans[1][1]],
                seqs_t=arrays_t[spans[3][0] : spans[3][1]],
                empty_t=host_t["empty"][:num_tokens],
                copied=arrays_t[: 3 * r1],  # kv_indptr, kv_last_page_len and table rows: one copy
                dev_arrays=dev_arrays,
                dev_indptr=dev_arrays[spans[0][0] : spans[0][1]],
                dev_last=dev_arrays[spans[1][0] : spans[1][1]],
                dev_rows=dev_arrays[spans[2][0] : spans[2][1]],
                no_cached=dev["empty"][:num_tokens],
            )
        return views

    def _plan(
        self,
        g: int,
        kind: str,
        part: CPGroupStep,
        v: _GroupViews,
        qo_indptr: torch.Tensor,
        n: int,
        total: int,
        graph: bool,
        max_seq: int,
    ) -> None:
        """Plans part A (when this rank holds cached pages) and, for steps of several tokens per
        row, part B (on rank 0, or on every rank of a step with nothing cached) of group ``g`` from
        host arrays: no device→host sync. A decode step's part A goes through
        :class:`~batchmeta.attention.decode_planner.DecodePlanner` (fast plans; a CUDA-graph
        wrapper per batch size); its part B needs no plan (each row's one new key)."""
        from batchmeta.attention.decode_planner import DecodePlanner
        from batchmeta.attention.wrappers import (
            get_workspace,
            new_decode_wrapper,
            new_paged_prefill_wrapper,
            new_ragged_prefill_wrapper,
        )

        cfg, grp = self.config, self.config.kv_groups[g]
        indptr, last = v.indptr_t, v.last_t
        if kind == "decode":  # one query per row, every row with at least one page (see prepare)
            key = ("graph", g, n) if graph else ("decode", g)
            planner = self._decode_planners.get(key)
            dev_indptr, dev_last, indices = v.dev_indptr, v.dev_last, self._dev[g]["indices"]
            if planner is None:
                scales = dict(sm_scale=cfg.sm_scale(g), logits_soft_cap=float(grp.logits_soft_cap))
                ws = get_workspace(cfg.device, cfg.workspace_bytes)
                tensor_cores = cfg.gqa_ratio > 4
                if graph:  # the graph reads these fixed buffers: prepare's copy and gather write them
                    w = new_decode_wrapper(
                        ws, use_tensor_cores=tensor_cores, graph_buffers=(dev_indptr, indices, dev_last)
                    )
                else:
                    w = new_decode_wrapper(ws, use_tensor_cores=tensor_cores)
                planner = self._decode_planners[key] = DecodePlanner(
                    w,
                    num_qo_heads=cfg.num_qo_heads,
                    num_kv_heads=cfg.num_kv_heads,
                    head_dim=cfg.head_dim,
                    page_size=grp.page_size,
                    window_left=-1,
                    q_data_type=cfg.q_dtype,
                    kv_data_type=cfg.kv_dtype,
                    max_batch_size=cfg.max_num_reqs,
                    **scales,
                )
            part.cached_wrapper = planner.plan(indptr, last, v.seqs_t, max_seq, dev_indptr, indices, dev_last)
            return
        heads = (cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim)
        scales = dict(sm_scale=cfg.sm_scale(g), logits_soft_cap=float(grp.logits_soft_cap))
        ws = get_workspace(cfg.device, cfg.workspace_bytes)
        if kind != "ragged_prefill" and total:
            # Several queries per row, none masked: every one comes after the whole cached context.
            key = ("paged", g)
            w = self._wrappers.get(key)
            if w is None:
                w = self._wrappers[key] = new_paged_prefill_wrapper(ws, backend=cfg.prefill_backend)
            w.plan(
                qo_indptr,
                indptr,
                part.kv_indices_cached,
                last,
                *heads,
                grp.page_size,
                causal=False,
                window_left=-1,
                q_data_type=cfg.q_dtype,
                kv_data_type=cfg.kv_dtype,
                **scales,
            )
            part.cached_wrapper = w
        if kind == "ragged_prefill" or self.cp.rank == 0:
            key = ("ragged", g)
            w = self._wrappers.get(key)
            if w is None:
                w = self._wrappers[key] = new_ragged_prefill_wrapper(ws, backend=cfg.prefill_backend)
            # The new keys and values arrive unquantized, in the queries' dtype.
            w.plan(
                qo_indptr,
                qo_indptr,
                *heads,
                causal=True,
                window_left=-1,
                q_data_type=cfg.q_dtype,
                kv_data_type=cfg.q_dtype,
                **scales,
            )
            part.new_wrapper = w


def partial_attention(
    part: CPGroupStep,
    kind: str,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qo_indptr_host: np.ndarray,
    *,
    with_new: bool,
    sm_scale: float,
    logits_soft_cap: float,
    k_scale: float | None,
    v_scale: float | None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's partial attention of one sharded group's layer: part A over its cached context,
    merged (``with_new``) with part B over the step's new tokens.

    Returns ``(out, lse)``: ``[T, Hq, D]`` in ``q``'s dtype and ``[T, Hq]`` float32, natural log
    (-inf where this rank's partial saw no key; ``out`` is 0 there). ``backend``: the merge's
    (``config.backend``).
    """
    from batchmeta.attention.torch_ref import paged_attention_torch
    from batchmeta.ops import correct_attn_out

    planned = part.cached_wrapper is not None or part.new_wrapper is not None
    decode = kind == "decode"
    out_a = lse_a = out_b = lse_b = None
    if kind != "ragged_prefill" and part.num_cached_pages:
        if part.cached_wrapper is not None:
            out_a, lse_a = part.cached_wrapper.run(
                q, (k_cache, v_cache), k_scale=k_scale, v_scale=v_scale, return_lse=True
            )
            lse_a = lse_a.mul_(_LN2)  # FlashInfer's lse is base 2
        elif not planned:
            out_a, lse_a = paged_attention_torch(
                q,
                k_cache,
                v_cache,
                qo_indptr_host if not decode else np.arange(q.shape[0] + 1),
                part.kv_indptr_cached,
                part.kv_indices_cached,
                part.kv_last_page_len_cached,
                causal=False,
                sm_scale=sm_scale,
                logits_soft_cap=logits_soft_cap,
                k_scale=k_scale,
                v_scale=v_scale,
                return_lse=True,
            )
        if out_a is not None:
            # A token whose row holds no cached key here saw none (or, in a decode step, the padding
            # page): its partial is out 0, lse -inf, whatever the kernel left there.
            lse_a = lse_a.masked_fill_(part.no_cached[:, None], float("-inf"))
            out_a = out_a.masked_fill_(part.no_cached[:, None, None], 0)
    if with_new:
        if decode:  # each row's one query over its one new key: no kernel to plan
            out_b, lse_b = _own_key_attention(q, k, v, sm_scale, logits_soft_cap)
        elif part.new_wrapper is not None:
            out_b, lse_b = part.new_wrapper.run(q, k, v, return_lse=True)
            lse_b = lse_b.mul_(_LN2)
        else:
            # The new tokens as a cache of one-token pages; queries and keys share qo_indptr (causal).
            num_tokens = k.shape[0]
            out_b, lse_b = paged_attention_torch(
                q,
                k.unsqueeze(1),
                v.unsqueeze(1),
                qo_indptr_host,
                qo_indptr_host,
                torch.arange(num_tokens, device=q.device),
                np.ones(len(qo_indptr_host) - 1, np.int32),
                causal=True,
                sm_scale=sm_scale,
                logits_soft_cap=logits_soft_cap,
                return_lse=True,
            )
    if out_a is None and out_b is None:
        return torch.zeros_like(q), torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    if out_b is None:
        return out_a, lse_a  # type: ignore[return-value]
    if out_a is None:
        return out_b, lse_b  # type: ignore[return-value]
    lses = torch.stack((lse_a, lse_b))  # type: ignore[arg-type]
    correct_attn_out(out_a, lses, 0, backend=backend)
    _, merged = correct_attn_out(out_b, lses, 1, backend=backend)
    return out_a.add_(out_b), merged


def _own_key_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, logits_soft_cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of token ``t``'s queries ``q[t]`` ``[T, Hq, D]`` over its own key and value alone
    (``k``, ``v`` ``[>= T, Hkv, D]``; query head ``h`` reads KV head ``h // (Hq / Hkv)``): the output
    is the value and the log-sum-exp the one logit (``q·k * sm_scale``, soft-capped as FlashInfer
    does). Returns ``(out [T, Hq, D] in q's dtype, lse [T, Hq] float32)``."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    rep = hq // hkv
    # Query heads grouped by their KV head: no copy of the keys per query head.
    logits = torch.einsum("tgrd,tgd->tgr", q.float().reshape(t, hkv, rep, d), k[:t].float()).reshape(t, hq)
    logits = logits * sm_scale
    if logits_soft_cap > 0:
        logits = logits_soft_cap * torch.tanh(logits / logits_soft_cap)
    return v[:t, :, None, :].expand(t, hkv, rep, d).reshape(t, hq, d).to(q.dtype), logits
