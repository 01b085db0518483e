"""batchmeta: attention metadata for LLM inference engines, built on the GPU without host syncs."""

from batchmeta import ops
from batchmeta.block_tables import BlockTables
from batchmeta.config import MLA, KVGroup, MetadataConfig
from batchmeta.context_parallel import ContextParallel
from batchmeta.draft import DraftRound
from batchmeta.metadata import BatchMetadata
from batchmeta.ops import PAD_SLOT_ID, has_triton
from batchmeta.step import StaleStepError, Step, current_step

__version__ = "0.1.0"

__all__ = [
    "MLA",
    "PAD_SLOT_ID",
    "BatchMetadata",
    "BlockTables",
    "ContextParallel",
    "DraftRound",
    "KVGroup",
    "MetadataConfig",
    "StaleStepError",
    "Step",
    "__version__",
    "current_step",
    "has_triton",
    "ops",
]
