"""Multi-LoRA batch metadata: an adapter per request slot, and per step the tokens sorted by adapter.

Engines serving many LoRA adapters in one batch sort each step's tokens by adapter and hand the LoRA
kernels segment metadata. vLLM's ``LoRAKernelMeta.prepare_tensors`` does it with
``torch.unique(return_counts=True)`` on the device and reads the result's size on the host (a sync
per step); LoRAX's ``find_segments`` with ``.cpu().tolist()``. Here the host already knows each
row's adapter (the engine said so with :meth:`LoraAdapters.set_adapter`) and query length (it
stages ``qo_indptr`` every step), so a counting sort over the step's rows (``O(B + max_loras)``, in
the compiled host path or numpy) writes the rows' sorted positions and the segment block into the
step's pinned staging buffer, and the step's own launch (:mod:`batchmeta.ops.step`, with the
programs of :mod:`batchmeta.ops.lora`) expands them to tokens on the device. No sync, no
``torch.unique``, no launch of its own; every array has a fixed shape (``max_num_tokens``,
``max_num_reqs``, ``max_loras + 1`` segments), so a CUDA graph captured for a batch size replays
with any mix of adapters.

The forms the common LoRA kernels read (``step.lora``, a :class:`LoraViews`):

- SGMV / segmented: ``seg_indptr``, ``seg_lora`` (adapter per segment, -1: skip), ``seg_rank``,
  ``token_perm`` (token at each sorted position) and ``token_perm_inv``;
- BGMV / per token: ``token_lora`` (adapter per token, -1: none), ``row_lora`` (per batch row: a
  decode step's per-token form), ``adapter_rank``;
- vLLM's ``LoRAKernelMeta``: ``token_lora_mapping``, ``token_indices_sorted_by_lora_ids``,
  ``num_tokens_per_lora``, ``lora_token_start_loc`` and ``active_lora_ids`` (aliases of the above,
  the same ``[max_loras + 1]`` / ``[max_loras + 2]`` shapes).
"""

from __future__ import annotations

import numpy as np
import torch

from batchmeta.config import MetadataConfig
from batchmeta.host_path import COMPILED
from batchmeta.ops.lora import LORA_ROW_STRIDE, LoraLayout

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; without it the numpy path runs
    numba = None

__all__ = ["LoraAdapters", "LoraViews", "stage_lora"]


def stage_lora(
    h: np.ndarray,
    idx_at: int,
    qo_at: int,
    layout: LoraLayout,
    padded: int,
    adapter_of: np.ndarray,
    rank_of: np.ndarray,
) -> None:
    """Writes a step's LoRA rows and segment block into host staging buffer ``h`` (numpy reference).

    Reads the step's already staged request slots (``h[idx_at:]``, ``[padded]``) and ``qo_indptr``
    (``h[qo_at:]``, ``[padded + 1]``). Rows are sorted by adapter, stably, adapters ascending and
    rows without one (``adapter_of`` -1; padding rows read the reserved slot's -1) last.

    Parameters
    ----------
    h:
        int32 host staging buffer.
    idx_at, qo_at:
        Offsets of the staged request slots and ``qo_indptr`` in ``h``.
    layout:
        Where the LoRA rows and segment block go (:class:`~batchmeta.ops.lora.LoraLayout`).
    padded:
        Rows of the step, padding rows included.
    adapter_of:
        ``[max_num_reqs + 1]`` int64: each request slot's adapter, -1 for none.
    rank_of:
        ``[max_loras]`` int64: each adapter's rank (0 while no request slot uses it).
    """
    num_loras = layout.max_loras
    s = num_loras + 1
    qo = h[qo_at : qo_at + padded + 1].astype(np.int64)
    adapter = adapter_of[h[idx_at : idx_at + padded]]
    key = np.where(adapter < 0, num_loras, adapter)
    q = qo[1:] - qo[:-1]
    counts = np.bincount(key, weights=q, minlength=s).astype(np.int64)  # exact: counts < 2^31
    order = np.argsort(key, kind="stable")
    sorted_q = q[order]
    dst = np.empty(padded, np.int64)
    dst[order] = np.cumsum(sorted_q) - sorted_q
    rows = h[layout.rows : layout.rows + (padded + 1) * LORA_ROW_STRIDE].reshape(padded + 1, LORA_ROW_STRIDE)
    rows[:padded, 0] = qo[:-1]
    rows[:padded, 1] = qo[1:]
    rows[:padded, 2] = dst
    rows[:padded, 3] = adapter
    rows[padded] = (qo[padded], qo[padded], 0, 0)
    block = h[layout.segments : layout.segments + layout.segment_block]
    seg_indptr = block[: s + 1]
    seg_lora = block[s + 1 : 2 * s + 1]
    seg_rank = block[2 * s + 1 : 3 * s + 1]
    seg_len = block[3 * s + 1 : 4 * s + 1]
    active = np.flatnonzero(counts[:num_loras])
    n = active.shape[0]
    seg_len[:n] = counts[active]
    seg_len[n] = counts[num_loras]  # the tokens without an adapter
    seg_len[n + 1 :] = 0
    seg_indptr[0] = 0
    np.cumsum(seg_len, out=seg_indptr[1:])
    seg_lora[:n] = active
    seg_lora[n:] = -1
    seg_rank[:n] = rank_of[active]
    seg_rank[n:] = 0
    block[4 * s + 1 :] = rank_of


