"""FlashInfer's wrappers: availability, the shared workspace and wrapper construction."""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = [
    "flashinfer_available",
    "get_workspace",
    "new_decode_wrapper",
    "new_paged_prefill_wrapper",
    "new_ragged_prefill_wrapper",
]

_workspaces: dict[torch.device, torch.Tensor] = {}


@functools.cache
def flashinfer_available() -> bool:
    """FlashInfer importable and a CUDA device present."""
    if not torch.cuda.is_available():
        return False
    try:
        import flashinfer  # noqa: F401
    except Exception:  # an import error, or a broken CUDA toolchain under it
        return False
    return True


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
    import flashinfer

    if graph_buffers is None:
        return flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
    qo, indptr, indices, last_page_len = graph_buffers
    return flashinfer.BatchPrefillWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True, qo_indptr_buf=qo, paged_kv_indptr_buf=indptr,
        paged_kv_indices_buf=indices, paged_kv_last_page_len_buf=last_page_len, backend=backend,
    )  # fmt: skip


def new_ragged_prefill_wrapper(workspace: torch.Tensor, backend: str = "fa2") -> Any:
    """``BatchPrefillWithRaggedKVCacheWrapper`` (NHD) over ``workspace``: prefill with nothing cached."""
    import flashinfer

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
    import flashinfer

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
