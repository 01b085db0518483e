"""The ``Step``: one step's metadata, as views of a ``BatchMetadata``'s buffers, and the active step.

A :class:`Step` is what ``prepare_prefill`` / ``prepare_decode`` return. Its fields are views of
buffers that the next ``prepare_*`` overwrites, so each step carries a generation number: reading a
view of a step that a later ``prepare_*`` has replaced raises :class:`StaleStepError` instead of
returning the newer step's data. The arrays a step owns (``idx_mapping_host``, ``cache_lens_host``,
``query_lens_host``, ``seq_lens_host``) and its sizes stay readable.

A step is its own context manager: ``with step:`` makes it :func:`current_step` (the lookup an
attention layer deep in a model uses) and restores the previous one on exit, also on error.
"""

from __future__ import annotations

import contextvars
from typing import Any

import numpy as np
import torch

from batchmeta.attention.mla import mla_run
from batchmeta.attention.torch_ref import mla_attention_torch, paged_attention_torch
from batchmeta.context_parallel import cp_process_group, partial_attention
from batchmeta.distributed import cp_lse_ag_out_ar

__all__ = ["StaleStepError", "Step", "StepViews", "current_step"]

_current: contextvars.ContextVar[Step | None] = contextvars.ContextVar("batchmeta_step", default=None)


class StaleStepError(RuntimeError):
    """A step's views were read after a later ``prepare_*`` overwrote the buffers they show."""


def current_step() -> Step:
    """The innermost active step (``with meta.prepare_*(...) as step:`` or ``with step:``).

    Attention layers call this instead of having metadata threaded through the model.

    Raises
    ------
    RuntimeError
        When no step is active.
    """
    step = _current.get()
    if step is None:
        raise RuntimeError("batchmeta.current_step(): no step is active; call it inside `with meta.prepare_*(...)`")
    return step


