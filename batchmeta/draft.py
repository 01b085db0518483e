"""Draft loops (EAGLE, MTP): ``k`` single-token draft steps planned once, replayable as one CUDA graph.

After a verify step, a drafter runs ``k`` steps of one token per row, each one position further:
step ``j`` of a row whose next cache length is ``c`` runs position ``c + j`` (its input the last
accepted token for ``j = 0``, else the token step ``j - 1`` drafted) and drafts the token at
``c + j + 1``. Its metadata is what ``prepare_decode(idx, c + j)`` gives. :class:`DraftLoop` (the
room :class:`~batchmeta.BatchMetadata` composes) prepares a whole round at once:

1. checks and stages every step on the host (the compiled host path or numpy), from the lengths
   ``accept_tokens`` returned (upper bounds where acceptance stayed on the device);
2. one launch per step (enqueued back to back, before the drafter's first forward) writes the
   step's positions, slot mappings, ``seq_lens``, ``kv_indptr``, ``kv_indices``,
   ``kv_last_page_len`` and ``input_ids`` into that step's own buffers; rows whose length is on the
   device are first resolved from it, ``j`` positions further;
3. one FlashInfer plan per step and KV-cache group, each step with wrappers of its own (plans read
   pinned host arrays, never the device);
4. between forwards only the drafted token moves: :func:`batchmeta.ops.draft.advance_draft` writes
   it into the token history (where the next verify step gathers its drafts), into the next step's
   ``input_ids`` and into the round's ``draft_token_ids``.

Nothing between two draft steps runs on the host, so a round of ``forward`` calls and advances is
captured as one CUDA graph per ``(batch size, k)`` and replayed (:meth:`DraftLoop.capture`,
:meth:`DraftLoop.replay`); every buffer it reads is allocated once per step index.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from batchmeta.batch import BatchChecker
from batchmeta.block_tables import BlockTables
from batchmeta.config import MetadataConfig
from batchmeta.launcher import StepLauncher
from batchmeta.ops.draft import advance_draft
from batchmeta.speculative import Speculation
from batchmeta.staging import (
    PinnedRing,
    StagingLayout,
    StepBuffers,
    packed_write_count,
    stage_prompts,
    stage_writes,
)
from batchmeta.step import StaleStepError, Step

__all__ = ["DraftLoop", "DraftRound"]

_NO_WRITES = np.zeros(0, np.int32)


class DraftRound:
    """The ``k`` draft steps of one round (what ``BatchMetadata.prepare_draft`` returns).

    Every step's metadata is already written (and planned) when the round is returned; only the
    drafted tokens move between steps (:meth:`advance`). Valid until the next ``prepare_draft``
    (or ``capture_draft_graph``) of the same ``BatchMetadata``; the verify steps in between do not
    touch it.

    Attributes
    ----------
    steps:
        ``k`` :class:`~batchmeta.Step` objects, ``"decode"`` steps of one token per row: step ``j``
        equals ``prepare_decode(idx_mapping, cache_lens + j)`` (with ``cuda_graph`` as asked), its
        ``input_ids`` the last accepted token for ``j = 0`` and, once step ``j - 1`` advanced, the
        token it drafted.
    num_steps:
        ``k``.
    num_reqs, padded_num_reqs:
        ``B`` and ``Bp`` (the captured batch size under a CUDA graph).
    cuda_graph:
        Planned for :meth:`~batchmeta.BatchMetadata.replay_draft_graph`.
    """

    __slots__ = ("_generation", "_loop", "cuda_graph", "num_reqs", "num_steps", "padded_num_reqs", "steps")

    def __init__(self, loop: DraftLoop, steps: tuple[Step, ...], num_reqs: int, padded: int, graph: bool):
        self._loop = loop
        self._generation = loop._clock[0]
        self.steps = steps
        self.num_steps = len(steps)
        self.num_reqs = num_reqs
        self.padded_num_reqs = padded
        self.cuda_graph = graph

    def __repr__(self) -> str:
        return (
            f"DraftRound(num_steps={self.num_steps}, num_reqs={self.num_reqs}, "
            f"padded_num_reqs={self.padded_num_reqs}, cuda_graph={self.cuda_graph})"
        )

    @property
    def is_stale(self) -> bool:
        """Whether a later ``prepare_draft`` has overwritten this round's buffers."""
        return self._generation != self._loop._clock[0]

    def _check_fresh(self, what: str) -> None:
        if self.is_stale:
            raise StaleStepError(
                f"round.{what}: a later prepare_draft (or capture_draft_graph) overwrote this draft round's "
                f"buffers; use a round before preparing the next one"
            )

    @property
    def draft_token_ids(self) -> torch.Tensor:
        """``[B, k]`` int64 device: the tokens drafted so far (column ``j`` after :meth:`advance` of
        step ``j``); the same tokens are in the token history at positions ``c + 1 .. c + k``."""
        self._check_fresh("draft_token_ids")
        return self._loop.drafts[: self.num_reqs, : self.num_steps]

    def advance(self, j: int, token_ids: torch.Tensor) -> None:
        """Hands step ``j``'s drafted tokens on: into the token history at each row's position + 1,
        into step ``j + 1``'s ``input_ids`` and column ``j`` of :attr:`draft_token_ids`. One launch,
        no sync (also under CUDA-graph capture).

        Parameters
        ----------
        j:
            The step that ran, ``0 <= j < k``.
        token_ids:
            ``[>= Bp]`` int32 or int64 on the device: the token the drafter chose for each row of
            step ``j`` (greedy or sampled); padding rows' entries are ignored.
        """
        self._check_fresh("advance")
        if type(j) is not int or not 0 <= j < self.num_steps:
            raise ValueError(f"j: expected a step of this round in [0, {self.num_steps}), got {j!r}")
        loop = self._loop
        views = self.steps[j]._views
        nxt = self.steps[j + 1]._views.input_ids if j + 1 < self.num_steps else None
        advance_draft(
            token_ids,
            views.idx_mapping,
            views.positions,
            loop.history,
            nxt,
            loop.drafts,
            column=j,
            backend=loop.config.backend,
        )

    def run(self, forward: Callable[[Step], torch.Tensor]) -> torch.Tensor:
        """Runs the round eagerly: for each step ``j``, ``token_ids = forward(step)`` with the step
        current (``batchmeta.current_step()``), then :meth:`advance`. Returns :attr:`draft_token_ids`.

        ``forward`` runs the drafter over the step (its KV writes at ``step.slot_mappings``, its
        attention through ``step.attention``) and returns the chosen token of each row (``[>= Bp]``
        on the device). The same loop is what :meth:`~batchmeta.BatchMetadata.capture_draft_graph`
        captures.
        """
        self._check_fresh("run")
        for j, step in enumerate(self.steps):
            with step:
                token_ids = forward(step)
            self.advance(j, token_ids)
        return self.draft_token_ids


