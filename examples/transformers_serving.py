"""A Hugging Face ``transformers`` decoder served through batchmeta: ``python examples/transformers_serving.py``.

A tiny Llama or Gemma 2 is built from a config with random weights (no download) and registered
batchmeta as its attention implementation (``transformers.AttentionInterface``): every attention
layer finds the active step with ``batchmeta.current_step()``, writes its keys and values into a
paged KV cache (``ops.store_kv``) and attends through ``step.attention``. A scheduler serves a batch
of prompts with greedy sampling: pages from a free list per KV-cache group, chunked prefill under a
token budget, prefill chunks beside decodes (mixed steps), pages freed when a request finishes. On a
GPU with FlashInfer, decode-only steps replay CUDA graphs (one per batch size); on a CPU everything
runs eagerly through batchmeta's torch fallbacks.

Nothing in a step's path reads the GPU: batchmeta owns a token history
(``MetadataConfig(token_history=True)``); each prefill chunk's prompt tokens are staged with
``stage_prompt``, ``accept_tokens`` writes the sampled tokens, and every step's launch gathers its
``step.input_ids`` from it, so the host never waits for a token (requests stop at a fixed length;
the tokens are read once, at the end).

With ``--spec K`` (speculative decoding), every decode step verifies ``K`` drafts of a prompt-lookup
drafter (:func:`ngram_drafts`, torch ops over the token history on the device): the target's argmax
at each token accepts drafts up to the first mismatch, ``accept_tokens`` writes the accepted tokens
(with host counts, ``--accept host``, or device counts, ``--accept device``: nothing read in a
step's path) and ``write_drafts`` the next drafts (:meth:`Runner._serve_spec`). With ``--drafter
layers`` the drafter is the model's first ``--draft-layers`` layers (with the final norm and head)
instead, drafting through batchmeta's draft loop: after each verify step one
``prepare_draft(..., num_steps=K)`` round of ``K`` single-token steps (one CUDA graph per round on a
GPU), its layers' KV caches tensors of their own over the target's pages, which the target's forward
also writes. In float32, :func:`greedy_check` then compares the tokens with plain greedy decoding,
token for token.

With ``--context-parallel N`` the KV cache of every request is spread over ``N`` ranks, one process
each (``torch.multiprocessing``; gloo on the CPU, NCCL with a GPU per rank): each rank's
``BatchMetadata`` has ``MetadataConfig(context_parallel=ContextParallel(N, rank))``, holds pages for
its own share of each request's tokens (``batchmeta.context_parallel.local_len``), runs the same
model and scheduler, stores the KV of the tokens it owns, and ``step.attention`` merges the ranks'
partial attention through the process group. Every rank must produce the tokens of one rank
(:func:`run_context_parallel`).

Afterwards, :func:`teacher_forced_check` runs the same model with transformers' own attention
(``"eager"``) over every prompt plus its generated tokens and checks each generated token against
that forward pass's argmax, allowing only near-ties.
"""

from __future__ import annotations

import argparse
import collections
import contextvars
import dataclasses
import os
import tempfile
import time

import numpy as np
import torch
import transformers

import batchmeta
from batchmeta import BatchMetadata, ContextParallel, KVGroup, MetadataConfig, ops
from batchmeta.attention import flashinfer_available
from batchmeta.context_parallel import local_len

ATTN_IMPLEMENTATION = "batchmeta"
MODELS = ("llama", "gemma2")

# A served token may differ from the reference's argmax only where the reference's top-2 logit gap is
# below this (a near-tie). float32 (CPU): batchmeta's torch fallback and transformers' eager
# attention do the same float32 math in another order; their logits differ by <= 2.1e-5, so 1e-3 is
# a margin of about 50. bfloat16 (GPU): 8 significant bits, so logits of magnitude 2-4 are stored
# 2^-6 = 0.0156 apart; FlashInfer and the eager path round q·k, the softmax and every layer's
# activations differently. Served and reference logits differ by up to 0.22 at a position (the bf16
# reference differs from its own float32 pass by up to 0.29), and over 4992 teacher-forced positions
# (both models, H100) the 191 mismatches all had gaps <= 0.109 (7 bf16 steps). 0.1875 is 1.7 times
# that and leaves about a third of the positions as near-ties; 0.25 would leave 41-45%, too close to
# the majority that fails the check. float16 (3 more bits): logits differed by up to 0.029, 6 times
# less than bf16's, hence 0.03.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.03, torch.bfloat16: 0.1875}