class StepViews:
    """The tensor and array views one step shape reads: made once per shape and staging buffer and
    shared by every step of that shape (a torch slice costs about a microsecond; a step needs dozens).

    Device tensors: ``idx_mapping``, ``qo_indptr``, ``seq_lens``, ``positions``, ``logits_indices``,
    ``slot_mappings`` / ``kv_indptr`` / ``kv_last_page_len`` / ``batch_block_tables`` (per group) and
    ``kv_indices_full`` (per group, whole buffers). Host numpy views of the staging buffer:
    ``idx_mapping_host`` (padded rows), ``qo_indptr_host``, ``kv_indptr_host``,
    ``kv_last_page_len_host``; the same as pinned CPU tensors (``*_pinned``) for FlashInfer's plan.

    What ``Step.attention`` / ``Step.mla_attention`` check their tensors against (host facts, no
    sync): ``q_shapes`` (per group, the queries' shapes: ``[Tp, Hq, D]``, or MLA's ``q_nope`` and
    ``q_pe``), ``cache_shapes`` (per group, a cache's shape but its page count: ``[page_size, Hkv,
    D]``, or MLA's ``ckv`` and ``kpe`` caches), ``min_pages`` (``config.num_kv_pages``), ``q_dtype``,
    ``kv_dtype`` and ``device``.
    """

    __slots__ = (
        "batch_block_tables",
        "cache_shapes",
        "device",
        "idx_mapping",
        "idx_mapping_host",
        "input_ids",
        "kv_dtype",
        "kv_indices_full",
        "kv_indptr",
        "kv_indptr_host",
        "kv_indptr_pinned",
        "kv_last_page_len",
        "kv_last_page_len_host",
        "kv_last_page_len_pinned",
        "logits_indices",
        "logits_soft_caps",
        "min_pages",
        "mla",
        "page_sizes",
        "positions",
        "q_dtype",
        "q_shapes",
        "qo_indptr",
        "qo_indptr_host",
        "qo_indptr_pinned",
        "seq_lens",
        "seq_lens_pinned",
        "sharded",
        "slot_mappings",
        "sm_scales",
        "window_lefts",
    )

    def __init__(self, **views: Any):
        for k, v in views.items():
            setattr(self, k, v)

    @classmethod
    def build(
        cls,
        config: Any,
        layout: Any,
        ring: Any,
        buffers: Any,
        num_reqs: int,
        padded: int,
        num_tokens_run: int,
        widths: tuple[int, ...],
    ) -> StepViews:
        """The views of a step of ``num_reqs`` rows padded to ``padded``, ``num_tokens_run`` tokens and
        per-batch table ``widths``, over ``ring``'s current host buffer (``layout``: a
        :class:`~batchmeta.staging.StagingLayout`) and ``buffers`` (:class:`~batchmeta.staging.StepBuffers`)."""
        d, ht, h = ring.dev, ring.host[ring.current], ring.host_np[ring.current]
        lay, b, n = layout, num_reqs, padded
        ng = len(config.kv_groups)

        def per_group(buf, at, size):
            return tuple(buf[at[g] : at[g] + size] for g in range(ng))

        q_shapes, cache_shapes = [], []
        for grp in config.kv_groups:
            if grp.mla is None:
                q_shapes.append((num_tokens_run, config.num_qo_heads, config.head_dim))
                cache_shapes.append((grp.page_size, config.num_kv_heads, config.head_dim))
            else:
                heads, ckv, kpe = grp.mla.num_heads, grp.mla.head_dim_ckv, grp.mla.head_dim_kpe
                q_shapes.append(((num_tokens_run, heads, ckv), (num_tokens_run, heads, kpe)))
                cache_shapes.append(((grp.page_size, ckv), (grp.page_size, kpe)))

        return cls(
            idx_mapping=d[lay.idx : lay.idx + n],
            qo_indptr=d[lay.qo_indptr : lay.qo_indptr + n + 1],
            seq_lens=d[lay.seq : lay.seq + n],
            positions=buffers.positions[:num_tokens_run],
            input_ids=None if buffers.input_ids is None else buffers.input_ids[:num_tokens_run],
            logits_indices=d[lay.logits : lay.logits + b],
            slot_mappings=tuple(sm[:num_tokens_run] for sm in buffers.slot_mappings),
            kv_indptr=per_group(d, lay.kv_indptr, n + 1),
            kv_indices_full=buffers.kv_indices,
            kv_last_page_len=per_group(d, lay.last_page_len, n),
            batch_block_tables=None
            if buffers.batch_block_tables is None
            else tuple(t[:n, :w] for t, w in zip(buffers.batch_block_tables, widths, strict=True)),
            idx_mapping_host=h[lay.idx : lay.idx + n],
            qo_indptr_host=h[lay.qo_indptr : lay.qo_indptr + n + 1],
            kv_indptr_host=per_group(h, lay.kv_indptr, n + 1),
            kv_last_page_len_host=per_group(h, lay.last_page_len, n),
            qo_indptr_pinned=ht[lay.qo_indptr : lay.qo_indptr + n + 1],
            kv_indptr_pinned=per_group(ht, lay.kv_indptr, n + 1),
            kv_last_page_len_pinned=per_group(ht, lay.last_page_len, n),
            seq_lens_pinned=ht[lay.seq : lay.seq + n],
            page_sizes=tuple(grp.page_size for grp in config.kv_groups),
            window_lefts=tuple(grp.window_left for grp in config.kv_groups),
            sm_scales=tuple(config.sm_scale(g) for g in range(ng)),
            logits_soft_caps=tuple(float(grp.logits_soft_cap) for grp in config.kv_groups),
            mla=tuple(grp.mla for grp in config.kv_groups),
            sharded=tuple(config.sharded(g) for g in range(ng)),
            q_shapes=tuple(q_shapes),
            cache_shapes=tuple(cache_shapes),
            min_pages=config.num_kv_pages,
            q_dtype=config.q_dtype,
            kv_dtype=config.kv_dtype,
            device=buffers.positions.device,
        )


def _check_arg(
    name: str, t: object, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, what: str
) -> None:
    """``t`` is a tensor of ``shape`` (``what`` names its dimensions), ``dtype`` and ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.shape != shape:
        hint = ""
        if t.ndim == len(shape) - 1 and t.shape[-1] == shape[-2] * shape[-1]:
            hint = f" (a flat [..., heads * head_dim] tensor: pass {name}.view(-1, {shape[-2]}, {shape[-1]}))"
        raise ValueError(f"{name}: expected shape {what} = {shape} for this step, got {tuple(t.shape)}{hint}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (config.device), got one on {t.device}")


def _check_cache(
    name: str,
    t: object,
    page_shape: tuple[int, ...],
    min_pages: int,
    dtype: torch.dtype,
    device: torch.device,
    what: str,
    group: int,
) -> None:
    """``t`` is a paged cache ``[num_pages, *page_shape]`` with ``>= min_pages`` pages, ``dtype`` and ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.shape[1:] != page_shape or t.ndim != len(page_shape) + 1:
        hint = ""
        if t.ndim == 4 and len(page_shape) == 3 and (t.shape[1], t.shape[2]) == (page_shape[1], page_shape[0]):
            hint = " (an HND cache? batchmeta's caches are NHD: [num_pages, page_size, num_kv_heads, head_dim])"
        elif t.ndim == len(page_shape) + 1 and t.shape[1] != page_shape[0] and t.shape[2:] == page_shape[1:]:
            hint = f" (KV-cache group {group} has page_size {page_shape[0]})"
        shape = ("num_pages", *page_shape)
        raise ValueError(
            f"{name}: expected shape {what} = ({', '.join(map(str, shape))}) for KV-cache group "
            f"{group}, got {tuple(t.shape)}{hint}"
        )
    if t.shape[0] < min_pages:
        raise ValueError(f"{name}: expected at least config.num_kv_pages ({min_pages}) pages, got {t.shape[0]}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (config.kv_dtype), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (config.device), got one on {t.device}")