def _stage_lora_kernel(h, idx_at, qo_at, rows_at, segs_at, padded, adapter_of, rank_of, counts):
    """:func:`stage_lora`'s writes, compiled: a counting sort in ``O(padded + max_loras)``.

    ``counts`` is ``[max_loras + 1]`` int64 scratch.
    """
    num_loras = rank_of.shape[0]
    s = num_loras + 1
    for k in range(s):
        counts[k] = 0
    for i in range(padded):
        a = adapter_of[h[idx_at + i]]
        key = num_loras if a < 0 else a
        counts[key] += h[qo_at + i + 1] - h[qo_at + i]
    # The segment block: active adapters ascending, the tokens without one, then empty segments.
    indptr_at = segs_at
    lora_at = segs_at + s + 1
    rank_at = segs_at + 2 * s + 1
    len_at = segs_at + 3 * s + 1
    h[indptr_at] = 0
    n = 0
    acc = 0
    for a in range(num_loras):
        c = counts[a]
        if c > 0:
            acc += c
            h[indptr_at + 1 + n] = acc
            h[lora_at + n] = a
            h[rank_at + n] = rank_of[a]
            h[len_at + n] = c
            n += 1
    acc += counts[num_loras]
    h[indptr_at + 1 + n] = acc
    h[lora_at + n] = -1
    h[rank_at + n] = 0
    h[len_at + n] = counts[num_loras]
    for k in range(n + 1, s):
        h[indptr_at + 1 + k] = acc
        h[lora_at + k] = -1
        h[rank_at + k] = 0
        h[len_at + k] = 0
    for a in range(num_loras):
        h[segs_at + 4 * s + 1 + a] = rank_of[a]
    # Each key's first sorted position (keys in segment order), then the rows in order: stable.
    acc = 0
    for k in range(s):
        c = counts[k]
        counts[k] = acc
        acc += c
    for i in range(padded):
        a = adapter_of[h[idx_at + i]]
        key = num_loras if a < 0 else a
        start = h[qo_at + i]
        end = h[qo_at + i + 1]
        o = rows_at + i * 4
        h[o] = start
        h[o + 1] = end
        h[o + 2] = counts[key]
        h[o + 3] = a
        counts[key] += end - start
    o = rows_at + padded * 4
    total = h[qo_at + padded]
    h[o] = total
    h[o + 1] = total
    h[o + 2] = 0
    h[o + 3] = 0


_COMPILED = COMPILED and numba is not None
if _COMPILED:
    _stage_lora_kernel = numba.njit(cache=True)(_stage_lora_kernel)