# -------------------------------------------------------------------------------------------------
# The model
# -------------------------------------------------------------------------------------------------
def build_model(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A tiny random-weight ``LlamaForCausalLM`` or ``Gemma2ForCausalLM`` (GQA, head_dim 64), in eval mode.

    Built on the CPU from ``seed`` (the same weights on every device), then moved. The weights are
    drawn wider than the models' default (``initializer_range`` 0.02) so that attention is peaked
    and the next-token logits well separated: with the default, attention is nearly uniform and a
    wrong mask or window would barely move a logit.
    """
    common = dict(
        vocab_size=384,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        initializer_range=0.12,
        attn_implementation="eager",
    )
    if name == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif name == "gemma2":
        # Small sliding window and soft cap, and query_pre_attn_scalar != head_dim, so that the
        # window, the cap and the softmax scale all change the logits (a wrong one fails the check).
        config = transformers.Gemma2Config(
            **common,
            sliding_window=12,
            query_pre_attn_scalar=20,
            attn_logit_softcapping=8.0,
            final_logit_softcapping=30.0,
            tie_word_embeddings=False,
        )
        cls = transformers.Gemma2ForCausalLM
    else:
        raise ValueError(f"name: expected one of {MODELS}, got {name!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.to(device=device, dtype=dtype).eval()


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What a transformers attention module passes its attention function, as batchmeta needs it."""

    module: torch.nn.Module
    sliding_window: int | None  # transformers' window: key j is visible from query i iff i - window < j <= i
    scaling: float
    softcap: float | None

    @property
    def kv_group(self) -> KVGroup:
        """The KV-cache group of this layer's attention (its ``page_size`` is set by the caller)."""
        # transformers masks keys j > i - sliding_window (masking_utils.sliding_window_overlay, 4.53
        # through 5.x), a window of sliding_window keys including the query itself; batchmeta's
        # window_left counts the keys before it.
        window = -1 if self.sliding_window is None else self.sliding_window - 1
        return KVGroup(
            page_size=1, window_left=window, sm_scale=float(self.scaling), logits_soft_cap=float(self.softcap or 0.0)
        )


def attention_layers(model) -> list[LayerSpec]:
    """The model's attention modules in layer order, with the window, scale and soft cap each uses."""
    specs = {}
    for m in model.modules():
        if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx") and hasattr(m, "scaling"):
            specs[m.layer_idx] = LayerSpec(
                m, getattr(m, "sliding_window", None), m.scaling, getattr(m, "attn_logit_softcapping", None)
            )
    n = model.config.num_hidden_layers
    if sorted(specs) != list(range(n)):
        raise ValueError(f"model: expected attention modules for layers 0..{n - 1}, found {sorted(specs)}")
    return [specs[i] for i in range(n)]


def batchmeta_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers attention function: paged KV and planned attention through the active batchmeta step.

    ``query`` is ``[1, Hq, T, D]`` and ``key``/``value`` ``[1, Hkv, T, D]`` (the runner flattens every
    row of a step into one sequence of ``T`` tokens); returns ``([1, T, Hq, D], None)`` as
    transformers' own attention functions do. ``attention_mask`` is None: transformers builds no mask
    for an implementation its mask interface does not know, and the step carries causality, windows
    and request boundaries. The layer's KV-cache group and caches are ``module.batchmeta_kv`` (set
    by :class:`Runner`); the group's window, scale and soft cap come from the module's attributes,
    the values its forward passes here as ``sliding_window``, ``scaling`` and ``softcap``.
    """
    group, k_cache, v_cache = module.batchmeta_kv
    step = batchmeta.current_step()
    # [1, H, T, D] -> [T, H, D]; rotary embeddings left q and k head-major, so these are copies.
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))
    draft_kv = getattr(module, "batchmeta_draft_kv", None)  # a layer of the drafter (--drafter layers)
    if draft_kv is not None:
        if DRAFTING.get():  # a draft step: the drafter's own caches, over the same pages
            k_cache, v_cache = draft_kv
        else:  # the target's forward computes the drafter's layers' keys and values too
            ops.store_kv(k, v, step.slot_mappings[group], *draft_kv)
    ops.store_kv(k, v, step.slot_mappings[group], k_cache, v_cache)  # PAD slots (graph padding) write nothing
    out = step.attention(q, k_cache, v_cache, group=group, k=k, v=v)  # k, v: a ragged prefill's whole KV
    return out.unsqueeze(0), None


transformers.AttentionInterface.register(ATTN_IMPLEMENTATION, batchmeta_attention)

# True while the drafter (the model's first layers, --drafter layers) runs a draft step.
DRAFTING: contextvars.ContextVar[bool] = contextvars.ContextVar("drafting", default=False)


def set_attention(model, name: str) -> None:
    """Switches the model's attention implementation (``"batchmeta"``, ``"eager"``, ...)."""
    if hasattr(model, "set_attn_implementation"):  # not in transformers 4.53
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


# -------------------------------------------------------------------------------------------------
# Serving
# -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    slot: int = -1  # request slot (row of the block tables and of the token history) while running
    cached: int = 0  # tokens in the KV cache
    generated: int = 0
    pages: list[list[int]] = dataclasses.field(default_factory=list)  # per KV-cache group
    output: torch.Tensor | None = None  # device copy of the generated tokens once finished
    logits: list[torch.Tensor] = dataclasses.field(default_factory=list)  # served logits per token, if recorded


@dataclasses.dataclass
class ServeResult:
    tokens: list[list[int]]  # generated tokens per prompt
    logits: list[torch.Tensor] | None  # [new_tokens, vocab] float32 per prompt, when recorded
    step_kinds: collections.Counter  # ragged_prefill, chunked_prefill, mixed, decode, graph_decode
    steps: int
    tokens_in: int  # tokens run through the model (prompts + decode inputs)
    seconds: float
    drafts_proposed: int = 0  # speculative decoding: drafts verified (k per verify row)
    drafts_accepted: int = 0  # ... and accepted (the matched drafts, bonus tokens not counted)

    @property
    def generated(self) -> int:
        return sum(len(t) for t in self.tokens)


