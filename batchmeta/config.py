"""Frozen configuration of a :class:`~batchmeta.metadata.BatchMetadata`.

Every capacity a buffer is sized by lives here, and every impossible value is rejected when the
config is made, with a message naming the field.
"""

from __future__ import annotations

import math

import attrs
import torch

from batchmeta.context_parallel import ContextParallel, is_sharded

__all__ = ["MLA", "KVGroup", "MetadataConfig"]

# float32 only where FlashInfer plans nothing (the torch attention); BatchMetadata checks that when made.
_ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2)
_MAX_INT32 = 2**31 - 1


def _int_in(lo: int, hi: int):
    """Validator: an int (not a bool) in ``[lo, hi]``; ``hi`` keeps every value an int32 buffer stores."""

    def check(inst, attribute, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{attribute.name}: expected an int, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise ValueError(f"{attribute.name}: expected an int in [{lo}, {hi}], got {value}")

    return check


_positive = _int_in(1, _MAX_INT32)
_non_negative = _int_in(0, _MAX_INT32)


def _positive_float(name: str, value: object, *, zero_ok: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{name}: expected a finite float {bound}, got {value}")


@attrs.frozen(kw_only=True)
class MLA:
    """Multi-head latent attention (DeepSeek V2/V3, Kimi K2): the shape of an MLA group's attention.

    Its layers cache one compressed latent ``[num_pages, page_size, head_dim_ckv]`` and one rope
    part ``[num_pages, page_size, head_dim_kpe]`` per token (no per-head keys or values), and attend
    with FlashInfer's ``BatchMLAPagedAttentionWrapper`` (absorbed form: queries ``q_nope``
    ``[T, num_heads, head_dim_ckv]`` and ``q_pe`` ``[T, num_heads, head_dim_kpe]``).

    Parameters
    ----------
    num_heads:
        Query heads of one rank.
    head_dim_ckv:
        Width of the compressed latent (DeepSeek: ``kv_lora_rank`` = 512).
    head_dim_kpe:
        Width of the rope part (DeepSeek: ``qk_rope_head_dim`` = 64).
    """

    num_heads: int = attrs.field(validator=_positive)
    head_dim_ckv: int = attrs.field(validator=_positive)
    head_dim_kpe: int = attrs.field(validator=_positive)


@attrs.frozen(kw_only=True)
class KVGroup:
    """A set of layers sharing one block table: its page size, sliding window and attention scales.

    Parameters
    ----------
    page_size:
        Tokens per KV page, ``>= 1``.
    window_left:
        Sliding window: a query at position ``p`` attends to keys at positions
        ``[p - window_left, p]``; ``-1`` (default) for full attention.
    sm_scale:
        Softmax scale of the group's attention logits, given to FlashInfer's plan; None (default)
        for ``1 / sqrt(head_dim)``. Gemma 2/3: ``query_pre_attn_scalar ** -0.5``. An MLA group must
        set it (DeepSeek: ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5``, times its YaRN mscale²).
    logits_soft_cap:
        Soft cap of the logits (after ``sm_scale``): ``cap * tanh(logit / cap)``; 0 (default) for
        none. Gemma 2: ``attn_logit_softcapping`` (50).
    mla:
        An :class:`MLA` shape makes the group an MLA group; None (default) for ordinary paged
        attention with the config's heads.
    """

    page_size: int = attrs.field(validator=_positive)
    window_left: int = attrs.field(default=-1)
    sm_scale: float | None = attrs.field(default=None)
    logits_soft_cap: float = attrs.field(default=0.0)
    mla: MLA | None = attrs.field(default=None)

    @window_left.validator
    def _check_window(self, attribute, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"window_left: expected an int, got {type(value).__name__}")
        if value < -1:
            raise ValueError(f"window_left: expected -1 (full attention) or a window >= 0, got {value}")

    @sm_scale.validator
    def _check_sm_scale(self, attribute, value) -> None:
        if value is not None:
            _positive_float("sm_scale", value, zero_ok=False)

    @logits_soft_cap.validator
    def _check_soft_cap(self, attribute, value) -> None:
        _positive_float("logits_soft_cap", value, zero_ok=True)

    @mla.validator
    def _check_mla(self, attribute, value) -> None:
        if value is None:
            return
        if not isinstance(value, MLA):
            raise TypeError(f"mla: expected an MLA or None, got {type(value).__name__}")
        # FlashInfer's MLA kernels have neither a window nor a soft cap; a default scale would be a guess.
        if self.window_left != -1:
            raise ValueError(f"window_left: an MLA group attends to every cached token (-1), got {self.window_left}")
        if self.logits_soft_cap:
            raise ValueError(f"logits_soft_cap: an MLA group has no soft cap (0), got {self.logits_soft_cap}")
        if self.sm_scale is None:
            raise ValueError(
                "sm_scale: an MLA group needs its softmax scale (DeepSeek: "
                "(qk_nope_head_dim + qk_rope_head_dim) ** -0.5 times its mscale squared)"
            )


def _default_device() -> torch.device:
    """CUDA where this machine has it, else the CPU (torch fallbacks)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to_device(value: object) -> torch.device:
    if isinstance(value, torch.device):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(
            f"device: expected a torch.device, a str such as 'cuda:0' or 'cpu', or a CUDA index, "
            f"got {type(value).__name__}"
        )
    try:
        return torch.device(value)
    except RuntimeError as e:
        raise ValueError(f"device: {value!r} is not a device torch knows ('cpu', 'cuda', 'cuda:1', ...)") from e


def _check_device(inst, attribute, value: torch.device) -> None:
    if value.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected a 'cpu' or 'cuda' device, got {value}")
    if value.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: {value} requested, but this machine has no usable CUDA device; use "
                f"device='cpu' (the torch fallbacks) or leave the default"
            )
        if value.index is not None and value.index >= torch.cuda.device_count():
            raise ValueError(
                f"device: {value} requested, but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )


def _to_groups(value: object) -> tuple[KVGroup, ...]:
    if isinstance(value, KVGroup):
        return (value,)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"kv_groups: expected a KVGroup or a sequence of them, got {type(value).__name__}")
    return tuple(value)  # type: ignore[arg-type]


def _to_sizes(value: object) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"cuda_graph_batch_sizes: expected a sequence of ints, got {type(value).__name__}")
    return tuple(value)  # type: ignore[arg-type]


@attrs.frozen(kw_only=True)
class MetadataConfig:
    """What a :class:`~batchmeta.metadata.BatchMetadata` is sized for. Frozen; validated on creation.

    Every size, page id and length the buffers store is int32: the bounds here keep it so.

    Parameters
    ----------
    max_num_reqs:
        Request slots: rows of the persistent block tables, and the largest batch.
    max_num_tokens:
        New tokens in one step (the scheduler's token budget).
    max_model_len:
        Longest sequence (cached + new tokens) of any request, ``< 2^31``.
    kv_groups:
        One :class:`KVGroup` per block table (hybrid models have several).
    num_qo_heads, num_kv_heads, head_dim:
        Attention shape; ``num_qo_heads`` must be a multiple of ``num_kv_heads``. Any ``head_dim``
        works with the torch attention; where FlashInfer plans (a CUDA device, FlashInfer installed,
        ``plan_attention=True``) it must be 64, 128 or 256, checked when the ``BatchMetadata`` is made.
    q_dtype, kv_dtype:
        Query and KV-cache dtypes given to FlashInfer's plan, and the dtypes ``step.attention``
        checks its tensors against. ``q_dtype``: float16, bfloat16 (default) or float32;
        ``kv_dtype``: those or float8. float32 only where FlashInfer plans nothing (the CPU, or
        ``plan_attention=False``): a planned CUDA ``BatchMetadata`` rejects it when made. A float8
        ``kv_dtype`` (e4m3fn or e5m2) is a quantized cache: store with ``ops.store_kv(...,
        k_scale=, v_scale=)`` and attend with ``step.attention(..., k_scale=, v_scale=)`` (the same
        per-layer scales); not for MLA groups.
    device:
        Where the buffers live (``"cuda"``, ``"cuda:1"``, ``"cpu"``). Default: ``"cuda"`` when this
        machine has a CUDA device, else ``"cpu"``. A device this machine lacks raises ``ValueError``.
    num_kv_pages:
        Pages in the KV cache of each group (page ids must be below it, ``<= 2^31``). 0: page ids
        are only checked to fit int32.
    cuda_graph_batch_sizes:
        Decode batch sizes to capture as CUDA graphs, increasing; each ``<= max_num_reqs``. Empty
        for none. Only used on CUDA (a CPU ``BatchMetadata`` rejects ``cuda_graph=True`` steps).
    max_draft_tokens:
        Speculative tokens per request in a decode step (decode query length ``1 + k``).
    padding_page:
        The page that padding rows of a CUDA-graph batch read (never written: their slots are PAD).
    workspace_bytes:
        FlashInfer float workspace, shared by every wrapper on the device.
    backend:
        How the step kernel runs: ``None`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, the torch
        implementation otherwise), ``"triton"`` or ``"torch"``, as for every op. ``"torch"`` on CUDA
        is a reference path: like every op's torch implementation it reads device values (syncs).
    plan_attention:
        Plan FlashInfer every step (when it is installed and the device is CUDA). ``False`` for
        engines whose attention reads the metadata directly (block tables, ``seq_lens``); steps then
        carry no wrappers.
    prefill_backend:
        FlashInfer's ``backend`` for the paged and ragged prefill wrappers: ``"fa2"`` (default),
        ``"fa3"`` (sm90 only) or ``"auto"`` (FlashInfer picks: FA3 on sm90). FA3's planner costs
        0.7–2 ms of host time per plan on an H100 machine (a heap over heads × query tiles), FA2's
        20–45 µs, so FA2 is the default; both take batchmeta's fast planning path.
    batch_block_tables:
        Build ``step.batch_block_tables`` (each batch row's pages, ``[B, W]``) every step. Off by
        default: FlashInfer reads ``kv_indices``, and writing a second copy of every row's pages
        doubles the step kernel's writes. Turn it on for attention kernels that read block tables.
    token_history:
        Own a device token history ``[max_num_reqs, max_model_len]`` int32
        (``BatchMetadata.token_ids``; token ids fit int32): prompts staged with ``stage_prompt`` are written into it by
        the next step's launch, ``accept_tokens`` writes sampled tokens into it, and every step
        gathers its ``input_ids`` from it in the same launch, so an engine can prepare step N+1
        before it has seen step N's tokens. Off by default; it takes ``4 * max_num_reqs *
        max_model_len`` bytes of device memory (512 MiB for 1024 requests of 128K tokens).
    max_loras:
        Multi-LoRA: adapter slots (the rows of the engine's stacked LoRA weights), so also the most
        adapters one batch uses. Each request slot uses one adapter or none
        (``BatchMetadata.lora.set_adapter``) and every step builds ``step.lora``: the tokens sorted
        by adapter and the segment metadata SGMV-, BGMV- and vLLM-style LoRA kernels read
        (:mod:`batchmeta.lora`). 0 (default): off, and steps are exactly what they are without it.
    max_lora_rank:
        Largest LoRA rank of an adapter (the width of the engine's stacked ``A`` / ``B`` weights);
        ``>= 1`` with ``max_loras > 0``, else 0.
    context_parallel:
        This rank's place in a context-parallel group (:class:`~batchmeta.ContextParallel`), whose
        ranks each store a share of every request's KV (:mod:`batchmeta.context_parallel`); each
        step is then this rank's: slot mappings PAD for the tokens it does not own, KV lengths,
        page counts, ``kv_indptr``, ``kv_indices`` and ``kv_last_page_len`` its local ones, in
        every full-attention group (sliding-window groups are not sharded). None (default) or
        ``world_size=1``: no sharding. ``step.attention`` merges the ranks' partial attention
        through the process group. Not yet with sharding: CUDA-graph decode, draft loops, MLA
        groups, speculative acceptance counts on the device.
    """

    max_num_reqs: int = attrs.field(validator=_int_in(1, _MAX_INT32 - 1))  # + the padding row
    max_num_tokens: int = attrs.field(validator=_positive)
    max_model_len: int = attrs.field(validator=_positive)
    kv_groups: tuple[KVGroup, ...] = attrs.field(converter=_to_groups)
    num_qo_heads: int = attrs.field(validator=_positive)
    num_kv_heads: int = attrs.field(validator=_positive)
    head_dim: int = attrs.field(validator=_positive)
    q_dtype: torch.dtype = attrs.field(default=torch.bfloat16)
    kv_dtype: torch.dtype = attrs.field(default=torch.bfloat16)
    device: torch.device = attrs.field(factory=_default_device, converter=_to_device, validator=_check_device)
    num_kv_pages: int = attrs.field(default=0, validator=_int_in(0, _MAX_INT32 + 1))  # page ids < 2^31
    cuda_graph_batch_sizes: tuple[int, ...] = attrs.field(default=(), converter=_to_sizes)
    max_draft_tokens: int = attrs.field(default=0, validator=_non_negative)
    padding_page: int = attrs.field(default=0, validator=_non_negative)
    workspace_bytes: int = attrs.field(default=128 * 1024 * 1024, validator=_int_in(1, 2**63 - 1))
    backend: str | None = attrs.field(default=None)
    plan_attention: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    prefill_backend: str = attrs.field(default="fa2")
    batch_block_tables: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    token_history: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    max_loras: int = attrs.field(default=0, validator=_int_in(0, 2**16))
    max_lora_rank: int = attrs.field(default=0, validator=_int_in(0, 2**16))
    context_parallel: ContextParallel | None = attrs.field(default=None)

    @kv_groups.validator
    def _check_groups(self, attribute, value) -> None:
        if not value:
            raise ValueError("kv_groups: expected at least one KVGroup, got none")
        for i, g in enumerate(value):
            if not isinstance(g, KVGroup):
                raise TypeError(f"kv_groups[{i}]: expected a KVGroup, got {type(g).__name__}")
            if g.window_left >= self.max_model_len:
                raise ValueError(
                    f"kv_groups[{i}].window_left: a window of {g.window_left} never applies with "
                    f"max_model_len {self.max_model_len}; use -1 for full attention"
                )
        # Every group's table plus its page counts, with the reserved padding row, in one int32-indexed buffer.
        rows = self.max_num_reqs + 1
        entries = sum(rows * (-(-self.max_model_len // g.page_size) + 1) for g in value)
        if entries > _MAX_INT32:
            raise ValueError(f"kv_groups: the block tables would hold {entries} entries, more than int32 indexes")

    @num_kv_heads.validator
    def _check_heads(self, attribute, value) -> None:
        if self.num_qo_heads % value:
            raise ValueError(
                f"num_kv_heads: num_qo_heads ({self.num_qo_heads}) must be a multiple of num_kv_heads ({value})"
            )

    @q_dtype.validator
    def _check_q_dtype(self, attribute, value) -> None:
        if value not in _ATTN_DTYPES:
            raise TypeError(f"q_dtype: expected torch.float16, torch.bfloat16 or torch.float32, got {value}")

    @kv_dtype.validator
    def _check_kv_dtype(self, attribute, value) -> None:
        if value not in _KV_DTYPES:
            raise TypeError(f"kv_dtype: expected float16, bfloat16, float32 or a float8 dtype, got {value}")

    @kv_groups.validator
    def _check_fp8(self, attribute, value) -> None:
        if self.kv_dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            return
        for i, g in enumerate(value):
            if g.mla is not None:
                raise ValueError(
                    f"kv_groups[{i}].mla: batchmeta has no float8 MLA cache; kv_dtype must be "
                    f"float16 or bfloat16 with MLA groups, got {self.kv_dtype}"
                )

    @max_draft_tokens.validator
    def _check_draft(self, attribute, value) -> None:
        if value >= self.max_num_tokens:
            raise ValueError(
                f"max_draft_tokens: 1 + {value} tokens per request exceed max_num_tokens ({self.max_num_tokens})"
            )

    @backend.validator
    def _check_backend(self, attribute, value) -> None:
        if value not in (None, "triton", "torch"):
            raise ValueError(f"backend: expected None, 'triton' or 'torch', got {value!r}")

    @prefill_backend.validator
    def _check_prefill_backend(self, attribute, value) -> None:
        if value not in ("fa2", "fa3", "auto"):
            raise ValueError(f"prefill_backend: expected 'fa2', 'fa3' or 'auto', got {value!r}")

    @prefill_backend.validator
    def _check_fp8_backend(self, attribute, value) -> None:
        fp8 = self.kv_dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        if fp8 and value != "fa2":
            # FA3 attends over float8 keys only with float8 queries.
            raise ValueError(
                f"prefill_backend: a float8 KV cache with {self.q_dtype} queries needs 'fa2', got {value!r}"
            )

    @cuda_graph_batch_sizes.validator
    def _check_graph_sizes(self, attribute, value) -> None:
        for s in value:
            if isinstance(s, bool) or not isinstance(s, int):
                raise TypeError(f"cuda_graph_batch_sizes: expected ints, got {value}")
            if s < 1:
                raise ValueError(f"cuda_graph_batch_sizes: expected ints >= 1, got {value}")
        if list(value) != sorted(set(value)):
            raise ValueError(f"cuda_graph_batch_sizes: expected strictly increasing sizes, got {value}")
        if value and value[-1] > self.max_num_reqs:
            raise ValueError(f"cuda_graph_batch_sizes: {value[-1]} exceeds max_num_reqs ({self.max_num_reqs})")
        if value and value[-1] * (1 + self.max_draft_tokens) > self.max_num_tokens:
            raise ValueError(
                f"cuda_graph_batch_sizes: a decode batch of {value[-1]} with {self.max_draft_tokens} draft tokens "
                f"needs {value[-1] * (1 + self.max_draft_tokens)} tokens, more than max_num_tokens "
                f"({self.max_num_tokens})"
            )

    @max_lora_rank.validator
    def _check_lora_rank(self, attribute, value) -> None:
        if self.max_loras and not value:
            raise ValueError(f"max_lora_rank: expected a rank >= 1 with max_loras={self.max_loras}, got 0")
        if value and not self.max_loras:
            raise ValueError(f"max_lora_rank: expected 0 with max_loras=0 (LoRA off), got {value}")

    @context_parallel.validator
    def _check_context_parallel(self, attribute, value) -> None:
        if value is not None and not isinstance(value, ContextParallel):
            raise TypeError(f"context_parallel: expected a ContextParallel or None, got {type(value).__name__}")
        sharded = [g for g, grp in enumerate(self.kv_groups) if is_sharded(value, grp)]
        if not sharded:
            return
        # Not built yet under sharding: rejected here rather than accepted untested.
        if any(self.kv_groups[g].mla is not None for g in sharded):
            raise ValueError(
                f"context_parallel: world_size {value.world_size} shards groups {sharded}, which batchmeta "
                f"does not support yet with an MLA group"
            )

    @padding_page.validator
    def _check_padding_page(self, attribute, value) -> None:
        if self.num_kv_pages and value >= self.num_kv_pages:
            raise ValueError(f"padding_page: expected a page below num_kv_pages ({self.num_kv_pages}), got {value}")

    @property
    def gqa_ratio(self) -> int:
        return self.num_qo_heads // self.num_kv_heads

    def sm_scale(self, group: int) -> float:
        """Softmax scale of group ``group``: its ``sm_scale``, or ``1 / sqrt(head_dim)``."""
        scale = self.kv_groups[group].sm_scale
        return float(scale) if scale is not None else 1.0 / math.sqrt(self.head_dim)

    def sharded(self, group: int) -> bool:
        """Whether group ``group``'s KV is spread over the context-parallel ranks
        (:func:`~batchmeta.context_parallel.is_sharded`)."""
        return is_sharded(self.context_parallel, self.kv_groups[group])

    def max_pages_per_req(self, group: int) -> int:
        """Width of group ``group``'s block table: ``ceil(max_model_len / page_size)``."""
        return -(-self.max_model_len // self.kv_groups[group].page_size)