class LoraViews:
    """One step's LoRA metadata: device views of fixed buffers, and host twins of the segments.

    ``Tp`` = the tokens the model runs, ``Bp`` = the padded rows, ``L`` = ``max_loras``,
    ``S = L + 1``. Every device tensor is int32 on ``config.device``.

    Attributes
    ----------
    token_lora:
        ``[Tp]`` adapter of each token; -1 for tokens without one and padding tokens.
    row_lora:
        ``[Bp]`` adapter of each batch row; -1 for none and padding rows.
    token_perm:
        ``[Tp]`` the token at each position of the order sorted by adapter (stable; the identity
        past the step's tokens): ``x[token_perm]`` is ``x`` sorted by adapter.
    token_perm_inv:
        ``[Tp]`` the sorted position of each token: ``y_sorted[token_perm_inv]`` is back in token order.
    seg_indptr:
        ``[S + 1]`` segment bounds in sorted positions: the active adapters' segments (ascending
        adapter id), then the segment of tokens without an adapter, then empty segments.
    seg_lora:
        ``[S]`` adapter of each segment, -1 (skip) for the no-adapter and empty segments.
    seg_rank:
        ``[S]`` rank of each segment's adapter (0 where ``seg_lora`` is -1).
    seg_len:
        ``[S]`` tokens per segment.
    adapter_rank:
        ``[L]`` rank of each adapter id (0 while no request slot uses it): the per-token form's rank.
    seg_indptr_host, seg_lora_host, seg_rank_host, seg_len_host:
        numpy int32 twins of the segment arrays (views of the pinned staging buffer).

    Notes
    -----
    vLLM's ``LoRAKernelMeta`` names the same arrays ``token_lora_mapping`` (``token_lora``),
    ``token_indices_sorted_by_lora_ids`` (``token_perm``), ``num_tokens_per_lora`` (``seg_len``),
    ``lora_token_start_loc`` (``seg_indptr``) and ``active_lora_ids`` (``seg_lora``); one
    difference: its no-adapter entry sorts first (``torch.unique`` puts -1 first), here last,
    which its kernels do not depend on (they skip the -1 entry wherever it is). Views are valid
    until the next ``prepare_*`` (read them through ``step.lora``, which checks).
    """

    __slots__ = (
        "adapter_rank",
        "row_lora",
        "seg_indptr",
        "seg_indptr_host",
        "seg_len",
        "seg_len_host",
        "seg_lora",
        "seg_lora_host",
        "seg_rank",
        "seg_rank_host",
        "token_lora",
        "token_perm",
        "token_perm_inv",
    )

    def __init__(self, layout: LoraLayout, out: torch.Tensor, h: np.ndarray, padded: int, num_tokens_run: int):
        lay, s, n = layout, layout.num_segments, num_tokens_run
        self.token_lora = out[lay.token_lora : lay.token_lora + n]
        self.token_perm = out[lay.token_perm : lay.token_perm + n]
        self.token_perm_inv = out[lay.token_perm_inv : lay.token_perm_inv + n]
        self.row_lora = out[lay.row_lora : lay.row_lora + padded]
        self.seg_indptr = out[lay.seg_indptr : lay.seg_indptr + s + 1]
        self.seg_lora = out[lay.seg_lora : lay.seg_lora + s]
        self.seg_rank = out[lay.seg_rank : lay.seg_rank + s]
        self.seg_len = out[lay.seg_len : lay.seg_len + s]
        self.adapter_rank = out[lay.adapter_rank : lay.adapter_rank + lay.max_loras]
        at = lay.segments
        self.seg_indptr_host = h[at : at + s + 1]
        self.seg_lora_host = h[at + s + 1 : at + 2 * s + 1]
        self.seg_rank_host = h[at + 2 * s + 1 : at + 3 * s + 1]
        self.seg_len_host = h[at + 3 * s + 1 : at + 4 * s + 1]

    @property
    def num_active(self) -> int:
        """Adapters with tokens in this step (host; 0: no LoRA work, vLLM's ``no_lora_flag``)."""
        return int(np.count_nonzero(self.seg_lora_host >= 0))

    # vLLM's names ----------------------------------------------------------------------------------
    @property
    def token_lora_mapping(self) -> torch.Tensor:
        return self.token_lora

    @property
    def token_indices_sorted_by_lora_ids(self) -> torch.Tensor:
        return self.token_perm

    @property
    def num_tokens_per_lora(self) -> torch.Tensor:
        return self.seg_len

    @property
    def lora_token_start_loc(self) -> torch.Tensor:
        return self.seg_indptr

    @property
    def active_lora_ids(self) -> torch.Tensor:
        return self.seg_lora


