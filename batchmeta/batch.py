"""The scheduler's batch on the host: conversion of its arrays and every check, before anything changes.

A step is described by host data only (lists, numpy arrays or CPU tensors): which request slot
each batch row is (``idx_mapping``), how many new tokens each row has (``query_lens``) and how many
it already has cached (``cache_lens``). :class:`BatchChecker` validates that against the
configuration and the pages each request slot holds, without reading the GPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Set

import numpy as np
import torch

from batchmeta.config import MetadataConfig
from batchmeta.context_parallel import local_len

__all__ = ["BatchChecker", "host_ints"]


_I64_MAX = 2**63 - 1
_INT64 = np.dtype(np.int64)  # the canonical instance: `is` tells native int64 arrays in one compare


def host_ints(name: str, value: object, *, length: int | None = None) -> np.ndarray:
    """A host-side integer vector (list, numpy array or CPU tensor) as a new int64 numpy array.

    Always a copy (the caller may reuse its arrays); never a wrap: values beyond int64 raise.
    ``ValueError`` for device tensors, ragged or multi-dimensional data, out-of-range values and a
    wrong number of elements; ``TypeError`` for non-integer data (a float list must not be
    truncated), bool, sparse tensors.
    """
    # Common case (an engine's int64 numpy arrays): nothing to convert or bound, only a copy to make.
    if type(value) is np.ndarray and value.dtype is _INT64 and value.ndim == 1:
        if length is not None and value.shape[0] != length:
            raise ValueError(f"{name}: expected {length} elements (one per batch row), got {value.shape[0]}")
        return value.copy()
    owned = False  # whether ``value`` becomes an array nobody else holds
    if type(value) is not np.ndarray:
        if isinstance(value, torch.Tensor):
            if value.device.type != "cpu":
                raise ValueError(
                    f"{name}: expected host data (list, numpy array or CPU tensor), got a tensor on {value.device}"
                )
            if value.layout != torch.strided:
                raise TypeError(f"{name}: expected a dense tensor, got layout {value.layout}")
            if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
                raise TypeError(f"{name}: expected integers, got dtype {value.dtype}")
            value = value.detach().numpy()
        elif isinstance(value, (str, bytes)) or value is None:
            raise TypeError(f"{name}: expected a sequence of ints, got {type(value).__name__}")
        elif isinstance(value, (Iterator, Set, Mapping)):  # np.asarray makes a 0-d object array of these
            raise TypeError(f"{name}: expected a list, numpy array or CPU tensor, got {type(value).__name__}")
        else:
            owned = isinstance(value, (list, tuple))  # np.asarray makes a new array of these
            try:
                value = np.asarray(value)
            except (ValueError, TypeError) as e:  # ragged nested lists
                raise ValueError(f"{name}: expected a flat sequence of ints, got {type(value).__name__}") from e
    arr: np.ndarray = value  # type: ignore[assignment]
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected 1 dimension, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        if arr.dtype == object and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in arr):
            if any(not -_I64_MAX - 1 <= int(v) <= _I64_MAX for v in arr):
                raise ValueError(f"{name}: values beyond int64 (max {_I64_MAX})")
            arr = arr.astype(np.int64)
        else:
            raise TypeError(f"{name}: expected integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and arr.size and arr.max() > _I64_MAX:
        raise ValueError(f"{name}: values beyond int64 (max {_I64_MAX}), got {arr.max()}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name}: expected {length} elements (one per batch row), got {arr.shape[0]}")
    if owned and arr.dtype == np.int64:
        return arr
    return arr.astype(np.int64)  # a copy, also when it is int64 already: the caller may reuse its array


class BatchChecker:
    """Checks a batch against the configuration and the pages each request slot holds.

    Parameters
    ----------
    config:
        Capacities and KV-cache groups.
    held:
        ``[num_groups, max_num_reqs + 1]`` pages each request slot holds (the block tables' host
        mirror, read at each check).
    """

    def __init__(self, config: MetadataConfig, held: np.ndarray):
        self.config = config
        self._held = held
        self.rows = np.arange(config.max_num_reqs + 1, dtype=np.int64)  # 0..max_num_reqs, shared scratch
        self._seen = np.zeros(config.max_num_reqs, dtype=np.int64)

    def check(
        self, idx: np.ndarray, qlens: np.ndarray | int, clens: np.ndarray
    ) -> tuple[np.ndarray, list[np.ndarray], int]:
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
        rows = self.rows[:b]
        self._seen[idx] = rows
        if (self._seen[idx] != rows).any():
            raise ValueError("idx_mapping: a request slot appears twice in one batch")
        # Read as unsigned, a negative length is huge: one reduction bounds cache_lens on both sides.
        if int(clens.view(np.uint64).max()) > cfg.max_model_len:
            raise ValueError(
                f"cache_lens: expected lengths in [0, {cfg.max_model_len}] (max_model_len), "
                f"got {clens.min()}..{clens.max()}"
            )
        num_tokens = qlens * b if type(qlens) is int else int(qlens.sum())
        if num_tokens > cfg.max_num_tokens:
            raise ValueError(f"query_lens: {num_tokens} tokens exceed max_num_tokens ({cfg.max_num_tokens})")
        seq = clens + qlens
        # Decode: a small int added to bounded lengths cannot overflow. Prefill: read as unsigned, a
        # sum that overflowed int64 is huge, so the one bound below rejects it (a query_lens sum can
        # only have wrapped if some row is longer than max_model_len).
        max_seq = int(seq.max()) if type(qlens) is int else int(seq.view(np.uint64).max())
        if max_seq > cfg.max_model_len:
            raise ValueError(
                f"cache_lens: a row reaches {self._reach(seq)} tokens, more than max_model_len ({cfg.max_model_len})"
            )
        pages = []
        local = None  # context parallelism: this rank's share of each row's tokens, in sharded groups
        for g, grp in enumerate(cfg.kv_groups):
            ps = grp.page_size
            kv = seq
            if cfg.sharded(g):  # page counts from local lengths, never global ones (vLLM #48003)
                kv = local = local_len(seq, cfg.context_parallel) if local is None else local
            need = kv if ps == 1 else (kv + (ps - 1)) // ps
            held = self._held[g, idx]
            short = held < need
            if short.any():
                self._raise_short(g, idx, seq, kv, need, held, int(np.argmax(short)))
            pages.append(need)
        return seq, pages, max_seq

    @staticmethod
    def _reach(seq: np.ndarray) -> str:
        """The longest row's tokens, for a message (``beyond int64`` where the sum overflowed)."""
        return "beyond int64" if seq.min() < 0 else str(int(seq.max()))

    def _raise_short(self, g: int, idx, seq, kv, need, held, k: int) -> None:
        req = int(idx[k])
        if not self._held[:, req].any():
            raise ValueError(
                f"idx_mapping: request slot {req} holds no pages yet (never given any, or reset); "
                f"meta.block_tables.append({req}, pages) before its first step"
            )
        cp = self.config.context_parallel
        tokens = (
            f"{seq[k]} tokens" if kv is seq else f"its {kv[k]} of {seq[k]} tokens on context-parallel rank {cp.rank}"
        )
        raise ValueError(
            f"cache_lens: request slot {req} needs {need[k]} pages in group {g} for {tokens} "
            f"but holds {held[k]}; append its pages first"
        )