class Runner:
    """Serves greedy requests on a transformers model through one :class:`~batchmeta.BatchMetadata`.

    Parameters
    ----------
    model:
        A transformers causal LM (eval mode); its attention is switched to batchmeta here.
    max_num_reqs, token_budget, max_model_len:
        Request slots, new tokens per step, and the longest prompt + output.
    page_sizes:
        Page size of the full-attention group and of the sliding-window group (if the model has one).
    cuda_graphs:
        Replay decode-only steps as CUDA graphs (needs CUDA and FlashInfer).
    spec:
        Draft tokens per verify step (speculative decoding); 0: plain decoding.
    drafter:
        With ``spec``: ``"ngram"`` (prompt lookup, :func:`ngram_drafts`, through ``write_drafts``) or
        ``"layers"`` (the model's first ``draft_layers`` layers, through batchmeta's draft loop:
        ``prepare_draft`` / ``capture_draft_graph``; their KV caches are tensors of their own over the
        target's pages, written by the target's forward too).
    context_parallel:
        This rank's :class:`~batchmeta.ContextParallel` (``torch.distributed`` initialised, the
        world its group), or None: one rank. Plain decoding without CUDA graphs only.
    """

    def __init__(
        self,
        model,
        *,
        max_num_reqs: int = 4,
        token_budget: int = 64,
        max_model_len: int = 256,
        page_sizes: tuple[int, int] = (16, 8),
        cuda_graphs: bool = False,
        spec: int = 0,
        drafter: str = "ngram",
        draft_layers: int = 2,
        context_parallel: ContextParallel | None = None,
    ):
        if context_parallel is not None and context_parallel.world_size > 1 and (spec or cuda_graphs):
            raise ValueError(
                "context_parallel: this runner spreads the KV cache over ranks for plain eager decoding only "
                "(batchmeta has no CUDA-graph decode or draft loops under context parallelism yet)"
            )
        if spec < 0:
            raise ValueError(f"spec: expected >= 0 draft tokens, got {spec}")
        if drafter not in ("ngram", "layers"):
            raise ValueError(f"drafter: expected 'ngram' or 'layers', got {drafter!r}")
        num_layers = model.config.num_hidden_layers
        if drafter == "layers" and not 1 <= draft_layers <= num_layers:
            raise ValueError(f"draft_layers: expected 1..{num_layers} (the model's layers), got {draft_layers}")
        if token_budget < max_num_reqs * (1 + spec):
            raise ValueError(
                f"token_budget: expected >= max_num_reqs * (1 + spec) ({max_num_reqs * (1 + spec)}), "
                f"one decode or verify row per request"
            )
        self.spec = spec
        self.drafter = drafter if spec else "none"
        self.draft_layers = draft_layers
        self.model = model
        dev = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        layers = attention_layers(model)
        # One KV-cache group per distinct (window, scale, soft cap), in order of first use.
        groups: list[KVGroup] = []
        self.layer_groups = []
        for spec in layers:
            want = spec.kv_group
            match = [g for g, grp in enumerate(groups) if _same_attention(grp, want)]
            if not match:
                page = page_sizes[0] if want.window_left < 0 else page_sizes[-1]
                groups.append(
                    KVGroup(
                        page_size=page,
                        window_left=want.window_left,
                        sm_scale=want.sm_scale,
                        logits_soft_cap=want.logits_soft_cap,
                    )
                )
                match = [len(groups) - 1]
            self.layer_groups.append(match[0])
        cfg = model.config
        self.use_graphs = cuda_graphs
        if cuda_graphs and not (dev.type == "cuda" and flashinfer_available()):
            raise ValueError("cuda_graphs: CUDA-graph decode needs a CUDA model and FlashInfer")
        graph_sizes = (*(s for s in (1, 2, 4, 8, 16, 32) if s < max_num_reqs), max_num_reqs)
        # Enough pages for every slot at max_model_len in each group, plus page 0 (graph padding).
        self.num_pages = max_num_reqs * max(-(-max_model_len // g.page_size) for g in groups) + 1
        plan = dtype != torch.float32  # FlashInfer plans float16 and bfloat16; float32 attends with torch
        self.meta_config = MetadataConfig(
            max_num_reqs=max_num_reqs,
            max_num_tokens=token_budget,
            max_model_len=max_model_len,
            kv_groups=tuple(groups),
            num_qo_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=layers[0].module.head_dim,
            q_dtype=dtype,
            kv_dtype=dtype,
            device=dev,
            num_kv_pages=self.num_pages,
            cuda_graph_batch_sizes=graph_sizes if cuda_graphs else (),
            token_history=True,
            plan_attention=plan,
            max_draft_tokens=self.spec,
            context_parallel=context_parallel,
        )
        self.meta = BatchMetadata(self.meta_config)
        hkv, d = cfg.num_key_value_heads, layers[0].module.head_dim
        for spec, g in zip(layers, self.layer_groups, strict=True):
            shape = (self.num_pages, groups[g].page_size, hkv, d)
            spec.module.batchmeta_kv = (
                g,
                torch.zeros(shape, dtype=dtype, device=dev),
                torch.zeros(shape, dtype=dtype, device=dev),
            )
        if self.drafter == "layers":  # the drafter's layers: KV caches of their own over the same pages
            for spec in layers[:draft_layers]:
                spec.module.batchmeta_draft_kv = tuple(torch.zeros_like(c) for c in spec.module.batchmeta_kv[1:])
        set_attention(model, ATTN_IMPLEMENTATION)
        # The token history (prompt + sampled tokens) of each request slot is batchmeta's own
        # (token_history=True): every step's launch gathers its input ids from it (step.input_ids).
        self.token_ids = self.meta.token_ids
        self.vocab = cfg.vocab_size
        self.graph_logits = None
        self.draft_tokens = torch.zeros(max_num_reqs, dtype=torch.int64, device=dev)
        if cuda_graphs:  # decode graphs, or with spec only verify graphs (every decode step verifies drafts)
            self.graph_logits = torch.zeros(max_num_reqs * (1 + self.spec), self.vocab, dtype=dtype, device=dev)
            with torch.no_grad():
                for s in graph_sizes:
                    self.meta.capture_decode_graph(s, self._graph_forward, num_draft_tokens=self.spec)
                    if self.drafter == "layers":  # a whole draft round: k drafter steps and their advances
                        self.meta.capture_draft_graph(s, self.spec, self._draft_forward)

    def _held_tokens(self, group: int, seq_len: int) -> int:
        """Tokens of a request of ``seq_len`` this rank keeps in ``group``: its share where context
        parallelism shards the group (never the global count), else all."""
        cfg = self.meta_config
        return int(local_len(seq_len, cfg.context_parallel)) if cfg.sharded(group) else seq_len

    # The forward passes --------------------------------------------------------------------------
    def _logits(self, input_ids: torch.Tensor, step, logits_to_keep) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids[None], position_ids=step.positions[None], use_cache=False, logits_to_keep=logits_to_keep
        )
        return out.logits[0]

    def _eager_forward(self, step) -> torch.Tensor:
        """Logits ``[B, vocab]`` of each row's last token; input ids gathered on the device by the step."""
        return self._logits(step.input_ids, step, step.logits_indices)

    def _graph_forward(self, step) -> None:
        """Decode or verify over fixed buffers only (captured): ``1 + k`` tokens per row, padding rows included."""
        n = step.padded_num_reqs * step.query_len
        self.graph_logits[:n] = self._logits(step.input_ids, step, 0)

    def _draft_forward(self, step) -> torch.Tensor:
        """One draft step (``--drafter layers``): the model's first layers, the final norm and head over
        one token per row; the greedy draft of each row (``[Bp]``, a fixed buffer: captured too)."""
        config = self.model.config
        num_layers, token = config.num_hidden_layers, DRAFTING.set(True)
        config.num_hidden_layers = self.draft_layers  # the decoder runs layers[:num_hidden_layers]
        try:
            logits = self._logits(step.input_ids, step, 0)
        finally:
            config.num_hidden_layers = num_layers
            DRAFTING.reset(token)
        n = step.padded_num_reqs
        self.draft_tokens[:n] = logits[:n].argmax(-1)
        return self.draft_tokens

    # The serving loop ----------------------------------------------------------------------------
    def serve(
        self, prompts: list[list[int]], max_new_tokens: int, *, record_logits: bool = False, accept: str = "device"
    ) -> ServeResult:
        """Greedy generation of ``max_new_tokens`` tokens for every prompt; requests wait for a free slot.

        With ``spec`` (see :class:`Runner`), ``accept`` says where acceptance counts live: ``"host"``
        (read after every verify step) or ``"device"`` (never read in a step's path).
        """
        if self.spec:
            if record_logits:
                raise ValueError("record_logits: not recorded with speculative decoding")
            return self._serve_spec(prompts, max_new_tokens, accept)
        meta, cfg = self.meta, self.meta_config
        groups = cfg.kv_groups
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
        for p in prompts:
            if not 1 <= len(p) <= cfg.max_model_len - max_new_tokens:
                raise ValueError(
                    f"prompts: a prompt of {len(p)} tokens plus {max_new_tokens} new ones exceeds "
                    f"max_model_len ({cfg.max_model_len})"
                )
        dev = cfg.device
        waiting = collections.deque(Request(list(p), max_new_tokens) for p in prompts)
        requests = list(waiting)
        running: list[Request] = []
        free_slots = list(range(cfg.max_num_reqs - 1, -1, -1))
        free_pages = [list(range(self.num_pages - 1, 0, -1)) for _ in groups]  # page 0: graph padding
        kinds: collections.Counter = collections.Counter()
        steps = tokens_in = 0
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            while waiting or running:
                while waiting and free_slots:  # admit: a slot
                    r = waiting.popleft()
                    r.slot = free_slots.pop()
                    r.pages = [[] for _ in groups]
                    running.append(r)
                # Schedule: every decode (one token), then prefill chunks in admission order within the budget.
                decodes = [r for r in running if r.cached >= len(r.prompt)]
                batch, budget = [(r, 1) for r in decodes], cfg.max_num_tokens - len(decodes)
                for r in running:
                    if r.cached < len(r.prompt) and budget > 0:
                        n = min(len(r.prompt) - r.cached, budget)
                        batch.append((r, n))
                        budget -= n
                for r, n in batch:  # pages for the cached and new tokens of each group, staged on the host
                    if r.cached < len(r.prompt):  # the chunk's prompt tokens, written by the step's launch
                        meta.stage_prompt(r.slot, r.prompt[r.cached : r.cached + n], r.cached)
                    new = []
                    for g, grp in enumerate(groups):
                        need = -(-self._held_tokens(g, r.cached + n) // grp.page_size) - len(r.pages[g])
                        new.append([free_pages[g].pop() for _ in range(need)])
                        r.pages[g] += new[-1]
                    meta.block_tables.append(r.slot, new)
                idx = [r.slot for r, _ in batch]
                clens = [r.cached for r, _ in batch]
                qlens = [n for _, n in batch]
                b = len(batch)
                if len(decodes) == b:
                    step = meta.prepare_decode(idx, clens, cuda_graph=self.use_graphs)
                else:
                    step = meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens)
                with step:
                    if step.cuda_graph:
                        meta.replay_decode_graph(step)
                        logits = self.graph_logits[:b]
                    else:
                        logits = self._eager_forward(step)
                kinds[_kind(step, len(decodes))] += 1
                next_ids = logits.argmax(-1)
                # Each row's sampled token goes into the history at cache + query length, unless that is
                # still inside the prompt (a chunk that does not end its prompt samples nothing).
                meta.accept_tokens(step, None, next_ids, [1] * b, [len(r.prompt) for r, _ in batch])
                if record_logits:
                    rec = logits.to(torch.float32, copy=True)  # graph_logits is overwritten next step
                for row, (r, n) in enumerate(batch):
                    r.cached += n
                    if r.cached < len(r.prompt):
                        continue
                    r.generated += 1
                    if record_logits:
                        r.logits.append(rec[row])
                    if r.generated == r.max_new_tokens:  # finished: keep its tokens, free its slot and pages
                        p = len(r.prompt)
                        r.output = self.token_ids[r.slot, p : p + r.max_new_tokens].clone()
                        for g in range(len(groups)):
                            free_pages[g] += r.pages[g]
                        meta.block_tables.reset(r.slot)
                        free_slots.append(r.slot)
                        running.remove(r)
                steps += 1
                tokens_in += sum(qlens)
            out = torch.cat([r.output for r in requests]).tolist() if requests else []  # the one read
        seconds = time.perf_counter() - t0
        tokens = [out[i * max_new_tokens : (i + 1) * max_new_tokens] for i in range(len(requests))]
        logits = [torch.stack(r.logits) for r in requests] if record_logits else None
        return ServeResult(tokens, logits, kinds, steps, tokens_in, seconds)

    def _serve_spec(self, prompts: list[list[int]], max_new_tokens: int, accept: str) -> ServeResult:
        """Greedy speculative decoding: chunked prefill steps, then verify steps of ``k`` n-gram drafts.

        A step is either a prefill step (prompt chunks under the token budget; a chunk that ends its
        prompt samples the request's first token) or a verify step of every request past its prompt
        (``prepare_decode(..., num_draft_tokens=k)``: its ``input_ids`` are the last accepted token and
        the ``k`` drafts, gathered from the history). The target's argmax at each of the ``1 + k``
        tokens verifies the drafts; ``accept_tokens`` writes the accepted tokens (the matched drafts
        and the bonus token), and :func:`ngram_drafts` proposes the next drafts from the history on
        the device, which ``write_drafts`` puts after each row's last accepted token.

        ``accept="host"`` reads the counts after every verify step (a sync) and knows every length;
        ``accept="device"`` passes the verifier's counts as a device tensor, so nothing in a step's
        path waits for the device: the host holds pages for the bounds ``accept_tokens`` returns, and
        learns each step's counts one step later (a copy it does not wait for, read after the next
        step is launched) to stop requests that have their tokens.
        """
        meta, cfg = self.meta, self.meta_config
        groups, k, dev = cfg.kv_groups, self.spec, cfg.device
        if accept not in ("host", "device"):
            raise ValueError(f"accept: expected 'host' or 'device', got {accept!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
        for p in prompts:
            need = max_len_needed(len(p), max_new_tokens, k, accept)
            if not p or need > cfg.max_model_len:
                raise ValueError(
                    f"prompts: a prompt of {len(p)} tokens needs max_model_len {need} with "
                    f"{max_new_tokens} new tokens, {k} drafts and {accept} acceptance, got "
                    f"{cfg.max_model_len}"
                )
        waiting = collections.deque(Request(list(p), max_new_tokens) for p in prompts)
        requests = list(waiting)
        running: list[Request] = []
        free_slots = list(range(cfg.max_num_reqs - 1, -1, -1))
        free_pages = [list(range(self.num_pages - 1, 0, -1)) for _ in groups]  # page 0: graph padding
        kinds: collections.Counter = collections.Counter()
        steps = tokens_in = proposed = 0
        accepted_drafts = torch.zeros((), dtype=torch.int64, device=dev)  # read once, at the end
        pending = fresh = None  # device acceptance: (rows, host copy of their counts, event) of a verify step

        def hold(r: Request, tokens: int) -> None:  # pages for the first `tokens` positions of every group
            new = []
            for g, grp in enumerate(groups):
                need = -(-tokens // grp.page_size) - len(r.pages[g])
                new.append([free_pages[g].pop() for _ in range(need)])
                r.pages[g] += new[-1]
            meta.block_tables.append(r.slot, new)

        def draft_round(rows: list[Request]) -> None:
            """``--drafter layers``: a draft round of ``k`` steps for the rows still running, from their
            next cache lengths (bounds with device counts), its drafts left in the token history."""
            rows = [r for r in rows if r in running] if self.drafter == "layers" else []
            if not rows:
                return
            for r in rows:
                hold(r, r.cached + 1 + k)  # the round reaches cached + k, the next verify step one further
            round_ = meta.prepare_draft(
                [r.slot for r in rows], [r.cached for r in rows], num_steps=k, cuda_graph=self.use_graphs
            )
            if round_.cuda_graph:
                meta.replay_draft_graph(round_)
            else:
                round_.run(self._draft_forward)

        def generated(r: Request, n: int) -> None:  # r has n more tokens: finished ones free their slot
            r.generated += n
            if r.generated >= r.max_new_tokens and r in running:
                p = len(r.prompt)
                r.output = self.token_ids[r.slot, p : p + r.max_new_tokens].clone()
                for g in range(len(groups)):
                    free_pages[g] += r.pages[g]
                meta.block_tables.reset(r.slot)
                free_slots.append(r.slot)
                running.remove(r)

        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            while waiting or running:
                while waiting and free_slots:  # admit: a slot
                    r = waiting.popleft()
                    r.slot = free_slots.pop()
                    r.pages = [[] for _ in groups]
                    running.append(r)
                prefill, budget = [], cfg.max_num_tokens
                for r in running:  # prompt chunks first, in admission order within the budget
                    if r.cached < len(r.prompt) and budget > 0:
                        n = min(len(r.prompt) - r.cached, budget)
                        prefill.append((r, n))
                        budget -= n
                if prefill:
                    batch = prefill
                    for r, n in batch:
                        meta.stage_prompt(r.slot, r.prompt[r.cached : r.cached + n], r.cached)
                        hold(r, r.cached + n)
                    step = meta.prepare_prefill(
                        [r.slot for r, _ in batch],
                        query_lens=[n for _, n in batch],
                        cache_lens=[r.cached for r, _ in batch],
                    )
                else:  # every request past its prompt verifies k drafts: pages for its bound + 1 + k
                    batch = [(r, 1 + k) for r in running]
                    for r, n in batch:
                        hold(r, r.cached + n)
                    step = meta.prepare_decode(
                        [r.slot for r, _ in batch],
                        [r.cached for r, _ in batch],
                        num_draft_tokens=k,
                        cuda_graph=self.use_graphs,
                    )
                b = len(batch)
                with step:
                    if step.cuda_graph:
                        meta.replay_decode_graph(step)
                        logits = self.graph_logits[: b * (1 + k)]
                    else:
                        logits = self._eager_forward(step) if prefill else self._logits(step.input_ids, step, 0)
                kinds[_kind(step, 0)] += 1
                prompt_lens = [len(r.prompt) for r, _ in batch]
                if prefill:  # one sampled token per row (dropped inside a prompt); drafts after the last ones
                    acc = meta.accept_tokens(step, None, logits.argmax(-1), [1] * b, prompt_lens)
                    ends = [row for row, (r, n) in enumerate(batch) if r.cached + n == len(r.prompt)]
                    if ends and self.drafter == "ngram":
                        last = torch.tensor([len(batch[row][0].prompt) for row in ends], device=dev)
                        slots = torch.tensor([batch[row][0].slot for row in ends], device=dev)
                        drafts = ngram_drafts(self.token_ids, slots, last, k)
                        meta.write_drafts(
                            step, drafts.reshape(-1), [k if r.cached + n == len(r.prompt) else 0 for r, n in batch]
                        )
                    for row, (r, _) in enumerate(batch):
                        r.cached = int(acc.cache_lens[row])
                    for row in ends:
                        generated(batch[row][0], 1)
                    draft_round([batch[row][0] for row in ends])
                else:  # verify: greedy targets at the 1 + k tokens, drafts accepted up to the first mismatch
                    target = logits.argmax(-1).view(b, 1 + k)
                    rows = step.input_ids[: b * (1 + k)].view(b, 1 + k)
                    num = 1 + torch.cumprod(target[:, :-1] == rows[:, 1:], dim=1).sum(1)
                    counts = num if accept == "device" else num.tolist()  # host: waits for the step
                    acc = meta.accept_tokens(step, None, target, counts, prompt_lens)
                    accepted_drafts += (num - 1).sum()
                    proposed += b * k
                    # Next drafts after each row's last accepted token, at its exact position: the
                    # row's first position (exact on the device, where the host has a bound) + count.
                    if self.drafter == "ngram":
                        last = step.positions[: b * (1 + k)].view(b, 1 + k)[:, 0] + num
                        drafts = ngram_drafts(self.token_ids, step.idx_mapping[:b].long(), last, k)
                        meta.write_drafts(step, drafts)
                    verified = [r for r, _ in batch]
                    for row, r in enumerate(verified):
                        r.cached = int(acc.cache_lens[row])  # the bound, with device counts
                    if accept == "host":
                        for r, n in zip(verified, counts, strict=True):
                            generated(r, n)
                    else:  # a copy of the counts, read once the next step is launched
                        fresh = (verified, *_copy_to_host(num))
                    draft_round(verified)
                # Device acceptance: the counts of the verify step before this one (already queued, so
                # the device keeps working); requests that have their tokens stop, one step late.
                if pending is not None:
                    _learn(pending, generated)
                pending, fresh = fresh, None
                steps += 1
                tokens_in += sum(n for _, n in batch)
            out = torch.cat([r.output for r in requests]).tolist() if requests else []  # the one read
            accepted = int(accepted_drafts)
        seconds = time.perf_counter() - t0
        tokens = [out[i * max_new_tokens : (i + 1) * max_new_tokens] for i in range(len(requests))]
        return ServeResult(tokens, None, kinds, steps, tokens_in, seconds, proposed, accepted)


def max_len_needed(prompt_len: int, max_new_tokens: int, spec: int = 0, accept: str = "device") -> int:
    """The ``max_model_len`` a request needs: its prompt and new tokens, plus with speculative decoding
    (``spec`` drafts) the drafts of its last verify step, and with device acceptance the host's bound."""
    if not spec:
        return prompt_len + max_new_tokens
    if accept == "host":  # the last verify step starts at most max_new_tokens - 1 tokens in
        return prompt_len + max_new_tokens + spec - 1
    # Device counts: the host's bound (accept_tokens' cache_lens) grows by 1 + spec per verify step,
    # as if every draft were accepted, and a request runs at most max_new_tokens verify steps (the
    # host learns that it finished one step late).
    return prompt_len + max_new_tokens * (1 + spec)


def _copy_to_host(counts: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A copy of device counts the host reads later (pinned, not waited for on CUDA)."""
    if counts.device.type != "cuda":
        return counts.clone(), None
    host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
    host.copy_(counts, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _learn(pending, generated) -> None:
    """The host learns a verify step's counts (device acceptance): requests that have their tokens stop."""
    rows, host, event = pending
    if event is not None:
        event.synchronize()  # normally long done: the step after it is already queued
    for r, n in zip(rows, host.tolist(), strict=True):
        generated(r, n)


def ngram_drafts(
    history: torch.Tensor, slots: torch.Tensor, last: torch.Tensor, k: int, max_ngram: int = 3
) -> torch.Tensor:
    """``[B, k]`` drafts by prompt lookup, on the device (torch ops, nothing read on the host).

    Row ``b``'s sequence is ``history[slots[b], : last[b] + 1]``. Its last ``n`` tokens (``n`` from
    ``max_ngram`` down to 1, the longest that matches) are looked up earlier in the sequence; at the
    latest match, the tokens that followed it are proposed, repeated with the match's period when
    they run into the sequence's end (a loop ``x y z x y`` proposes ``z x y ...``). Without any
    match, the last token repeated.
    """
    rows = history[slots]  # [B, L]
    width = rows.shape[1]
    last = last.long()
    cont = torch.full_like(last, -1)  # position of the first proposed token, -1: no match yet
    for n in range(max_ngram, 0, -1):
        if n >= width:
            continue
        suffix = rows.gather(1, (last[:, None] - n + 1 + torch.arange(n, device=rows.device)).clamp(min=0))
        starts = torch.arange(width - n + 1, device=rows.device)
        match = (rows.unfold(1, n, 1) == suffix[:, None, :]).all(-1) & (starts + n <= last[:, None])
        found = torch.where(match, starts + n, -1).amax(1)  # the latest match's continuation
        cont = torch.where(cont < 0, found, cont)
    period = (last + 1 - cont).clamp(min=1)
    offsets = torch.arange(k, device=rows.device)
    pos = torch.where(cont[:, None] >= 0, cont[:, None] + offsets % period[:, None], last[:, None])
    return rows.gather(1, pos)


def _same_attention(a: KVGroup, b: KVGroup) -> bool:
    return (a.window_left, a.sm_scale, a.logits_soft_cap) == (b.window_left, b.sm_scale, b.logits_soft_cap)


def _kind(step, num_decodes: int) -> str:
    """What a step was, for the summary: the step kinds a serving loop goes through."""
    if step.kind in ("decode", "spec_decode"):
        name = "decode" if step.kind == "decode" else "verify"
        return f"graph_{name}" if step.cuda_graph else name
    if step.kind == "ragged_prefill":  # nothing cached: every row starts its prompt
        return "ragged_prefill"
    return "mixed" if num_decodes else "chunked_prefill"  # chunked: some row resumes a prompt over its cache


# -------------------------------------------------------------------------------------------------
# The teacher-forced check
# -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CheckResult:
    checked: int  # generated tokens compared
    exact: int  # equal to the reference's argmax
    near_ties: int  # positions whose reference top-2 gap is below the tolerance (matched or not)
    tie_mismatches: int  # mismatches at near-ties (allowed)
    max_tie_mismatch_gap: float  # the largest reference top-2 gap at an allowed mismatch (0 if none)
    failures: list[tuple[int, int, int, int, float]]  # (prompt, position, served, reference, gap) mismatches
    max_logit_diff: float | None  # max |served - reference| logit, when the served logits were recorded
    tolerance: float

    @property
    def ok(self) -> bool:
        """Every mismatch is a near-tie, and near-ties are a minority (so the check cannot pass vacuously)."""
        return not self.failures and 2 * self.near_ties < self.checked

    def __str__(self) -> str:
        diff = "" if self.max_logit_diff is None else f", max |logit diff| {self.max_logit_diff:.2e}"
        verdict = "passed" if self.ok else "FAILED"
        ties = f"top-2 gap < {self.tolerance:g}"
        return (
            f"teacher-forced check {verdict}: {self.exact}/{self.checked} tokens equal the reference argmax, "
            f"{self.tie_mismatches} near-tie mismatches allowed (largest gap {self.max_tie_mismatch_gap:.3g}), "
            f"{self.near_ties} near-ties ({ties}), {len(self.failures)} failures{diff}"
        )


def teacher_forced_check(
    model, prompts: list[list[int]], result: ServeResult, *, tolerance: float | None = None
) -> CheckResult:
    """Checks served tokens against the model's own forward pass (``"eager"`` attention, no batchmeta).

    Each prompt plus its generated tokens runs as one sequence; the token generated at position
    ``p`` must be the argmax of the reference logits at ``p - 1``, unless the reference's top-2 gap
    there is below ``tolerance`` (default :data:`TOLERANCE` for the model's dtype).
    """
    dtype = next(model.parameters()).dtype
    dev = next(model.parameters()).device
    tol = TOLERANCE[dtype] if tolerance is None else tolerance
    previous = model.config._attn_implementation
    set_attention(model, "eager")
    checked = exact = near = tie_mismatches = 0
    max_tie_gap = 0.0
    failures = []
    max_diff = None if result.logits is None else 0.0
    try:
        with torch.no_grad():
            for i, (prompt, new) in enumerate(zip(prompts, result.tokens, strict=True)):
                seq = torch.tensor([*prompt, *new], dtype=torch.int64, device=dev)
                logits = model(input_ids=seq[None], use_cache=False).logits[0].float()
                ref = logits[len(prompt) - 1 : len(seq) - 1]  # predicts each generated token
                top = ref.topk(2, dim=-1)
                gap = (top.values[:, 0] - top.values[:, 1]).tolist()
                want = top.indices[:, 0].tolist()
                if result.logits is not None:
                    max_diff = max(max_diff, (result.logits[i] - ref).abs().max().item())
                for j, (got, ref_tok, g) in enumerate(zip(new, want, gap, strict=True)):
                    checked += 1
                    tie = g < tol
                    near += tie
                    if got == ref_tok:
                        exact += 1
                    elif tie:
                        tie_mismatches += 1
                        max_tie_gap = max(max_tie_gap, g)
                    else:
                        failures.append((i, len(prompt) + j, got, ref_tok, g))
    finally:
        set_attention(model, previous)
    return CheckResult(checked, exact, near, tie_mismatches, max_tie_gap, failures, max_diff, tol)


@dataclasses.dataclass
class GreedyCheck:
    checked: int  # generated tokens compared
    equal: int  # equal to plain greedy decoding, token for token
    # The first divergence of each prompt that diverges: (prompt, position, served, reference, top-2 gap).
    divergences: list[tuple[int, int, int, int, float]]

    @property
    def ok(self) -> bool:
        return self.checked > 0 and self.equal == self.checked

    def __str__(self) -> str:
        verdict = "passed" if self.ok else "FAILED"
        return (
            f"greedy check {verdict}: {self.equal}/{self.checked} tokens equal plain greedy decoding "
            f"(transformers eager attention), {len(self.divergences)} prompts diverge"
        )


def greedy_reference(model, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
    """Plain greedy decoding with the model's own attention (``"eager"``, no batchmeta): per prompt,
    one full forward per new token. Returns the tokens and the top-2 logit gap behind each."""
    dev = next(model.parameters()).device
    previous = model.config._attn_implementation
    set_attention(model, "eager")
    tokens, gaps = [], []
    try:
        with torch.no_grad():
            for prompt in prompts:
                seq, gap = list(prompt), []
                for _ in range(max_new_tokens):
                    ids = torch.tensor(seq, dtype=torch.int64, device=dev)[None]
                    top = model(input_ids=ids, use_cache=False).logits[0, -1].float().topk(2)
                    seq.append(int(top.indices[0]))
                    gap.append(float(top.values[0] - top.values[1]))
                tokens.append(seq[len(prompt) :])
                gaps.append(gap)
    finally:
        set_attention(model, previous)
    return tokens, gaps


def greedy_check(model, prompts: list[list[int]], result: ServeResult) -> GreedyCheck:
    """Checks served tokens against plain greedy decoding of the same model (:func:`greedy_reference`),
    token for token: speculative decoding must not change a single greedy token (float32)."""
    max_new = max((len(t) for t in result.tokens), default=0)
    want, gaps = greedy_reference(model, prompts, max_new)
    checked = equal = 0
    divergences = []
    for i, (got, ref, gap) in enumerate(zip(result.tokens, want, gaps, strict=True)):
        checked += len(got)
        same = 0
        while same < len(got) and got[same] == ref[same]:
            same += 1
        equal += same  # tokens after a divergence follow another context: not compared
        if same < len(got):
            divergences.append((i, len(prompts[i]) + same, got[same], ref[same], gap[same]))
    return GreedyCheck(checked, equal, divergences)


def random_prompts(num: int, vocab: int, lengths: tuple[int, int], seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(rng.integers(lengths[0], lengths[1] + 1))).tolist() for _ in range(num)]


def periodic_prompts(num: int, vocab: int, lengths: tuple[int, int], seed: int) -> list[list[int]]:
    """Prompts that repeat a random pattern of 2 to 6 tokens: repetitive text, where prompt lookup
    drafts (:func:`ngram_drafts`) are partly accepted even by a random-weight model (whose
    continuation of random prompts almost never repeats itself)."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(num):
        pattern = rng.integers(0, vocab, int(rng.integers(2, 7))).tolist()
        n = int(rng.integers(lengths[0], lengths[1] + 1))
        prompts.append((pattern * -(-n // len(pattern)))[:n])
    return prompts


# -------------------------------------------------------------------------------------------------
# Context parallelism: one process per rank
# -------------------------------------------------------------------------------------------------
def _cp_rank(rank: int, world: int, init_method: str, job: dict, results) -> None:
    """One rank of :func:`run_context_parallel`: its process group, model, runner and tokens."""
    import torch.distributed as dist

    cuda = job["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        device = f"cuda:{rank}" if cuda else "cpu"
        model = build_model(job["model"], seed=job["seed"], dtype=job["dtype"], device=device)
        runner = Runner(
            model, **job["runner"], context_parallel=ContextParallel(world, rank, interleave=job["interleave"])
        )
        result = runner.serve(job["prompts"], job["max_new_tokens"])
        results.put((rank, result.tokens, dict(result.step_kinds), result.steps))
    except BaseException:
        import traceback

        results.put((rank, traceback.format_exc(), None, None))
        raise
    finally:
        dist.destroy_process_group()


def run_context_parallel(
    world: int,
    *,
    model: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    interleave: int = 1,
    **runner,
) -> list[tuple[list[list[int]], dict, int]]:
    """Serves ``prompts`` on ``world`` context-parallel ranks, a process each (spawned; gloo on the
    CPU, NCCL on ``cuda``, one GPU per rank); returns each rank's ``(tokens, step kinds, steps)``.
    ``runner``: :class:`Runner`'s keyword arguments (the same on every rank)."""
    import torch.multiprocessing as mp

    if world < 2:
        raise ValueError(f"world: expected at least 2 ranks, got {world}")
    if device == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"world: {world} ranks need {world} GPUs, {torch.cuda.device_count()} visible")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    job = dict(
        model=model,
        prompts=prompts,
        max_new_tokens=max_new_tokens,
        device=device,
        dtype=dtype,
        seed=seed,
        interleave=interleave,
        runner=runner,
    )
    with tempfile.TemporaryDirectory() as tmp:
        init_method = f"file://{os.path.join(tmp, 'rendezvous')}"
        procs = [ctx.Process(target=_cp_rank, args=(r, world, init_method, job, results)) for r in range(world)]
        for p in procs:
            p.start()
        got = {}
        try:
            for _ in range(world):
                rank, tokens, kinds, steps = results.get(timeout=900)
                if kinds is None:
                    raise RuntimeError(f"context-parallel rank {rank} failed:\n{tokens}")
                got[rank] = (tokens, kinds, steps)
        finally:
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
    return [got[r] for r in range(world)]


# -------------------------------------------------------------------------------------------------
# CLI
# -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="llama")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="default: bfloat16 on cuda, float32 on cpu",
    )
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-num-reqs", type=int, default=4)
    parser.add_argument("--token-budget", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(8, 96), metavar=("MIN", "MAX"))
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--tolerance", type=float, default=None, help="near-tie top-2 logit gap (default by dtype)")
    parser.add_argument(
        "--spec",
        type=int,
        default=0,
        metavar="K",
        help="speculative decoding: K n-gram draft tokens per verify step (default 0: plain decoding)",
    )
    parser.add_argument(
        "--accept",
        choices=("host", "device"),
        default="device",
        help="with --spec: acceptance counts read on the host after each verify step, or kept on the device (default)",
    )
    parser.add_argument(
        "--drafter",
        choices=("ngram", "layers"),
        default="ngram",
        help="with --spec: prompt-lookup drafts, or the model's first --draft-layers layers through the draft loop",
    )
    parser.add_argument("--draft-layers", type=int, default=2, help="with --drafter layers: the drafter's layers")
    parser.add_argument(
        "--context-parallel",
        type=int,
        default=1,
        metavar="N",
        help="spread every request's KV cache over N ranks, a process each (gloo on cpu, NCCL with N GPUs); "
        "plain eager decoding: every rank must give one rank's tokens",
    )
    parser.add_argument("--interleave", type=int, default=1, help="with --context-parallel: tokens per rank in turn")
    parser.add_argument(
        "--prompts",
        choices=("random", "periodic"),
        default="random",
        help="random tokens, or a short random pattern repeated (text that n-gram drafts predict)",
    )
    args = parser.parse_args(argv)
    if args.spec < 0:
        parser.error(f"--spec: expected K >= 0, got {args.spec}")

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    graphs = args.device == "cuda" and not args.no_cuda_graphs and flashinfer_available() and dtype != torch.float32
    model = build_model(args.model, seed=args.seed, dtype=dtype, device=args.device)
    make_prompts = periodic_prompts if args.prompts == "periodic" else random_prompts
    prompts = make_prompts(args.requests, model.config.vocab_size, tuple(args.prompt_len), args.seed)
    spec = args.spec
    need = max_len_needed(args.prompt_len[1], args.max_new_tokens, spec, args.accept)
    if args.context_parallel > 1:
        if spec:
            parser.error("--context-parallel: plain decoding only (no --spec)")
        return _main_context_parallel(args, model, prompts, dtype, 16 * -(-need // 16))
    runner = Runner(
        model,
        max_num_reqs=args.max_num_reqs,
        token_budget=args.token_budget,
        max_model_len=16 * -(-need // 16),
        cuda_graphs=graphs,
        spec=spec,
        drafter=args.drafter,
        draft_layers=args.draft_layers,
    )
    runner.serve(prompts[:1], 2, accept=args.accept)  # warm-up: lazy initialisation, FlashInfer modules, autotuning
    result = runner.serve(prompts, args.max_new_tokens, record_logits=not spec, accept=args.accept)
    if spec and dtype == torch.float32:  # speculative decoding changes no greedy token
        check = greedy_check(model, prompts, result)
    else:  # low precision: teacher-forced, near-ties allowed
        check = teacher_forced_check(model, prompts, result, tolerance=args.tolerance)

    groups = runner.meta_config.kv_groups
    print(
        f"{args.model} ({transformers.__version__}), {args.device}, {str(dtype).removeprefix('torch.')}, "
        f"{'CUDA-graph decode' if graphs else 'eager'}: {len(groups)} KV-cache group(s) "
        f"{[(g.page_size, g.window_left) for g in groups]} (page size, window_left)"
    )
    print(f"{args.requests} requests, {result.steps} steps {dict(sorted(result.step_kinds.items()))}")
    print(
        f"{result.generated} tokens generated in {result.seconds:.2f} s: {result.generated / result.seconds:.1f} "
        f"tokens/s generated, {result.tokens_in / result.seconds:.1f} tokens/s through the model"
    )
    if spec:
        rate = result.drafts_accepted / max(result.drafts_proposed, 1)
        drafter = "n-gram" if args.drafter == "ngram" else f"draft-loop (first {args.draft_layers} layers)"
        print(
            f"speculative decoding, {spec} {drafter} drafts per verify step, {args.accept} acceptance: "
            f"{result.drafts_accepted}/{result.drafts_proposed} drafts accepted ({100 * rate:.1f}%)"
        )
    print(check)
    for i, pos, got, want, gap in (check.divergences if isinstance(check, GreedyCheck) else check.failures)[:10]:
        print(f"  prompt {i}, position {pos}: served {got}, reference {want} (top-2 gap {gap:.3g})")
    return 0 if check.ok else 1


def _main_context_parallel(args, model, prompts: list[list[int]], dtype: torch.dtype, max_model_len: int) -> int:
    """``--context-parallel N``: serve on N ranks; each rank's tokens against one rank's and the check."""
    world = args.context_parallel
    runner = dict(max_num_reqs=args.max_num_reqs, token_budget=args.token_budget, max_model_len=max_model_len)
    t0 = time.perf_counter()
    ranks = run_context_parallel(
        world,
        model=args.model,
        prompts=prompts,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        dtype=dtype,
        seed=args.seed,
        interleave=args.interleave,
        **runner,
    )
    seconds = time.perf_counter() - t0
    single = Runner(model, **runner).serve(prompts, args.max_new_tokens)
    tokens, kinds, steps = ranks[0]
    same = [r for r, (t, _, _) in enumerate(ranks) if t == single.tokens]
    served = ServeResult(tokens, None, collections.Counter(kinds), steps, 0, seconds)
    check = teacher_forced_check(model, prompts, served, tolerance=args.tolerance)
    print(
        f"{args.model}, {args.device}, {str(dtype).removeprefix('torch.')}, context parallel over {world} ranks "
        f"(interleave {args.interleave}): {args.requests} requests, {steps} steps {dict(sorted(kinds.items()))}, "
        f"{seconds:.1f} s with process start-up"
    )
    agree = all(t == tokens for t, _, _ in ranks)
    print(f"ranks with one rank's tokens: {len(same)}/{world}; every rank the same: {agree}")
    print(check)
    return 0 if check.ok and len(same) == world else 1


if __name__ == "__main__":
    raise SystemExit(main())