class LoraAdapters:
    """Which adapter each request slot uses (``meta.lora``), and the buffers of each step's segments.

    :meth:`set_adapter` changes a host table at once; nothing reaches the device until the next
    ``prepare_*``, whose staging carries the step's rows sorted by adapter and whose LoRA launch
    writes the device arrays (as block-table writes are staged and applied). A request slot that
    ``block_tables.reset`` frees uses no adapter afterwards.

    Parameters
    ----------
    config:
        With ``max_loras > 0``.
    staging_offset:
        Where the LoRA region starts in the step's staging buffers
        (``LoraLayout.staging_size(max_num_reqs, max_loras)`` int32 elements).
    device:
        Where the output buffer lives.

    Attributes
    ----------
    layout:
        The :class:`~batchmeta.ops.lora.LoraLayout` of the staged rows and of ``out``.
    out:
        ``[layout.out_size]`` int32 device buffer the step's launch expands the rows into.
    """

    def __init__(self, config: MetadataConfig, staging_offset: int, device: torch.device):
        cfg = config
        if not cfg.max_loras:
            raise ValueError("config: max_loras is 0 (LoRA off); make the config with max_loras >= 1")
        r, num_loras = cfg.max_num_reqs, cfg.max_loras
        self.config = cfg
        self.layout = lay = LoraLayout(
            max_loras=num_loras,
            max_rows=r,
            token_capacity=cfg.max_num_tokens,
            rows=staging_offset,
            segments=staging_offset + (r + 1) * LORA_ROW_STRIDE,
        )
        self.out = torch.zeros(lay.out_size, dtype=torch.int32, device=device)
        self._adapter = np.full(r + 1, -1, np.int64)  # row r: the padding rows' reserved slot
        self._rank = np.zeros(num_loras, np.int64)
        self._users = np.zeros(num_loras, np.int64)
        self._counts = np.zeros(num_loras + 1, np.int64)
        self._views: dict[tuple[int, int, int], LoraViews] = {}
        if _COMPILED:  # compile (or load from the cache) now, not in the first step
            scratch = np.zeros(lay.segments + lay.segment_block, np.int32)
            _stage_lora_kernel(scratch, 0, 0, lay.rows, lay.segments, 0, self._adapter, self._rank, self._counts)

    def __repr__(self) -> str:
        used = int(np.count_nonzero(self._adapter[: self.config.max_num_reqs] >= 0))
        return (
            f"LoraAdapters(max_loras={self.config.max_loras}, max_lora_rank={self.config.max_lora_rank}, "
            f"request_slots_with_adapter={used}, adapters_in_use={int(np.count_nonzero(self._users))})"
        )

    # The engine's calls, between steps ----------------------------------------------------------------
    def set_adapter(self, req_idx: int, adapter_id: int | None, rank: int | None = None) -> None:
        """Request slot ``req_idx`` uses adapter ``adapter_id`` of rank ``rank`` from the next step on
        (``adapter_id=None``: no adapter).

        An adapter's rank is the same for every request slot using it: a different ``rank`` for an
        adapter another slot uses raises. Nothing changes when a check fails.

        Parameters
        ----------
        req_idx:
            Request slot, in ``[0, max_num_reqs)``.
        adapter_id:
            The adapter's slot in the engine's stacked LoRA weights, in ``[0, max_loras)``; or None.
        rank:
            Its rank, in ``[1, max_lora_rank]``; omitted (None) with ``adapter_id=None``.
        """
        cfg = self.config
        req = _check_int("req_idx", req_idx, 0, cfg.max_num_reqs - 1, "a request slot")
        if adapter_id is None:
            if rank is not None:
                raise ValueError(f"rank: expected None with adapter_id=None (no adapter), got {rank}")
            self._assign(req, -1, 0)
            return
        a = _check_int("adapter_id", adapter_id, 0, cfg.max_loras - 1, "an adapter slot (config.max_loras)")
        if rank is None:
            raise TypeError("rank: expected an int with an adapter_id, got None")
        rk = _check_int("rank", rank, 1, cfg.max_lora_rank, "a rank (config.max_lora_rank)")
        others = self._users[a] - (self._adapter[req] == a)
        if others and self._rank[a] != rk:
            raise ValueError(
                f"rank: adapter {a} has rank {self._rank[a]} in the {others} other request slot(s) using it, got {rk}"
            )
        self._assign(req, a, rk)

    def clear(self, req_idx: int) -> None:
        """Request slot ``req_idx`` uses no adapter (``set_adapter(req_idx, None)``)."""
        self.set_adapter(req_idx, None)

    def adapter(self, req_idx: int) -> int | None:
        """The adapter request slot ``req_idx`` uses (host table, changes of this step included), or None."""
        req = _check_int("req_idx", req_idx, 0, self.config.max_num_reqs - 1, "a request slot")
        a = int(self._adapter[req])
        return None if a < 0 else a

    def rank(self, adapter_id: int) -> int:
        """Rank of adapter ``adapter_id`` (0 while no request slot uses it)."""
        a = _check_int("adapter_id", adapter_id, 0, self.config.max_loras - 1, "an adapter slot (config.max_loras)")
        return int(self._rank[a])

    def num_users(self, adapter_id: int) -> int:
        """Request slots using adapter ``adapter_id``: 0 means its weights may be replaced."""
        a = _check_int("adapter_id", adapter_id, 0, self.config.max_loras - 1, "an adapter slot (config.max_loras)")
        return int(self._users[a])

    # BatchMetadata's calls, in a step ---------------------------------------------------------------
    def stage(self, h: np.ndarray, idx_at: int, qo_at: int, padded: int, *, compiled: bool) -> None:
        """Writes the step's LoRA rows and segments into ``h`` (after its ``idx`` and ``qo_indptr``)."""
        lay = self.layout
        if compiled and _COMPILED:  # common case
            adapter, rank, counts = self._adapter, self._rank, self._counts
            _stage_lora_kernel(h, idx_at, qo_at, lay.rows, lay.segments, padded, adapter, rank, counts)
        else:
            stage_lora(h, idx_at, qo_at, lay, padded, self._adapter, self._rank)

    def views(self, current: int, h: np.ndarray, padded: int, num_tokens_run: int) -> LoraViews:
        """The step's :class:`LoraViews` (cached per shape and staging buffer)."""
        key = (current, padded, num_tokens_run)
        views = self._views.get(key)
        if views is None:
            if len(self._views) > 4096:  # many distinct prefill shapes: start over rather than grow
                self._views.clear()
            views = self._views[key] = LoraViews(self.layout, self.out, h, padded, num_tokens_run)
        return views

    # Internals --------------------------------------------------------------------------------------
    def _assign(self, req: int, a: int, rk: int) -> None:
        old = self._adapter[req]
        if old >= 0:
            self._users[old] -= 1
            if not self._users[old]:
                self._rank[old] = 0
        self._adapter[req] = a
        if a >= 0:
            self._users[a] += 1
            self._rank[a] = rk


def _check_int(name: str, value: object, lo: int, hi: int, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}: expected {what} in [{lo}, {hi}], got {value}")
    return int(value)
