"""``BatchMetadata``: the object a model runner makes once and calls every step.

A step, as :meth:`BatchMetadata.prepare_prefill` / :meth:`~BatchMetadata.prepare_decode` perform it
(each stage a module of its own):

1. convert and check the scheduler's host-side batch, before anything changes (:mod:`batchmeta.batch`);
2. take the block-table writes staged since the last step (:mod:`batchmeta.block_tables`);
3. write the step's small host arrays into a pinned staging buffer (:mod:`batchmeta.staging`);
4. one kernel launch, reading that pinned buffer in place (zero-copy): apply the staged block-table
   writes, write positions, slot mappings, ``kv_indices`` (and, if asked, per-batch block tables)
   of every KV-cache group, and copy the staged fields FlashInfer reads to the device
   (:mod:`batchmeta.ops.step`);
5. plan FlashInfer once per group from the pinned host arrays (:mod:`batchmeta.attention`);
6. hand back a :class:`~batchmeta.step.Step` of views (:mod:`batchmeta.step`).

Decode steps may replay CUDA graphs (:mod:`batchmeta.cuda_graphs`, where the padding policy is).
Speculative acceptance and drafts live in :mod:`batchmeta.speculative`; a drafter's rounds of ``k``
single-token steps, prepared at once and replayable as one graph, in :mod:`batchmeta.draft`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from batchmeta.attention import flashinfer_planning_available
from batchmeta.attention.mla import check_mla_shape
from batchmeta.batch import BatchChecker, host_ints
from batchmeta.block_tables import BlockTables
from batchmeta.config import MetadataConfig
from batchmeta.context_parallel import CPAttention
from batchmeta.cuda_graphs import DecodeGraphs, graph_batch_size
from batchmeta.draft import DraftLoop, DraftRound
from batchmeta.host_path import COMPILED, HostPath
from batchmeta.launcher import StepLauncher
from batchmeta.lora import LoraAdapters
from batchmeta.ops.lora import LoraLayout
from batchmeta.ops.step import bind_scatter_pairs
from batchmeta.speculative import Acceptance, Speculation
from batchmeta.staging import (
    PinnedRing,
    StagingLayout,
    StepBuffers,
    packed_write_count,
    stage_prompts,
    stage_writes,
)
from batchmeta.step import Step

__all__ = ["BatchMetadata"]

_I32_MAX = 2**31 - 1
_FLASHINFER_HEAD_DIMS = (64, 128, 256)  # what FlashInfer's paged prefill and decode kernels compile for


class BatchMetadata:
    """Preallocated attention metadata for one model runner; ``prepare_*`` every step.

    Example
    -------
    >>> meta = BatchMetadata(cfg)
    >>> meta.block_tables.append(req_idx, pages)          # staged on the host
    >>> with meta.prepare_decode(idx_mapping, cache_lens) as step:
    ...     ops.store_kv(k, v, step.slot_mappings[0], k_cache, v_cache)
    ...     out = step.attention(q, k_cache, v_cache)     # or batchmeta.current_step() in a layer

    Parameters
    ----------
    config:
        What the buffers are sized for (:class:`~batchmeta.MetadataConfig`).
    cp_group:
        The ``torch.distributed`` process group over which ``step.attention`` merges a group sharded
        by ``config.context_parallel`` (NCCL on GPUs, gloo on CPUs); None: the world.

    Attributes
    ----------
    config:
        The configuration.
    block_tables:
        The persistent per-request block tables (:class:`~batchmeta.BlockTables`): ``append``,
        ``reset``, ``pages``, ``num_pages``.
    positions:
        ``[max_num_tokens]`` int64 device buffer a step's ``positions`` view (and a CUDA graph) reads.
    slot_mappings:
        Per group ``[max_num_tokens]`` int64 device buffers (PAD past a step's tokens).
    kv_indices:
        Per group ``[(max_num_reqs + 1) * W_g]`` int32 device buffers.
    lora:
        Multi-LoRA (``config.max_loras > 0``): the adapter of each request slot
        (:class:`~batchmeta.lora.LoraAdapters`: ``set_adapter``, ``clear``), staged for the next
        step, which builds ``step.lora``; None when off.
    token_ids:
        ``[max_num_reqs, max_model_len]`` int32 device token history (``config.token_history``),
        else None: prompts staged with :meth:`stage_prompt`, tokens written by
        :meth:`accept_tokens`; each step's ``input_ids`` are gathered from it.
    """

    def __init__(self, config: MetadataConfig, *, cp_group: Any = None):
        if not isinstance(config, MetadataConfig):
            raise TypeError(f"config: expected a MetadataConfig, got {type(config).__name__}")
        self.config = cfg = config
        dev = cfg.device
        self._device_index: int | None = None
        if dev.type == "cuda":
            self._device_index = dev.index if dev.index is not None else torch.cuda.current_device()
            dev = torch.device("cuda", self._device_index)
        groups, r, t = len(cfg.kv_groups), cfg.max_num_reqs, cfg.max_num_tokens
        with self._on_device():
            self.block_tables = BlockTables(cfg)
            # Staged block-table writes per step: a full prefill budget of new pages plus a count per
            # request per group, twice over; more than that is applied in several copies.
            max_writes = groups * (t + 4 * (r + 1))
            # Token history: one staged prompt span per request slot, a step's tokens plus a whole
            # prompt of them between two steps.
            hist = cfg.token_history
            self._layout = StagingLayout(
                r,
                groups,
                max_writes,
                max_chunks=r if hist else 0,
                max_prompt_tokens=t + cfg.max_model_len if hist else 0,
                lora_size=LoraLayout.staging_size(r, cfg.max_loras) if cfg.max_loras else 0,
            )
            self._staging = PinnedRing(self._layout.total, dev)
            self._buffers = buf = StepBuffers(cfg, dev)
            # Multi-LoRA (config.max_loras): adapters per request slot; the step's launch sorts its tokens.
            self.lora = LoraAdapters(cfg, self._layout.lora, dev) if cfg.max_loras else None
            if self.lora is not None:
                self.block_tables.on_reset(self.lora.clear)
            # Speculative decoding: acceptance, drafts, and the request slots whose lengths are on the
            # device; a step with such rows first rewrites its packed rows into the mirror from them.
            self._spec = Speculation(cfg, dev, self.block_tables, buf.token_ids)
            self._scatter = bind_scatter_pairs(
                self._staging.dev,
                self.block_tables.flat,
                count=self._layout.num_writes,
                pairs=self._layout.pairs,
                max_writes=max_writes,
                backend=cfg.backend,
            )
        self.positions = buf.positions
        self.slot_mappings = buf.slot_mappings
        self.kv_indices = buf.kv_indices
        self.token_ids = buf.token_ids
        # Staged prompt spans per request slot: (first position, token arrays), and their token count.
        self._prompts: dict[int, tuple[int, list[np.ndarray]]] = {}
        self._num_prompt_tokens = 0
        self._checker = BatchChecker(cfg, self.block_tables.host_num_blocks())
        # The compiled host path (numba), or None: the numpy checks and stage_step, the reference.
        self._host_path = HostPath(cfg, self._layout, self.block_tables.host_num_blocks()) if COMPILED else None
        sharded = any(cfg.sharded(g) for g in range(groups))  # context parallelism (batchmeta.context_parallel)
        self._planned = dev.type == "cuda" and cfg.plan_attention and flashinfer_planning_available()
        if self._planned:
            if torch.float32 in (cfg.q_dtype, cfg.kv_dtype):
                raise TypeError(
                    f"q_dtype, kv_dtype: FlashInfer plans float16 or bfloat16 (float8 KV), got "
                    f"{cfg.q_dtype}, {cfg.kv_dtype}; float32 runs where nothing is planned (device='cpu' "
                    f"or plan_attention=False)"
                )
            for g, grp in enumerate(cfg.kv_groups):
                if grp.mla is not None:
                    check_mla_shape(g, grp.mla.head_dim_ckv, grp.mla.head_dim_kpe)
                elif cfg.head_dim not in _FLASHINFER_HEAD_DIMS:
                    # Otherwise the first plan fails deep inside FlashInfer's JIT build.
                    raise ValueError(
                        f"head_dim: FlashInfer's kernels take head_dim {_FLASHINFER_HEAD_DIMS}, got "
                        f"{cfg.head_dim}; plan_attention=False plans no attention"
                    )
        with self._on_device():
            # The steps' launches (one bound per pinned host buffer: the kernel reads the step's
            # staging in place; and one rewriting its packed rows from device lengths), views and plans.
            self._launcher = StepLauncher(
                cfg,
                self._layout,
                self._staging,
                buf,
                self.block_tables,
                self._spec.lens,
                checker=self._checker,
                host_path=self._host_path,
                planned=self._planned,
                lora=None if self.lora is None else (self.lora.layout, self.lora.out),
            )
        self._graphs = DecodeGraphs()
        self._clock = [0]  # number of the latest step: older steps' views are stale
        self._draft: DraftLoop | None = None  # made by the first prepare_draft
        self._sharded = sharded  # context parallelism shards a group: see batchmeta.context_parallel
        self._cp = CPAttention(cfg, self.block_tables.tables, dev, cp_group) if sharded else None

    def __repr__(self) -> str:
        cfg = self.config
        return (
            f"BatchMetadata(device={cfg.device}, max_num_reqs={cfg.max_num_reqs}, "
            f"max_num_tokens={cfg.max_num_tokens}, max_model_len={cfg.max_model_len}, "
            f"kv_groups={list(cfg.kv_groups)}, plans_flashinfer={self._planned}, "
            f"cuda_graph_batch_sizes={cfg.cuda_graph_batch_sizes}, steps={self._clock[0]})"
        )

    # ---------------------------------------------------------------------------------------------
    # Token history
    # ---------------------------------------------------------------------------------------------
    def stage_prompt(self, req_idx: int, token_ids: Any, start: int = 0) -> None:
        """Stages prompt tokens of request slot ``req_idx`` at positions ``[start, start + n)`` of the
        token history; the next ``prepare_*`` launch writes them (``config.token_history``).

        A request's staged tokens form one span until the next step: staging again continues it
        (``start`` = the span's end) or replaces it (``start`` = the span's start; or drop it with
        :meth:`discard_prompt`). Between two steps at most ``max_num_tokens + max_model_len``
        tokens may be staged in all. Nothing is staged when a check fails. A span stays staged
        until a step is prepared (a rejected step keeps it), also across ``block_tables.reset``.

        Parameters
        ----------
        req_idx:
            Request slot, in ``[0, max_num_reqs)``.
        token_ids:
            ``[n]`` host ints (list, numpy array or CPU tensor), each in ``[0, 2^31)``.
        start:
            Position of the first token.
        """
        cfg = self.config
        if self.token_ids is None:
            raise ValueError(
                "stage_prompt: this BatchMetadata has no token history; make it with MetadataConfig(token_history=True)"
            )
        for name, v in (("req_idx", req_idx), ("start", start)):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
        if not 0 <= req_idx < cfg.max_num_reqs:
            raise ValueError(f"req_idx: expected a request slot in [0, {cfg.max_num_reqs}), got {req_idx}")
        tokens = host_ints("token_ids", token_ids)
        n = tokens.shape[0]
        if n and not 0 <= tokens.min() <= tokens.max() <= _I32_MAX:
            raise ValueError(f"token_ids: expected token ids in [0, 2^31), got {tokens.min()}..{tokens.max()}")
        if start < 0:
            raise ValueError(f"start: expected a position >= 0, got {start}")
        if not start <= cfg.max_model_len - n:
            raise ValueError(f"start: {n} tokens from position {start} do not fit max_model_len ({cfg.max_model_len})")
        pending = self._prompts.get(req_idx)
        held = 0 if pending is None else sum(len(a) for a in pending[1])
        replace = pending is not None and start == pending[0]
        if pending is not None and not replace and start != pending[0] + held:
            end = pending[0] + held
            raise ValueError(
                f"start: request slot {req_idx} has positions [{pending[0]}, {end}) staged; continue "
                f"from {end}, restage from {pending[0]}, or discard_prompt({req_idx})"
            )
        room = self._layout.max_prompt_tokens - self._num_prompt_tokens + (held if replace else 0)
        if n > room:
            raise ValueError(
                f"token_ids: {n} tokens exceed the {room} that may still be staged before the next step "
                f"(max_num_tokens + max_model_len in all)"
            )
        if replace:
            self.discard_prompt(req_idx)
            pending = None
        if not n:
            return
        if pending is None:
            self._prompts[req_idx] = (int(start), [tokens.astype(np.int32)])
        else:
            pending[1].append(tokens.astype(np.int32))
        self._num_prompt_tokens += n

    def discard_prompt(self, req_idx: int) -> None:
        """Drops the prompt tokens staged for request slot ``req_idx`` since the last step (if any):
        for a request aborted, or rescheduled with other chunks, before they were applied."""
        if self.token_ids is None:
            raise ValueError(
                "discard_prompt: this BatchMetadata has no token history; make it with "
                "MetadataConfig(token_history=True)"
            )
        if isinstance(req_idx, (bool, np.bool_)) or not isinstance(req_idx, (int, np.integer)):
            raise TypeError(f"req_idx: expected an int, got {type(req_idx).__name__}")
        if not 0 <= req_idx < self.config.max_num_reqs:
            raise ValueError(f"req_idx: expected a request slot in [0, {self.config.max_num_reqs}), got {req_idx}")
        pending = self._prompts.pop(req_idx, None)
        if pending is not None:
            self._num_prompt_tokens -= sum(len(a) for a in pending[1])

    def _take_prompts(self) -> list[tuple[int, int, np.ndarray]]:
        """The staged prompt spans, as ``(request slot, first position, tokens)``; none remain staged."""
        spans = [
            (r, first, parts[0] if len(parts) == 1 else np.concatenate(parts))
            for r, (first, parts) in self._prompts.items()
        ]
        self._prompts = {}
        self._num_prompt_tokens = 0
        return spans

    # ---------------------------------------------------------------------------------------------
    # Every step
    # ---------------------------------------------------------------------------------------------
    def prepare_prefill(self, idx_mapping: Any, *lengths: Any, query_lens: Any = None, cache_lens: Any = None) -> Step:
        """Metadata for a prefill or mixed step (chunked prefill beside decodes).

        ``meta.prepare_prefill(idx, query_lens=q, cache_lens=c)``: the two lengths are passed by
        keyword (both are ``[B]`` ints: swapped, they would pass every check). Passing them by
        position, ``prepare_prefill(idx, q, c)``, still works and warns (``DeprecationWarning``).

        Parameters
        ----------
        idx_mapping:
            ``[B]`` request slot of each batch row (host data: list, numpy array or CPU tensor).
        query_lens:
            ``[B]`` new tokens per row (a prefill chunk, or 1 for a decode row), each ``>= 1``.
        cache_lens:
            ``[B]`` tokens already in the KV cache per row.

        Returns
        -------
        Step
            The step's metadata; ``with step:`` (or ``with meta.prepare_prefill(...) as step:``)
            makes it ``batchmeta.current_step()`` for the body. A ``"ragged_prefill"`` step when
            nothing is cached, else ``"prefill"``.
        """
        if lengths:
            if len(lengths) != 2 or query_lens is not None or cache_lens is not None:
                raise TypeError(
                    "prepare_prefill: pass query_lens= and cache_lens= by keyword "
                    f"(got {len(lengths)} positional length argument(s))"
                )
            warnings.warn(
                "prepare_prefill(idx, query_lens, cache_lens) by position is deprecated: swapped lengths pass "
                "every check; pass query_lens= and cache_lens= by keyword",
                DeprecationWarning,
                stacklevel=2,
            )
            query_lens, cache_lens = lengths
        for name, value in (("query_lens", query_lens), ("cache_lens", cache_lens)):
            if value is None:
                raise TypeError(f"prepare_prefill: missing {name}= (a [B] int per row)")
        idx = host_ints("idx_mapping", idx_mapping)
        b = idx.shape[0]
        qlens = host_ints("query_lens", query_lens, length=b)
        clens = host_ints("cache_lens", cache_lens, length=b)
        if b and qlens.min() < 1:
            raise ValueError(f"query_lens: expected >= 1 new token per row, got {qlens.min()}")
        kind = "prefill" if clens.any() else "ragged_prefill"
        index = self._device_index
        if index is None or _current_device() == index:  # common case: no device to switch to (no `with`)
            return self._prepare(idx, qlens, clens, kind, padded=b, graph=False)
        with torch.cuda.device(index):
            return self._prepare(idx, qlens, clens, kind, padded=b, graph=False)

    def prepare_decode(
        self, idx_mapping: Any, cache_lens: Any, *, num_draft_tokens: int = 0, cuda_graph: bool = False
    ) -> Step:
        """Metadata for a decode step: ``1 + num_draft_tokens`` new tokens per row.

        Parameters
        ----------
        idx_mapping, cache_lens:
            As in :meth:`prepare_prefill`.
        num_draft_tokens:
            Speculative tokens verified this step (``<= config.max_draft_tokens``).
        cuda_graph:
            Pad the batch to the next size in ``config.cuda_graph_batch_sizes`` and plan the
            CUDA-graph wrappers (decode, or with draft tokens speculative verify: FlashInfer's
            prefill wrapper in CUDA-graph mode); replay with :meth:`replay_decode_graph` a graph
            captured for that size and ``num_draft_tokens``.

        Returns
        -------
        Step
            A ``"decode"`` or ``"spec_decode"`` step; usable as a context manager (see
            :meth:`prepare_prefill`).
        """
        cfg = self.config
        if cuda_graph is not False and cuda_graph is not True:  # common case: a bool, nothing to check
            if not isinstance(cuda_graph, (bool, np.bool_)):
                raise TypeError(f"cuda_graph: expected a bool, got {type(cuda_graph).__name__}")
            cuda_graph = bool(cuda_graph)  # one compiled specialisation of the host path, not one per type
        if type(num_draft_tokens) is not int:
            raise TypeError(f"num_draft_tokens: expected an int, got {type(num_draft_tokens).__name__}")
        if not 0 <= num_draft_tokens <= cfg.max_draft_tokens:
            raise ValueError(
                f"num_draft_tokens: expected 0..{cfg.max_draft_tokens} (config.max_draft_tokens), "
                f"got {num_draft_tokens}"
            )
        if cuda_graph and num_draft_tokens and self._sharded:
            self._reject_sharded_verify_graph()
        idx = host_ints("idx_mapping", idx_mapping)
        b = idx.shape[0]
        clens = host_ints("cache_lens", cache_lens, length=b)
        padded = self.graph_batch_size(b) if cuda_graph else b
        kind = "spec_decode" if num_draft_tokens else "decode"
        index = self._device_index
        if index is None or _current_device() == index:  # common case: no device to switch to (no `with`)
            return self._prepare(idx, 1 + num_draft_tokens, clens, kind, padded=padded, graph=cuda_graph)
        with torch.cuda.device(index):
            return self._prepare(idx, 1 + num_draft_tokens, clens, kind, padded=padded, graph=cuda_graph)

    def _prepare(
        self, idx: np.ndarray, qlens: np.ndarray | int, clens: np.ndarray, kind: str, *, padded: int, graph: bool
    ) -> Step:
        """The step: check and stage (:meth:`_stage`), launch, plan, and the ``Step``. ``qlens`` is
        an int for decode."""
        lay, ring = self._layout, self._staging
        on_device = self._spec.rows_on_device(idx, clens)  # rows whose cache length is on the device (rare)
        h, num_tokens, widths, max_seq = self._stage(idx, qlens, clens, padded, graph, on_device)
        if self.lora is not None:  # multi-LoRA: the rows sorted by adapter, which the launch expands
            self.lora.stage(h, lay.idx, lay.qo_indptr, padded, compiled=self._host_path is not None)
        try:
            b = idx.shape[0]
            query_len = qlens if type(qlens) is int else None
            views, num_kv_pages, wrappers, tokens_run = self._launcher.launch(
                kind, b, padded, graph, qlens, num_tokens, widths, max_seq, on_device
            )
            step = Step(
                kind,
                b,
                padded,
                num_tokens,
                query_len,
                graph,
                idx,
                clens,
                None if query_len else qlens,
                num_kv_pages,
                views,
                wrappers,
                self._clock,
                self.block_tables,
                on_device,
            )
            if self.lora is not None:
                step._lora = self.lora.views(ring.current, h, padded, tokens_run)
            if self._cp is not None:  # the sharded groups' cached-context arrays and plans
                qo = np.full(b, query_len) if query_len else qlens
                parts = self._cp.prepare(
                    kind,
                    idx,
                    clens,
                    qo,
                    views.qo_indptr_pinned,
                    ring.current,
                    plan=bool(wrappers),
                    padded=padded,
                    graph=graph,
                )
                step._cp = (self._cp, parts)
            return step
        finally:
            ring.done()  # the host buffer stays busy until what was enqueued from it has run

    # ---------------------------------------------------------------------------------------------
    # CUDA-graph decode
    # ---------------------------------------------------------------------------------------------
    def graph_batch_size(self, num_reqs: int) -> int:
        """The captured batch size a decode batch of ``num_reqs`` rows is padded to."""
        return graph_batch_size(self.config, num_reqs, planned=self._planned)

    def capture_decode_graph(
        self, batch_size: int, forward: Callable[[Step], None], *, num_draft_tokens: int = 0, warmup: int = 2
    ) -> Any:
        """Captures ``forward(step)`` for a decode batch of ``batch_size`` rows as a CUDA graph.

        ``forward`` must read and write only fixed buffers (the step's views, the engine's own
        static input/output tensors, ``batch_size * (1 + num_draft_tokens)`` tokens). The capture
        plans with a batch of padding rows only; each later step plans outside the graph
        (``prepare_decode(..., num_draft_tokens=k, cuda_graph=True)``) and
        :meth:`replay_decode_graph` replays the graph of its size and ``k``.

        Parameters
        ----------
        batch_size:
            One of ``config.cuda_graph_batch_sizes``.
        num_draft_tokens:
            Speculative tokens per row (``<= config.max_draft_tokens``): a verify step of
            ``1 + num_draft_tokens`` tokens per row. 0: plain decode.
        """
        cfg = self.config
        if cfg.device.type != "cuda":
            raise ValueError(
                f"capture_decode_graph: CUDA graphs need a CUDA device; this BatchMetadata is on "
                f"{cfg.device} (config.device)"
            )
        if batch_size not in cfg.cuda_graph_batch_sizes:
            raise ValueError(
                f"batch_size: expected one of config.cuda_graph_batch_sizes "
                f"{cfg.cuda_graph_batch_sizes}, got {batch_size}"
            )
        if type(num_draft_tokens) is not int:
            raise TypeError(f"num_draft_tokens: expected an int, got {type(num_draft_tokens).__name__}")
        if not 0 <= num_draft_tokens <= cfg.max_draft_tokens:
            raise ValueError(
                f"num_draft_tokens: expected 0..{cfg.max_draft_tokens} (config.max_draft_tokens), "
                f"got {num_draft_tokens}"
            )
        if num_draft_tokens and self._sharded:
            self._reject_sharded_verify_graph()
        self.graph_batch_size(batch_size)  # raises without CUDA or FlashInfer
        empty = np.zeros(0, np.int64)
        kind = "spec_decode" if num_draft_tokens else "decode"
        with self._on_device():
            step = self._prepare(empty, 1 + num_draft_tokens, empty, kind, padded=batch_size, graph=True)
            return self._graphs.capture(step, forward, warmup=warmup)

    def _reject_sharded_verify_graph(self) -> None:
        raise ValueError(
            f"context_parallel: CUDA graphs of speculative verify steps are not supported yet with a KV-cache group "
            f"sharded over {self.config.context_parallel.world_size} ranks (plain decode graphs are)"  # type: ignore[union-attr]
        )

    def replay_decode_graph(self, step: Step) -> None:
        """Replays the graph captured for ``step.padded_num_reqs`` and its draft tokens (``step``: the
        latest step, prepared with ``cuda_graph=True``); raises if none was captured for them."""
        if not isinstance(step, Step):
            raise TypeError(f"step: expected the Step of a prepare_decode call, got {type(step).__name__}")
        if step._clock is not self._clock:
            raise ValueError("step: prepared by another BatchMetadata")
        with self._on_device():
            self._graphs.replay(step)

    # ---------------------------------------------------------------------------------------------
    # Draft loops (batchmeta.draft)
    # ---------------------------------------------------------------------------------------------
    def prepare_draft(
        self, idx_mapping: Any, cache_lens: Any, *, num_steps: int, cuda_graph: bool = False
    ) -> DraftRound:
        """A drafter's round of ``num_steps`` single-token steps (EAGLE, MTP), prepared and planned at once.

        Step ``j`` of the round is the decode step ``prepare_decode(idx_mapping, cache_lens + j)``
        would give (every field), in buffers of its own. Every step is checked now; step 0 is
        staged and written by a launch enqueued now, or, with a graph captured for the round's
        batch size and ``k``, by the replay (the first read of ``round.steps``, or the next
        ``prepare_*``, ``accept_tokens`` or ``write_drafts``, enqueues it if it comes first); a
        later step's host twins are staged on first read. FlashInfer is planned once per group for
        the last step's lengths with headroom, taken by every step's wrappers and kept by later
        rounds it still bounds (``round.planned``); the GPU writes each later step:
        ``round.run(forward)`` (or ``round.advance(j, tokens)`` after each forward) puts the
        drafted token into the token history at ``c + j + 1``, then writes step ``j + 1``, whose
        ``input_ids`` gather it, and the next ``prepare_decode(..., num_draft_tokens=num_steps)``
        gathers the drafts. Under a CUDA graph the whole round replays with
        :meth:`replay_draft_graph`. Needs ``config.token_history``.

        The drafter's KV caches may be tensors of its own over the request's pages (pass the
        target's group to ``step.attention(..., group=g)`` and write at ``step.slot_mappings[g]``)
        or a KV-cache group of its own (``config.kv_groups``); see the README.

        Parameters
        ----------
        idx_mapping:
            ``[B]`` request slot of each row (host data), each past its prompt.
        cache_lens:
            ``[B]`` each row's next cache length as ``accept_tokens`` returned it (the upper bound
            where ``exact`` is False: those rows are resolved on the device). The engine must hold
            pages for ``cache_lens + num_steps`` tokens.
        num_steps:
            ``k``, in ``[1, config.max_draft_tokens]``.
        cuda_graph:
            Pad the batch to the next size in ``config.cuda_graph_batch_sizes`` and plan the
            CUDA-graph wrappers of the steps, for :meth:`replay_draft_graph`.

        Returns
        -------
        DraftRound
            ``round.steps`` (``k`` Steps), ``round.run(forward)``, ``round.advance(j, tokens)``,
            ``round.draft_token_ids`` (``[B, k]``). Valid until the next ``prepare_draft``.
        """
        num_steps, cuda_graph = self._check_draft_args(num_steps, cuda_graph)
        idx = host_ints("idx_mapping", idx_mapping)
        b = idx.shape[0]
        clens = host_ints("cache_lens", cache_lens, length=b)
        padded = self.graph_batch_size(b) if cuda_graph else b
        with self._on_device():
            return self._draft_loop().prepare(
                idx, clens, num_steps, padded=padded, graph=cuda_graph, staged_prompts=self._prompts
            )

    def capture_draft_graph(
        self, batch_size: int, num_steps: int, forward: Callable[[Step], torch.Tensor], *, warmup: int = 2
    ) -> Any:
        """Captures a whole draft round as one CUDA graph: for each of ``num_steps`` steps,
        ``token_ids = forward(step)`` (the drafter's forward and its greedy or sampled choice, ``[>=
        batch_size]`` on the device) and the advance that hands the tokens to the next step.

        ``forward`` must read and write only fixed buffers (the step's views, the engine's static
        tensors), as for :meth:`capture_decode_graph`. Later rounds are prepared with
        ``prepare_draft(..., num_steps=num_steps, cuda_graph=True)`` and replayed with
        :meth:`replay_draft_graph`, whose first launch writes step 0: preparing such a round
        launches no kernel of its own (a round that plans enqueues FlashInfer's copies; more staged
        block-table writes than one step holds are scattered first). The capture prepares three
        rounds of padding rows (which makes any earlier round stale) and returns three graphs: one
        for each of step 0's two host staging buffers, and one without step 0's launch, replayed
        where something before the replay launched it.

        Parameters
        ----------
        batch_size:
            One of ``config.cuda_graph_batch_sizes``.
        num_steps:
            ``k``, in ``[1, config.max_draft_tokens]``.
        """
        cfg = self.config
        if cfg.device.type != "cuda":
            raise ValueError(
                f"capture_draft_graph: CUDA graphs need a CUDA device; this BatchMetadata is on "
                f"{cfg.device} (config.device)"
            )
        if batch_size not in cfg.cuda_graph_batch_sizes:
            raise ValueError(
                f"batch_size: expected one of config.cuda_graph_batch_sizes "
                f"{cfg.cuda_graph_batch_sizes}, got {batch_size}"
            )
        num_steps, _ = self._check_draft_args(num_steps, True)
        self.graph_batch_size(batch_size)  # raises without FlashInfer planning
        with self._on_device():
            return self._draft_loop().capture(batch_size, num_steps, forward, warmup=warmup)

    def replay_draft_graph(self, round: DraftRound) -> None:
        """Replays the graph captured for ``round.padded_num_reqs`` and ``round.num_steps`` (``round``:
        the latest ``prepare_draft(..., cuda_graph=True)``); raises if none was captured for them."""
        if not isinstance(round, DraftRound):
            raise TypeError(f"round: expected the DraftRound of a prepare_draft call, got {type(round).__name__}")
        if self._draft is None or round._loop is not self._draft:
            raise ValueError("round: prepared by another BatchMetadata")
        with self._on_device():
            self._draft.replay(round)

    def _check_draft_args(self, num_steps: Any, cuda_graph: Any) -> tuple[int, bool]:
        cfg = self.config
        if self.token_ids is None:
            raise ValueError(
                "prepare_draft: draft rounds read and write the token history; make the BatchMetadata with "
                "MetadataConfig(token_history=True)"
            )
        if self._sharded:  # a draft step's attention over a sharded group is not built
            raise ValueError(
                f"context_parallel: draft rounds are not supported yet with a KV-cache group sharded over "
                f"{cfg.context_parallel.world_size} ranks"  # type: ignore[union-attr]
            )
        if type(num_steps) is not int:
            raise TypeError(f"num_steps: expected an int, got {type(num_steps).__name__}")
        if not cfg.max_draft_tokens:
            raise ValueError(
                "num_steps: draft rounds need MetadataConfig(max_draft_tokens=k) with k >= num_steps (it is 0)"
            )
        if not 1 <= num_steps <= cfg.max_draft_tokens:
            raise ValueError(
                f"num_steps: expected 1..{cfg.max_draft_tokens} (config.max_draft_tokens), got {num_steps}"
            )
        if not isinstance(cuda_graph, (bool, np.bool_)):
            raise TypeError(f"cuda_graph: expected a bool, got {type(cuda_graph).__name__}")
        return num_steps, bool(cuda_graph)

    def _draft_loop(self) -> DraftLoop:
        if self._draft is None:
            self._draft = DraftLoop(
                self.config,
                self._buffers.positions.device,
                self._layout,
                self.block_tables,
                self.token_ids,
                self._spec,
                self._checker,
                self._host_path,
                self._planned,
                self._apply_excess_writes,
            )
        return self._draft

    # ---------------------------------------------------------------------------------------------
    # After sampling
    # ---------------------------------------------------------------------------------------------
    def accept_tokens(
        self,
        step: Step,
        token_ids: torch.Tensor | None,
        next_input_ids: torch.Tensor,
        num_accepted: Any,
        prompt_lens: Any,
    ) -> Acceptance:
        """After sampling (and verification): writes each row's accepted tokens into the token history
        and computes each request's next cache length.

        The rule: batch row ``b`` ran ``q`` query tokens at positions ``c .. c+q-1``, the last
        ``k = step.num_draft_tokens`` of them drafts, and accepted ``a = num_accepted[b]`` tokens (a
        decode or verify row: ``1 <= a <= 1 + k``, the matched drafts plus the bonus token; a prefill
        row: 1 at the end of its prompt, else 0 or 1, a token inside the prompt being dropped). They
        go at positions ``c+q-k .. c+q-k+a-1`` (never inside the prompt); the rejected drafts leave
        the sequence, and the next cache length is ``c+q-k+a-1`` (the last accepted token is the
        next step's first input) or ``c+q`` when ``a = 0``. Example: ``c = 5``, ``k = 2``, both drafts
        rejected (``a = 1``): the bonus token goes to position 6 and the next cache length is 6.

        One small host→device copy and one launch; no sync. A step is accepted once (a second call
        raises). ``step`` may be older than the latest step (it uses the arrays the step owns); steps
        must be accepted in the order they ran.

        Parameters
        ----------
        step:
            The step that ran (any kind).
        token_ids:
            ``[max_num_reqs, L]`` int32/int64 token history on the device, or None for
            :attr:`token_ids` (``config.token_history``), which the next steps gather ``input_ids``
            from.
        next_input_ids:
            The accepted tokens (int32 or int64, stored as ``token_ids``' dtype), on the device:
            ``[B, W]`` (row ``b``'s first ``num_accepted[b]``; a verifier's ``[B, 1 + k]`` target
            tokens) or ``[sum(num_accepted)]`` back to back.
        num_accepted:
            ``[B]`` counts: host ints (list, numpy), checked against the rule; or a tensor on
            ``config.device`` (a verifier's output, never read on the host: counts outside the rule's
            range are clamped into it). Device counts leave the verify rows' next lengths on the
            device (see Returns).
        prompt_lens:
            ``[B]`` host ints: each request's prompt length.

        Returns
        -------
        Acceptance
            ``(cache_lens, exact)``: ``[B]`` int64 next cache lengths and ``[B]`` bool. Where
            ``exact`` is False (device counts on a verify row, or a row whose own cache length was
            on the device) ``cache_lens`` is the upper bound ``c + q``; pass it to the next
            ``prepare_*`` as it is (the engine must hold pages for it): that step computes the exact
            positions, slots and lengths on the device and plans FlashInfer from the bound.
        """
        if not isinstance(step, Step):
            raise TypeError(f"step: expected the Step of a prepare_* call, got {type(step).__name__}")
        if step._clock is not self._clock:
            raise ValueError("step: prepared by another BatchMetadata")
        if self._sharded and isinstance(num_accepted, torch.Tensor):
            raise ValueError(
                "context_parallel: acceptance counts on the device are not supported yet with a sharded "
                "KV-cache group; pass num_accepted as host ints"
            )
        with self._on_device():
            if self._draft is not None:
                self._draft.flush()  # a draft round's step 0 reads the history this writes
            return self._spec.accept(step, token_ids, next_input_ids, num_accepted, prompt_lens)

    def write_drafts(self, step: Step, draft_token_ids: torch.Tensor, num_drafts: Any = None) -> None:
        """Writes a drafter's tokens into the token history, where the next verify step reads them.

        After ``accept_tokens(step, ...)``: row ``b``'s drafts go at positions ``n+1, n+2, ...`` of its
        request's history, ``n`` its next cache length (on the device: exact also where the host
        has only a bound), so ``prepare_decode(idx, cache_lens, num_draft_tokens=k)`` gathers
        ``input_ids`` = the last accepted token, then the drafts. One launch, no sync, no host copy
        of a token (``config.token_history``).

        Parameters
        ----------
        step:
            The step just accepted.
        draft_token_ids:
            On the device, int32 or int64: ``[B, k]`` (``k <= config.max_draft_tokens``
            drafts per row), or ragged ``[N]``, row ``b``'s ``num_drafts[b]`` back to back.
        num_drafts:
            With ragged drafts, ``[B]`` counts: host ints, or a tensor on ``config.device`` (clamped
            to ``0..max_draft_tokens``, never read on the host).
        """
        if not isinstance(step, Step):
            raise TypeError(f"step: expected the Step of a prepare_* call, got {type(step).__name__}")
        if step._clock is not self._clock:
            raise ValueError("step: prepared by another BatchMetadata")
        with self._on_device():
            if self._draft is not None:
                self._draft.flush()  # a draft round's step 0 reads the history this writes
            self._spec.write_drafts(step, draft_token_ids, num_drafts)

    # ---------------------------------------------------------------------------------------------
    # Internals
    # ---------------------------------------------------------------------------------------------
    def _stage(
        self,
        idx: np.ndarray,
        qlens: np.ndarray | int,
        clens: np.ndarray,
        padded: int,
        graph: bool,
        on_device: np.ndarray | None,
    ) -> tuple[np.ndarray, int, tuple[int, ...], int]:
        """Checks the batch, writes the other host staging buffer and makes it current; returns it
        with ``(num_tokens, widths, max_seq)``.

        Nothing changes before every check has passed: the numpy path checks first; the compiled
        host path checks while it writes the buffer, which is not yet current (writing nothing if
        the batch is invalid; the numpy checker then raises the message).
        """
        lay, ring, tables = self._layout, self._staging, self.block_tables
        if self._draft is not None and self._draft._pending is not None:
            self._draft.flush()  # a draft round's step 0 left to a replay that did not come
        checked = None if self._host_path is not None else self._checker.check(idx, qlens, clens)
        count = packed_write_count(min(tables.num_staged(), lay.max_writes))
        h = ring.peek()
        staged = self._launcher.stage_rows(h, checked, idx, qlens, clens, padded, graph, count, on_device)
        offsets, values = tables.take_staged()
        if len(offsets) > lay.max_writes:  # more new pages than one step holds: apply the excess first
            offsets, values = self._apply_excess_writes(offsets, values)
            # The excess went through the ring: stage again (the numpy path too: one flow, and rare).
            count = packed_write_count(len(offsets))
            h = ring.peek()
            staged = self._launcher.stage_rows(h, checked, idx, qlens, clens, padded, graph, count, on_device)
        self._clock[0] += 1  # from here the buffers change: earlier steps are stale
        ring.advance()
        rows = tables.rows_of(offsets) if count < 0 else None  # many writes: bucketed by row
        stage_writes(h, lay, offsets, values, rows)
        # The prompt spans and their count in the packed rows; none (common) leaves the count the
        # compiled path zeroed (the numpy path may keep the packed rows of an earlier step).
        if self.token_ids is not None and (self._prompts or self._host_path is None):
            stage_prompts(h, lay, self._take_prompts(), padded, len(self.config.kv_groups))
        return (h, *staged)

    def _apply_excess_writes(self, offsets: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Applies the staged writes beyond what one step's staging holds through the pinned ring,
        one transfer and launch per ``max_writes``; returns the last ``max_writes`` for the step itself."""
        lay, ring = self._layout, self._staging
        cut = len(offsets) - lay.max_writes
        for start in range(0, cut, lay.max_writes):
            stop = min(start + lay.max_writes, cut)
            n = stop - start
            h = ring.next()
            h[lay.num_writes] = n
            pairs = h[lay.pairs : lay.pairs + 2 * n]
            pairs[0::2] = offsets[start:stop]
            pairs[1::2] = values[start:stop]
            ring.upload(lay.num_writes + 1, start=lay.num_writes)
            ring.upload(lay.pairs + 2 * n, start=lay.pairs)
            self._scatter(n)
            ring.done()
        return offsets[cut:], values[cut:]

    def _on_device(self) -> contextlib.AbstractContextManager:
        """Makes the config's CUDA device current: Triton launches, events, streams and graphs use it.
        (``prepare_*`` test the common case themselves, without a ``with``.)"""
        index = self._device_index
        if index is None or _current_device() == index:
            return _NULL_CONTEXT
        return torch.cuda.device(index)


_NULL_CONTEXT = contextlib.nullcontext()
_current_device = getattr(torch._C, "_cuda_getDevice", None)
