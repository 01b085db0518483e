"""``BatchMetadata``: the object a model runner makes once and calls every step.

Per step, ``prepare_prefill`` / ``prepare_decode``:

1. validate the scheduler's host-side batch (before anything is written);
2. compute the small arrays with numpy into a pinned staging buffer (``qo_indptr``, per-group
   ``kv_indptr`` / ``kv_last_page_len``, ``logits_indices``, the staged block-table writes);
3. copy that buffer to the device in one transfer and apply the staged block-table writes with one
   kernel;
4. launch the metadata kernels (positions and slot mappings for every group in one launch,
   ``kv_indices`` per group, the per-step block table for every group in one launch);
5. plan FlashInfer once per KV-cache group with the host arrays (no device→host sync).

CUDA-graph padding policy (decode): a batch of ``B`` rows is padded to the next captured size
``Bp``. Padded rows use a reserved extra row of every block table that holds ``padding_page``; each
has one cached token (never 0 tokens, which some kernels turn into NaN or illegal accesses), reads
that page, and has no new token in the slot mappings: every slot from the step's token count to the
end of the buffer is PAD (-1), so ``store_kv`` writes nothing for them. Their outputs are garbage
and must be ignored (``logits_indices`` only covers real rows).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np
import torch

from batchmeta import ops
from batchmeta.attention import (
    DecodePlanner,
    activate_step,
    flashinfer_available,
    get_workspace,
    new_decode_wrapper,
    new_paged_prefill_wrapper,
    new_ragged_prefill_wrapper,
    paged_attention_torch,
)
from batchmeta.config import MetadataConfig
from batchmeta.ops._common import check_tensor

__all__ = ["BatchMetadata", "BlockTables", "Step"]

_I32_MAX = 2**31 - 1


def _host_ints(name: str, value: object, *, length: int | None = None) -> np.ndarray:
    """Host-side integer vector (list, numpy array or CPU tensor) as int64 numpy, validated."""
    if type(value) is not np.ndarray:
        if isinstance(value, torch.Tensor):
            if value.device.type != "cpu":
                raise ValueError(f"{name}: expected host data (list, numpy array or CPU tensor), got a tensor on "
                                 f"{value.device}")  # fmt: skip
            value = value.numpy()
        value = np.asarray(value)
    arr: np.ndarray = value  # type: ignore[assignment]
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected 1 dimension, got shape {arr.shape}")
    if arr.dtype.kind not in "iu" and arr.size:  # not bool, not float: a float list must not be truncated
        raise TypeError(f"{name}: expected integers, got dtype {arr.dtype}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name}: expected {length} elements (one per batch row), got {arr.shape[0]}")
    return arr if arr.dtype == np.int64 else arr.astype(np.int64)


@attrs.define(eq=False)
class BlockTables:
    """Persistent per-request block tables, one per KV-cache group, with writes staged on the host.

    ``append`` and ``reset`` change a host mirror at once (so validation sees them) and stage the
    device writes; the next ``prepare_*`` applies every staged write with one host→device copy and
    one kernel. Row ``max_num_reqs`` of every table is reserved for CUDA-graph padding rows.

    Attributes
    ----------
    tables:
        Per group, ``[max_num_reqs + 1, ceil(max_model_len / page_size)]`` int32 device tensors.
    num_blocks:
        Per group, ``[max_num_reqs + 1]`` int32 device tensors: pages held by each request slot.
    """

    config: MetadataConfig
    flat: torch.Tensor = attrs.field(init=False)
    tables: tuple[torch.Tensor, ...] = attrs.field(init=False)
    num_blocks: tuple[torch.Tensor, ...] = attrs.field(init=False)
    _host_tables: list[np.ndarray] = attrs.field(init=False)
    _host_num_blocks: np.ndarray = attrs.field(init=False)
    _table_base: list[int] = attrs.field(init=False)
    _num_blocks_base: int = attrs.field(init=False)
    _staged: dict[int, int] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        cfg = self.config
        rows = cfg.max_num_reqs + 1
        widths = [cfg.max_pages_per_req(g) for g in range(len(cfg.kv_groups))]
        self._table_base = list(np.cumsum([0] + [rows * w for w in widths])[:-1])
        self._num_blocks_base = sum(rows * w for w in widths)
        total = self._num_blocks_base + rows * len(widths)  # < 2^31: checked by MetadataConfig
        self.flat = torch.zeros(total, dtype=torch.int32, device=cfg.device)
        self.tables = tuple(
            self.flat[b : b + rows * w].view(rows, w) for b, w in zip(self._table_base, widths, strict=True)
        )
        self.num_blocks = tuple(
            self.flat[self._num_blocks_base + g * rows : self._num_blocks_base + (g + 1) * rows]
            for g in range(len(widths))
        )
        self._host_tables = [np.zeros((rows, w), np.int32) for w in widths]
        self._host_num_blocks = np.zeros((len(widths), rows), np.int64)
        # The padding row: one page, the padding page, in every group.
        for g in range(len(widths)):
            self._write(g, cfg.max_num_reqs, 0, [cfg.padding_page])
            self._set_count(g, cfg.max_num_reqs, 1)

    @property
    def num_groups(self) -> int:
        return len(self.tables)

    def pages(self, req_idx: int, group: int = 0) -> np.ndarray:
        """The pages request slot ``req_idx`` holds in ``group`` (host mirror, staged writes included)."""
        return self._host_tables[group][req_idx, : self._host_num_blocks[group, req_idx]].copy()

    def num_pages(self, req_idx: int, group: int = 0) -> int:
        return int(self._host_num_blocks[group, req_idx])

    def _check_slot(self, req_idx: object) -> int:
        if isinstance(req_idx, bool) or not isinstance(req_idx, (int, np.integer)):
            raise TypeError(f"req_idx: expected an int, got {type(req_idx).__name__}")
        if not 0 <= req_idx < self.config.max_num_reqs:
            raise ValueError(f"req_idx: expected a request slot in [0, {self.config.max_num_reqs}), got {req_idx}")
        return int(req_idx)

    def append(self, req_idx: int, new_pages: Sequence[int] | Sequence[Sequence[int]]) -> None:
        """Adds pages to the end of request slot ``req_idx``'s rows.

        Parameters
        ----------
        req_idx:
            Request slot in ``[0, max_num_reqs)``.
        new_pages:
            With one group, a sequence of page ids; with several, one sequence per group.
        """
        req = self._check_slot(req_idx)
        per_group = self._per_group(new_pages)
        cfg = self.config
        for g, pages in enumerate(per_group):
            have = self._host_num_blocks[g, req]
            width = self._host_tables[g].shape[1]
            if have + len(pages) > width:
                raise ValueError(
                    f"new_pages: request slot {req} would hold {have + len(pages)} pages in group {g}, "
                    f"more than the {width} that max_model_len ({cfg.max_model_len}) needs"
                )
            upper = cfg.num_kv_pages or _I32_MAX + 1
            if len(pages) and (pages.min() < 0 or pages.max() >= upper):
                raise ValueError(f"new_pages: page ids must be in [0, {upper}), got {pages.min()}..{pages.max()}")
        for g, pages in enumerate(per_group):
            have = int(self._host_num_blocks[g, req])
            self._write(g, req, have, pages)
            self._set_count(g, req, have + len(pages))

    def reset(self, req_idx: int) -> None:
        """Request slot ``req_idx`` finished: it holds no pages in any group."""
        req = self._check_slot(req_idx)
        for g in range(self.num_groups):
            self._set_count(g, req, 0)

    def _per_group(self, new_pages: object) -> list[np.ndarray]:
        groups = self.num_groups
        if isinstance(new_pages, torch.Tensor):
            if new_pages.device.type != "cpu":
                raise ValueError(f"new_pages: expected host data, got a tensor on {new_pages.device}")
            new_pages = new_pages.numpy()
        if isinstance(new_pages, np.ndarray) and new_pages.ndim == 1:
            new_pages = [new_pages] if groups == 1 else list(new_pages)
        seq = list(new_pages)  # type: ignore[call-overload]
        if groups == 1 and seq and all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in seq):
            seq = [seq]
        if len(seq) != groups:
            raise ValueError(f"new_pages: expected one sequence of pages per group ({groups}), got {len(seq)}")
        out = []
        for g, pages in enumerate(seq):
            arr = pages.numpy() if isinstance(pages, torch.Tensor) else np.asarray(pages)
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                raise TypeError(f"new_pages[{g}]: expected a sequence of int page ids, got {pages!r}")
            out.append(arr.astype(np.int64))
        return out

    def _write(self, g: int, req: int, col: int, pages: Sequence[int] | np.ndarray) -> None:
        pages = np.asarray(pages, dtype=np.int64)
        width = self._host_tables[g].shape[1]
        self._host_tables[g][req, col : col + len(pages)] = pages
        start = self._table_base[g] + req * width + col
        self._staged.update(zip(range(start, start + len(pages)), pages.tolist(), strict=True))

    def _set_count(self, g: int, req: int, n: int) -> None:
        self._host_num_blocks[g, req] = n
        self._staged[self._num_blocks_base + g * (self.config.max_num_reqs + 1) + req] = n

    def take_staged(self) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, values) of every staged write into :attr:`flat`, forgotten once taken."""
        if not self._staged:
            return np.zeros(0, np.int32), np.zeros(0, np.int32)
        offsets = np.fromiter(self._staged.keys(), np.int32, len(self._staged))
        values = np.fromiter(self._staged.values(), np.int32, len(self._staged))
        self._staged.clear()
        return offsets, values


