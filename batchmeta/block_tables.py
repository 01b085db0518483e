"""Persistent per-request block tables, one per KV-cache group, with writes staged on the host.

vLLM's ``block_table.py`` counterpart: an engine appends the pages it allocates to a request slot
and resets the slot when the request finishes; nothing touches the device until the next step, which
applies every staged write inside its one kernel launch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from batchmeta.batch import host_ints
from batchmeta.config import MetadataConfig

__all__ = ["BlockTables"]

_I32_MAX = 2**31 - 1


_NO_WRITES = np.zeros(0, np.int32)  # what take_staged returns with nothing staged (no allocation per step)
_NO_WRITES.flags.writeable = False


class BlockTables:
    """Persistent per-request block tables, one per KV-cache group (``meta.block_tables``).

    ``append`` and ``reset`` change a host mirror at once (so a step's checks see them) and stage the
    device writes; the next ``prepare_*`` applies every staged write in its one launch. Row
    ``max_num_reqs`` of every table is reserved for CUDA-graph padding rows and holds
    ``config.padding_page`` (in as many columns as a padding row of a speculative graph step reads).

    Attributes
    ----------
    tables:
        Per group, ``[max_num_reqs + 1, ceil(max_model_len / page_size)]`` int32 device tensors.
    num_blocks:
        Per group, ``[max_num_reqs + 1]`` int32 device tensors: pages held by each request slot.
    flat:
        The one int32 device buffer both live in (the step kernel writes it by offset).
    num_resets:
        How many times a request slot was reset (steps use it to know their pages still stand).
    """

    def __init__(self, config: MetadataConfig):
        self.config = cfg = config
        rows = cfg.max_num_reqs + 1
        widths = [cfg.max_pages_per_req(g) for g in range(len(cfg.kv_groups))]
        self.table_offsets = [int(x) for x in np.cumsum([0] + [rows * w for w in widths])[:-1]]
        self.num_blocks_offset = sum(rows * w for w in widths)
        total = self.num_blocks_offset + rows * len(widths)  # < 2^31: checked by MetadataConfig
        self.flat = torch.zeros(total, dtype=torch.int32, device=cfg.device)
        self.tables = tuple(
            self.flat[b : b + rows * w].view(rows, w) for b, w in zip(self.table_offsets, widths, strict=True)
        )
        self.num_blocks = tuple(
            self.flat[self.num_blocks_offset + g * rows : self.num_blocks_offset + (g + 1) * rows]
            for g in range(len(widths))
        )
        self.num_resets = 0
        self._reset_listeners: list[Callable[[int], None]] = []
        self._host_tables = [np.zeros((rows, w), np.int32) for w in widths]
        self._host_num_blocks = np.zeros((len(widths), rows), np.int64)
        self._staged: dict[int, int] = {}
        self._one_group = len(widths) == 1
        # The padding row, in every group: the padding page, as many times as a padding row of a
        # speculative CUDA-graph step reads (one cached token and 1 + max_draft_tokens new ones).
        for g, w in enumerate(widths):
            n = min(w, -(-(2 + cfg.max_draft_tokens) // cfg.kv_groups[g].page_size))
            self._write(g, cfg.max_num_reqs, 0, [cfg.padding_page] * n)
            self._set_count(g, cfg.max_num_reqs, n)

    def __repr__(self) -> str:
        used = int((self._host_num_blocks[:, : self.config.max_num_reqs] > 0).any(axis=0).sum())
        return (
            f"BlockTables(num_groups={self.num_groups}, max_num_reqs={self.config.max_num_reqs}, "
            f"widths={[t.shape[1] for t in self._host_tables]}, request_slots_holding_pages={used}, "
            f"staged_writes={len(self._staged)})"
        )

    @property
    def num_groups(self) -> int:
        return len(self.tables)

    def pages(self, req_idx: int, group: int = 0) -> np.ndarray:
        """The pages request slot ``req_idx`` holds in ``group`` (host mirror, staged writes included)."""
        req = self._check_slot(req_idx)
        g = self._check_group(group)
        return self._host_tables[g][req, : self._host_num_blocks[g, req]].copy()

    def num_pages(self, req_idx: int, group: int = 0) -> int:
        """How many pages request slot ``req_idx`` holds in ``group``."""
        return int(self._host_num_blocks[self._check_group(group), self._check_slot(req_idx)])

    def host_table(self, group: int) -> np.ndarray:
        """Group ``group``'s host mirror ``[max_num_reqs + 1, W]`` int32 (read-only by convention)."""
        return self._host_tables[group]

    def host_num_blocks(self) -> np.ndarray:
        """``[num_groups, max_num_reqs + 1]`` int64: pages each request slot holds (host mirror)."""
        return self._host_num_blocks

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
        if self._one_group and type(new_pages) is list and new_pages and all(type(p) is int for p in new_pages):
            if self._append_ints(req, new_pages):  # common case: one group, a list of Python ints
                return
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

    def _append_ints(self, req: int, pages: list[int]) -> bool:
        """``append`` of one group's pages given as Python ints (not empty), in plain Python, without
        numpy's per-call cost on a list of one or a few pages: the same writes. Returns False, having
        changed nothing, for pages the general path must reject (it raises the message)."""
        have = int(self._host_num_blocks[0, req])
        width = self._host_tables[0].shape[1]
        upper = self.config.num_kv_pages or _I32_MAX + 1
        if have + len(pages) > width or min(pages) < 0 or max(pages) >= upper:
            return False
        table, staged, start = self._host_tables[0], self._staged, self.table_offsets[0] + req * width + have
        for i, page in enumerate(pages):
            table[req, have + i] = page
            staged[start + i] = page
        n = have + len(pages)
        self._host_num_blocks[0, req] = n
        staged[self.num_blocks_offset + req] = n  # group 0's held counts start there
        return True

    def reset(self, req_idx: int) -> None:
        """Request slot ``req_idx`` finished: it holds no pages in any group."""
        req = self._check_slot(req_idx)
        for g in range(self.num_groups):
            self._set_count(g, req, 0)
        self.num_resets += 1
        for listener in self._reset_listeners:
            listener(req)

    def on_reset(self, listener: Callable[[int], None]) -> None:
        """Calls ``listener(req_idx)`` after each :meth:`reset` (state kept per request slot elsewhere)."""
        self._reset_listeners.append(listener)

    def num_staged(self) -> int:
        """Writes staged since the last step (what :meth:`take_staged` would return)."""
        return len(self._staged)

    def take_staged(self) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, values) of every staged write into :attr:`flat`, forgotten once taken."""
        if not self._staged:
            return _NO_WRITES, _NO_WRITES
        offsets = np.fromiter(self._staged.keys(), np.int32, len(self._staged))
        values = np.fromiter(self._staged.values(), np.int32, len(self._staged))
        self._staged.clear()
        return offsets, values

    def rows_of(self, offsets: np.ndarray) -> np.ndarray:
        """The table row (request slot; ``max_num_reqs`` for the padding row) each write at
        ``offsets`` (into :attr:`flat`, as :meth:`take_staged` gives them) goes to: one of its
        tables' columns, or its held count. ``[n]`` int64."""
        rows = self.config.max_num_reqs + 1
        off = offsets.astype(np.int64)
        out = np.mod(off - self.num_blocks_offset, rows)  # held counts: group after group, a row each
        for start, table in zip(self.table_offsets, self.tables, strict=True):
            inside = (off >= start) & (off < start + table.numel())
            np.floor_divide(off - start, table.shape[1], out=out, where=inside)
        return out

    # Internals ----------------------------------------------------------------------------------------
    def _check_slot(self, req_idx: object) -> int:
        if isinstance(req_idx, bool) or not isinstance(req_idx, (int, np.integer)):
            raise TypeError(f"req_idx: expected an int, got {type(req_idx).__name__}")
        if not 0 <= req_idx < self.config.max_num_reqs:
            raise ValueError(f"req_idx: expected a request slot in [0, {self.config.max_num_reqs}), got {req_idx}")
        return int(req_idx)

    def _check_group(self, group: object) -> int:
        if isinstance(group, bool) or not isinstance(group, (int, np.integer)):
            raise TypeError(f"group: expected an int, got {type(group).__name__}")
        if not 0 <= group < self.num_groups:
            raise ValueError(f"group: expected a KV-cache group in [0, {self.num_groups}), got {group}")
        return int(group)

    def _per_group(self, new_pages: object) -> list[np.ndarray]:
        groups = self.num_groups
        if isinstance(new_pages, torch.Tensor):
            if new_pages.device.type != "cpu":
                raise ValueError(f"new_pages: expected host data, got a tensor on {new_pages.device}")
            new_pages = new_pages.detach().numpy()
        if isinstance(new_pages, np.ndarray) and new_pages.ndim == 1:
            new_pages = [new_pages] if groups == 1 else list(new_pages)
        if isinstance(new_pages, (str, bytes)) or not hasattr(new_pages, "__iter__"):
            raise TypeError(
                f"new_pages: expected a sequence of page ids (one per group with several groups), "
                f"got {type(new_pages).__name__}"
            )
        seq = list(new_pages)  # type: ignore[call-overload]
        if groups == 1 and all(np.ndim(p) == 0 for p in seq):
            seq = [seq]  # one group: a flat sequence of page ids (empty: no pages)
        if len(seq) != groups:
            raise ValueError(f"new_pages: expected one sequence of pages per group ({groups}), got {len(seq)}")
        return [host_ints(f"new_pages[{g}]", pages) for g, pages in enumerate(seq)]

    def _write(self, g: int, req: int, col: int, pages: Sequence[int] | np.ndarray) -> None:
        pages = np.asarray(pages, dtype=np.int64)
        width = self._host_tables[g].shape[1]
        self._host_tables[g][req, col : col + len(pages)] = pages
        start = self.table_offsets[g] + req * width + col
        self._staged.update(zip(range(start, start + len(pages)), pages.tolist(), strict=True))

    def _set_count(self, g: int, req: int, n: int) -> None:
        self._host_num_blocks[g, req] = n
        self._staged[self.num_blocks_offset + g * (self.config.max_num_reqs + 1) + req] = n
