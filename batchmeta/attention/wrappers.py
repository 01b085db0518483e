"""FlashInfer's wrappers: availability, the shared workspace and wrapper construction."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

__all__ = [
    "FLASHINFER_INSTALL",
    "flashinfer_available",
    "flashinfer_planning_available",
    "get_workspace",
    "new_decode_wrapper",
    "new_paged_prefill_wrapper",
    "new_ragged_prefill_wrapper",
]

FLASHINFER_INSTALL = "pip install 'batchmeta[flashinfer]'"  # FlashInfer is an optional extra

_logger = logging.getLogger("batchmeta")
_workspaces: dict[torch.device, torch.Tensor] = {}
_warned_missing = [False]


@functools.cache
def _flashinfer_import_error() -> str | None:
    """Why ``import flashinfer`` fails here, or None when it works."""
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # an import error, or a broken CUDA toolchain under it
        return f"{type(e).__name__}: {e}"
    return None


@functools.cache
def flashinfer_available() -> bool:
    """FlashInfer importable and a CUDA device present."""
    return torch.cuda.is_available() and _flashinfer_import_error() is None


def flashinfer_planning_available() -> bool:
    """:func:`flashinfer_available`, for a CUDA model runner that asks to plan: where CUDA is present
    but FlashInfer cannot be imported, logs a warning once (logger ``"batchmeta"``) saying how to
    install it; attention then runs the torch implementation."""
    if flashinfer_available():
        return True
    if torch.cuda.is_available() and not _warned_missing[0]:
        _warned_missing[0] = True
        _logger.warning(
            "batchmeta: FlashInfer is not installed (%s): attention is not planned and runs the torch "
            "implementation; install it with %s",
            _flashinfer_import_error(),
            FLASHINFER_INSTALL,
        )
    return False


def _flashinfer() -> Any:
    """The ``flashinfer`` module, or an ImportError saying how to install it."""
    try:
        import flashinfer
    except ImportError as e:
        raise ImportError(f"FlashInfer is not installed; install it with {FLASHINFER_INSTALL}") from e
    return flashinfer


def get_workspace(device: torch.device, nbytes: int = 128 * 1024 * 1024) -> torch.Tensor:
    """The float workspace FlashInfer wrappers on ``device`` share: one per device, made on first use.

    A later request for more bytes than the existing workspace has replaces it for new wrappers;
    wrappers made earlier keep theirs.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ws = _workspaces.get(device)
    if ws is None or ws.numel() < nbytes:
        ws = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        _workspaces[device] = ws
    return ws


def new_paged_prefill_wrapper(
    workspace: torch.Tensor,
    backend: str = "fa2",
    graph_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> Any:
    """``BatchPrefillWithPagedKVCacheWrapper`` (NHD) over ``workspace``, with FlashInfer's ``backend``.
    With ``graph_buffers`` = ``(qo_indptr [bs+1], kv_indptr [bs+1], kv_indices [capacity],
    kv_last_page_len [bs])`` it is a CUDA-graph wrapper for one batch size, reading those fixed
    buffers (speculative verify steps under graphs)."""
    flashinfer = _flashinfer()

    if graph_buffers is None:
        return flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
    qo, indptr, indices, last_page_len = graph_buffers
    return flashinfer.BatchPrefillWithPagedKVCacheWrapper(
        workspace,
        "NHD",
        use_cuda_graph=True,
        qo_indptr_buf=qo,
        paged_kv_indptr_buf=indptr,
        paged_kv_indices_buf=indices,
        paged_kv_last_page_len_buf=last_page_len,
        backend=backend,
    )


def new_ragged_prefill_wrapper(workspace: torch.Tensor, backend: str = "fa2") -> Any:
    """``BatchPrefillWithRaggedKVCacheWrapper`` (NHD) over ``workspace``: prefill with nothing cached."""
    flashinfer = _flashinfer()

    return flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend=backend)


def new_decode_wrapper(
    workspace: torch.Tensor,
    *,
    use_tensor_cores: bool,
    graph_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> Any:
    """``BatchDecodeWithPagedKVCacheWrapper`` (NHD). With ``graph_buffers`` =
    ``(kv_indptr [bs+1], kv_indices [capacity], kv_last_page_len [bs])`` it is a CUDA-graph wrapper
    for one batch size, reading those fixed buffers."""
    flashinfer = _flashinfer()

    if graph_buffers is None:
        return flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=use_tensor_cores)
    indptr, indices, last_page_len = graph_buffers
    return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace,
        "NHD",
        use_cuda_graph=True,
        use_tensor_cores=use_tensor_cores,
        paged_kv_indptr_buffer=indptr,
        paged_kv_indices_buffer=indices,
        paged_kv_last_page_len_buffer=last_page_len,
    )
