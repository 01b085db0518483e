"""batchmeta: attention metadata for LLM inference engines, built on the GPU without host syncs."""

from batchmeta import ops
from batchmeta.attention import current_step
from batchmeta.config import KVGroup, MetadataConfig
from batchmeta.metadata import BatchMetadata, BlockTables, Step
from batchmeta.ops import PAD_SLOT_ID, has_triton

__version__ = "0.1.0"

__all__ = [
    "PAD_SLOT_ID",
    "BatchMetadata",
    "BlockTables",
    "KVGroup",
    "MetadataConfig",
    "Step",
    "__version__",
    "current_step",
    "has_triton",
    "ops",
]
