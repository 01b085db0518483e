"""CUDA-graph decode and speculative verify: the captured graphs of one model runner, and the padding policy.

A decode batch of ``B`` rows with ``k`` draft tokens per row is padded to the next captured size
``Bp`` (:func:`graph_batch_size`); graphs are captured per ``(Bp, k)``. Padding rows use a reserved
extra row of every block table holding ``padding_page``; each has one cached token (never 0
tokens, which some kernels turn into NaN or illegal accesses) and reads that page. In plain decode
they add no new token: every slot from the step's token count to the end of the buffer is PAD
(-1). In a verify step (``k > 0``) each adds ``1 + k`` tokens like a real row, so every row of the
graph has the same query length (FlashInfer's prefill wrapper plans a CUDA graph for a fixed row
count and sizes its tiles for uniform rows), and the step kernel gives those tokens PAD slots. Either
way ``store_kv`` writes nothing for padding rows; their outputs are garbage and must be ignored
(``logits_indices`` covers real rows only). Each step plans outside the graph; the graph reads only
buffers whose addresses never change.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from batchmeta.attention.wrappers import FLASHINFER_INSTALL
from batchmeta.config import MetadataConfig
from batchmeta.step import Step

__all__ = ["DecodeGraphs", "graph_batch_size"]


def graph_batch_size(config: MetadataConfig, num_reqs: int, *, planned: bool) -> int:
    """The captured batch size a decode batch of ``num_reqs`` rows is padded to.

    ``planned``: whether FlashInfer plans this runner's steps (the torch fallback reads host arrays,
    so a captured graph would replay stale attention).
    """
    sizes = config.cuda_graph_batch_sizes
    if config.device.type != "cuda":
        raise ValueError(
            f"cuda_graph: CUDA graphs need a CUDA device; this BatchMetadata is on {config.device} (config.device)"
        )
    if not sizes:
        raise ValueError("cuda_graph: no CUDA-graph batch sizes are configured (config.cuda_graph_batch_sizes)")
    if not planned:
        raise ValueError(
            f"cuda_graph: CUDA-graph decode needs FlashInfer planning (FlashInfer installed: "
            f"{FLASHINFER_INSTALL}; and config.plan_attention=True)"
        )
    for s in sizes:
        if s >= num_reqs:
            return s
    raise ValueError(f"idx_mapping: a CUDA-graph decode batch holds at most {sizes[-1]} rows, got {num_reqs}")


class DecodeGraphs:
    """The CUDA graphs captured for decode steps, one per ``(batch size, query length)``."""

    def __init__(self) -> None:
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}

    def capture(self, step: Step, forward: Callable[[Step], None], *, warmup: int) -> torch.cuda.CUDAGraph:
        """Captures ``forward(step)`` for ``step.padded_num_reqs`` rows of ``step.query_len`` tokens
        (``step``: a planned graph step).

        ``forward`` runs ``warmup`` times on a side stream first (lazy initialisation, autotuning),
        then once under capture; ``step`` is the current step throughout.
        """
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), step:
            for _ in range(warmup):
                forward(step)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), step:
            forward(step)
        self._graphs[(step.padded_num_reqs, step.query_len)] = graph  # type: ignore[index]
        return graph

    def replay(self, step: Step) -> None:
        """Replays the graph captured for ``step.padded_num_reqs`` and ``step.query_len``."""
        if not step.cuda_graph:
            raise ValueError("step: planned without cuda_graph=True; its wrappers do not match a captured graph")
        if step.is_stale:
            step._raise_stale("replay")
        graph = self._graphs.get((step.padded_num_reqs, step.query_len))  # type: ignore[arg-type]
        if graph is None:
            k = step.query_len - 1  # type: ignore[operator]
            raise ValueError(
                f"step: no CUDA graph captured for batch size {step.padded_num_reqs} with "
                f"{k} draft tokens (capture_decode_graph(..., num_draft_tokens={k}))"
            )
        graph.replay()