class _DraftSlot:
    """The buffers of draft step ``j`` (every round's step ``j``): its own staging (two pinned host
    buffers and the device mirror), outputs, and its :class:`~batchmeta.launcher.StepLauncher`
    (bound launches, views, FlashInfer wrappers)."""

    def __init__(self, loop: DraftLoop):
        config = loop.config
        r = config.max_num_reqs
        self.ring = PinnedRing(loop._layout.total, loop.device)
        # One token per row: the token buffers hold max_num_reqs tokens (a graph's padding rows too).
        self.buffers = buf = StepBuffers(config, loop.device, token_capacity=r, history=loop.history)
        # Device-length rows: step j's cache length is the slot's device length + j (into self.lens).
        self.spec_lens = loop._spec.lens
        self.lens = torch.zeros_like(self.spec_lens)
        self.launcher = StepLauncher(
            config,
            loop._layout,
            self.ring,
            buf,
            loop.block_tables,
            self.lens,
            checker=loop._checker,
            host_path=loop._host_path,
            planned=loop._planned,
        )


class DraftLoop:
    """The draft rounds of one :class:`~batchmeta.BatchMetadata` (made on its first ``prepare_draft``).

    Parameters
    ----------
    config, device:
        The owner's configuration and device.
    layout:
        The owner's :class:`~batchmeta.staging.StagingLayout` (the draft steps stage the same fields
        at the same offsets, so the owner's compiled host path stages them).
    block_tables, history, speculation, checker, host_path:
        The owner's block tables, token history, :class:`~batchmeta.speculative.Speculation`,
        :class:`~batchmeta.batch.BatchChecker` and compiled host path (or None: numpy).
    planned:
        Whether FlashInfer plans the owner's steps.
    apply_excess_writes:
        ``(offsets, values) -> (offsets, values)``: applies the staged block-table writes beyond what
        one step holds, returns the rest (the owner's ring and scatter).

    Attributes
    ----------
    drafts:
        ``[max_num_reqs, max_draft_tokens]`` int64 device: each round's drafted tokens by batch row.
    """

    def __init__(
        self,
        config: MetadataConfig,
        device: torch.device,
        layout: StagingLayout,
        block_tables: BlockTables,
        history: torch.Tensor,
        speculation: Speculation,
        checker: BatchChecker,
        host_path: Any,
        planned: bool,
        apply_excess_writes: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    ):
        cfg = self.config = config
        self.device = device
        self.block_tables = block_tables
        self.history = history
        self._spec = speculation
        self._checker = checker
        self._host_path = host_path
        self._planned = planned
        self._apply_excess_writes = apply_excess_writes
        # The owner's layout without prompt spans: every field up to the staged writes at the same
        # offset, which the owner's compiled host path writes.
        self._layout = StagingLayout(cfg.max_num_reqs, len(cfg.kv_groups), layout.max_writes)
        if (self._layout.fixed_end, self._layout.pairs) != (layout.fixed_end, layout.pairs):
            raise RuntimeError("batchmeta: the draft steps' staging layout differs from the owner's")
        self._slots: list[_DraftSlot] = []
        self.drafts = torch.zeros(cfg.max_num_reqs, max(cfg.max_draft_tokens, 1), dtype=torch.int64, device=device)
        self._clock = [0]  # number of the latest round: older rounds' steps are stale
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}

    def _slot(self, j: int) -> _DraftSlot:
        """Step ``j``'s buffers, made on first use (once per step index, never per round)."""
        while len(self._slots) <= j:
            self._slots.append(_DraftSlot(self))
        return self._slots[j]

    # ---------------------------------------------------------------------------------------------
    def prepare(
        self, idx: np.ndarray, clens: np.ndarray, num_steps: int, *, padded: int, graph: bool, staged_prompts: Any
    ) -> DraftRound:
        """The round (see ``BatchMetadata.prepare_draft``); ``idx`` / ``clens`` are checked host int64
        arrays, ``staged_prompts`` the request slots with prompt tokens staged.

        Nothing changes before every check has passed (every step's batch is checked, as
        ``prepare_decode`` checks it, before the staged block-table writes are taken).
        """
        cfg, lay = self.config, self._layout
        k = num_steps
        b = idx.shape[0]
        on_device = self._spec.rows_on_device(idx, clens)  # rows whose cache length is on the device (rare)
        if staged_prompts and b:
            hit = [int(r) for r in idx if int(r) in staged_prompts]
            if hit:
                raise ValueError(
                    f"idx_mapping: request slot {hit[0]} has prompt tokens staged (stage_prompt); a draft round "
                    f"does not apply them: prepare its prefill first, or discard_prompt"
                )
        slots = [self._slot(j) for j in range(k)]
        lens = [clens + j for j in range(k)]
        # Step 0's launch applies the staged writes: its packed rows carry their count.
        counts = [packed_write_count(min(self.block_tables.num_staged(), lay.max_writes))] + [0] * (k - 1)
        staged: list[Any] = []
        for j, slot in enumerate(slots):  # check (and, compiled, stage) every step into a free buffer
            if self._host_path is not None:  # common case
                args = (slot.ring.peek(), None, idx, 1, lens[j], padded, graph, counts[j], on_device)
                out = slot.launcher.stage_rows(*args)
            else:
                out = self._checker.check(idx, 1, lens[j])
            staged.append(out)
        offsets, values = self.block_tables.take_staged()
        if len(offsets) > lay.max_writes:  # more new pages than one step holds: apply the excess first
            offsets, values = self._apply_excess_writes(offsets, values)
        rows = self.block_tables.rows_of(offsets) if counts[0] < 0 else None  # many writes: bucketed by row
        self._clock[0] += 1  # from here the buffers change: earlier rounds are stale
        steps = []
        try:
            for j, slot in enumerate(slots):
                ring = slot.ring
                writes = (offsets, values, rows) if j == 0 else (_NO_WRITES, _NO_WRITES, None)
                h = ring.peek()
                if self._host_path is not None:
                    num_tokens, widths, max_seq = staged[j]  # staged above
                else:
                    args = (h, staged[j], idx, 1, lens[j], padded, graph, counts[j], on_device)
                    num_tokens, widths, max_seq = slot.launcher.stage_rows(*args)
                ring.advance()
                stage_writes(h, lay, *writes)
                if self.history is not None:
                    stage_prompts(h, lay, [], padded, len(cfg.kv_groups))  # no spans: input_ids from the history
                steps.append(self._launch(j, slot, idx, lens[j], padded, graph, num_tokens, widths, max_seq, on_device))
        finally:
            for slot in slots:
                slot.ring.done()  # each host buffer stays busy until what was enqueued from it has run
        return DraftRound(self, tuple(steps), b, padded, graph)

    def _launch(
        self,
        j: int,
        slot: _DraftSlot,
        idx: np.ndarray,
        clens: np.ndarray,
        padded: int,
        graph: bool,
        num_tokens: int,
        widths: tuple[int, ...],
        max_seq: int,
        on_device: np.ndarray | None,
    ) -> Step:
        """Step ``j``'s launch (after resolving device-length rows), views, plan and ``Step``."""
        if on_device is not None:  # the exact lengths, j positions further, from the device
            torch.add(slot.spec_lens, j, out=slot.lens)
        b = idx.shape[0]
        views, num_kv_pages, wrappers, _ = slot.launcher.launch(
            "decode", b, padded, graph, 1, num_tokens, widths, max_seq, on_device
        )
        return Step(
            "decode",
            b,
            padded,
            num_tokens,
            1,
            graph,
            idx,
            clens,
            None,
            num_kv_pages,
            views,
            wrappers,
            self._clock,
            self.block_tables,
            on_device,
        )

    # ---------------------------------------------------------------------------------------------
    def capture(
        self, batch_size: int, num_steps: int, forward: Callable[[Step], torch.Tensor], *, warmup: int
    ) -> torch.cuda.CUDAGraph:
        """Captures a round of ``num_steps`` steps of ``batch_size`` rows (``forward`` and the
        advance after each step) as one CUDA graph. ``forward`` runs ``warmup`` rounds on a side
        stream first; the capture round is planned with padding rows only."""
        round_ = self.prepare(
            np.zeros(0, np.int64), np.zeros(0, np.int64), num_steps, padded=batch_size, graph=True, staged_prompts=()
        )
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                round_.run(forward)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            round_.run(forward)
        self._graphs[(batch_size, num_steps)] = graph
        return graph

    def replay(self, round_: DraftRound) -> None:
        """Replays the graph captured for the round's batch size and step count."""
        if not round_.cuda_graph:
            raise ValueError("round: prepared without cuda_graph=True; its wrappers do not match a captured graph")
        round_._check_fresh("replay")
        graph = self._graphs.get((round_.padded_num_reqs, round_.num_steps))
        if graph is None:
            raise ValueError(
                f"round: no draft graph captured for batch size {round_.padded_num_reqs} with {round_.num_steps} "
                f"steps (capture_draft_graph({round_.padded_num_reqs}, {round_.num_steps}, forward))"
            )
        graph.replay()