class _StepViews:
    """The tensor and array views one step shape reads (made once per shape and ring slot, reused:
    a torch slice costs about a microsecond and a step needs dozens)."""

    __slots__ = (
        "block_tables", "idx_mapping", "kv_indices_full", "kv_indptr", "kv_indptr_host", "kv_indptr_pinned",
        "kv_last_page_len", "kv_last_page_len_host", "kv_last_page_len_pinned", "logits_indices", "page_sizes",
        "positions", "qo_indptr_host", "qo_indptr_pinned", "query_start_loc", "seq_lens", "seq_lens_pinned",
        "slot_mappings", "window_lefts",
    )  # fmt: skip

    def __init__(self, **views: Any):
        for k, v in views.items():
            setattr(self, k, v)


@attrs.frozen(eq=False)
class Step:
    """The metadata of one step: views of :class:`BatchMetadata`'s buffers, valid until the next
    ``prepare_*`` (the ``*_lens_host`` / ``idx_mapping_host`` arrays are the step's own).

    ``B`` is ``num_reqs``, ``Bp`` is ``padded_num_reqs`` (``B`` unless a CUDA-graph decode), ``T``
    is ``num_tokens`` and ``Tp`` the tokens the model runs (``T``, or ``Bp * (1 + k)`` in a graph).

    Device views (properties): ``idx_mapping`` ``[Bp]`` int32 (padding rows map to the reserved
    row); ``query_start_loc`` ``[Bp + 1]`` int32 == FlashInfer ``qo_indptr`` (padding rows add no
    tokens); ``seq_lens`` ``[Bp]`` int32 (cached + new); ``positions`` ``[Tp]`` int64 (0 past
    ``T``); ``logits_indices`` ``[B]`` int32 (last token of each real row); and per group
    ``slot_mappings`` ``[Tp]`` int64 (PAD past ``T``), ``kv_indptr`` ``[Bp + 1]``, ``kv_indices``
    ``[kv_indptr[Bp]]``, ``kv_last_page_len`` ``[Bp]`` and ``block_tables`` ``[Bp, W]`` int32
    (rows padded with 0; ``W`` the step's longest row, or the full width in a graph).

    Host views (numpy int32, of the pinned staging buffer): ``qo_indptr_host`` ``[Bp + 1]``, per
    group ``kv_indptr_host`` ``[Bp + 1]`` and ``kv_last_page_len_host`` ``[Bp]``.
    """

    kind: str  # "prefill", "ragged_prefill", "decode", "spec_decode"
    num_reqs: int
    padded_num_reqs: int
    num_tokens: int
    query_len: int | None  # decode: 1 + k; prefill: None
    cuda_graph: bool
    idx_mapping_host: np.ndarray  # [B] int64, owned by the step (valid after later steps too)
    cache_lens_host: np.ndarray  # [B] int64, owned by the step
    _query_lens: np.ndarray | None  # [B] int64 for prefill; None for decode (query_len each)
    _num_kv_pages: tuple[int, ...]  # per group kv_indptr[Bp]
    _views: _StepViews
    wrappers: tuple[Any, ...] | None  # planned FlashInfer wrapper per group (None without FlashInfer)

    @property
    def query_lens_host(self) -> np.ndarray:
        """``[B]`` int64 new tokens per row (owned by the step)."""
        if self._query_lens is None:
            return np.full(self.num_reqs, self.query_len, np.int64)
        return self._query_lens

    @property
    def kv_indices(self) -> tuple[torch.Tensor, ...]:
        return tuple(buf[:n] for buf, n in zip(self._views.kv_indices_full, self._num_kv_pages, strict=True))

    idx_mapping = property(lambda self: self._views.idx_mapping)
    query_start_loc = property(lambda self: self._views.query_start_loc)
    seq_lens = property(lambda self: self._views.seq_lens)
    positions = property(lambda self: self._views.positions)
    logits_indices = property(lambda self: self._views.logits_indices)
    slot_mappings = property(lambda self: self._views.slot_mappings)
    kv_indptr = property(lambda self: self._views.kv_indptr)
    kv_last_page_len = property(lambda self: self._views.kv_last_page_len)
    block_tables = property(lambda self: self._views.block_tables)
    qo_indptr_host = property(lambda self: self._views.qo_indptr_host)
    kv_indptr_host = property(lambda self: self._views.kv_indptr_host)
    kv_last_page_len_host = property(lambda self: self._views.kv_last_page_len_host)
    page_sizes = property(lambda self: self._views.page_sizes)
    window_lefts = property(lambda self: self._views.window_lefts)

    def attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        *,
        group: int = 0,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of this step's queries over a layer of ``group``, with the planned wrapper.

        Write the step's keys and values first (``batchmeta.ops.store_kv`` at
        ``slot_mappings[group]``). A ``"ragged_prefill"`` step attends over ``k``/``v`` (the new
        tokens, ``[T, Hkv, D]``) instead of the cache.

        Parameters
        ----------
        q:
            ``[Tp, Hq, D]``.
        k_cache, v_cache:
            ``[num_pages, page_size, Hkv, D]`` of this layer.
        """
        if self.kind == "ragged_prefill" and (k is None or v is None):
            raise ValueError("k, v: a ragged_prefill step attends over the new keys and values; pass both")
        if self.wrappers is not None:
            w = self.wrappers[group]
            if self.kind == "ragged_prefill":
                return w.run(q, k, v, out=out)
            return w.run(q, (k_cache, v_cache), out=out)
        res = paged_attention_torch(
            q, k_cache, v_cache, self.qo_indptr_host, self.kv_indptr_host[group], self.kv_indices[group],
            self.kv_last_page_len_host[group], causal=True, window_left=self.window_lefts[group],
        )  # fmt: skip
        if out is not None:
            out.copy_(res)
            return out
        return res


class _PinnedRing:
    """Two host staging buffers (pinned on CUDA), filled in turn and copied to one device buffer.

    A host buffer is reused only after the transfer that last read it has finished (an event
    query; in steady state always true, since the engine has synced on the step's sampled tokens).
    ``memo[slot]`` lets the caller remember what a slot already holds.
    """

    def __init__(self, numel: int, device: torch.device):
        pin = device.type == "cuda"
        self.host = [torch.zeros(numel, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self.host_np = [h.numpy() for h in self.host]
        self.events = [torch.cuda.Event() if pin else None for _ in range(2)]
        self.dev = torch.zeros(numel, dtype=torch.int32, device=device)
        self.slot = 0
        self.memo: list[Any] = [None, None]
        self._device_index = device.index if pin else None
        self._stream: Any = None
        self._stream_raw = None
        self._copies: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def next(self) -> np.ndarray:
        """Switches to the other host buffer (waiting for its last transfer if needed); returns it."""
        self.slot ^= 1
        ev = self.events[self.slot]
        if ev is not None and not ev.query():
            ev.synchronize()  # the transfer of two uses ago is still pending: never in steady state
        return self.host_np[self.slot]

    def upload(self, end: int, start: int = 0) -> torch.Tensor:
        """Copies elements ``[start, end)`` of the current host buffer to the device buffer."""
        key = (self.slot, start, end)
        views = self._copies.get(key)
        if views is None:
            if len(self._copies) > 4096:
                self._copies.clear()
            views = self._copies[key] = (self.dev[start:end], self.host[self.slot][start:end])
        views[0].copy_(views[1], non_blocking=True)
        return self.dev

    def done(self) -> None:
        """Marks the current host buffer busy until everything enqueued so far has run."""
        ev = self.events[self.slot]
        if ev is None:
            return
        # Event.record() looks the current stream up in Python each time; keep the Stream object
        # while the raw current stream is unchanged.
        raw = _current_raw_stream(self._device_index)
        if raw != self._stream_raw:
            self._stream = torch.cuda.current_stream(self._device_index)
            self._stream_raw = raw
        _record_event(ev, self._stream)


class _Layout:
    """Fixed element offsets of the per-step fields in the int32 staging buffers (host and device)."""

    def __init__(self, max_reqs: int, num_groups: int, max_writes: int):
        r = max_reqs
        pos = 0

        def take(n: int) -> int:
            nonlocal pos
            pos += n
            return pos - n

        self.idx = take(r)
        self.qsl = take(r + 1)
        self.seq = take(r)
        self.cache = take(r)
        self.logits = take(r)
        self.kv_indptr = [take(r + 1) for _ in range(num_groups)]
        self.last_page_len = [take(r) for _ in range(num_groups)]
        self.step_width = [take(1) for _ in range(num_groups)]
        self.num_writes = take(1)
        self.fixed_end = pos
        self.max_writes = max_writes
        # Staged block-table writes as (offset, value) pairs from ``fixed_end``, so a step uploads
        # ``fixed_end + 2n`` elements whatever the capacity.
        self.pairs = pos
        self.total = pos + 2 * max_writes


@attrs.define(eq=False)
class BatchMetadata:
    """Preallocated attention metadata for one model runner; ``prepare_*`` every step.

    Example
    -------
    >>> meta = BatchMetadata(cfg)
    >>> meta.block_tables.append(req_idx, pages)          # staged on the host
    >>> with meta.prepare_decode(idx_mapping, cache_lens) as step:
    ...     ops.store_kv(k, v, step.slot_mappings[0], k_cache, v_cache)
    ...     out = step.attention(q, k_cache, v_cache)     # or batchmeta.current_step() in a layer

    Attributes
    ----------
    positions:
        ``[max_num_tokens]`` int64.
    slot_mappings:
        Per group ``[max_num_tokens]`` int64.
    kv_indices:
        Per group ``[(max_num_reqs + 1) * W_g]`` int32.
    step_block_tables:
        Per group ``[max_num_reqs, W_g]`` int32.
    """

    config: MetadataConfig
    block_tables: BlockTables = attrs.field(init=False)
    _layout: _Layout = attrs.field(init=False)
    _staging: _PinnedRing = attrs.field(init=False)
    _accept_staging: _PinnedRing = attrs.field(init=False)
    _out32: torch.Tensor = attrs.field(init=False)
    _out64: torch.Tensor = attrs.field(init=False)
    positions: torch.Tensor = attrs.field(init=False)
    slot_mappings: tuple[torch.Tensor, ...] = attrs.field(init=False)
    kv_indices: tuple[torch.Tensor, ...] = attrs.field(init=False)
    step_block_tables: tuple[torch.Tensor, ...] = attrs.field(init=False)
    _fill: Callable[[int], None] = attrs.field(init=False)
    _scatter: Callable[[int], None] = attrs.field(init=False)
    _use_flashinfer: bool = attrs.field(init=False)
    _device_index: int | None = attrs.field(init=False)
    _planners: dict[tuple, Any] = attrs.field(init=False, factory=dict)
    _wrappers: dict[tuple, Any] = attrs.field(init=False, factory=dict)
    _graphs: dict[int, Any] = attrs.field(init=False, factory=dict)
    _views: dict[tuple, _StepViews] = attrs.field(init=False, factory=dict)
    _decode_qsl: dict[int, tuple] = attrs.field(init=False, factory=dict)
    _rows: np.ndarray = attrs.field(init=False)
    _seen: np.ndarray = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        cfg = self.config
        dev = cfg.device
        groups = len(cfg.kv_groups)
        r = cfg.max_num_reqs
        t = cfg.max_num_tokens
        if dev.type == "cuda":
            self._device_index = dev.index if dev.index is not None else torch.cuda.current_device()
            dev = torch.device("cuda", self._device_index)
        else:
            self._device_index = None
        self.block_tables = BlockTables(cfg)
        # Staged block-table writes per step: a full prefill budget of new pages plus a count per
        # request per group, twice over; more than that is applied in several copies.
        max_writes = groups * (t + 4 * (r + 1))
        self._layout = lay = _Layout(r, groups, max_writes)
        self._staging = _PinnedRing(lay.total, dev)
        self._accept_staging = _PinnedRing(5 * r + 1, dev)
        widths = [cfg.max_pages_per_req(g) for g in range(groups)]
        # int32 outputs: per group kv_indices [(r + 1) * W] then the per-step table [r, W].
        kv_at, step_at, pos = [], [], 0
        for w in widths:
            kv_at.append(pos)
            step_at.append(pos + (r + 1) * w)
            pos += (2 * r + 1) * w
        self._out32 = torch.zeros(pos, dtype=torch.int32, device=dev)
        # int64 outputs: positions, then per group the slot mapping, each [t]; slots start as PAD.
        self._out64 = torch.full(((1 + groups) * t,), -1, dtype=torch.int64, device=dev)
        self._out64[:t] = 0
        self.positions = self._out64[:t]
        self.slot_mappings = tuple(self._out64[(1 + g) * t : (2 + g) * t] for g in range(groups))
        self.kv_indices = tuple(self._out32[kv_at[g] : kv_at[g] + (r + 1) * w] for g, w in enumerate(widths))
        self.step_block_tables = tuple(
            self._out32[step_at[g] : step_at[g] + r * w].view(r, w) for g, w in enumerate(widths)
        )
        bt = self.block_tables
        layout = ops.StepLayout(
            page_size=[grp.page_size for grp in cfg.kv_groups], width=widths, num_table_rows=r + 1,
            idx=lay.idx, query_start_loc=lay.qsl, cache_lens=lay.cache, kv_indptr=lay.kv_indptr,
            step_width=lay.step_width, num_writes=lay.num_writes, pairs=lay.pairs, max_writes=max_writes,
            table=bt._table_base, held=[bt._num_blocks_base + g * (r + 1)
                                                                   for g in range(groups)],
            kv_indices=kv_at, kv_capacity=[(r + 1) * w for w in widths], step_table=step_at,
            positions=0, slot_mapping=[(1 + g) * t for g in range(groups)], token_capacity=t,
        )  # fmt: skip
        self._fill = ops.bind_step_metadata(layout, self._staging.dev, bt.flat, self._out32, self._out64,
                                            max_rows=r)  # fmt: skip
        self._scatter = ops.bind_scatter_pairs(self._staging.dev, bt.flat, count=lay.num_writes, pairs=lay.pairs,
                                               max_writes=max_writes)  # fmt: skip
        self._use_flashinfer = dev.type == "cuda" and cfg.plan_attention and flashinfer_available()
        self._rows = np.arange(r + 1, dtype=np.int64)
        self._seen = np.zeros(r, dtype=np.int64)

    # ---------------------------------------------------------------------------------------------
    # Public per-step API
    # ---------------------------------------------------------------------------------------------
    def prepare_prefill(self, idx_mapping: Any, query_lens: Any, cache_lens: Any) -> activate_step:
        """Metadata for a prefill or mixed step (chunked prefill beside decodes).

        Parameters
        ----------
        idx_mapping:
            ``[B]`` request slot of each batch row (host: list, numpy or CPU tensor).
        query_lens:
            ``[B]`` new tokens per row (a prefill chunk, or 1 for a decode row).
        cache_lens:
            ``[B]`` tokens already in the KV cache per row.

        Returns a context manager yielding the :class:`Step`; while it runs,
        ``batchmeta.current_step()`` returns that step.
        """
        idx = _host_ints("idx_mapping", idx_mapping)
        b = idx.shape[0]
        qlens = _host_ints("query_lens", query_lens, length=b)
        clens = _host_ints("cache_lens", cache_lens, length=b)
        if b and qlens.min() < 1:
            raise ValueError(f"query_lens: expected >= 1 new token per row, got {qlens.min()}")
        seq, pages, max_seq = self._check_batch(idx, qlens, clens)
        kind = "prefill" if clens.any() else "ragged_prefill"
        with self._on_device():
            step = self._prepare(idx, qlens, clens, seq, pages, max_seq, kind=kind, padded=b, query_len=None)
        return activate_step(step)

    def prepare_decode(
        self, idx_mapping: Any, cache_lens: Any, *, num_draft_tokens: int = 0, cuda_graph: bool = False
    ) -> activate_step:
        """Metadata for a decode step: ``1 + num_draft_tokens`` new tokens per row.

        Parameters
        ----------
        idx_mapping, cache_lens:
            As in :meth:`prepare_prefill`.
        num_draft_tokens:
            Speculative tokens verified this step (``<= config.max_draft_tokens``).
        cuda_graph:
            Pad the batch to the next size in ``config.cuda_graph_batch_sizes`` and plan the
            CUDA-graph wrappers (plain decode only); replay with :meth:`replay_decode_graph`.
        """
        cfg = self.config
        if type(num_draft_tokens) is not int:
            raise TypeError(f"num_draft_tokens: expected an int, got {type(num_draft_tokens).__name__}")
        if not 0 <= num_draft_tokens <= cfg.max_draft_tokens:
            raise ValueError(f"num_draft_tokens: expected 0..{cfg.max_draft_tokens} (config.max_draft_tokens), "
                             f"got {num_draft_tokens}")  # fmt: skip
        idx = _host_ints("idx_mapping", idx_mapping)
        b = idx.shape[0]
        clens = _host_ints("cache_lens", cache_lens, length=b)
        padded = b
        if cuda_graph:
            if num_draft_tokens:
                raise ValueError("cuda_graph: CUDA-graph decode supports plain decode only (num_draft_tokens=0)")
            padded = self.graph_batch_size(b)
        q = 1 + num_draft_tokens
        seq, pages, max_seq = self._check_batch(idx, q, clens)
        with self._on_device():
            kind = "spec_decode" if num_draft_tokens else "decode"
            step = self._prepare(idx, q, clens, seq, pages, max_seq, kind=kind, padded=padded, graph=cuda_graph,
                                 query_len=q)  # fmt: skip
        return activate_step(step)

    def graph_batch_size(self, num_reqs: int) -> int:
        """The captured batch size a decode batch of ``num_reqs`` rows is padded to."""
        sizes = self.config.cuda_graph_batch_sizes
        if self.config.device.type != "cuda" or not sizes:
            raise ValueError("cuda_graph: no CUDA-graph batch sizes are configured for this device")
        if not self._use_flashinfer:
            # The torch fallback reads host arrays: a captured graph would replay stale attention.
            raise ValueError("cuda_graph: CUDA-graph decode needs FlashInfer, which is not available here")
        for s in sizes:
            if s >= num_reqs:
                return s
        raise ValueError(f"idx_mapping: a CUDA-graph decode batch holds at most {sizes[-1]} rows, got {num_reqs}")

    def capture_decode_graph(self, batch_size: int, forward: Callable[[Step], None], *, warmup: int = 2) -> Any:
        """Captures ``forward(step)`` for a decode batch of ``batch_size`` rows as a CUDA graph.

        ``forward`` must read and write only fixed buffers (the step's views, the engine's own
        static input/output tensors). The capture plans with a dummy batch of padding rows; each
        later step plans outside the graph (``prepare_decode(..., cuda_graph=True)``) and
        :meth:`replay_decode_graph` replays it.
        """
        if batch_size not in self.config.cuda_graph_batch_sizes:
            raise ValueError(f"batch_size: expected one of config.cuda_graph_batch_sizes "
                             f"{self.config.cuda_graph_batch_sizes}, got {batch_size}")  # fmt: skip
        self.graph_batch_size(batch_size)  # raises without CUDA or FlashInfer
        empty = np.zeros(0, np.int64)
        with self._on_device():
            step = self._prepare(empty, 1, empty, empty, [empty] * len(self.config.kv_groups), 0, kind="decode",
                                 padded=batch_size, graph=True, query_len=1)  # fmt: skip
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), activate_step(step):
                for _ in range(warmup):
                    forward(step)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), activate_step(step):
                forward(step)
        self._graphs[batch_size] = graph
        return graph

    def replay_decode_graph(self, step: Step) -> None:
        """Replays the graph captured for ``step.padded_num_reqs`` (``step`` from a graph decode)."""
        if not step.cuda_graph:
            raise ValueError("step: planned without cuda_graph=True; its wrappers do not match a captured graph")
        graph = self._graphs.get(step.padded_num_reqs)
        if graph is None:
            raise ValueError(f"step: no CUDA graph captured for batch size {step.padded_num_reqs}")
        with self._on_device():
            graph.replay()

    def accept_tokens(
        self, step: Step, token_ids: torch.Tensor, next_input_ids: torch.Tensor, num_accepted: Any, prompt_lens: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """After sampling: writes each row's accepted tokens into the token history, and advances lengths.

        For batch row ``b`` (request slot ``r``), ``j < num_accepted[b]``:
        ``token_ids[r, cache_len + query_len + j] = next_input_ids[sum(num_accepted[:b]) + j]``
        except inside the prompt (``copy_next_input_ids_inplace`` semantics: call it before the
        lengths advance). One host→device copy and one kernel; no sync.

        Parameters
        ----------
        step:
            The step just run (decode, speculative decode or prefill).
        token_ids:
            ``[max_num_reqs, L]`` the engine's persistent token history on the device.
        next_input_ids:
            ``[sum(num_accepted)]`` accepted tokens of each row, back to back (same dtype as
            ``token_ids``).
        num_accepted, prompt_lens:
            ``[B]`` host ints.

        Returns
        -------
        ``(cache_lens, query_lens)`` for the next step, as LoRAX advances them:
        ``cache_lens + query_lens`` and ``num_accepted``.
        """
        b = step.num_reqs
        accepted = _host_ints("num_accepted", num_accepted, length=b)
        prompts = _host_ints("prompt_lens", prompt_lens, length=b)
        if b and accepted.min() < 0:
            raise ValueError(f"num_accepted: expected non-negative counts, got {accepted.min()}")
        if b and prompts.min() < 0:
            raise ValueError(f"prompt_lens: expected non-negative lengths, got {prompts.min()}")
        r = self.config.max_num_reqs
        check_tensor("token_ids", token_ids, ndim=2, device=self.block_tables.flat.device)
        if token_ids.shape[0] < r:
            raise ValueError(f"token_ids: expected {r} rows (max_num_reqs), got shape {tuple(token_ids.shape)}")
        check_tensor("next_input_ids", next_input_ids, dtypes=(token_ids.dtype,), ndim=1,
                         device=token_ids.device)  # fmt: skip
        if int(accepted.sum()) > next_input_ids.numel():
            raise ValueError(f"next_input_ids: expected at least {int(accepted.sum())} tokens (sum of num_accepted), "
                             f"got {next_input_ids.numel()}")  # fmt: skip
        ends = step.cache_lens_host + step.query_lens_host + accepted
        if b and ends.max() > token_ids.shape[1]:
            raise ValueError(f"token_ids: a row needs {ends.max()} columns, got {token_ids.shape[1]}")
        # Staging fields: cu_accepted [r + 1], then prompt, cache, query lengths and idx_mapping [r] each.
        cu, prompt, cache, query, rows = (slice(0, b + 1), *(slice(k * r + 1, k * r + 1 + b) for k in range(1, 5)))
        h = self._accept_staging.next()
        ops.fill_qo_indptr(accepted, h[cu])
        h[prompt] = prompts
        h[cache] = step.cache_lens_host
        h[query] = step.query_lens_host
        h[rows] = step.idx_mapping_host
        with self._on_device():
            d = self._accept_staging.upload(5 * r + 1)
            ops.copy_next_input_ids_inplace(
                token_ids, d[cache], d[query], d[prompt], next_input_ids, d[cu], idx_mapping=d[rows]
            )
            self._accept_staging.done()
        return step.cache_lens_host + step.query_lens_host, accepted

    # ---------------------------------------------------------------------------------------------
    # Internals
    # ---------------------------------------------------------------------------------------------
    def _check_batch(self, idx: np.ndarray, qlens: np.ndarray | int, clens: np.ndarray):
        """Validates a batch on host data only; returns ``(seq_lens, pages per group, max seq_len)``.

        ``qlens`` is an int for decode (every row has that many new tokens).
        """
        cfg = self.config
        r = cfg.max_num_reqs
        b = idx.shape[0]
        if b > r:
            raise ValueError(f"idx_mapping: {b} rows exceed max_num_reqs ({r})")
        if not b:
            return clens, [clens] * len(cfg.kv_groups), 0
        if (idx.view(np.uint64) >= r).any():  # a negative slot reads as a huge unsigned one
            raise ValueError(f"idx_mapping: expected request slots in [0, {r}), got {idx.min()}..{idx.max()}")
        # Duplicates: after seen[idx] = 0..b-1, a repeated slot reads back another row's number.
        rows = self._rows[:b]
        self._seen[idx] = rows
        if (self._seen[idx] != rows).any():
            raise ValueError("idx_mapping: a request slot appears twice in one batch")
        if clens.min() < 0:
            raise ValueError(f"cache_lens: expected non-negative lengths, got {clens.min()}")
        num_tokens = qlens * b if type(qlens) is int else int(qlens.sum())
        if num_tokens > cfg.max_num_tokens:
            raise ValueError(f"query_lens: {num_tokens} tokens exceed max_num_tokens ({cfg.max_num_tokens})")
        seq = clens + qlens
        max_seq = int(seq.max())
        if max_seq > cfg.max_model_len:
            raise ValueError(f"cache_lens: a row reaches {max_seq} tokens, more than max_model_len "
                             f"({cfg.max_model_len})")  # fmt: skip
        pages = []
        held_all = self.block_tables._host_num_blocks
        for g, grp in enumerate(cfg.kv_groups):
            ps = grp.page_size
            need = seq if ps == 1 else (seq + (ps - 1)) // ps
            short = held_all[g, idx] < need
            if short.any():
                k = int(np.argmax(short))
                raise ValueError(
                    f"cache_lens: request slot {idx[k]} needs {need[k]} pages in group {g} for {seq[k]} tokens "
                    f"but holds {held_all[g, idx[k]]}; append its pages first"
                )
            pages.append(need)
        return seq, pages, max_seq

    def _prepare(self, idx, qlens, clens, seq, pages, max_seq: int, *, kind: str, padded: int, query_len: int | None,
                 graph: bool = False) -> Step:  # fmt: skip
        """Fills the staging buffer, uploads it, launches the metadata kernels and plans.

        ``qlens`` is an int for decode; ``pages`` per group ``ceil(seq / page_size)``.
        """
        cfg = self.config
        lay = self._layout
        groups = cfg.kv_groups
        b = idx.shape[0]
        offsets, values = self.block_tables.take_staged()
        n = len(offsets)
        if n > lay.max_writes:  # more new pages than one transfer holds: apply the excess first
            for start in range(0, n - lay.max_writes, lay.max_writes):
                stop = min(start + lay.max_writes, n - lay.max_writes)
                self._upload_writes(offsets[start:stop], values[start:stop])
            offsets, values = offsets[n - lay.max_writes :], values[n - lay.max_writes :]
            n = lay.max_writes
        h = self._staging.next()

        # Host arrays, numpy into the pinned staging buffer. Padding rows (graph decode) use the
        # reserved row, hold one cached token and add no new token.
        h[lay.idx : lay.idx + b] = idx
        h[lay.cache : lay.cache + b] = clens
        seq_h = h[lay.seq : lay.seq + padded]
        seq_h[:b] = seq
        if padded > b:
            h[lay.idx + b : lay.idx + padded] = cfg.max_num_reqs
            seq_h[b:] = 1
        qsl = h[lay.qsl : lay.qsl + padded + 1]
        if type(qlens) is int:
            # Decode: query_start_loc and logits_indices depend only on (B, Bp, q); each ring slot
            # remembers what it holds.
            num_tokens = qlens * b
            shape = (b, padded, qlens)
            if self._staging.memo[self._staging.slot] != shape:
                np.multiply(self._rows[: padded + 1], qlens, out=qsl)
                qsl[b + 1 :] = num_tokens
                np.subtract(qsl[1 : b + 1], 1, out=h[lay.logits : lay.logits + b])
                self._staging.memo[self._staging.slot] = shape
        else:
            qsl[0] = 0
            np.cumsum(qlens, out=qsl[1 : b + 1])
            num_tokens = int(qsl[b])
            np.subtract(qsl[1 : b + 1], 1, out=h[lay.logits : lay.logits + b])
            self._staging.memo[self._staging.slot] = None
        if not b and padded:
            max_seq = 1  # padding rows only (a graph capture)
        widths = []
        for g, grp in enumerate(groups):
            ps = grp.page_size
            indptr = h[lay.kv_indptr[g] : lay.kv_indptr[g] + padded + 1]
            indptr[0] = 0
            np.cumsum(pages[g], out=indptr[1 : b + 1])
            last = h[lay.last_page_len[g] : lay.last_page_len[g] + padded]
            if ps == 1:
                last[:b] = 1
            else:
                np.subtract(seq, (pages[g] - 1) * ps, out=last[:b])
            if padded > b:  # padding rows: one page each (the padding page), one token in it
                np.add(self._rows[1 : padded - b + 1], indptr[b], out=indptr[b + 1 :])
                last[b:] = 1
            # Eager steps fill only as many per-step table columns as the longest row needs.
            widths.append(self.step_block_tables[g].shape[1] if graph else -(-max_seq // ps))
            h[lay.step_width[g]] = widths[g]
        h[lay.num_writes] = n
        if n:
            pairs = h[lay.pairs : lay.pairs + 2 * n]
            pairs[0::2] = offsets
            pairs[1::2] = values

        # One transfer, then one launch: the staged block-table writes and every metadata field.
        self._staging.upload(lay.fixed_end + 2 * n)
        self._fill(padded)
        step = self._make_step(h, idx, qlens, clens, kind, b, padded, num_tokens, query_len, graph, max_seq,
                               tuple(widths))  # fmt: skip
        self._staging.done()
        return step

    def _step_views(self, key: tuple, b: int, padded: int, tokens_run: int, widths: tuple[int, ...]) -> _StepViews:
        """The views of one step shape (``key`` = ring slot, sizes and widths), made on first use."""
        lay = self._layout
        d, ht, h = self._staging.dev, self._staging.host[self._staging.slot], self._staging.host_np[self._staging.slot]
        ng = len(self.config.kv_groups)

        def per_group(buf, at, n):
            return tuple(buf[at[g] : at[g] + n] for g in range(ng))

        if len(self._views) > 4096:  # many distinct prefill shapes: start over rather than grow
            self._views.clear()
        v = self._views[key] = _StepViews(
            idx_mapping=d[lay.idx : lay.idx + padded],
            query_start_loc=d[lay.qsl : lay.qsl + padded + 1],
            seq_lens=d[lay.seq : lay.seq + padded],
            positions=self.positions[:tokens_run],
            logits_indices=d[lay.logits : lay.logits + b],
            slot_mappings=tuple(sm[:tokens_run] for sm in self.slot_mappings),
            kv_indptr=per_group(d, lay.kv_indptr, padded + 1),
            kv_indices_full=self.kv_indices,
            kv_last_page_len=per_group(d, lay.last_page_len, padded),
            block_tables=tuple(t[:padded, :w] for t, w in zip(self.step_block_tables, widths, strict=True)),
            qo_indptr_host=h[lay.qsl : lay.qsl + padded + 1],
            kv_indptr_host=per_group(h, lay.kv_indptr, padded + 1),
            kv_last_page_len_host=per_group(h, lay.last_page_len, padded),
            qo_indptr_pinned=ht[lay.qsl : lay.qsl + padded + 1],
            kv_indptr_pinned=per_group(ht, lay.kv_indptr, padded + 1),
            kv_last_page_len_pinned=per_group(ht, lay.last_page_len, padded),
            seq_lens_pinned=ht[lay.seq : lay.seq + padded],
            page_sizes=tuple(grp.page_size for grp in self.config.kv_groups),
            window_lefts=tuple(grp.window_left for grp in self.config.kv_groups),
        )
        return v

    def _make_step(self, h, idx, qlens, clens, kind, b, padded, num_tokens, query_len, graph, max_seq,
                   widths) -> Step:  # fmt: skip
        lay = self._layout
        tokens_run = padded * query_len if graph else num_tokens  # type: ignore[operator]
        key = (self._staging.slot, b, padded, tokens_run, widths)
        views = self._views.get(key) or self._step_views(key, b, padded, tokens_run, widths)
        nnz = tuple(int(h[at + padded]) for at in lay.kv_indptr)
        wrappers = None
        if self._use_flashinfer and padded:
            wrappers = self._plan(kind, padded, graph, views, max_seq, nnz)
        return Step(kind, b, padded, num_tokens, query_len, graph, idx, clens,
                    None if type(qlens) is int else qlens, nnz, views, wrappers)  # fmt: skip

    def _upload_writes(self, offsets: np.ndarray, values: np.ndarray) -> None:
        """Applies staged writes that did not fit a step's transfer, through the pinned ring."""
        lay, n = self._layout, len(offsets)
        h = self._staging.next()
        h[lay.num_writes] = n
        pairs = h[lay.pairs : lay.pairs + 2 * n]
        pairs[0::2] = offsets
        pairs[1::2] = values
        self._staging.upload(lay.num_writes + 1, start=lay.num_writes)
        self._staging.upload(lay.pairs + 2 * n, start=lay.pairs)
        self._scatter(n)
        self._staging.done()

    def _on_device(self) -> contextlib.AbstractContextManager:
        """Makes the config's CUDA device current: Triton launches, events, streams and graphs use it."""
        index = self._device_index
        if index is None or _current_device() == index:
            return _NULL_CONTEXT
        return torch.cuda.device(index)

    def _wrapper(self, key: tuple, make: Callable[[torch.Tensor], Any]) -> Any:
        w = self._wrappers.get(key)
        if w is None:
            w = self._wrappers[key] = make(get_workspace(self.config.device, self.config.workspace_bytes))
        return w

    def _decode_planner(self, g: int, padded: int, graph: bool, indptr_d, last_d) -> DecodePlanner:
        key = ("graph", g, padded) if graph else ("decode", g)
        planner = self._planners.get(key)
        if planner is None:
            cfg = self.config
            ws = get_workspace(cfg.device, cfg.workspace_bytes)
            tensor_cores = cfg.gqa_ratio > 4
            if graph:
                # The graph reads the staging buffer's indptr and last-page-length views and the
                # kv_indices buffer directly: the kernels write them, nothing is copied.
                wrapper = new_decode_wrapper(ws, use_tensor_cores=tensor_cores,
                                             graph_buffers=(indptr_d[g], self.kv_indices[g], last_d[g]))  # fmt: skip
            else:
                wrapper = new_decode_wrapper(ws, use_tensor_cores=tensor_cores)
            grp = cfg.kv_groups[g]
            planner = self._planners[key] = DecodePlanner(
                wrapper, num_qo_heads=cfg.num_qo_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                page_size=grp.page_size, window_left=grp.window_left, q_data_type=cfg.q_dtype,
                kv_data_type=cfg.kv_dtype, max_batch_size=cfg.max_num_reqs,
            )  # fmt: skip
        return planner

    def _plan(self, kind: str, padded: int, graph: bool, v: _StepViews, max_seq: int,
              nnz: tuple[int, ...]) -> tuple[Any, ...]:  # fmt: skip
        """Plans one FlashInfer wrapper per group from pinned host views (no device→host sync)."""
        cfg = self.config
        out = []
        for g, grp in enumerate(cfg.kv_groups):
            if kind == "decode":
                planner = self._decode_planner(g, padded, graph, v.kv_indptr, v.kv_last_page_len)
                planner.plan(v.kv_indptr_pinned[g], v.kv_last_page_len_pinned[g], v.seq_lens_pinned, max_seq,
                             v.kv_indptr[g], self.kv_indices[g], v.kv_last_page_len[g])  # fmt: skip
                out.append(planner.wrapper)
                continue
            heads = (cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim)
            qo = v.qo_indptr_pinned
            if kind == "ragged_prefill":
                w = self._wrapper(("ragged", g), new_ragged_prefill_wrapper)
                w.plan(qo, qo, *heads, causal=True, window_left=grp.window_left,
                       q_data_type=cfg.q_dtype, kv_data_type=cfg.q_dtype)  # fmt: skip
            else:  # prefill, mixed, speculative decode
                w = self._wrapper(("prefill", g), new_paged_prefill_wrapper)
                w.plan(qo, v.kv_indptr_pinned[g], self.kv_indices[g][: nnz[g]], v.kv_last_page_len_pinned[g],
                       *heads, grp.page_size, causal=True, window_left=grp.window_left, q_data_type=cfg.q_dtype,
                       kv_data_type=cfg.kv_dtype)  # fmt: skip
            out.append(w)
        return tuple(out)

_NULL_CONTEXT = contextlib.nullcontext()
_current_device = getattr(torch._C, "_cuda_getDevice", None)
_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_record_event = getattr(getattr(torch._C, "_CudaEventBase", None), "record", None) or torch.cuda.Event.record
