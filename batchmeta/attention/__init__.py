"""FlashInfer plumbing, one module per concern; this package knows nothing of ``BatchMetadata`` or
``Step`` and deals in tensors and host arrays.

- :mod:`~batchmeta.attention.wrappers`: is FlashInfer usable, the shared workspace, wrapper construction;
- :mod:`~batchmeta.attention.fast_plan`: what the fast planners share: FlashInfer's planning-call
  conventions per release and the one-time check that a wrapper's fast plan equals its stock plan;
- :mod:`~batchmeta.attention.decode_planner`: :class:`DecodePlanner`, fast decode planning;
- :mod:`~batchmeta.attention.prefill_planner`: :class:`PrefillPlanner`, fast paged- and ragged-prefill planning;
- :mod:`~batchmeta.attention.mla`: :class:`~batchmeta.attention.mla.MLAPlanner`, fast MLA planning;
- :mod:`~batchmeta.attention.planning`: :class:`StepPlanner`, every wrapper of a model runner and
  how a step plans them;
- :mod:`~batchmeta.attention.torch_ref`: paged attention in torch (CPU fallback, reference).
"""

from batchmeta.attention.decode_planner import DecodePlanner, fast_plan_supported
from batchmeta.attention.planning import StepPlanner
from batchmeta.attention.prefill_planner import PrefillPlanner
from batchmeta.attention.torch_ref import paged_attention_torch
from batchmeta.attention.wrappers import (
    FLASHINFER_INSTALL,
    flashinfer_available,
    flashinfer_planning_available,
    get_workspace,
    new_decode_wrapper,
    new_paged_prefill_wrapper,
    new_ragged_prefill_wrapper,
)

__all__ = [
    "FLASHINFER_INSTALL",
    "DecodePlanner",
    "PrefillPlanner",
    "StepPlanner",
    "fast_plan_supported",
    "flashinfer_available",
    "flashinfer_planning_available",
    "get_workspace",
    "new_decode_wrapper",
    "new_paged_prefill_wrapper",
    "new_ragged_prefill_wrapper",
    "paged_attention_torch",
]
