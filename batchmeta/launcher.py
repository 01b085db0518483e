"""A step's device work behind one staging ring: its rows staged, its launch, its views and its plan.

:class:`StepLauncher` owns what a step needs past the checks: the bound launches of the ring's host
buffers (:func:`~batchmeta.staging.bind_ring_launches`), the views made once per shape and the
FlashInfer planner. ``BatchMetadata`` has one for its steps; every draft step index of a
:class:`~batchmeta.draft.DraftLoop` has one of its own. The caller checks the batch, takes the staged
block-table writes and makes the ``Step``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from batchmeta.attention import StepPlanner
from batchmeta.batch import BatchChecker
from batchmeta.block_tables import BlockTables
from batchmeta.config import MetadataConfig
from batchmeta.ops.lora import LoraLayout
from batchmeta.staging import PinnedRing, StagingLayout, StepBuffers, bind_ring_launches, stage_step
from batchmeta.step import StepViews

__all__ = ["StepLauncher"]


class StepLauncher:
    """Stages, launches, views and plans the steps of one staging ring.

    Parameters
    ----------
    config, layout, ring, buffers, block_tables:
        The owner's configuration, staging layout, pinned ring, device buffers and block tables.
    lens:
        ``[max_num_reqs + 1]`` int32 device: the per-slot cache lengths device-length rows resolve from.
    checker, host_path:
        The owner's :class:`~batchmeta.batch.BatchChecker` and compiled host path (None: numpy).
    planned:
        Whether FlashInfer plans the steps.
    lora:
        ``(layout, out)`` of the multi-LoRA rows the launch expands, or None.
    int_workspaces:
        Shared by launchers whose decode wrappers share a plan (see
        :class:`~batchmeta.attention.StepPlanner`), or None.

    Attributes
    ----------
    fills, resolves:
        Per host buffer of ``ring``: the bound step launch and ``resolve_rows`` launch.
    planner:
        The :class:`~batchmeta.attention.StepPlanner` of these buffers.
    """

    def __init__(
        self,
        config: MetadataConfig,
        layout: StagingLayout,
        ring: PinnedRing,
        buffers: StepBuffers,
        block_tables: BlockTables,
        lens: torch.Tensor,
        *,
        checker: BatchChecker,
        host_path: Any,
        planned: bool,
        lora: tuple[LoraLayout, torch.Tensor] | None = None,
        int_workspaces: dict[tuple, torch.Tensor] | None = None,
    ):
        self.config, self.layout, self.ring, self.buffers = config, layout, ring, buffers
        self.fills, self.resolves = bind_ring_launches(config, layout, ring, buffers, block_tables, lens, lora=lora)
        self.planner = StepPlanner(config, buffers.kv_indices, int_workspaces)
        self._checker = checker
        self._host_path = host_path
        self._planned = planned
        self._views: dict[tuple, StepViews] = {}
        self._min_page_size = min(grp.page_size for grp in config.kv_groups)

    def stage_rows(
        self,
        h: np.ndarray,
        checked: tuple | None,
        idx: np.ndarray,
        qlens: np.ndarray | int,
        clens: np.ndarray,
        padded: int,
        graph: bool,
        num_writes: int,
        on_device: np.ndarray | None,
        ahead: int = 0,
    ) -> tuple[int, tuple[int, ...], int]:
        """Writes the step's rows into ``h``, the ring's other host buffer (``ring.peek()``), not yet
        current: by the compiled host path, which checks as it goes (``checked`` None; ``ahead``:
        also with every row that many tokens longer), or by :func:`stage_step` from the numpy
        checker's ``checked = (seq, pages, max_seq)``. Returns ``(num_tokens, widths, max_seq)``."""
        ring = self.ring
        if checked is None:  # common case
            staged = self._host_path.stage(h, idx, qlens, clens, padded, graph, num_writes, on_device, ahead)
            if staged is None:
                self._checker.check(idx, qlens, clens)  # raises the message
                if ahead:
                    self._checker.check(idx, qlens, clens + ahead)
                raise RuntimeError("batchmeta: the compiled checks rejected a batch the numpy checks accept")
            ring.memo[ring.current ^ 1] = None  # the compiled path keeps no memo of what the buffer holds
            return staged
        args = (idx, qlens, clens, *checked, padded, graph, num_writes, on_device)
        return stage_step(h, self.layout, ring.memo, ring.current ^ 1, self.config, self._checker.rows, *args)

    def launch(
        self,
        kind: str,
        b: int,
        padded: int,
        graph: bool,
        qlens: np.ndarray | int,
        num_tokens: int,
        widths: tuple[int, ...],
        max_seq: int,
        on_device: np.ndarray | None,
    ) -> tuple[StepViews, tuple[int, ...], tuple | None, int]:
        """The current host buffer's step of ``b`` rows (``padded`` with a graph's padding rows;
        ``qlens`` an int for decode): one launch (device-length rows resolved first), its views and,
        when planned, its FlashInfer plans. Returns ``(views, num_kv_pages, wrappers, tokens_run)``."""
        query_len = qlens if type(qlens) is int else None
        max_cols = self.fill(padded, max_seq, widths, on_device)
        tokens_run = padded * query_len if graph else num_tokens  # type: ignore[operator]
        views = self.views(b, padded, tokens_run, widths)
        num_kv_pages = self.num_kv_pages(padded)
        wrappers = None
        if self._planned and padded:
            self.ring.wait_previous()  # the last step's plan copies have read FlashInfer's pinned buffers
            max_query_len = query_len if query_len else int(qlens.max())  # type: ignore[union-attr]
            wrappers = self.planner.plan(kind, padded, graph, views, max_seq, num_kv_pages, num_tokens, max_query_len)
            if on_device is not None and self.planner.graph_stock_planned:
                # A graph wrapper's stock plan (its first, or every one without fast plans) copied
                # the host arrays, upper bounds for these rows, over the exact ones.
                self.fills[self.ring.current](padded, max_cols, resolved=True)
        return views, num_kv_pages, wrappers, tokens_run

    def fill(
        self,
        padded: int,
        max_seq: int,
        widths: tuple[int, ...],
        on_device: np.ndarray | None,
        *,
        mirror_rows: bool = False,
    ) -> int:
        """The current host buffer's launch of ``padded`` rows: the step kernel, after
        ``resolve_rows`` where rows' lengths are on the device. ``mirror_rows``: the packed rows end
        in the device mirror too (a draft round's first step, whose later steps shift them). Returns
        the column count it covered."""
        max_cols = self.columns(max_seq, widths)
        if on_device is not None:  # exact lengths from the device first; the bounds size the grid and the plan
            self.fill_resolving(padded, max_cols)
        elif mirror_rows:
            self.fills[self.ring.current](padded, max_cols, mirror_rows=True)
        else:  # common case
            self.fills[self.ring.current](padded, max_cols)
        return max_cols

    def fill_resolving(self, padded: int, max_cols: int) -> None:
        """The current host buffer's launch of ``padded`` rows covering ``max_cols`` columns, rows
        resolved first (``resolve_rows``: only those flagged as on the device change, so it is right
        for any batch): what a captured graph replays whatever rows a later step has."""
        current = self.ring.current
        self.resolves[current](padded)
        self.fills[current](padded, max_cols, resolved=True)

    def columns(self, max_seq: int, widths: tuple[int, ...]) -> int:
        """The columns a launch's programs cover: the pages of a row of ``max_seq`` tokens in the
        group of smallest pages, and the per-step tables' ``widths``."""
        return max(-(-max_seq // self._min_page_size), *widths)

    def views(self, b: int, padded: int, tokens_run: int, widths: tuple[int, ...]) -> StepViews:
        """The views of a step of this shape over the current host buffer (made once per shape)."""
        key = (self.ring.current, b, padded, tokens_run, widths)
        views = self._views.get(key)
        if views is None:
            if len(self._views) > 4096:  # many distinct prefill shapes: start over rather than grow
                self._views.clear()
            views = self._views[key] = StepViews.build(
                self.config, self.layout, self.ring, self.buffers, b, padded, tokens_run, widths
            )
        return views

    def num_kv_pages(self, padded: int) -> tuple[int, ...]:
        """Each group's ``kv_indptr[padded]`` as the current host buffer stages it."""
        h = self.ring.host_np[self.ring.current]
        return tuple([h.item(at + padded) for at in self.layout.kv_indptr])