def _view(name: str, doc: str) -> property:
    """A property returning ``self._views.<name>``, after checking the step is still the latest."""

    def get(self: Step) -> Any:
        if self._generation != self._clock[0]:
            self._raise_stale(name)
        return getattr(self._views, name)

    get.__name__ = name
    return property(get, doc=doc)


class Step:
    """The metadata of one step: views of :class:`~batchmeta.BatchMetadata`'s preallocated buffers.

    Made by ``prepare_prefill`` / ``prepare_decode`` (not constructed directly: its constructor's
    arguments are internal); valid until the next ``prepare_*`` of the same ``BatchMetadata``, after
    which reading a view, or entering it with ``with step:``, raises :class:`StaleStepError`.
    ``with step:`` makes it :func:`current_step` for the body.

    Sizes: ``B`` = ``num_reqs``; ``Bp`` = ``padded_num_reqs`` (``B`` unless a CUDA-graph decode
    padded the batch); ``T`` = ``num_tokens``; ``Tp`` = the tokens the model runs (``T``, or
    ``Bp * query_len`` in a CUDA graph). Per-group fields are tuples, one entry per KV-cache group.

    Attributes
    ----------
    kind:
        ``"ragged_prefill"`` (nothing cached), ``"prefill"`` (chunked or mixed), ``"decode"`` or
        ``"spec_decode"`` (``1 + k`` tokens per row).
    num_reqs, padded_num_reqs, num_tokens:
        ``B``, ``Bp``, ``T``.
    query_len:
        New tokens per row of a decode step (``1 + num_draft_tokens``); None for prefill.
    cuda_graph:
        Planned for CUDA-graph replay (``BatchMetadata.replay_decode_graph``).
    num_draft_tokens:
        ``k``: the last ``k`` query tokens of every row are drafts (``"spec_decode"``), else 0.
    idx_mapping_host, cache_lens_host:
        ``[B]`` int64 numpy, owned by the step and read-only (valid after later steps too). For a row
        whose cache length is on the device (:attr:`rows_on_device`), ``cache_lens_host`` holds the
        upper bound the engine passed; the device views hold the exact values.

    Device views (FlashInfer's names): ``idx_mapping`` ``[Bp]`` int32 request slot of each row
    (padding rows map to the reserved row); ``qo_indptr`` ``[Bp + 1]`` int32 (padding rows add no
    tokens); ``seq_lens`` ``[Bp]`` int32 (cached + new); ``positions`` ``[Tp]`` int64 (0 past
    ``T``); ``logits_indices`` ``[B]`` int32 (last token of each real row); per group
    ``slot_mappings`` ``[Tp]`` int64 (PAD, -1, past ``T``), ``kv_indptr`` ``[Bp + 1]``,
    ``kv_indices`` ``[kv_indptr[Bp]]``, ``kv_last_page_len`` ``[Bp]`` and ``batch_block_tables``
    ``[Bp, W]`` int32 (each row's pages, padded with 0; ``W`` the longest row's pages, or the full
    table width in a CUDA graph).

    Host twins (numpy int32): ``qo_indptr_host``, ``kv_indptr_host``, ``kv_last_page_len_host``
    (views of the pinned staging buffer) and ``kv_indices_host`` (built on access from the host
    mirror of the block tables).
    """

    __slots__ = (
        "_accepted",
        "_block_tables",
        "_clock",
        "_cp",
        "_generation",
        "_lora",
        "_num_kv_pages",
        "_prompt_lens",
        "_query_lens",
        "_resets",
        "_rows_on_device",
        "_tokens",
        "_views",
        "_wrappers",
        "cache_lens_host",
        "cuda_graph",
        "idx_mapping_host",
        "kind",
        "num_draft_tokens",
        "num_reqs",
        "num_tokens",
        "padded_num_reqs",
        "query_len",
    )

    def __init__(self, *internal: Any):
        # Internal, in this order (BatchMetadata._prepare): kind, num_reqs, padded_num_reqs, num_tokens,
        # query_len (int | None), cuda_graph, idx_mapping_host, cache_lens_host (numpy), query_lens (numpy |
        # None), num_kv_pages (per group), views (StepViews), wrappers (tuple | None), clock (list[int]),
        # block_tables (BlockTables), rows_on_device (numpy | None: rows whose cache length is on the device).
        (
            kind,
            num_reqs,
            padded_num_reqs,
            num_tokens,
            query_len,
            cuda_graph,
            idx_mapping_host,
            cache_lens_host,
            query_lens,
            num_kv_pages,
            views,
            wrappers,
            clock,
            block_tables,
            rows_on_device,
        ) = internal
        self.kind = kind
        self.num_reqs = num_reqs
        self.padded_num_reqs = padded_num_reqs
        self.num_tokens = num_tokens
        self.query_len = query_len
        self.cuda_graph = cuda_graph
        # The step's own copies: read-only, so neither the engine nor accept_tokens' caller can change them.
        idx_mapping_host.setflags(write=False)  # setflags: half the cost of .flags.writeable, every step
        cache_lens_host.setflags(write=False)
        if query_lens is not None:
            query_lens.setflags(write=False)
        self.idx_mapping_host = idx_mapping_host
        self.cache_lens_host = cache_lens_host
        self._query_lens = query_lens
        self._num_kv_pages = num_kv_pages
        self._views = views
        self._wrappers = wrappers
        self._clock = clock  # the owner's generation counter: [number of the latest step]
        self._generation = clock[0]
        self._block_tables = block_tables
        self._resets = block_tables.num_resets
        self._tokens: list[contextvars.Token] = []
        self.num_draft_tokens = query_len - 1 if kind == "spec_decode" else 0  # type: ignore[operator]
        if rows_on_device is not None:
            rows_on_device.setflags(write=False)
        self._rows_on_device = rows_on_device
        self._accepted = False  # accept_tokens ran on it (once per step)
        self._prompt_lens: np.ndarray | None = None  # given to accept_tokens (write_drafts reads them)
        self._lora: Any = None  # LoraViews, set by BatchMetadata when config.max_loras > 0
        # Context parallelism (batchmeta.context_parallel): (CPAttention, {group: CPGroupStep}), set by
        # BatchMetadata when a group is sharded.
        self._cp: Any = None

    # Context manager: the active step --------------------------------------------------------------
    def __enter__(self) -> Step:
        if self._generation != self._clock[0]:
            self._raise_stale("__enter__")
        self._tokens.append(_current.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._tokens.pop())

    def __repr__(self) -> str:
        return (
            f"Step(kind={self.kind!r}, num_reqs={self.num_reqs}, padded_num_reqs={self.padded_num_reqs}, "
            f"num_tokens={self.num_tokens}, query_len={self.query_len}, cuda_graph={self.cuda_graph})"
        )

    @property
    def is_stale(self) -> bool:
        """Whether a later ``prepare_*`` has overwritten this step's views."""
        return self._generation != self._clock[0]

    def _raise_stale(self, what: str) -> None:
        raise StaleStepError(
            f"step.{what}: this {self.kind} step's buffers were overwritten by a later prepare_* of the same "
            f"BatchMetadata (step {self._generation}, latest {self._clock[0]}); read a step's views before preparing "
            f"the next one (its idx_mapping_host, cache_lens_host and query_lens_host stay valid)"
        )

    # Owned host arrays ------------------------------------------------------------------------------
    @property
    def rows_on_device(self) -> np.ndarray:
        """``[B]`` bool: rows whose cache length the step read on the device (after ``accept_tokens``
        with device counts). Their host twins (``cache_lens_host``, ``seq_lens_host``, ``*_host``
        arrays, the planned wrappers' lengths) are upper bounds; the device views are exact."""
        if self._rows_on_device is None:
            return np.zeros(self.num_reqs, bool)
        return self._rows_on_device != 0

    @property
    def query_lens_host(self) -> np.ndarray:
        """``[B]`` int64 new tokens per row (owned by the step)."""
        if self._query_lens is None:
            return np.full(self.num_reqs, self.query_len, np.int64)
        return self._query_lens

    @property
    def seq_lens_host(self) -> np.ndarray:
        """``[B]`` int64 cached + new tokens per row (owned by the step)."""
        return self.cache_lens_host + self.query_lens_host

    # Views of the shared buffers (checked) ----------------------------------------------------------
    idx_mapping = _view("idx_mapping", "``[Bp]`` int32 device: request slot of each batch row.")
    qo_indptr = _view("qo_indptr", "``[Bp + 1]`` int32 device: prefix sum of new tokens per row.")
    seq_lens = _view(
        "seq_lens",
        "``[Bp]`` int32 device: cached + new tokens per row (global lengths also under context parallelism: "
        "a rank's local KV lengths are in kv_indptr / kv_last_page_len).",
    )
    positions = _view("positions", "``[Tp]`` int64 device: position of each new token (0 past ``T``).")
    logits_indices = _view("logits_indices", "``[B]`` int32 device: last new token of each real row.")
    slot_mappings = _view("slot_mappings", "Per group ``[Tp]`` int64 device: KV slot of each token (PAD past T).")
    kv_indptr = _view("kv_indptr", "Per group ``[Bp + 1]`` int32 device: prefix sum of pages per row.")
    kv_last_page_len = _view("kv_last_page_len", "Per group ``[Bp]`` int32 device: tokens in each row's last page.")

    @property
    def input_ids(self) -> torch.Tensor:
        """``[Tp]`` int64 device: each new token's id, gathered from the token history at its
        position by the step's launch (after the prompts staged before it); 0 past ``T``. Built
        only with ``MetadataConfig(token_history=True)``."""
        if self._generation != self._clock[0]:
            self._raise_stale("input_ids")
        ids = self._views.input_ids
        if ids is None:
            raise ValueError("input_ids: not built; make the BatchMetadata with MetadataConfig(token_history=True)")
        return ids

    @property
    def lora(self) -> Any:
        """The step's multi-LoRA metadata (:class:`~batchmeta.lora.LoraViews`): tokens sorted by
        adapter, segments (SGMV form), adapter per token and row (BGMV form), vLLM's names. Built
        only with ``MetadataConfig(max_loras=...)``."""
        if self._generation != self._clock[0]:
            self._raise_stale("lora")
        if self._lora is None:
            raise ValueError(
                "lora: not built; make the BatchMetadata with MetadataConfig(max_loras=..., max_lora_rank=...)"
            )
        return self._lora

    @property
    def batch_block_tables(self) -> tuple[torch.Tensor, ...]:
        """Per group ``[Bp, W]`` int32 device: each row's pages, 0-padded (``W`` the longest row's
        pages, or the table width in a CUDA graph). Built only with
        ``MetadataConfig(batch_block_tables=True)``."""
        if self._generation != self._clock[0]:
            self._raise_stale("batch_block_tables")
        tables = self._views.batch_block_tables
        if tables is None:
            raise ValueError(
                "batch_block_tables: not built; make the BatchMetadata with "
                "MetadataConfig(batch_block_tables=True) to have them every step"
            )
        return tables

    qo_indptr_host = _view("qo_indptr_host", "``[Bp + 1]`` int32 numpy twin of ``qo_indptr``.")
    kv_indptr_host = _view("kv_indptr_host", "Per group ``[Bp + 1]`` int32 numpy twin of ``kv_indptr``.")
    kv_last_page_len_host = _view("kv_last_page_len_host", "Per group ``[Bp]`` int32 numpy twin of kv_last_page_len.")

    @property
    def kv_indices(self) -> tuple[torch.Tensor, ...]:
        """Per group ``[kv_indptr[Bp]]`` int32 device: every row's pages, back to back."""
        if self._generation != self._clock[0]:
            self._raise_stale("kv_indices")
        return tuple(buf[:n] for buf, n in zip(self._views.kv_indices_full, self._num_kv_pages, strict=True))

    @property
    def kv_indices_host(self) -> tuple[np.ndarray, ...]:
        """Per group ``[kv_indptr[Bp]]`` int32 numpy twin of ``kv_indices``, built from the host mirror of
        the block tables (valid until a request slot is reset: pages a reset frees may be reused)."""
        if self._generation != self._clock[0]:
            self._raise_stale("kv_indices_host")
        bt = self._block_tables
        if bt.num_resets != self._resets:
            raise StaleStepError(
                "step.kv_indices_host: a request slot was reset since this step was prepared; read it before resetting"
            )
        rows = self._views.idx_mapping_host
        out = []
        for g, indptr in enumerate(self._views.kv_indptr_host):
            table = bt.host_table(g)[rows]
            out.append(table[np.arange(table.shape[1]) < np.diff(indptr)[:, None]])
        return tuple(out)

    @property
    def wrappers(self) -> tuple[Any, ...] | None:
        """The planned FlashInfer wrapper of each group, or None where FlashInfer does not plan (no CUDA, no
        FlashInfer, or ``plan_attention=False``). :meth:`attention` works either way. A group sharded
        over context-parallel ranks has None here: its attention runs in two parts, each planned
        per step (:class:`~batchmeta.context_parallel.CPGroupStep`)."""
        if self._generation != self._clock[0]:
            self._raise_stale("wrappers")
        return self._wrappers

    @property
    def page_sizes(self) -> tuple[int, ...]:
        return self._views.page_sizes

    @property
    def window_lefts(self) -> tuple[int, ...]:
        return self._views.window_lefts

    @property
    def sm_scales(self) -> tuple[float, ...]:
        """Per group, the softmax scale its attention uses (``KVGroup.sm_scale`` or ``1/sqrt(head_dim)``)."""
        return self._views.sm_scales

    @property
    def logits_soft_caps(self) -> tuple[float, ...]:
        """Per group, the logits soft cap its attention uses (0: none)."""
        return self._views.logits_soft_caps

    def _check_group(self, group: object, mla: bool) -> int:
        groups = self._views.mla
        if (
            isinstance(group, (bool, np.bool_))
            or not isinstance(group, (int, np.integer))
            or not 0 <= group < len(groups)
        ):
            raise ValueError(f"group: expected a KV-cache group in [0, {len(groups)}), got {group!r}")
        if mla != (groups[group] is not None):
            what = "an MLA group: call step.mla_attention" if groups[group] is not None else "not an MLA group"
            raise ValueError(f"group: KV-cache group {group} is {what}")
        return int(group)

    def attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        *,
        group: int = 0,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        k_scale: float | None = None,
        v_scale: float | None = None,
        out: torch.Tensor | None = None,
        cp_group: Any = None,
    ) -> torch.Tensor:
        """Attention of this step's queries over one layer of KV-cache group ``group``.

        Runs the group's planned FlashInfer wrapper, or the torch implementation where none is
        planned, with the group's ``sm_scale``, ``logits_soft_cap`` and window. Write the step's
        keys and values first (``batchmeta.ops.store_kv`` at ``slot_mappings[group]``). A
        ``"ragged_prefill"`` step attends over ``k`` / ``v`` (the new tokens, ``[T, Hkv, D]``,
        unquantized) instead of the cache.

        A group sharded over context-parallel ranks (:mod:`batchmeta.context_parallel`) needs
        ``k`` / ``v`` at every step kind: each rank attends over its share of the cached context,
        rank 0 also over the new tokens (causally), and the partials merge by log-sum-exp through
        the process group; every rank returns the whole merged output. A collective: every rank
        calls it for the same layers in the same order.

        Parameters
        ----------
        q:
            ``[Tp, Hq, D]``.
        k_cache, v_cache:
            ``[num_pages, page_size, Hkv, D]`` of this layer (NHD).
        k, v:
            ``[T, Hkv, D]``: the step's new keys and values, in ``q``'s dtype (or, outside sharded
            groups, the cache's). Used by ``"ragged_prefill"`` steps and by sharded groups; ignored
            otherwise.
        k_scale, v_scale:
            This layer's dequantization scales of a float8 cache: the ones ``store_kv`` quantized
            with (FlashInfer folds ``k_scale`` into the logit scale and multiplies the output by
            ``v_scale``). None: 1.
        out:
            Optional ``[Tp, Hq, D]`` output.
        cp_group:
            A sharded group's process group (NCCL on GPUs, gloo on CPUs); None: the one given to
            ``BatchMetadata(config, cp_group=...)``, else the world.

        Returns ``[Tp, Hq, D]`` in ``q``'s dtype.

        Raises
        ------
        TypeError, ValueError
            Before any work, naming the argument, when a tensor's shape, dtype or device differs
            from what the config and the step say (``q``: ``config.q_dtype``; caches:
            ``config.kv_dtype``, the group's ``page_size``, at least ``config.num_kv_pages`` pages),
            when ``k`` / ``v`` are missing where needed, or (``cp_group``) when the process group
            does not match ``config.context_parallel``.
        """
        if self._generation != self._clock[0]:
            self._raise_stale("attention")
        group = self._check_attention_args(q, k_cache, v_cache, group, k, v, out)
        views = self._views
        if views.sharded[group]:
            ragged = self.kind == "ragged_prefill"
            cp_state = self._cp[0]
            # Nothing cached: every rank attends over the new tokens alone, and no collective runs.
            pg = (
                None
                if ragged
                else cp_process_group(cp_group if cp_group is not None else cp_state.cp_group, cp_state.cp)
            )
            res, lse = self._cp_partial(
                group, q, k_cache, v_cache, k, v, k_scale, v_scale, ragged or cp_state.cp.rank == 0
            )
            if not ragged:
                res = cp_lse_ag_out_ar(res, lse, pg)
            if out is not None:
                out.copy_(res)
                return out
            return res
        if self._wrappers is not None:
            w = self._wrappers[group]
            if self.kind == "ragged_prefill":
                return w.run(q, k, v, out=out)
            return w.run(q, (k_cache, v_cache), k_scale=k_scale, v_scale=v_scale, out=out)
        if self.kind == "ragged_prefill":  # the new tokens are the whole KV: attend over them, not the cache
            k_cache, v_cache = k.unsqueeze(1), v.unsqueeze(1)  # type: ignore[union-attr]
            kv_indptr, indices = views.qo_indptr_host, torch.arange(k_cache.shape[0], device=q.device)
            last, k_scale, v_scale = np.ones(self.padded_num_reqs, np.int32), None, None
        elif self._rows_on_device is not None:
            # Lengths on the device: the host arrays are bounds; read the exact ones (this torch
            # reference path reads the device, a sync on CUDA).
            kv_indptr, last = (t.cpu().numpy() for t in (views.kv_indptr[group], views.kv_last_page_len[group]))
            indices = views.kv_indices_full[group][: int(kv_indptr[-1])]
        else:
            kv_indptr, indices = views.kv_indptr_host[group], self.kv_indices[group]
            last = views.kv_last_page_len_host[group]
        res = paged_attention_torch(
            q,
            k_cache,
            v_cache,
            views.qo_indptr_host,
            kv_indptr,
            indices,
            last,
            causal=True,
            window_left=views.window_lefts[group],
            sm_scale=views.sm_scales[group],
            logits_soft_cap=views.logits_soft_caps[group],
            k_scale=k_scale,
            v_scale=v_scale,
        )
        if out is not None:
            out.copy_(res)
            return out
        return res

    def cp_partial_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        *,
        group: int = 0,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        k_scale: float | None = None,
        v_scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's partial attention of a sharded group, without any collective.

        Part A (this rank's share of the cached context, no mask) and, on rank 0, part B (the new
        tokens ``k`` / ``v``, causal), merged: ``ops.correct_attn_out`` over every rank's partial and
        a sum give :meth:`attention`'s output (what ``cp_lse_ag_out_ar`` does through the group).
        One process can so simulate the ranks, a ``BatchMetadata`` per rank. Arguments as for
        :meth:`attention`.

        Returns
        -------
        ``(out, lse)``: ``[T, Hq, D]`` in ``q``'s dtype and ``[T, Hq]`` float32, natural log; -inf
        (and ``out`` 0) for a token that saw no key on this rank.

        Raises
        ------
        TypeError, ValueError
            As :meth:`attention`; ``group`` when the group is not sharded.
        """
        if self._generation != self._clock[0]:
            self._raise_stale("cp_partial_attention")
        group = self._check_attention_args(q, k_cache, v_cache, group, k, v, None)
        if not self._views.sharded[group]:
            raise ValueError(f"group: KV-cache group {group} is not sharded over context-parallel ranks")
        rank0 = self._cp[0].cp.rank == 0
        return self._cp_partial(group, q, k_cache, v_cache, k, v, k_scale, v_scale, rank0)

    def _cp_partial(
        self, group: int, q, k_cache, v_cache, k, v, k_scale, v_scale, with_new: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        views = self._views
        return partial_attention(
            self._cp[1][group],
            self.kind,
            q,
            k_cache,
            v_cache,
            k,
            v,
            views.qo_indptr_host,
            with_new=with_new,
            sm_scale=views.sm_scales[group],
            logits_soft_cap=views.logits_soft_caps[group],
            k_scale=k_scale,
            v_scale=v_scale,
            backend=self._cp[0].config.backend,
        )

    def _check_attention_args(self, q, k_cache, v_cache, group: object, k, v, out) -> int:
        """Checks :meth:`attention`'s tensors (see there); returns the group."""
        group = self._check_group(group, mla=False)
        views = self._views
        q_shape, dev = views.q_shapes[group], views.device
        _check_arg("q", q, q_shape, views.q_dtype, dev, "[tokens, num_qo_heads, head_dim]")
        page_shape, min_pages = views.cache_shapes[group], views.min_pages
        what = "[num_pages, page_size, num_kv_heads, head_dim]"
        _check_cache("k_cache", k_cache, page_shape, min_pages, views.kv_dtype, dev, what, group)
        _check_cache("v_cache", v_cache, page_shape, min_pages, views.kv_dtype, dev, what, group)
        if out is not None:
            _check_arg("out", out, q_shape, q.dtype, dev, "[tokens, num_qo_heads, head_dim]")
        sharded = views.sharded[group]
        if self.kind == "ragged_prefill" or sharded:
            if k is None or v is None:
                why = (
                    f"KV-cache group {group} is sharded over context-parallel ranks: its attention needs the "
                    f"step's new keys and values beside the cached context"
                    if sharded
                    else "a ragged_prefill step attends over the new keys and values"
                )
                raise ValueError(f"k, v: {why}; pass both")
            kv_shape = (q_shape[0], *page_shape[1:])
            what = "[tokens, num_kv_heads, head_dim]"
            # The new keys and values, unquantized (q's dtype) or in the cache's; a sharded group's
            # attend beside the cache with no scale (its part over them is planned in q's dtype).
            k_dtype = k.dtype if getattr(k, "dtype", None) in (views.q_dtype, views.kv_dtype) else views.q_dtype
            if sharded:
                k_dtype = views.q_dtype
            _check_arg("k", k, kv_shape, k_dtype, dev, what)
            _check_arg("v", v, kv_shape, k_dtype, dev, what)
        return group

    def mla_attention(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        ckv_cache: torch.Tensor,
        kpe_cache: torch.Tensor,
        *,
        group: int = 0,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MLA of this step's queries over one layer of MLA group ``group`` (absorbed form).

        Runs the group's planned ``BatchMLAPagedAttentionWrapper``, or the torch implementation
        where none is planned. Write the step's latents first (``batchmeta.ops.store_mla_kv`` at
        ``slot_mappings[group]``); every step kind, ``"ragged_prefill"`` included, reads the cache.

        Parameters
        ----------
        q_nope, q_pe:
            ``[Tp, num_heads, head_dim_ckv]`` and ``[Tp, num_heads, head_dim_kpe]``.
        ckv_cache, kpe_cache:
            ``[num_pages, page_size, head_dim_ckv]`` and ``[num_pages, page_size, head_dim_kpe]``.
        out:
            Optional ``[Tp, num_heads, head_dim_ckv]`` output.

        Returns ``[Tp, num_heads, head_dim_ckv]`` in ``q_nope``'s dtype.

        Raises
        ------
        TypeError, ValueError
            Before any work, naming the argument, when a tensor's shape, dtype or device differs
            from what the config and the step say (as for :meth:`attention`).
        """
        if self._generation != self._clock[0]:
            self._raise_stale("mla_attention")
        group = self._check_group(group, mla=True)
        views = self._views
        (nope_shape, pe_shape), (ckv_shape, kpe_shape) = views.q_shapes[group], views.cache_shapes[group]
        dev, min_pages = views.device, views.min_pages
        _check_arg("q_nope", q_nope, nope_shape, views.q_dtype, dev, "[tokens, num_heads, head_dim_ckv]")
        _check_arg("q_pe", q_pe, pe_shape, views.q_dtype, dev, "[tokens, num_heads, head_dim_kpe]")
        _check_cache(
            "ckv_cache",
            ckv_cache,
            ckv_shape,
            min_pages,
            views.kv_dtype,
            dev,
            "[num_pages, page_size, head_dim_ckv]",
            group,
        )
        _check_cache(
            "kpe_cache",
            kpe_cache,
            kpe_shape,
            min_pages,
            views.kv_dtype,
            dev,
            "[num_pages, page_size, head_dim_kpe]",
            group,
        )
        if out is not None:
            _check_arg("out", out, nope_shape, q_nope.dtype, dev, "[tokens, num_heads, head_dim_ckv]")
        if self._wrappers is not None:
            return mla_run(self._wrappers[group], q_nope, q_pe, ckv_cache, kpe_cache, out)
        kv_indptr, last = views.kv_indptr_host[group], views.kv_last_page_len_host[group]
        indices = self.kv_indices[group]
        if self._rows_on_device is not None:  # exact lengths on the device (see attention)
            kv_indptr, last = (t.cpu().numpy() for t in (views.kv_indptr[group], views.kv_last_page_len[group]))
            indices = views.kv_indices_full[group][: int(kv_indptr[-1])]
        res = mla_attention_torch(
            q_nope,
            q_pe,
            ckv_cache,
            kpe_cache,
            views.qo_indptr_host,
            kv_indptr,
            indices,
            last,
            sm_scale=views.sm_scales[group],
        )
        if out is not None:
            out.copy_(res)
            return out
        return res
