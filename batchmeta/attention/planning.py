"""Planning FlashInfer for a step: one wrapper per KV-cache group, planned once for all layers.

:class:`StepPlanner` owns every wrapper a :class:`~batchmeta.metadata.BatchMetadata` plans: a ragged
prefill wrapper (nothing cached), a paged prefill wrapper (chunked, mixed and speculative steps, and
one CUDA-graph wrapper per captured batch size and draft count for speculative verify) and decode
wrappers (eager, and one CUDA-graph wrapper per captured batch size), each made on first
use over the device's shared workspace. Plans read pinned host arrays only (no device→host sync);
decode plans go through :class:`~batchmeta.attention.decode_planner.DecodePlanner` and paged-prefill
plans through :class:`~batchmeta.attention.prefill_planner.PrefillPlanner`. Each group's wrappers are
planned with its ``sm_scale`` and ``logits_soft_cap``. An MLA group has one MLA wrapper for every
eager step kind and one per captured batch size (:class:`~batchmeta.attention.mla.MLAPlanner`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from batchmeta.attention.decode_planner import DecodePlanner
from batchmeta.attention.mla import MLAPlanner, new_mla_wrapper
from batchmeta.attention.prefill_planner import PrefillPlanner
from batchmeta.attention.wrappers import (
    get_workspace,
    new_decode_wrapper,
    new_paged_prefill_wrapper,
    new_ragged_prefill_wrapper,
)
from batchmeta.config import MetadataConfig

__all__ = ["StepPlanner"]


class StepPlanner:
    """The FlashInfer wrappers of one model runner, and how a step plans them.

    Parameters
    ----------
    config:
        Heads, dtypes, KV-cache groups (page size, ``window_left``), capacities and workspace size.
    kv_indices:
        Per group, the ``kv_indices`` buffer the step kernel writes (fixed address; CUDA-graph
        wrappers read it directly).
    int_workspaces:
        A dict shared by the planners whose decode wrappers share one plan (a draft round's steps:
        :meth:`adopt`): each decode wrapper made here uses the int workspace stored under its key
        (``("decode", group)`` or ``("graph", group, batch_size)``), the first one made storing its
        own. None: every wrapper keeps its own.
    """

    def __init__(
        self,
        config: MetadataConfig,
        kv_indices: Sequence[torch.Tensor],
        int_workspaces: dict[tuple, torch.Tensor] | None = None,
    ):
        self.config = config
        self._kv_indices = tuple(kv_indices)
        self._int_workspaces = int_workspaces
        self._planners: dict[tuple, DecodePlanner] = {}
        self._prefill_planners: dict[int | tuple[str, int], PrefillPlanner] = {}
        self._mla_planners: dict[tuple, MLAPlanner] = {}
        self._heads = (config.num_qo_heads, config.num_kv_heads, config.head_dim)
        # Whether the last plan() ran a CUDA-graph wrapper's stock plan, which copies the pinned
        # host arrays into the step's device views (the graph's fixed buffers).
        self.graph_stock_planned = False

    def decode_planners(self) -> dict[tuple, DecodePlanner]:
        """Every decode planner made so far, keyed ``("decode", group)`` or ``("graph", group, batch_size)``."""
        return self._planners

    def plan(
        self,
        kind: str,
        padded: int,
        graph: bool,
        views: Any,
        max_seq_len: int,
        num_kv_pages: tuple[int, ...],
        num_tokens: int,
        max_query_len: int,
    ) -> tuple[Any, ...]:
        """Plans one wrapper per group for a step of ``padded`` rows; returns them.

        ``views`` are the step's buffer views (pinned host arrays and device tensors: see
        :class:`~batchmeta.step.StepViews`); ``num_kv_pages`` per group ``kv_indptr[padded]``;
        ``num_tokens`` and ``max_query_len`` the step's new tokens and the most of one row.
        """
        cfg = self.config
        out = []
        self.graph_stock_planned = False
        for g, grp in enumerate(cfg.kv_groups):
            if cfg.sharded(g):  # context parallelism: planned by batchmeta.context_parallel.CPAttention
                out.append(None)
                continue
            if grp.mla is not None:  # every step kind: the MLA kernels read the paged cache
                planner = self._mla_planner(g, padded, graph, views, max_query_len)
                rows_tokens = padded * max_query_len if graph else num_tokens  # a graph's padding rows' too
                out.append(
                    planner.plan(
                        views.qo_indptr_pinned,
                        views.kv_indptr_pinned[g],
                        views.seq_lens_pinned,
                        self._kv_indices[g][: num_kv_pages[g]],
                        rows_tokens,
                    )
                )
                continue
            if kind == "decode":
                planner = self._decode_planner(g, padded, graph, views)
                planner.plan(
                    views.kv_indptr_pinned[g],
                    views.kv_last_page_len_pinned[g],
                    views.seq_lens_pinned,
                    max_seq_len,
                    views.kv_indptr[g],
                    self._kv_indices[g],
                    views.kv_last_page_len[g],
                )
                self.graph_stock_planned |= graph and planner.stock_planned
                out.append(planner.wrapper)
                continue
            qo = views.qo_indptr_pinned
            if kind == "ragged_prefill":
                w = self._prefill_planner(g, ragged=True).plan(
                    qo,
                    None,
                    None,
                    views.seq_lens_pinned,
                    num_tokens,
                    max_query_len,
                    max_seq_len,
                    views.qo_indptr,
                    None,
                    None,
                    None,
                    0,
                )
            else:  # prefill, mixed, speculative decode (under a CUDA graph: one planner per size and k)
                planner = self._prefill_planner(
                    g, graph_rows=padded if graph else 0, views=views, query_len=max_query_len
                )
                w = planner.plan(
                    qo,
                    views.kv_indptr_pinned[g],
                    views.kv_last_page_len_pinned[g],
                    views.seq_lens_pinned,
                    num_tokens,
                    max_query_len,
                    max_seq_len,
                    views.qo_indptr,
                    views.kv_indptr[g],
                    self._kv_indices[g],
                    views.kv_last_page_len[g],
                    num_kv_pages[g],
                )
                self.graph_stock_planned |= graph and planner.stock_planned
            out.append(w)
        return tuple(out)

    def decode_ready(self, padded: int, graph: bool) -> bool:
        """Whether every group's decode wrapper for steps of this shape has been planned once (a
        wrapper's first plan is FlashInfer's stock ``plan()``, which :meth:`adopt` does not replace)."""
        for g in range(len(self.config.kv_groups)):
            if (("graph", g, padded) if graph else ("decode", g)) not in self._planners:
                return False
        return True

    def clamps_decode_lengths(self, padded: int, graph: bool) -> bool:
        """Whether every group's decode wrapper for steps of this shape has been planned and runs
        FlashInfer's tensor-core FA2 decode, whose kernels clamp each KV chunk to the device lengths
        (so a plan of longer lengths serves shorter steps: :meth:`adopt`)."""
        for g in range(len(self.config.kv_groups)):
            planner = self._planners.get(("graph", g, padded) if graph else ("decode", g))
            if planner is None or not planner.clamps_lengths:
                return False
        return True

    def decode_wrappers(self, padded: int, graph: bool) -> tuple[Any, ...]:
        """Every group's decode wrapper for steps of this shape, as the latest plan (or
        :meth:`adopt`) left it: for a step that takes that plan again."""
        return tuple(
            self._planners[("graph", g, padded) if graph else ("decode", g)].wrapper
            for g in range(len(self.config.kv_groups))
        )

    def adopt(self, source: StepPlanner, padded: int, graph: bool, views: Any) -> tuple[Any, ...]:
        """Gives this planner's decode wrappers ``source``'s latest decode plan of the same shape,
        over this step's device ``views`` (None for CUDA-graph wrappers, which read their own
        buffers); returns the wrappers.

        Both planners' wrappers share each int workspace (``int_workspaces``), which ``source``'s
        plan wrote; only the plan's host state is copied. Right for a step whose lengths are at most
        the planned ones where FlashInfer's tensor-core decode runs FA2, whose kernels clamp each KV
        chunk's start and end to the device lengths (0.7.2.post1 and 0.7.4; FA3's scheduler takes
        the planned lengths: :meth:`DecodePlanner.adopt` raises ``RuntimeError`` for any other
        kernel). Every group must be a decode group (no MLA, no context parallelism).
        """
        out = []
        for g in range(len(self.config.kv_groups)):
            key = ("graph", g, padded) if graph else ("decode", g)
            planner = self._planners[key]
            if graph:  # a CUDA-graph wrapper reads its own buffers
                planner.adopt(source._planners[key], None, None, None)
            else:
                planner.adopt(source._planners[key], views.kv_indptr[g], self._kv_indices[g], views.kv_last_page_len[g])
            out.append(planner.wrapper)
        return tuple(out)

    def mla_planners(self) -> dict[tuple, MLAPlanner]:
        """Every MLA planner made so far, keyed ``("mla", group)`` or ``("mla_graph", group, batch_size,
        query_len)``."""
        return self._mla_planners

    def _mla_planner(self, g: int, padded: int, graph: bool, views: Any, query_len: int) -> MLAPlanner:
        key = ("mla_graph", g, padded, query_len) if graph else ("mla", g)
        planner = self._mla_planners.get(key)
        if planner is None:
            cfg, grp = self.config, self.config.kv_groups[g]
            ws = get_workspace(cfg.device, cfg.workspace_bytes)
            # A graph wrapper reads the step's own device views (fixed per batch size); its plan
            # copies the same values the step kernel writes there.
            buffers = (views.qo_indptr, views.kv_indptr[g], self._kv_indices[g], views.seq_lens) if graph else None
            mla = grp.mla
            planner = self._mla_planners[key] = MLAPlanner(
                new_mla_wrapper(ws, buffers),
                num_heads=mla.num_heads,
                head_dim_ckv=mla.head_dim_ckv,
                head_dim_kpe=mla.head_dim_kpe,
                page_size=grp.page_size,
                sm_scale=cfg.sm_scale(g),
                q_data_type=cfg.q_dtype,
                kv_data_type=cfg.kv_dtype,
            )
        return planner

    def prefill_planners(self) -> dict[Any, PrefillPlanner]:
        """Every prefill planner made so far: paged ones by group, ragged ones keyed ``("ragged", group)``,
        CUDA-graph ones (speculative verify) ``("graph", group, batch_size, query_len)``."""
        return self._prefill_planners

    def _prefill_planner(
        self, g: int, ragged: bool = False, graph_rows: int = 0, views: Any = None, query_len: int = 0
    ) -> PrefillPlanner:
        key: Any = ("ragged", g) if ragged else ("graph", g, graph_rows, query_len) if graph_rows else g
        planner = self._prefill_planners.get(key)
        if planner is None:
            cfg, grp = self.config, self.config.kv_groups[g]
            ws = get_workspace(cfg.device, cfg.workspace_bytes)
            if ragged:
                wrapper = new_ragged_prefill_wrapper(ws, backend=cfg.prefill_backend)
            elif graph_rows:
                # The graph reads the step's own device views (fixed per batch size): the step kernel
                # writes them; the planner copies nothing.
                buffers = (views.qo_indptr, views.kv_indptr[g], self._kv_indices[g], views.kv_last_page_len[g])
                wrapper = new_paged_prefill_wrapper(ws, backend=cfg.prefill_backend, graph_buffers=buffers)
            else:
                wrapper = new_paged_prefill_wrapper(ws, backend=cfg.prefill_backend)
            planner = self._prefill_planners[key] = PrefillPlanner(
                wrapper,
                num_qo_heads=cfg.num_qo_heads,
                num_kv_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim,
                page_size=grp.page_size,
                window_left=grp.window_left,
                q_data_type=cfg.q_dtype,
                kv_data_type=cfg.kv_dtype,
                ragged=ragged,
                sm_scale=cfg.sm_scale(g),
                logits_soft_cap=grp.logits_soft_cap,
                uniform_query_len=query_len if graph_rows else 0,
            )
        return planner

    def _decode_planner(self, g: int, padded: int, graph: bool, views: Any) -> DecodePlanner:
        key = ("graph", g, padded) if graph else ("decode", g)
        planner = self._planners.get(key)
        if planner is None:
            cfg = self.config
            ws = get_workspace(cfg.device, cfg.workspace_bytes)
            # With speculative decoding a decode step's lengths may be on the device, shorter than
            # the bounds it is planned from: FA2's prefill kernel (tensor-core decode) clamps each
            # KV chunk to the device length, the CUDA-core decode kernel does not.
            tensor_cores = cfg.gqa_ratio > 4 or cfg.max_draft_tokens > 0
            if graph:
                # The graph reads the staging buffer's indptr and last-page-length views and the
                # kv_indices buffer directly: the kernel writes them, nothing is copied.
                buffers = (views.kv_indptr[g], self._kv_indices[g], views.kv_last_page_len[g])
                wrapper = new_decode_wrapper(ws, use_tensor_cores=tensor_cores, graph_buffers=buffers)
            else:
                wrapper = new_decode_wrapper(ws, use_tensor_cores=tensor_cores)
            if self._int_workspaces is not None:  # one plan for several planners' wrappers
                shared = self._int_workspaces.setdefault(key, wrapper._int_workspace_buffer)
                if shared is not wrapper._int_workspace_buffer:
                    wrapper.reset_workspace_buffer(wrapper._float_workspace_buffer, shared)
            grp = cfg.kv_groups[g]
            planner = self._planners[key] = DecodePlanner(
                wrapper,
                num_qo_heads=cfg.num_qo_heads,
                num_kv_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim,
                page_size=grp.page_size,
                window_left=grp.window_left,
                q_data_type=cfg.q_dtype,
                kv_data_type=cfg.kv_dtype,
                max_batch_size=cfg.max_num_reqs,
                sm_scale=cfg.sm_scale(g),
                logits_soft_cap=grp.logits_soft_cap,
            )
        return planner
