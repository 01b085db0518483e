"""Speculative decoding: the acceptance rule, drafts into the token history, and lengths on the device.

:class:`Speculation` is the part of a :class:`~batchmeta.BatchMetadata` that knows what happened
after a step ran. ``accept_tokens`` applies the engine's rule (SPEC, third round): a row that ran
``q`` query tokens at positions ``c .. c+q-1``, the last ``k`` of them drafts, and accepted ``a``
tokens (the matched drafts plus the bonus token) writes them at positions ``c+q-k .. c+q-k+a-1``;
the rejected drafts leave the sequence, and the request's next cache length is ``c+q-k+a-1`` (the
last accepted token is the next step's first input), or ``c+q`` when ``a = 0`` (a prefill chunk
inside its prompt).

The counts may be a device tensor (the verifier's output). The host then knows only an upper bound
of the next cache length (``c + q``, every draft accepted), and the exact value lives in
:attr:`Speculation.lens` on the device: such request slots are *on the device* until the host
learns their length again. A step with such rows is staged from the bounds (whose pages the engine
must hold), planned from them, and :func:`batchmeta.ops.speculative.resolve_rows` rewrites its
packed rows from the device lengths before the step kernel runs, so positions, slot mappings,
``seq_lens`` and every ``kv_*`` array are exact. Nothing is read back.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import numpy as np
import torch

from batchmeta.batch import host_ints
from batchmeta.block_tables import BlockTables
from batchmeta.config import MetadataConfig
from batchmeta.ops import fill_qo_indptr
from batchmeta.ops._common import check_tensor, check_unit_column_stride
from batchmeta.ops.speculative import accept_tokens as accept_op
from batchmeta.ops.speculative import write_drafts as drafts_op
from batchmeta.staging import PinnedRing

__all__ = ["Acceptance", "Speculation"]

_I32_MAX = 2**31 - 1
_NULL_CONTEXT = contextlib.nullcontext()
_current_device = getattr(torch._C, "_cuda_getDevice", None)


class Acceptance(NamedTuple):
    """What ``accept_tokens`` returns: each row's next cache length, as far as the host knows it.

    Attributes
    ----------
    cache_lens:
        ``[B]`` int64: the next step's cache length of each row (``c+q-k+a-1``, or ``c+q`` for
        ``a = 0``); where ``exact`` is False, its upper bound ``c + q`` (every draft accepted). Pass
        it to the next ``prepare_*`` as it is: that step reads the exact lengths on the device.
        The engine must hold pages for the bound.
    exact:
        ``[B]`` bool: whether ``cache_lens[b]`` is the length itself (host counts on a row whose
        own cache length was known on the host) rather than a bound.
    """

    cache_lens: np.ndarray
    exact: np.ndarray


class Speculation:
    """Acceptance and drafts of one :class:`~batchmeta.BatchMetadata`, and the device lengths.

    Attributes
    ----------
    lens:
        ``[max_num_reqs + 1]`` int32 device tensor: each request slot's next cache length, as the
        last ``accept_tokens`` of a step holding it computed it (on the device).
    """

    def __init__(
        self, config: MetadataConfig, device: torch.device, block_tables: BlockTables, history: torch.Tensor | None
    ):
        r = config.max_num_reqs
        self.config = config
        self.lens = torch.zeros(r + 1, dtype=torch.int32, device=device)
        self.history = history
        # Per request slot: 1 while its next cache length is only on the device, and the bound the
        # engine must pass for it. Row r (CUDA-graph padding) is never on the device.
        self._on_device = np.zeros(r + 1, np.int64)
        self._bound = np.zeros(r + 1, np.int64)
        self.num_on_device = 0
        # What the host learns one or two steps late, without waiting: after an accept that leaves
        # lengths on the device, ``lens`` is copied to pinned memory behind an event; an accept that
        # finds a copy complete takes its values. Per slot, as running totals so one accept is a few
        # array operations over its rows: accepts so far (``_version``), the sum of the most each
        # accept added (``_total``) and the number of accepts whose increment was only a bound
        # (``_inexact``); and the same three at the newest exactly known length (``_known_*``, with
        # that length in ``_known_value``). A bound is the known length plus what the later accepts
        # added at most, so it never drifts further than the accepts the GPU has not reached yet.
        self._version = np.zeros(r + 1, np.int64)
        self._total = np.zeros(r + 1, np.int64)
        self._inexact = np.zeros(r + 1, np.int64)
        self._known_version = np.zeros(r + 1, np.int64)
        self._known_total = np.zeros(r + 1, np.int64)
        self._known_inexact = np.zeros(r + 1, np.int64)
        self._known_value = np.zeros(r + 1, np.int64)
        pin = device.type == "cuda"
        self._copies = [
            (torch.zeros(r + 1, dtype=torch.int32, pin_memory=pin), torch.cuda.Event() if pin else None)
            for _ in range(3)
        ]
        # Per copy in flight: the (version, total, inexact) snapshot its values belong to.
        self._copy_state: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = [None] * len(self._copies)
        # Per accept: request slots, cache, query and prompt lengths, on-device flags [r] each, then
        # host counts [r] and their prefix sum [r + 1]; per write_drafts: slots, prompt lengths,
        # counts [r] each, prefix [r + 1].
        self._staging = PinnedRing(7 * r + 1, device)
        self._device = device
        # The CUDA device to make current around a launch (None on the CPU); see _device_context.
        self._device_index = (
            (device.index if device.index is not None else torch.cuda.current_device()) if pin else None
        )
        block_tables.on_reset(self._forget)

    def _device_context(self) -> contextlib.AbstractContextManager:
        """The config's CUDA device made current for a launch; no ``with`` (a few µs) when it already is."""
        index = self._device_index
        if index is None or _current_device() == index:
            return _NULL_CONTEXT
        return torch.cuda.device(index)

    def _forget(self, req: int) -> None:
        """A reset request slot starts over: its length is the host's again."""
        if self._on_device[req]:
            self._on_device[req] = 0
            self.num_on_device -= 1

    def _learn(self) -> None:
        """Takes the device lengths of every completed copy (an event query: never waits)."""
        for i, (host, event) in enumerate(self._copies):
            state = self._copy_state[i]
            if state is None or (event is not None and not event.query()):
                continue
            versions, totals, inexact = state
            newer = versions > self._known_version
            self._known_version[newer] = versions[newer]
            self._known_total[newer] = totals[newer]
            self._known_inexact[newer] = inexact[newer]
            self._known_value[newer] = host.numpy()[newer]
            self._copy_state[i] = None

    def _copy_lens(self) -> None:
        """Copies ``lens`` to a free pinned buffer behind an event (skipped when none is free)."""
        for i, (host, event) in enumerate(self._copies):
            if self._copy_state[i] is None:
                host.copy_(self.lens, non_blocking=True)
                if event is not None:
                    event.record()
                self._copy_state[i] = (self._version.copy(), self._total.copy(), self._inexact.copy())
                return

    def _advance(
        self,
        idx: np.ndarray,
        cache: np.ndarray,
        increment: np.ndarray,
        exact_increment: np.ndarray,
        input_exact: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Records one accept of the request slots ``idx`` (distinct; input lengths ``cache``, exact
        where ``input_exact``; next lengths at most ``cache + increment``, exactly where
        ``exact_increment``); returns each row's next length or bound, and whether it is exact."""
        start = idx[input_exact]  # the host knew the input length: the record starts there
        self._known_version[start] = self._version[start]
        self._known_total[start] = self._total[start]
        self._known_inexact[start] = self._inexact[start]
        self._known_value[start] = cache[input_exact]
        self._version[idx] += 1
        self._total[idx] += increment
        self._inexact[idx] += ~exact_increment
        bound = self._known_value[idx] + self._total[idx] - self._known_total[idx]
        return bound, self._inexact[idx] == self._known_inexact[idx]

    def rows_on_device(self, idx: np.ndarray, cache_lens: np.ndarray) -> np.ndarray | None:
        """``[B]`` int64, 1 for rows whose cache length is on the device (None when no row's is), after
        checking that the engine passed the bound ``accept_tokens`` returned for each of them."""
        if not self.num_on_device or not idx.shape[0]:  # common case
            return None
        flags = self._on_device[idx]
        if not flags.any():
            return None
        wrong = (flags != 0) & (cache_lens != self._bound[idx])
        if wrong.any():
            b = int(np.argmax(wrong))
            raise ValueError(
                f"cache_lens: request slot {int(idx[b])}'s length is on the device (accept_tokens with "
                f"device counts); pass the bound accept_tokens returned, {int(self._bound[idx[b]])}, "
                f"got {int(cache_lens[b])}"
            )
        return flags

    # ---------------------------------------------------------------------------------------------
    def accept(
        self,
        step: Any,
        token_ids: torch.Tensor | None,
        next_input_ids: torch.Tensor,
        num_accepted: Any,
        prompt_lens: Any,
    ) -> Acceptance:
        """``BatchMetadata.accept_tokens`` (see there)."""
        cfg = self.config
        if step._accepted:
            raise ValueError(
                "step: already accepted; each step's tokens are accepted once (accept_tokens advances the lengths)"
            )
        if token_ids is None:
            if self.history is None:
                raise ValueError(
                    "token_ids: None names this BatchMetadata's token history, and it has none "
                    "(MetadataConfig(token_history=True))"
                )
            token_ids = self.history
        b = step.num_reqs
        k = step.num_draft_tokens
        device = self.lens.device
        check_tensor("token_ids", token_ids, dtypes=(torch.int32, torch.int64), ndim=2, device=device)
        if token_ids.shape[0] < cfg.max_num_reqs:
            raise ValueError(
                f"token_ids: expected {cfg.max_num_reqs} rows (max_num_reqs), got shape {tuple(token_ids.shape)}"
            )
        check_unit_column_stride("token_ids", token_ids)
        prompts = host_ints("prompt_lens", prompt_lens, length=b)
        max_len = cfg.max_model_len
        if b and not 0 <= prompts.min() <= prompts.max() <= max_len:
            raise ValueError(
                f"prompt_lens: expected lengths in [0, {max_len}] (max_model_len), got {prompts.min()}..{prompts.max()}"
            )
        cache, query = step.cache_lens_host, step.query_lens_host
        ends = cache + query >= prompts  # rows that reach their prompt's end (on the host: bounds too)
        on_device_rows = step._rows_on_device
        # A tensor on this BatchMetadata's device is device data (on a CPU one, any CPU tensor).
        if isinstance(num_accepted, torch.Tensor) and num_accepted.device == device:
            accepted = None
            check_tensor(
                "num_accepted", num_accepted, dtypes=(torch.int32, torch.int64), ndim=1, device=device, contiguous=True
            )
            if num_accepted.numel() != b:
                raise ValueError(f"num_accepted: expected {b} elements (one per batch row), got {num_accepted.numel()}")
        else:
            accepted = host_ints("num_accepted", num_accepted, length=b)
            lo, hi = np.where(ends, 1, 0), np.where(ends, 1 + k, 1)
            bad = (accepted < lo) | (accepted > hi)
            if bad.any():
                i = int(np.argmax(bad))
                what = f"1..{1 + k} (1 + num_draft_tokens)" if ends[i] else "0 or 1 (still inside its prompt)"
                raise ValueError(f"num_accepted: batch row {i} accepts {what} tokens, got {int(accepted[i])}")
        check_tensor("next_input_ids", next_input_ids, dtypes=(torch.int32, torch.int64), device=device)
        if next_input_ids.ndim == 1:
            if not next_input_ids.is_contiguous():
                raise ValueError("next_input_ids: expected a contiguous tensor")
            if accepted is not None and int(accepted.sum()) > next_input_ids.numel():
                raise ValueError(
                    f"next_input_ids: expected at least {int(accepted.sum())} tokens (sum of "
                    f"num_accepted), got {next_input_ids.numel()}"
                )
        elif next_input_ids.ndim == 2:
            if next_input_ids.shape[0] != b:
                raise ValueError(
                    f"next_input_ids: expected {b} rows (one per batch row), got shape {tuple(next_input_ids.shape)}"
                )
            need = 1 + k if accepted is None else int(accepted.max(initial=0))
            if next_input_ids.shape[1] < need:
                raise ValueError(
                    f"next_input_ids: expected at least {need} columns (accepted tokens per row), "
                    f"got shape {tuple(next_input_ids.shape)}"
                )
        else:
            raise ValueError(
                f"next_input_ids: expected 1 (back to back) or 2 ([B, 1 + k]) dimensions, got shape "
                f"{tuple(next_input_ids.shape)}"
            )
        # What each row adds to its length: at most q (device counts: every draft accepted), or
        # exactly q - k + a - 1 (host counts; q for a row inside its prompt).
        if accepted is None:
            increment = query.copy()
            increment_exact = ~(ends & (k > 0))  # a verify row's count decides its length
        else:
            increment = np.where((accepted >= 1) & ends, query - k + accepted - 1, query)
            increment_exact = np.ones(b, bool)
        input_exact = np.ones(b, bool) if on_device_rows is None else on_device_rows == 0
        # Rows that write reach position ``cache + increment`` (the last accepted token's); with device
        # counts a position past the history is dropped on the device (the bound may not be reached).
        writes = (accepted >= 1) & ends if accepted is not None else np.zeros(b, bool)
        reach = cache + increment
        if writes.any() and reach[writes].max() >= token_ids.shape[1]:
            raise ValueError(f"token_ids: a row needs {int(reach[writes].max()) + 1} columns, got {token_ids.shape[1]}")
        if accepted is None and any(grp.mla is not None for grp in cfg.kv_groups):
            # FlashInfer's MLA plan copies the KV lengths to the device: lengths resolved there would be ignored.
            raise ValueError(
                "num_accepted: device counts need every KV length on the device, and FlashInfer's "
                "MLA plan takes them from the host; pass host counts with MLA groups"
            )
        # Staging: request slots, cache, query, prompt lengths, on-device flags, counts [b] each, prefix [b + 1].
        idx = step.idx_mapping_host
        h = self._staging.next()
        with self._device_context():
            try:
                h[0:b] = idx
                h[b : 2 * b] = cache
                h[2 * b : 3 * b] = query
                h[3 * b : 4 * b] = prompts
                h[4 * b : 5 * b] = 0 if on_device_rows is None else on_device_rows
                if accepted is not None:
                    h[5 * b : 6 * b] = accepted
                    fill_qo_indptr(accepted, h[6 * b : 7 * b + 1])
                d = self._staging.upload(7 * b + 1)
                counts = d[5 * b : 6 * b] if accepted is not None else num_accepted
                cu = d[6 * b : 7 * b + 1] if accepted is not None and next_input_ids.ndim == 1 else None
                accept_op(
                    token_ids,
                    d[: 5 * b],
                    b,
                    counts,
                    next_input_ids,
                    self.lens,
                    num_draft_tokens=k,
                    cu_accepted=cu,
                    backend=cfg.backend,
                )
            finally:
                self._staging.done()
        step._accepted = True
        step._prompt_lens = prompts  # write_drafts keeps drafts out of the prompt
        # Each row's next length, or its bound: from what the host knows (lengths learned from the
        # device copies included), which request slots stay on the device, and a copy if any does.
        self._learn()
        bound, exact = self._advance(idx, cache, increment, increment_exact, input_exact)
        self._on_device[idx] = ~exact
        self._bound[idx[~exact]] = bound[~exact]
        self.num_on_device = int(np.count_nonzero(self._on_device))
        if not exact.all():
            self._copy_lens()
        return Acceptance(bound, exact)

    def write_drafts(self, step: Any, draft_token_ids: torch.Tensor, num_drafts: Any = None) -> None:
        """``BatchMetadata.write_drafts`` (see there)."""
        cfg = self.config
        if self.history is None:
            raise ValueError(
                "write_drafts: this BatchMetadata has no token history; make it with MetadataConfig(token_history=True)"
            )
        if not step._accepted:
            raise ValueError(
                "step: accept its tokens first (accept_tokens): drafts go after each row's next "
                "cache length, which acceptance computes"
            )
        b = step.num_reqs
        device = self.lens.device
        check_tensor("draft_token_ids", draft_token_ids, dtypes=(torch.int32, torch.int64), device=device)
        k_max = cfg.max_draft_tokens
        counts = cu = None
        host_counts = None
        if draft_token_ids.ndim == 2:
            if num_drafts is not None:
                raise ValueError("num_drafts: give it only with ragged (1-D) draft_token_ids")
            if draft_token_ids.shape[0] != b or not 1 <= draft_token_ids.shape[1] <= k_max:
                raise ValueError(
                    f"draft_token_ids: expected shape [{b}, k] with 1 <= k <= {k_max} "
                    f"(config.max_draft_tokens), got {tuple(draft_token_ids.shape)}"
                )
            per_row = draft_token_ids.shape[1]
        elif draft_token_ids.ndim == 1:
            if not draft_token_ids.is_contiguous():
                raise ValueError("draft_token_ids: expected a contiguous tensor")
            if num_drafts is None:
                raise ValueError("num_drafts: ragged (1-D) draft_token_ids need a count per row")
            per_row = k_max
            if isinstance(num_drafts, torch.Tensor) and num_drafts.device == device:
                check_tensor(
                    "num_drafts", num_drafts, dtypes=(torch.int32, torch.int64), ndim=1, device=device, contiguous=True
                )
                if num_drafts.numel() != b:
                    raise ValueError(f"num_drafts: expected {b} elements (one per batch row), got {num_drafts.numel()}")
                counts = num_drafts
            else:
                host_counts = host_ints("num_drafts", num_drafts, length=b)
                if b and not 0 <= host_counts.min() <= host_counts.max() <= k_max:
                    raise ValueError(
                        f"num_drafts: expected counts in [0, {k_max}] (config.max_draft_tokens), "
                        f"got {host_counts.min()}..{host_counts.max()}"
                    )
                if int(host_counts.sum()) > draft_token_ids.numel():
                    raise ValueError(
                        f"draft_token_ids: expected at least {int(host_counts.sum())} tokens (sum of "
                        f"num_drafts), got {draft_token_ids.numel()}"
                    )
        else:
            raise ValueError(
                f"draft_token_ids: expected [B, k] or ragged [N] drafts, got shape {tuple(draft_token_ids.shape)}"
            )
        h = self._staging.next()
        with self._device_context():
            try:
                # Staging: request slots, prompt lengths, counts [b] each, their prefix sum [b + 1].
                h[0:b] = step.idx_mapping_host
                h[b : 2 * b] = step._prompt_lens
                if host_counts is not None:
                    h[2 * b : 3 * b] = host_counts
                    fill_qo_indptr(host_counts, h[3 * b : 4 * b + 1])
                d = self._staging.upload(4 * b + 1)
                if host_counts is not None:
                    counts, cu = d[2 * b : 3 * b], d[3 * b : 4 * b + 1]
                drafts_op(
                    self.history,
                    d[:b],
                    d[b : 2 * b],
                    self.lens,
                    draft_token_ids,
                    num_drafts=counts,
                    cu_drafts=cu,
                    max_drafts=per_row,
                    backend=cfg.backend,
                )
            finally:
                self._staging.done()
