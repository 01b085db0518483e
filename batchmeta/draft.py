"""Draft loops (EAGLE, MTP): ``k`` single-token draft steps planned once, replayable as one CUDA graph.

After a verify step, a drafter runs ``k`` steps of one token per row, each one position further:
step ``j`` of a row whose next cache length is ``c`` runs position ``c + j`` (its input the last
accepted token for ``j = 0``, else the token step ``j - 1`` drafted) and drafts the token at
``c + j + 1``. Its metadata is what ``prepare_decode(idx, c + j)`` gives. :class:`DraftLoop` (the
room :class:`~batchmeta.BatchMetadata` composes) prepares a whole round at once:

1. checks every step and stages step 0 on the host (the compiled host path or numpy), from the
   lengths ``accept_tokens`` returned (upper bounds where acceptance stayed on the device): the
   checks only grow stricter with the length, so step 0's, made also with every row ``k - 1``
   tokens longer, cover the others, whose host twins (read by nobody on the device) are staged
   on first read, or when a plan is made from them;
2. plans FlashInfer once per KV-cache group: the last step's lengths bound every step's, and the
   tensor-core decode kernel (FA2) clamps each KV chunk to a step's own lengths, so every step's
   wrapper takes that one plan (their int workspaces are one buffer: :meth:`StepPlanner.adopt
   <batchmeta.attention.StepPlanner.adopt>`). The plan is made for lengths ``headroom`` tokens
   longer than the last step's (:func:`plan_headroom`), so the next rounds, whose rows grew by the
   tokens their verify step accepted, take it too, until a row outgrows it (or the batch changes
   shape, or a row's plan is more than twice the headroom longer than it needs); with an MLA group
   or float8 data each step plans its own, every round;
3. one launch writes step 0 (rows whose length is on the device resolved there first), its packed
   rows kept in its device mirror; under a captured graph that launch is the replay's first, so
   preparing a replayed round launches no kernel of its own;
4. the GPU advances the rest: :meth:`DraftRound.advance` after step ``j``'s forward writes the
   drafted token (:func:`batchmeta.ops.draft.advance_draft`: the token history, the round's
   ``draft_token_ids``), then step ``j + 1``: its packed rows are step 0's ``j + 1`` positions further
   (:func:`batchmeta.ops.draft.shift_rows`) and the step kernel writes its positions, slots,
   ``kv_indptr``, ``kv_indices``, ``kv_last_page_len`` and ``input_ids`` (the drafted token, from
   the history) into buffers of its own.

Nothing between two draft steps runs on the host, so a round of ``forward`` calls and advances is
captured as one CUDA graph per ``(batch size, k)`` and host buffer of step 0's staging, and
replayed (:meth:`DraftLoop.capture`, :meth:`DraftLoop.replay`); every buffer it reads is allocated
once per step index. A round prepared for a captured graph leaves step 0's launch to the replay;
if anything else comes first (reading ``round.steps``, the next ``prepare_*``, ``accept_tokens``,
``write_drafts``), :meth:`DraftLoop.flush` enqueues it then, since it also applies the block-table
writes staged since the last step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from batchmeta.batch import BatchChecker
from batchmeta.block_tables import BlockTables
from batchmeta.config import MetadataConfig
from batchmeta.host_path import COMPILED, plan_fits
from batchmeta.launcher import StepLauncher
from batchmeta.ops.draft import advance_draft, bind_shift_rows
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


class DraftRound:
    """The ``k`` draft steps of one round (what ``BatchMetadata.prepare_draft`` returns).

    Every step is planned, and step 0's launch enqueued, when the round is returned (for a round
    with a captured graph, by :meth:`~batchmeta.BatchMetadata.replay_draft_graph`, or by whatever
    comes first of the first read of :attr:`steps`, the next ``prepare_*``, ``accept_tokens`` and
    ``write_drafts``; a replay after that leaves step 0 alone); step ``j + 1``'s device metadata is
    written by :meth:`advance` of step ``j`` (on the device, after the drafted token).
    Valid until the next ``prepare_draft`` (or ``capture_draft_graph``) of the same
    ``BatchMetadata``; the verify steps in between do not touch it.

    Attributes
    ----------
    steps:
        ``k`` :class:`~batchmeta.Step` objects, ``"decode"`` steps of one token per row: step ``j``
        equals ``prepare_decode(idx_mapping, cache_lens + j)`` (with ``cuda_graph`` as asked; its
        host twins from the start, its device views once step ``j - 1`` advanced), its
        ``input_ids`` the last accepted token for ``j = 0`` and the token step ``j - 1`` drafted after.
        Made on first read (a replayed round needs none): read them while the round is the latest.
    num_steps:
        ``k``.
    num_reqs, padded_num_reqs:
        ``B`` and ``Bp`` (the captured batch size under a CUDA graph).
    cuda_graph:
        Planned for :meth:`~batchmeta.BatchMetadata.replay_draft_graph`.
    planned:
        Whether preparing the round planned FlashInfer; False where it took the plan of an earlier
        round (of the same shape and ``k``), made for lengths that bound this round's, or where
        nothing is planned (no FlashInfer, ``plan_attention=False``).
    """

    __slots__ = ("_built", "_generation", "_loop", "_spec", "planned")

    def __init__(self, loop: DraftLoop, spec: _RoundSpec, planned: bool):
        self._loop = loop
        self._generation = loop._clock[0]
        self._spec = spec
        self._built: tuple[tuple[Step, ...], tuple[int, ...]] | None = None  # the steps, each launch's columns
        self.planned = planned

    # The shape, read from the spec (a replayed round reads none of it on the host).
    @property
    def num_steps(self) -> int:
        return len(self._spec.shapes)

    @property
    def num_reqs(self) -> int:
        return self._spec.idx.shape[0]

    @property
    def padded_num_reqs(self) -> int:
        return self._spec.padded

    @property
    def cuda_graph(self) -> bool:
        return self._spec.graph

    @property
    def steps(self) -> tuple[Step, ...]:
        """The round's ``k`` steps (see the class docstring)."""
        built = self._built
        if built is None:
            self._check_fresh("steps")
            self._loop.flush()  # step 0's device metadata, where its launch was left to a replay
            built = self._built = self._loop._build(self._spec)
        return built[0]

    def __repr__(self) -> str:
        return (
            f"DraftRound(num_steps={self.num_steps}, num_reqs={self.num_reqs}, "
            f"padded_num_reqs={self.padded_num_reqs}, cuda_graph={self.cuda_graph}, planned={self.planned})"
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
        return self._loop.drafts_view(self.num_reqs, self.num_steps)

    def advance(self, j: int, token_ids: torch.Tensor) -> None:
        """Hands step ``j``'s drafted tokens on and writes step ``j + 1``: the tokens into the token
        history at each row's position + 1 and column ``j`` of :attr:`draft_token_ids`, then step
        ``j + 1``'s device metadata, its ``input_ids`` the tokens (one launch after the last step,
        three before the others; no sync, also under CUDA-graph capture).

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
        advance_draft(
            token_ids,
            views.idx_mapping,
            views.positions,
            loop.history,
            None,  # step j + 1's launch gathers the token from the history
            loop.drafts,
            column=j,
            backend=loop.config.backend,
        )
        if j + 1 < self.num_steps:
            slot = loop._slots[j + 1]
            slot.shift(self.padded_num_reqs)
            slot.launcher.fills[0](self.padded_num_reqs, self._built[1][j + 1], resolved=True)  # type: ignore[index]

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


class _RoundSpec:
    """What a round's steps are made from (on first read of ``DraftRound.steps``): the batch, and per
    step ``(num_tokens, max_seq, widths, views, staged)`` (None until :meth:`DraftLoop._shape`;
    views None until made; ``staged`` False for a step staged on first read) and its wrappers."""

    __slots__ = (
        "buffer",
        "clens",
        "flushed",
        "graph",
        "idx",
        "kept",
        "on_device",
        "padded",
        "resets",
        "shapes",
        "staged_now",
        "tokens_run",
        "wrappers",
    )

    def __init__(self, idx, clens, on_device, padded, graph, tokens_run, shapes, wrappers, resets):
        self.idx, self.clens, self.on_device = idx, clens, on_device
        self.padded, self.graph, self.tokens_run = padded, graph, tokens_run
        self.shapes, self.wrappers, self.resets = shapes, wrappers, resets
        self.staged_now: list[int] = []  # steps staged while the round is prepared
        self.buffer = 0  # which of step 0's host buffers holds its staging
        self.flushed = False  # step 0 launched before (or without) a replay: the replay must not again
        self.kept = False  # took the plan an earlier round made (its wrappers not looked up yet)


def plan_headroom(num_steps: int) -> int:
    """Tokens a draft round's plan adds to each row's last-step length, so the next rounds (each
    row ``1 .. num_steps + 1`` tokens further after its verify step) take the same plan: about
    eight rounds' growth."""
    return 8 * (num_steps + 1)


class _LazyDraftStep(Step):
    """A draft step after the first of its round, not staged when prepared: no device work reads
    its host staging buffer, so its host twins (``*_host``, ``kv_indices``' length, the torch attention
    path's arrays) are staged on first read, while the round is the latest."""

    __slots__ = ("_pending",)

    def _stage(self, what: str) -> None:
        if self._generation != self._clock[0]:
            self._raise_stale(what)
        pending = self._pending
        if pending is not None:
            if self._block_tables.num_resets != self._resets:
                # The checks would run on other pages: the twins of the round's batch are gone.
                raise StaleStepError(
                    f"step.{what}: a request slot was reset since this draft round was prepared; read a draft "
                    f"step's host twins before resetting"
                )
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"step.{what}: a draft step's host twins are staged on first read, which waits on the host: "
                    f"read them outside CUDA-graph capture (capture_draft_graph's warm-up rounds read them first)"
                )
            loop, j, spec = pending
            self._views, self._num_kv_pages = loop._stage_later(spec, j)
            self._pending = None

    @property
    def qo_indptr_host(self) -> np.ndarray:
        self._stage("qo_indptr_host")
        return self._views.qo_indptr_host

    @property
    def kv_indptr_host(self) -> tuple[np.ndarray, ...]:
        self._stage("kv_indptr_host")
        return self._views.kv_indptr_host

    @property
    def kv_last_page_len_host(self) -> tuple[np.ndarray, ...]:
        self._stage("kv_last_page_len_host")
        return self._views.kv_last_page_len_host

    @property
    def kv_indices(self) -> tuple[torch.Tensor, ...]:
        self._stage("kv_indices")
        return Step.kv_indices.fget(self)  # type: ignore[attr-defined]

    @property
    def kv_indices_host(self) -> tuple[np.ndarray, ...]:
        self._stage("kv_indices_host")
        return Step.kv_indices_host.fget(self)  # type: ignore[attr-defined]

    def attention(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._pending is not None and self._wrappers is None:  # the torch path reads the host twins
            self._stage("attention")
        return Step.attention(self, *args, **kwargs)

    def mla_attention(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._pending is not None and self._wrappers is None:
            self._stage("mla_attention")
        return Step.mla_attention(self, *args, **kwargs)


class _DraftSlot:
    """The buffers of draft step ``j`` (every round's step ``j``): its own staging (two pinned host
    buffers and the device mirror), outputs, its :class:`~batchmeta.launcher.StepLauncher` (bound
    launches, views, FlashInfer wrappers) and, for ``j > 0``, the bound ``shift(num_rows)`` of step
    0's packed rows ``j`` positions further into its mirror."""

    def __init__(self, loop: DraftLoop, j: int):
        config = loop.config
        r = config.max_num_reqs
        self.ring = PinnedRing(loop._layout.total, loop.device)
        # One token per row: the token buffers hold max_num_reqs tokens (a graph's padding rows too).
        self.buffers = buf = StepBuffers(config, loop.device, token_capacity=r, history=loop.history)
        # Step 0 resolves device-length rows from the slots' device lengths; later steps shift from it.
        self.launcher = StepLauncher(
            config,
            loop._layout,
            self.ring,
            buf,
            loop.block_tables,
            loop._spec.lens,
            checker=loop._checker,
            host_path=loop._host_path,
            planned=loop._planned,
            int_workspaces=loop._int_workspaces,
        )
        self.shift: Callable[[int], None] | None = None
        if j:
            self.shift = bind_shift_rows(
                loop._slots[0].ring.dev,
                self.ring.dev,
                tuple(grp.page_size for grp in config.kv_groups),
                shift=j,
                rows_at=loop._layout.rows,
                stride=loop._layout.row_stride,
                pad_row=r,
                max_len=config.max_model_len,
                backend=config.backend,
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
        # One plan for every step: where FlashInfer's tensor-core decode runs FA2, whose kernels
        # clamp each KV chunk to the device lengths. Not for an MLA group (its plan takes exact host
        # lengths) nor float8 queries or caches (FlashInfer may pick FA3 there, whose scheduler
        # takes the planned lengths): those steps plan on their own.
        fp8 = {torch.float8_e4m3fn, torch.float8_e5m2} & {cfg.q_dtype, cfg.kv_dtype}
        self._plan_once = all(grp.mla is None for grp in cfg.kv_groups) and not fp8
        self._int_workspaces: dict[tuple, torch.Tensor] | None = {} if self._plan_once else None
        self.drafts = torch.zeros(cfg.max_num_reqs, max(cfg.max_draft_tokens, 1), dtype=torch.int64, device=device)
        self._clock = [0]  # number of the latest round: older rounds' steps are stale
        # Per (batch size, k): one graph per host buffer of step 0's ring (each graph's first launch
        # reads that buffer in place), then one without step 0's launch (for a round flushed first).
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, ...]] = {}
        # The latest round, where its step 0's launch is left to its replay (else None).
        self._pending: _RoundSpec | None = None
        # Recorded after each round's plans: the next plan rewrites FlashInfer's pinned buffers, whose
        # copies to the device must have run (not the rounds' forwards).
        self._planned_event = torch.cuda.Event() if device.type == "cuda" else None
        self._page_sizes = tuple(grp.page_size for grp in cfg.kv_groups)
        # The shared plan's lengths per int workspace ("graph", batch size) / ("eager",): (k, [padded]
        # int64), while the slots' wrappers hold that plan; and the host arrays it is made from.
        self._bounds: dict[tuple, tuple[int, np.ndarray]] = {}
        self._plan_host: tuple | None = None
        self._drafts_views: dict[tuple[int, int], torch.Tensor] = {}
        self._need = np.zeros(cfg.max_num_reqs, np.int64)  # a planning round's last-step lengths
        if COMPILED and self._plan_once and planned:  # compiled (or loaded) now, not in a round
            plan_fits(self._need[:1].astype(np.int32), self._need[:1], 0, 0, 0)
        self._ready: set[tuple[int, bool, int]] = set()  # (padded, graph, k) whose steps' wrappers all planned once

    def drafts_view(self, num_reqs: int, num_steps: int) -> torch.Tensor:
        """``drafts[:num_reqs, :num_steps]``, made once per shape (a slice costs microseconds)."""
        key = (num_reqs, num_steps)
        view = self._drafts_views.get(key)
        if view is None:
            view = self._drafts_views[key] = self.drafts[:num_reqs, :num_steps]
        return view

    def _slot(self, j: int) -> _DraftSlot:
        """Step ``j``'s buffers, made on first use (once per step index, never per round)."""
        while len(self._slots) <= j:
            self._slots.append(_DraftSlot(self, len(self._slots)))
        return self._slots[j]

    # ---------------------------------------------------------------------------------------------
    def prepare(
        self, idx: np.ndarray, clens: np.ndarray, num_steps: int, *, padded: int, graph: bool, staged_prompts: Any
    ) -> DraftRound:
        """The round (see ``BatchMetadata.prepare_draft``); ``idx`` / ``clens`` are checked host int64
        arrays, ``staged_prompts`` the request slots with prompt tokens staged.

        Nothing changes before every check has passed: step 0 is checked (and staged) with every
        row also ``k - 1`` tokens longer before the staged block-table writes are taken, and every
        check only grows stricter with the cache length, so they hold for the later steps, which
        are staged on first read of a host twin (or now, where a plan is made from them).
        """
        cfg, lay = self.config, self._layout
        if self._pending is not None:  # the last round's step 0 was never replayed: its launch first
            self.flush()
        k = num_steps
        last = k - 1
        b = idx.shape[0]
        on_device = self._spec.rows_on_device(idx, clens)  # rows whose cache length is on the device (rare)
        if staged_prompts and b:
            hit = [int(r) for r in idx if int(r) in staged_prompts]
            if hit:
                raise ValueError(
                    f"idx_mapping: request slot {hit[0]} has prompt tokens staged (stage_prompt); a draft round "
                    f"does not apply them: prepare its prefill first, or discard_prompt"
                )
        slots = self._slots[:k] if len(self._slots) >= k else [self._slot(j) for j in range(k)]
        planning = self._planned and padded > 0
        # Staged now: step 0 (its launch reads its host buffer; its checks are also made with every
        # row k - 1 tokens longer, the last step's) and any step that plans on its own (its
        # wrappers' first plan, or every plan without a shared one). The last step is staged when a
        # plan is made from it; the others on first read of a host twin.
        now = [0]
        if planning and (padded, graph, k) not in self._ready:
            ready = [self._plan_once and slot.launcher.planner.decode_ready(padded, graph) for slot in slots]
            now += [j for j in range(1, k) if not ready[j]]
        # Step 0's launch applies the staged writes: its packed rows carry their count.
        count = packed_write_count(min(self.block_tables.num_staged(), lay.max_writes))
        free = {0: slots[0].ring.peek()}  # each staged step's free host buffer
        if len(now) > 1:
            free.update((j, slots[j].ring.peek()) for j in now[1:])
        staged: dict[int, Any] = {}
        for j in now:  # check (and, compiled, stage)
            lens = clens + j if j else clens
            if self._host_path is not None:  # common case
                args = (free[j], None, idx, 1, lens, padded, graph, 0 if j else count, on_device)
                staged[j] = slots[j].launcher.stage_rows(*args, ahead=0 if j else last)
            else:
                staged[j] = self._checker.check(idx, 1, lens)
                if not j and last:
                    self._checker.check(idx, 1, clens + last)
        offsets, values = self.block_tables.take_staged()
        if len(offsets) > lay.max_writes:  # more new pages than one step holds: apply the excess first
            offsets, values = self._apply_excess_writes(offsets, values)
        rows = self.block_tables.rows_of(offsets) if count < 0 else None  # many writes: bucketed by row
        self._clock[0] += 1  # from here the buffers change: earlier rounds are stale
        shapes: list[Any] = [None] * k
        spec = _RoundSpec(idx, clens, on_device, padded, graph, 0, shapes, [None] * k, self.block_tables.num_resets)
        spec.staged_now = now
        spec.buffer = slots[0].ring.current ^ 1  # step 0's host buffer, current once staged
        planned_alone: list[int] = []
        # Under a captured graph, step 0's launch is the replay's first (see capture).
        deferred = graph and (padded, k) in self._graphs
        try:
            for j in now:
                slot, h = slots[j], free[j]
                if self._host_path is not None:
                    num_tokens, widths, max_seq = staged[j]  # staged above
                else:
                    args = (h, staged[j], idx, 1, clens + j, padded, graph, 0 if j else count, on_device)
                    num_tokens, widths, max_seq = slot.launcher.stage_rows(*args)
                slot.ring.advance()
                if not j:  # only step 0's launch reads its host buffer: later steps' rows come from its mirror
                    stage_writes(h, lay, offsets, values, rows)
                    if self.history is not None and self._host_path is None:  # the compiled path zeroed the count
                        stage_prompts(h, lay, [], padded, len(cfg.kv_groups))  # no spans: input_ids from the history
                    spec.tokens_run = padded if graph else num_tokens
                shapes[j] = (num_tokens, max_seq, widths, None, True)  # views made when needed
            planned = False
            if planning:  # from step 0's staged sequence lengths (a graph's padding rows too)
                planned_alone, planned = self._plan(slots, spec, b, free[0][lay.seq : lay.seq + padded])
            # Step 0's launch, after the plans (a CUDA-graph wrapper's first, stock plan copies the
            # host arrays into the device views: bounds where rows' lengths are on the device). With
            # later steps its packed rows go to its device mirror, where advance() shifts them.
            if deferred:  # the replay launches it (or flush(), if something else comes first)
                self._pending = spec
            else:
                _, max_seq, widths, _, _ = shapes[0]
                slots[0].launcher.fill(padded, max_seq, widths, on_device, mirror_rows=k > 1)
        finally:
            # A host buffer stays busy until what was enqueued from it has run: step 0's (its launch
            # reads it; a deferred one's busy mark comes with its launch), and those a stock plan
            # may have copied from (a step planned on its own, the last step's). No device work
            # reads the other steps' (their host twins only).
            for j in spec.staged_now:
                if (not j and self._pending is None) or (j and (j == last or j in planned_alone)):
                    slots[j].ring.done()
        return DraftRound(self, spec, planned)

    def flush(self) -> None:
        """Enqueues the latest round's step-0 launch where it was left to a replay that has not
        come: before anything else reads the device state it writes (the staged block-table writes
        it applies, step 0's metadata). A later replay of the round then leaves step 0 alone (what
        came in between may have written newer block-table entries or lengths)."""
        spec = self._pending
        if spec is None:
            return
        self._pending = None
        spec.flushed = True
        _, max_seq, widths, _, _ = spec.shapes[0]
        launcher = self._slots[0].launcher
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            launcher.fill(spec.padded, max_seq, widths, spec.on_device, mirror_rows=len(spec.shapes) > 1)
            launcher.ring.done()

    def _stage_step(self, spec: _RoundSpec, j: int) -> tuple[int, tuple[int, ...], int]:
        """Stages step ``j`` of the latest round (checked already: step 0's checks hold for it) into
        its ring's free host buffer, made current; returns ``(num_tokens, widths, max_seq)``."""
        slot, lens = self._slots[j], spec.clens + j
        h = slot.ring.peek()
        checked = None if self._host_path is not None else self._checker.check(spec.idx, 1, lens)
        staged = slot.launcher.stage_rows(h, checked, spec.idx, 1, lens, spec.padded, spec.graph, 0, spec.on_device)
        slot.ring.advance()
        return staged

    def _stage_now(self, spec: _RoundSpec, j: int) -> None:
        """Stages step ``j`` of the round being prepared, for a plan made from it."""
        num_tokens, widths, max_seq = self._stage_step(spec, j)
        spec.staged_now.append(j)
        spec.shapes[j] = (num_tokens, max_seq, widths, None, True)

    def _shape(self, spec: _RoundSpec, j: int) -> tuple:
        """Step ``j``'s ``(num_tokens, max_seq, widths, views, staged)``, its views made: as staged,
        or for a step staged on first read step 0's, ``j`` tokens longer."""
        shape = spec.shapes[j]
        if shape is None:
            num_tokens, max_seq, widths, _, _ = spec.shapes[0]
            if spec.idx.shape[0]:
                max_seq += j
            if not spec.graph:  # an eager step's per-batch tables are as wide as its longest row needs
                sizes = self._page_sizes
                widths = tuple(-(-max_seq // sizes[g]) if w else 0 for g, w in enumerate(widths))
            shape = (num_tokens, max_seq, widths, None, False)
        if shape[3] is None:  # views over the ring's current host buffer: a staged step's own
            views = self._slots[j].launcher.views(spec.idx.shape[0], spec.padded, spec.tokens_run, shape[2])
            shape = spec.shapes[j] = (*shape[:3], views, shape[4])
        return shape

    def _build(self, spec: _RoundSpec) -> tuple[tuple[Step, ...], tuple[int, ...]]:
        """The round's steps, and the column count of each step's launch (a graph's are captured
        once, so they cover any row)."""
        cfg, idx, on_device = self.config, spec.idx, spec.on_device
        b = idx.shape[0]
        steps, cols = [], []
        for j in range(len(spec.shapes)):
            num_tokens, max_seq, widths, views, staged = self._shape(spec, j)
            launcher = self._slots[j].launcher
            cols.append(launcher.columns(cfg.max_model_len if spec.graph else max_seq, widths))
            lens = spec.clens + j if j else spec.clens
            num_kv_pages = launcher.num_kv_pages(spec.padded) if staged else None
            if spec.kept:
                spec.wrappers[j] = self._slots[j].launcher.planner.decode_wrappers(spec.padded, spec.graph)
            step = (Step if staged else _LazyDraftStep)(
                "decode",
                b,
                spec.padded,
                num_tokens,
                1,
                spec.graph,
                idx,
                lens,
                None,
                num_kv_pages,
                views,
                spec.wrappers[j],
                self._clock,
                self.block_tables,
                on_device,
            )
            step._resets = spec.resets  # as at prepare time: a reset since makes the host twins stale
            if not staged:
                step._pending = (self, j, spec)
            steps.append(step)
        return tuple(steps), tuple(cols)

    def _stage_later(self, spec: _RoundSpec, j: int) -> tuple[Any, tuple[int, ...]]:
        """Stages step ``j`` of the latest round on first read of a host twin (no device work reads
        them); returns its views over that buffer and its ``num_kv_pages``."""
        _, widths, _ = self._stage_step(spec, j)
        launcher, padded = self._slots[j].launcher, spec.padded
        return launcher.views(spec.idx.shape[0], padded, spec.tokens_run, widths), launcher.num_kv_pages(padded)

    def _plan(self, slots: list[_DraftSlot], spec: _RoundSpec, b: int, seq: np.ndarray) -> tuple[list[int], bool]:
        """The round's FlashInfer plans, into ``spec.wrappers``: one for every step (the last step's
        lengths bound every step's), made for ``plan_headroom`` more tokens per row and kept for
        later rounds of the same shape and ``k`` while it bounds their last step's lengths (step
        0's staged ``seq``, ``[padded]``, its ``b`` rows ``k - 1`` further) by at most twice the
        headroom; a step whose wrappers were never planned plans its own first. With an MLA group
        or float8 data, each step's own plan, every round. Returns the steps planned on their own
        and whether anything was planned."""
        k, padded, graph, wrappers = len(slots), spec.padded, spec.graph, spec.wrappers
        last = k - 1
        key = ("graph", padded) if graph else ("eager",)
        if self._plan_once:
            kept = self._bounds.get(key)
            if kept is not None and kept[0] == k and kept[1].shape[0] == padded:
                if plan_fits(seq, kept[1], b, last, 2 * plan_headroom(k)):  # common case
                    spec.kept = True  # the steps' wrappers hold the plan: looked up if steps are made
                    return [], False
        need = self._need[:padded]  # the last step's lengths
        need[:] = seq
        need[:b] += last
        if spec.shapes[last] is None:  # planned from: staged now
            self._stage_now(spec, last)
        # FlashInfer's plans rewrite pinned buffers the last planning round's copies read: wait (if
        # needed) for what that round enqueued while it planned.
        event = self._planned_event
        if event is not None and not event.query():
            event.synchronize()
        alone = []
        bounds = need
        for j, slot in enumerate(slots):
            planner = slot.launcher.planner
            if self._plan_once and j < last and planner.decode_ready(padded, graph):
                continue  # takes the last step's plan below
            num_tokens, max_seq, _, views, _ = self._shape(spec, j)  # staged: a step planning on its own
            num_kv_pages = slot.launcher.num_kv_pages(padded)
            if self._plan_once and j == last:
                self._bounds.pop(key, None)  # the workspace's plan changes
                # With headroom only over wrappers whose kernels clamp to the device lengths (FA2's,
                # known once planned: a first plan is for the step's own lengths, and not kept).
                if planner.clamps_decode_lengths(padded, graph):
                    bounds = need.astype(np.int64)
                    bounds[:b] += plan_headroom(k)
                    views, max_seq = self._bound_views(views, bounds, b, padded), int(bounds.max())
            wrappers[j] = planner.plan("decode", padded, graph, views, max_seq, num_kv_pages, num_tokens, 1)
            alone.append(j)
        if self._plan_once:
            source = slots[last].launcher.planner
            for j in range(last):  # after every plan: the int workspace holds the last step's
                # A graph wrapper reads its own buffers: an eager one is pointed at the step's views.
                views = None if graph else self._shape(spec, j)[3]
                wrappers[j] = slots[j].launcher.planner.adopt(source, padded, graph, views)
            if bounds is not need:  # planned with headroom: later rounds may keep it
                self._bounds[key] = (k, bounds)
            self._ready.add((padded, graph, k))  # every step's wrappers planned once: later rounds stage one
        if self._planned_event is not None:
            self._planned_event.record()
        return alone, True

    def _bound_views(self, views: Any, seq: np.ndarray, b: int, padded: int) -> Any:
        """``views`` with its planning host arrays (``seq_lens_pinned``, per group
        ``kv_indptr_pinned`` and ``kv_last_page_len_pinned``) replaced by those of lengths ``seq``
        (``[padded]``; rows past ``b``, a graph's padding rows, as staged). CPU tensors of this
        loop's, not pinned: FlashInfer's fast plan reads them on the host, and its stock plan's
        copies from pageable memory finish before it returns."""
        r = self.config.max_num_reqs
        if self._plan_host is None:
            n = len(self._page_sizes)
            self._plan_host = (
                torch.zeros(r, dtype=torch.int32),
                tuple(torch.zeros(r + 1, dtype=torch.int32) for _ in range(n)),
                tuple(torch.zeros(r, dtype=torch.int32) for _ in range(n)),
            )
        seq_t, indptr_t, last_t = self._plan_host
        seq_t[:padded].numpy()[:] = seq
        fields = {name: getattr(views, name) for name in views.__slots__}
        fields["seq_lens_pinned"] = seq_t[:padded]
        indptrs, lasts = [], []
        for g, ps in enumerate(self._page_sizes):
            pages = np.diff(views.kv_indptr_host[g])  # as staged (padding rows: the padding page)
            pages[:b] = -(-seq[:b] // ps)
            indptr, last = indptr_t[g][: padded + 1], last_t[g][:padded]
            ind = indptr.numpy()
            ind[0] = 0
            np.cumsum(pages, out=ind[1:])
            lp = last.numpy()
            lp[:] = views.kv_last_page_len_host[g]
            lp[:b] = seq[:b] - (pages[:b] - 1) * ps
            indptrs.append(indptr)
            lasts.append(last)
        fields["kv_indptr_pinned"], fields["kv_last_page_len_pinned"] = tuple(indptrs), tuple(lasts)
        return type(views)(**fields)

    # ---------------------------------------------------------------------------------------------
    def capture(
        self, batch_size: int, num_steps: int, forward: Callable[[Step], torch.Tensor], *, warmup: int
    ) -> tuple[torch.cuda.CUDAGraph, ...]:
        """Captures a round of ``num_steps`` steps of ``batch_size`` rows as CUDA graphs, returned:
        for each host buffer of step 0's ring, step 0's launch (which reads that buffer in place),
        then ``forward`` and the advance after each step; last, the round without step 0's launch
        (the replay of a round whose step 0 :meth:`flush` launched). Before each capture the round
        runs on a side stream (``warmup`` times before the first, once before the others: their
        host twins staged, every launch bound); the capture rounds have padding rows only."""
        key = (batch_size, num_steps)
        self._graphs.pop(key, None)  # the capture rounds launch step 0 themselves
        empty = np.zeros(0, np.int64)
        graphs: list[Any] = [None, None, None]
        for i in range(3):  # each round stages step 0 into the other host buffer
            round_ = self.prepare(empty, empty, num_steps, padded=batch_size, graph=True, staged_prompts=())
            launcher = self._slots[0].launcher
            in_graph = i < 2
            max_cols = launcher.columns(self.config.max_model_len, round_._spec.shapes[0][2])  # any row's
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warmup if i == 0 else 1):
                    if in_graph:
                        launcher.fill_resolving(batch_size, max_cols)
                    round_.run(forward)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                if in_graph:
                    # Step 0's launch, which prepare() leaves to the replay: rows resolved from the
                    # device lengths first, a no-op for rows whose lengths the host knows, so one
                    # graph serves both.
                    launcher.fill_resolving(batch_size, max_cols)
                round_.run(forward)
            graphs[round_._spec.buffer if in_graph else 2] = graph
        self._graphs[key] = tuple(graphs)
        return self._graphs[key]

    def replay(self, round_: DraftRound) -> None:
        """Replays the graph captured for the round's batch size and step count: the one whose
        first launch writes step 0 from the round's host buffer, or, where :meth:`flush` launched
        step 0 already, the one without."""
        spec = round_._spec
        if not spec.graph:
            raise ValueError("round: prepared without cuda_graph=True; its wrappers do not match a captured graph")
        if round_._generation != self._clock[0]:
            round_._check_fresh("replay")  # raises
        graphs = self._graphs.get((spec.padded, len(spec.shapes)))
        if graphs is None:
            raise ValueError(
                f"round: no draft graph captured for batch size {round_.padded_num_reqs} with {round_.num_steps} "
                f"steps (capture_draft_graph({round_.padded_num_reqs}, {round_.num_steps}, forward))"
            )
        if spec.flushed:  # step 0 ran; what came since may have written newer block-table entries
            graphs[2].replay()
            return
        self._pending = None
        graphs[spec.buffer].replay()
        self._slots[0].ring.done()  # the graph read step 0's host buffer
