"""batchmeta: attention metadata for LLM inference engines, built on the GPU without host syncs."""

from batchmeta import ops
from batchmeta.ops import PAD_SLOT_ID, has_triton

__version__ = "0.1.0"

__all__ = ["PAD_SLOT_ID", "__version__", "has_triton", "ops"]
