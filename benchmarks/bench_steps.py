"""Per-step metadata cost: batchmeta against the glue engines write today, measured in one run.

Run on a machine with CUDA and FlashInfer:  python benchmarks/bench_steps.py [--prefill-backend fa2|fa3|auto]
Writes ``benchmarks/results/<device>-<date>-flashinfer-<version>.{md,json,png}`` (and copies them to ``$OUT`` if set).

Implementations, A/B interleaved step by step:

- ``eager-glue``: what engines hand-write: lengths copied to the GPU as tensors, indptr and
  last_page_len by torch ops on the GPU, ragged kv_indices by masking the padded table, positions
  and slots by torch ops, and FlashInfer's stock ``plan()`` fed device tensors;
- ``stock-plan``: FlashInfer's stock ``plan()`` alone, fed host tensors prepared beforehand (the floor
  of the stock API, no metadata built);
- ``batchmeta``: ``BatchMetadata.prepare_*`` (metadata kernels, one staging copy, plans), eager, and
  under CUDA graphs (plan for the graph wrappers) where the scenario allows;
- ``batchmeta-noplan``: the same with ``plan_attention=False`` (engines whose attention reads block
  tables and lengths directly): the metadata alone;
- ``fast-decode-plan`` (decode scenarios): FlashInfer's ``fast_decode_plan``, the planner SGLang calls on
  its decode wrappers (the CUDA-graph wrapper under graphs), alone, fed arrays prepared beforehand: the
  floor of the peers' decode path, no metadata built;
- ``peer-glue``: the peers' whole per-step path, re-implemented from their published approach
  (vLLM / SGLang, :class:`PeerGlue`): indptr, last-page lengths, query offsets, each token's request
  row and position computed with numpy into one pinned buffer, one host→device copy, ``kv_indices``
  gathered from the block table by a Triton kernel (one program per request, as SGLang's
  ``create_flashinfer_kv_indices_triton``), slot mappings by torch ops on the device, then
  ``fast_decode_plan`` (decode) or the stock prefill ``plan()`` (the rest).

Scenarios whose steps also run attention (``S_graph``: S's batch under CUDA graphs) add, beside ``batchmeta``
(eager prepare) and ``batchmeta-graph`` (prepare with ``cuda_graph=True``) on the same batch:

- ``batchmeta+fwd``: the eager step with a small forward (:class:`ForwardPass`: the step's new keys and
  values stored into a paged KV cache with ``ops.store_kv``, then ``step.attention``, one layer, on static
  buffers);
- ``batchmeta-graph+replay``: prepare with ``cuda_graph=True``, then ``replay_decode_graph`` of that forward,
  captured beforehand for the step's padded batch size and draft tokens (``capture_decode_graph``).

Their host µs are prepare + forward launches (or + the graph launch), their GPU µs the metadata work and the
forward's kernels; the report adds a table of graph beside eager for such scenarios (and against S's own
``batchmeta`` row when S ran).

``DCP`` (decode context parallelism, last): D1's batch on rank 0 of two ranks
(``MetadataConfig(context_parallel=ContextParallel(2, 0))``, the rank holding pages for its share of every
request), ``batchmeta`` and ``batchmeta-noplan`` beside ``batchmeta-world1`` and ``batchmeta-world1-noplan``, the
same batch with ``world_size=1``, interleaved in one run; the report adds their ratios
(:func:`against_world1`). One process: the rank's step (its metadata and FlashInfer plans for its parts), not
the collective its attention runs. A failure of this scenario is reported and leaves the others' report intact.

Figures per step: host µs (what the engine's CPU pays; median, p90), interleaved, then again with each
implementation's steps back to back (every step still after a sync, the device idle; the step run just before is
the same one, so caches hold its code and data, as in an engine whose loop between steps is short, a graph replay
and a sampler, where interleaving leaves them holding another implementation's); GPU µs (CUDA events around the
step's device work, enqueued behind a sleeping kernel so the host's pace is excluded; an
implementation that syncs waits for the GPU, so its gaps count); and host syncs (torch's sync debug
mode, counted in a separate pass).

``--prefill-backend`` (``fa2``, the default; ``fa3``; ``auto``) is FlashInfer's ``backend=`` for the prefill
wrappers: batchmeta gets it as ``MetadataConfig.prefill_backend``, and ``stock-plan`` and ``eager-glue`` build
their ``BatchPrefillWithPagedKVCacheWrapper`` with the same one, so the comparison is like for like (decode
wrappers have no such choice). The backend is recorded in the report's header and json.

After the per-implementation table, the report has a summary: one row per scenario with batchmeta's host and
GPU medians as ratios of stock-plan's from the same run, each checked against ``TARGETS`` (the project's speed
issue) with ✓ / ✗, and an overall pass / miss (``n/a`` where a target cannot be checked in this run, e.g. D2
without D1). A graph scenario's row also gives its host µs as a ratio of the eager step it is checked against
(D2: D1's batchmeta; S_graph: batchmeta+fwd of the same batch). The json carries the same under ``summary``
(and the graph-beside-eager table under ``graph_vs_eager``).

A second summary sets batchmeta against the best peer of each scenario (:func:`against_peers`): host µs against
the fastest of ``fast-decode-plan`` and ``peer-glue`` (at most ``PEER_TARGETS["host"]`` of it), GPU µs against
``peer-glue``, the peer path that builds the whole step (``fast-decode-plan`` alone builds nothing on the device),
at most ``PEER_TARGETS["gpu"]`` of it. Both summaries are repeated with the back-to-back host µs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import attrs
import numpy as np
import torch
import triton
import triton.language as tl

from batchmeta import BatchMetadata, KVGroup, MetadataConfig, ops

try:  # trees before context parallelism (benchmarks/ab_revisions.py runs this file against older checkouts)
    from batchmeta.context_parallel import ContextParallel, local_len
except ImportError:  # pragma: no cover
    ContextParallel = local_len = None


@dataclass
class Scenario:
    name: str
    what: str
    cache_lens: list[int]
    query_lens: list[int]
    page_size: int = 16
    graph: bool = False
    draft: int = 0
    forward: bool = False  # steps also run attention (ForwardPass): eager, and under a replayed CUDA graph
    cp: int = 0  # context parallelism over this many ranks: the batch of rank 0 (its share of every request)

    @property
    def decode(self) -> bool:
        return all(q == 1 + self.draft for q in self.query_lens) and self.draft == max(self.query_lens) - 1


def _around(rng, n, mean, spread=0.25, lo=1):
    return [max(lo, int(x)) for x in rng.normal(mean, mean * spread, n)]


def scenarios(rng) -> list[Scenario]:
    out = [
        Scenario("D1", "decode, B=256, context 4K", _around(rng, 256, 4096), [1] * 256),
        Scenario("D2", "D1 under CUDA graphs", _around(rng, 256, 4096), [1] * 256, graph=True),
        Scenario("D3", "decode, B=1, context 8K", [8192], [1]),
        Scenario("D4", "decode, B=512, context 32K", _around(rng, 512, 32768, 0.1), [1] * 512),
        Scenario(
            "D5", "decode, page size 1, B=256, context 32K", _around(rng, 256, 32768, 0.1), [1] * 256, page_size=1
        ),
        Scenario(
            "P1", "chunked prefill, 8192 tokens in 4 requests over 0-28K prefixes", [0, 9000, 18000, 28000], [2048] * 4
        ),
        Scenario(
            "M1", "mixed: one 2048-token chunk + 255 decodes", [1024, *_around(rng, 255, 4096)], [2048] + [1] * 255
        ),
        Scenario("S", "speculative decode, B=64, 1 + 4 tokens", _around(rng, 64, 4096), [5] * 64, draft=4),
    ]
    spec = out[-1]  # S's very batch under CUDA graphs (draws nothing from rng: the scenarios above keep their data)
    out.append(
        Scenario(
            "S_graph",
            "S under CUDA graphs (the same batch), with a one-layer forward replayed",
            list(spec.cache_lens),
            list(spec.query_lens),
            graph=True,
            draft=spec.draft,
            forward=True,
        )
    )
    # D1's very batch on rank 0 of two context-parallel ranks (decode context parallelism), beside world_size=1.
    d1 = out[0]
    out.append(
        Scenario("DCP", "D1 on rank 0 of 2 context-parallel ranks", list(d1.cache_lens), list(d1.query_lens), cp=2)
    )
    for s in out:
        s.cache_lens = [min(c, 40000) for c in s.cache_lens]
    return out


HEADS = (32, 8, 128)  # num_qo_heads, num_kv_heads, head_dim (Llama-3-8B-like); --head-dim changes the last
TIMES = "\N{MULTIPLICATION SIGN}"  # spelt out: ruff flags the literal sign as ambiguous
PREFILL_BACKENDS = ("fa2", "fa3", "auto")  # FlashInfer's backend= of the paged and ragged prefill wrappers

# Speed targets, from the project's speed issue; all are ratios of medians measured in the same run.
# host: batchmeta host µs / stock-plan host µs at most this; noplan: batchmeta-noplan / stock-plan likewise;
# host_vs: host µs no more than that scenario's batchmeta host µs (D2, under graphs, no slower than D1 eager),
# or (scenario, implementation) for another implementation's (S_graph: no slower than the same step eager);
# gpu_ratio: batchmeta GPU µs at most this × stock-plan's; gpu_us: an absolute GPU µs bound instead;
# gpu_vs: (scenario, implementation, limit): GPU µs at most limit × that implementation's;
# impl: the implementation the row checks (default batchmeta-graph where measured, else batchmeta).
TARGETS: dict[str, dict] = {
    "D1": dict(host=0.17, noplan=0.08, gpu_ratio=1.5),
    "D2": dict(host_vs="D1", gpu_ratio=1.5),
    "D3": dict(host=0.17, noplan=0.08, gpu_ratio=1.5),
    "D4": dict(host=0.17, noplan=0.08, gpu_ratio=1.5),
    "D5": dict(host=0.17, noplan=0.08, gpu_us=25.0),
    "P1": dict(host=0.5, gpu_ratio=1.5),
    "M1": dict(host=0.5, gpu_ratio=1.5),
    "S": dict(host=0.5, gpu_ratio=1.5),
    # Not from the speed issue: D2's rule (a graph step no slower on the host than the eager one) applied to S,
    # the eager step running the same forward; its GPU µs against the same within the usual 1.5x.
    "S_graph": dict(
        impl="batchmeta-graph+replay",
        host_vs=("S_graph", "batchmeta+fwd"),
        gpu_vs=("S_graph", "batchmeta+fwd", 1.5),
    ),
}


# Against the peers (the project's speed issue): batchmeta's host µs at most this × the best peer's, its GPU µs at
# most this × peer-glue's.
PEER_TARGETS = dict(host=0.5, gpu=1.2)
PEERS = ("fast-decode-plan", "peer-glue")


@dataclass
class Setup:
    scn: Scenario
    meta: BatchMetadata
    idx: np.ndarray
    noplan: BatchMetadata | None = None
    world1: Setup | None = None  # context parallelism: the same batch with world_size=1
    prefill_backend: str = "fa2"
    host: dict = field(default_factory=dict)
    dev: dict = field(default_factory=dict)
    num_pages: int = 0  # page ids in the block tables are 1..num_pages (0: CUDA-graph padding)


def build(scn: Scenario, rng, prefill_backend: str = "fa2") -> Setup:
    b = len(scn.cache_lens)
    seq = np.array(scn.cache_lens) + np.array(scn.query_lens)
    max_len = int(seq.max()) + 64
    # Trees before prefill_backend existed (benchmarks/ab_revisions.py, profile_step.py on an older
    # checkout) planned prefill with FlashInfer's default backend.
    extra = {"prefill_backend": prefill_backend} if "prefill_backend" in attrs.fields_dict(MetadataConfig) else {}
    cp = None
    if scn.cp:  # the DCP scenario; a tree without context parallelism fails it (reported, see main)
        if ContextParallel is None or "context_parallel" not in attrs.fields_dict(MetadataConfig):
            raise RuntimeError("this checkout has no context parallelism")
        cp = extra["context_parallel"] = ContextParallel(scn.cp, 0)
    cfg = MetadataConfig(
        max_num_reqs=b,
        max_num_tokens=max(int(sum(scn.query_lens)), b),
        max_model_len=max_len,
        kv_groups=(KVGroup(page_size=scn.page_size),),
        num_qo_heads=HEADS[0],
        num_kv_heads=HEADS[1],
        head_dim=HEADS[2],
        q_dtype=torch.bfloat16,
        kv_dtype=torch.bfloat16,
        device="cuda",
        cuda_graph_batch_sizes=(b,) if scn.graph else (),
        max_draft_tokens=scn.draft,
        **extra,
    )
    meta = BatchMetadata(cfg)
    noplan = BatchMetadata(attrs.evolve(cfg, plan_attention=False))
    held = local_len(seq, cp) if cp is not None else seq  # a context-parallel rank holds pages for its share
    num_pages = int(sum(-(-held // scn.page_size))) + 1
    perm = rng.permutation(np.arange(1, num_pages + 1))
    start = 0
    for r in range(b):
        n = -(-int(held[r]) // scn.page_size)
        for m in (meta, noplan):
            m.block_tables.append(r, perm[start : start + n].tolist())
        start += n
    idx = np.arange(b)
    s = Setup(scn, meta, idx, noplan=noplan, prefill_backend=prefill_backend, num_pages=num_pages)
    if cp is not None:
        s.world1 = build(dataclasses.replace(scn, cp=0), rng, prefill_backend)
    # Host arrays for the stock plan, and device kv_indices, prepared once (not timed).
    with meta.prepare_prefill(idx, query_lens=scn.query_lens, cache_lens=scn.cache_lens) as step:
        s.host = dict(
            qo=torch.from_numpy(step.qo_indptr_host.copy()),
            kv=torch.from_numpy(step.kv_indptr_host[0].copy()),
            last=torch.from_numpy(step.kv_last_page_len_host[0].copy()),
        )
        s.dev = dict(kv_indices=step.kv_indices[0].clone(), table=meta.block_tables.tables[0][:b].clone())
    return s


# --------------------------------------------------------------------------------------------------
# Implementations: each returns a callable running one step, and the host→device bytes it copies
# --------------------------------------------------------------------------------------------------
def _wrappers(decode: bool, prefill_backend: str):
    import flashinfer

    ws = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    if decode:
        return flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=HEADS[0] // HEADS[1] > 4)
    return flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=prefill_backend)


def _plan(w, decode, qo, kv, indices, last, ps):
    if decode:
        w.plan(kv, indices, last, *HEADS, ps, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    else:
        w.plan(qo, kv, indices, last, *HEADS, ps, causal=True, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)


def impl_eager_glue(s: Setup):
    scn = s.scn
    ps = scn.page_size
    decode = scn.decode and scn.draft == 0
    w = _wrappers(decode, s.prefill_backend)
    table = s.dev["table"]
    width = table.shape[1]
    cols = torch.arange(width, device="cuda")
    cache_l, query_l, idx_l = list(scn.cache_lens), list(scn.query_lens), s.idx.tolist()

    def step():
        cache = torch.tensor(cache_l, dtype=torch.int32, device="cuda")
        query = torch.tensor(query_l, dtype=torch.int32, device="cuda")
        idx = torch.tensor(idx_l, dtype=torch.int64, device="cuda")
        seq = cache + query
        pages = (seq + ps - 1) // ps
        kv_indptr = torch.nn.functional.pad(torch.cumsum(pages, 0, dtype=torch.int32), (1, 0))
        qo_indptr = torch.nn.functional.pad(torch.cumsum(query, 0, dtype=torch.int32), (1, 0))
        last = (seq - 1) % ps + 1
        rows = table[idx]
        kv_indices = rows[cols[None, :] < pages[:, None]]  # boolean mask: a device→host sync
        total = int(qo_indptr[-1])  # and another
        row_of = torch.repeat_interleave(torch.arange(len(idx_l), device="cuda"), query, output_size=total)
        positions = cache[row_of] + torch.arange(total, device="cuda") - qo_indptr[row_of]
        slots = rows[row_of, positions // ps].long() * ps + positions % ps
        _plan(w, decode, qo_indptr, kv_indptr, kv_indices, last, ps)  # device indptrs: plan syncs
        return slots

    return step


def impl_stock_plan(s: Setup):
    scn = s.scn
    decode = scn.decode and scn.draft == 0
    w = _wrappers(decode, s.prefill_backend)
    h, ind = s.host, s.dev["kv_indices"]

    def step():
        _plan(w, decode, h["qo"], h["kv"], ind, h["last"], scn.page_size)

    return step


@triton.jit
def _gather_kv_indices(
    table_ptr,  # int32 [R, W]: the block table, row stride TABLE_STRIDE
    idx_ptr,  # int32 [B]: each row's request slot
    kv_indptr_ptr,  # int32 [B + 1]
    out_ptr,  # int32 [kv_indptr[B]]: kv_indices
    TABLE_STRIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per row copies its pages from the block table to ``kv_indices`` (SGLang's approach)."""
    b = tl.program_id(0)
    req = tl.load(idx_ptr + b).to(tl.int64)
    lo = tl.load(kv_indptr_ptr + b)
    n = tl.load(kv_indptr_ptr + b + 1) - lo
    for off in range(0, n, BLOCK):
        j = off + tl.arange(0, BLOCK)
        m = j < n
        tl.store(out_ptr + lo + j, tl.load(table_ptr + req * TABLE_STRIDE + j, mask=m), mask=m)


class PeerGlue:
    """The metadata of one step the way vLLM and SGLang build it, re-implemented from their published
    approach: numpy on the host, one pinned host→device copy, a Triton gather of ``kv_indices`` and torch
    ops for the slot mappings; no host sync.

    Parameters
    ----------
    table:
        ``[R, W]`` int32 block table on the device (the request slots' pages).
    page_size:
        Tokens per page.
    max_tokens:
        Most new tokens in a step.

    One pinned buffer is reused every step: the caller must not start a step before the last one's copy has
    run (the benchmark synchronises between steps; an engine would keep two buffers).
    """

    def __init__(self, table: torch.Tensor, page_size: int, max_tokens: int):
        r = table.shape[0]
        self.table, self.ps = table, page_size
        size = 4 * r + 2 + 2 * max_tokens
        self.host = torch.zeros(size, dtype=torch.int32, pin_memory=table.is_cuda)
        self.h = self.host.numpy()
        self.dev = torch.zeros(size, dtype=torch.int32, device=table.device)
        self.kv_indices = torch.zeros(table.numel(), dtype=torch.int32, device=table.device)

    def views(self, b: int, t: int) -> dict:
        """Where a step of ``b`` rows and ``t`` tokens keeps each array in the buffers (host name: device tensor)."""
        at = dict(kv_indptr=(0, b + 1), last=(b + 1, 2 * b + 1), qo=(2 * b + 1, 3 * b + 2), idx=(3 * b + 2, 4 * b + 2))
        at.update(req=(4 * b + 2, 4 * b + 2 + t), pos=(4 * b + 2 + t, 4 * b + 2 + 2 * t))
        return {k: (self.host[lo:hi], self.dev[lo:hi]) for k, (lo, hi) in at.items()}

    def step(self, idx: np.ndarray, query_lens: np.ndarray, cache_lens: np.ndarray) -> dict:
        """The step's arrays: host ``kv_indptr``, ``last``, ``qo`` (pinned, for the planner) and device
        ``kv_indptr``, ``kv_indices``, ``last``, ``qo``, ``positions``, ``slots``."""
        h, ps, b = self.h, self.ps, idx.shape[0]
        t = int(query_lens.sum())
        seq = cache_lens + query_lens
        pages = -(-seq // ps)
        o = 0
        kv = h[o : o + b + 1]
        kv[0] = 0
        np.cumsum(pages, out=kv[1:])
        o += b + 1
        h[o : o + b] = seq - (pages - 1) * ps
        o += b
        qo = h[o : o + b + 1]
        qo[0] = 0
        np.cumsum(query_lens, out=qo[1:])
        o += b + 1
        h[o : o + b] = idx
        o += b
        rows = np.repeat(np.arange(b), query_lens)
        h[o : o + t] = idx[rows]
        o += t
        h[o : o + t] = np.arange(t) - qo[rows] + cache_lens[rows]
        o += t
        self.dev[:o].copy_(self.host[:o], non_blocking=True)
        v = self.views(b, t)
        num_pages = int(kv[b])
        kv_indices = self.kv_indices[:num_pages]
        _gather_kv_indices[(b,)](self.table, v["idx"][1], v["kv_indptr"][1], kv_indices, self.table.stride(0), 128)
        pos, req = v["pos"][1], v["req"][1].long()
        slots = self.table[req, (pos // ps).long()].long() * ps + pos % ps
        return dict(
            kv_indptr_host=v["kv_indptr"][0],
            last_host=v["last"][0],
            qo_host=v["qo"][0],
            kv_indptr=v["kv_indptr"][1],
            kv_indices=kv_indices,
            last=v["last"][1],
            qo=v["qo"][1],
            positions=pos,
            slots=slots,
        )


def _fast_decode_plan(w, kv_indptr, kv_indices, last, kv_indptr_host, ps):
    from flashinfer.decode import fast_decode_plan

    fast_decode_plan(
        w,
        kv_indptr,
        kv_indices,
        last,
        *HEADS,
        ps,
        q_data_type=torch.bfloat16,
        kv_data_type=torch.bfloat16,
        global_override_indptr_cpu=kv_indptr_host,
    )


def _graph_decode_wrapper(b: int, kv_indptr, kv_indices, last):
    """A CUDA-graph decode wrapper over fixed buffers, as SGLang keeps one per captured batch size."""
    import flashinfer

    ws = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        ws,
        "NHD",
        use_cuda_graph=True,
        use_tensor_cores=HEADS[0] // HEADS[1] > 4,
        paged_kv_indptr_buffer=kv_indptr,
        paged_kv_indices_buffer=kv_indices,
        paged_kv_last_page_len_buffer=last,
    )


def impl_fast_decode_plan(s: Setup):
    """``fast_decode_plan`` alone (decode scenarios), on arrays prepared beforehand; a CUDA-graph wrapper under
    graphs. Its first plan is the stock one (the module it reuses)."""
    scn = s.scn
    if not (scn.decode and scn.draft == 0):
        raise ValueError(f"{scn.name}: fast_decode_plan plans decode steps only")
    h, ind, ps = s.host, s.dev["kv_indices"], scn.page_size
    kv, last = h["kv"].cuda(), h["last"].cuda()
    kv_host = h["kv"].pin_memory()
    if scn.graph:
        w = _graph_decode_wrapper(len(scn.cache_lens), kv, ind, last)
    else:
        w = _wrappers(True, s.prefill_backend)
    _plan(w, True, None, kv_host, ind, h["last"], ps)

    def step():
        _fast_decode_plan(w, kv, ind, last, kv_host, ps)

    return step


def impl_peer_glue(s: Setup):
    """:class:`PeerGlue`'s metadata, then ``fast_decode_plan`` (decode; a CUDA-graph wrapper over the glue's
    own buffers under graphs) or the stock prefill ``plan()`` fed the pinned host arrays."""
    scn = s.scn
    decode = scn.decode and scn.draft == 0
    ps, b = scn.page_size, len(scn.cache_lens)
    idx, q, c = s.idx.astype(np.int32), np.array(scn.query_lens), np.array(scn.cache_lens)
    glue = PeerGlue(s.dev["table"], ps, int(q.sum()))
    if decode and scn.graph:
        v = glue.views(b, int(q.sum()))
        w = _graph_decode_wrapper(b, v["kv_indptr"][1], glue.kv_indices, v["last"][1])
    else:
        w = _wrappers(decode, s.prefill_backend)
    first = glue.step(idx, q, c)
    _plan(w, decode, first["qo_host"], first["kv_indptr_host"], first["kv_indices"], first["last_host"], ps)

    def step():
        a = glue.step(idx, q, c)
        if decode:
            _fast_decode_plan(w, a["kv_indptr"], a["kv_indices"], a["last"], a["kv_indptr_host"], ps)
        else:
            _plan(w, False, a["qo_host"], a["kv_indptr_host"], a["kv_indices"], a["last_host"], ps)
        return a["slots"]

    return step


class ForwardPass:
    """The forward of a scenario whose steps run attention: one layer storing the step's new keys and values
    into a paged KV cache (``ops.store_kv`` at ``slot_mappings[0]``) and running ``step.attention`` over it, on
    static buffers (a CUDA graph reads and writes fixed addresses only). ``capture(s)`` captures it for the
    scenario's padded batch size and draft tokens."""

    def __init__(self, s: Setup):
        cfg = s.meta.config
        hq, hkv, d = cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim
        cap, ps = cfg.max_num_tokens, cfg.kv_groups[0].page_size
        gen = torch.Generator(device="cuda").manual_seed(0)

        def rand(*shape):
            return (0.5 * torch.randn(*shape, generator=gen, device="cuda")).to(cfg.q_dtype)

        self.q, self.k, self.v = rand(cap, hq, d), rand(cap, hkv, d), rand(cap, hkv, d)
        self.out = torch.zeros(cap, hq, d, dtype=cfg.q_dtype, device="cuda")
        # Page ids run 1..num_pages (build); page 0 is the padding page graph padding rows read.
        self.k_cache, self.v_cache = (
            torch.zeros(s.num_pages + 1, ps, hkv, d, dtype=cfg.kv_dtype, device="cuda") for _ in range(2)
        )

    def __call__(self, step) -> None:
        n = step.padded_num_reqs * step.query_len if step.cuda_graph else step.num_tokens
        ops.store_kv(self.k[:n], self.v[:n], step.slot_mappings[0], self.k_cache, self.v_cache)
        step.attention(self.q[:n], self.k_cache, self.v_cache, out=self.out[:n])

    def capture(self, s: Setup) -> None:
        b = len(s.scn.cache_lens)
        s.meta.capture_decode_graph(s.meta.graph_batch_size(b), self, num_draft_tokens=s.scn.draft)


def impl_batchmeta(s: Setup, graph: bool, plan: bool = True, forward: ForwardPass | None = None):
    """``prepare_*`` alone, or with ``forward`` (decode scenarios): run eagerly, or replayed from the CUDA
    graph ``forward.capture`` made (``graph=True``)."""
    scn, meta = s.scn, (s.meta if plan else s.noplan)
    idx, q, c = s.idx, np.array(scn.query_lens), np.array(scn.cache_lens)

    if forward is not None:
        if not scn.decode:
            raise ValueError(f"{scn.name}: a forward runs with decode scenarios only")
        if graph:

            def step():
                with meta.prepare_decode(idx, c, num_draft_tokens=scn.draft, cuda_graph=True) as st:
                    meta.replay_decode_graph(st)

        else:

            def step():
                with meta.prepare_decode(idx, c, num_draft_tokens=scn.draft) as st:
                    forward(st)

    elif scn.decode:

        def step():
            with meta.prepare_decode(idx, c, num_draft_tokens=scn.draft, cuda_graph=graph):
                pass

    else:

        def step():
            with meta.prepare_prefill(idx, query_lens=q, cache_lens=c):
                pass

    return step


# --------------------------------------------------------------------------------------------------
def _count_syncs(step) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("called a synchronizing" in str(w.message) for w in caught)  # not the "prototype" notice


def measure(impls: dict, steps: int, progress) -> dict:
    res = {name: dict(host=[], host_run=[], gpu=[]) for name in impls}
    for fn in impls.values():  # warm up: kernels compiled, wrappers built, FlashInfer JIT loaded
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for name, fn in impls.items():
        res[name]["syncs"] = _count_syncs(fn)
    names = list(impls)
    shuffle = np.random.default_rng(1)
    for _ in range(steps):
        # Interleaved A/B in an order shuffled each step (seeded): the step run just before evicts
        # caches, and which one it is changes the figures, so no implementation always follows another.
        for name in shuffle.permutation(names):  # host time, GPU idle
            fn = impls[name]
            torch.cuda.synchronize()
            t0 = time.perf_counter_ns()
            fn()
            t1 = time.perf_counter_ns()
            res[name]["host"].append((t1 - t0) / 1e3)
        for name, fn in impls.items():  # GPU time: the step is enqueued behind a sleeping kernel,
            torch.cuda.synchronize()  # so the events time its device work, not the host's pace
            torch.cuda._sleep(2_000_000)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            res[name]["gpu"].append(start.elapsed_time(end) * 1e3)
        progress()
    for name in shuffle.permutation(names):  # host time, back to back: the step run just before is this one
        fn = impls[name]
        fn()
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter_ns()
            fn()
            t1 = time.perf_counter_ns()
            res[name]["host_run"].append((t1 - t0) / 1e3)
    for r in res.values():
        r["host_median"] = statistics.median(r["host"])
        r["host_run_median"] = statistics.median(r["host_run"])
        r["host_p90"] = float(np.percentile(r["host"], 90))
        r["gpu_median"] = statistics.median(r["gpu"])
    return res


def memory_report(s: Setup) -> dict:
    meta = s.meta
    tensors = [
        meta.block_tables.flat,
        meta._staging.dev,
        meta._spec._staging.dev,
        meta._spec.lens,
        meta._buffers.out32,
        meta._buffers.out64,
    ]
    held = sum(t.numel() * t.element_size() for t in tensors)
    b = len(s.scn.cache_lens)
    seq = np.array(s.scn.cache_lens) + np.array(s.scn.query_lens)
    pages = int(sum(-(-seq // s.scn.page_size)))
    width = meta.block_tables.tables[0].shape[1]
    needed = 4 * (b * width + pages + 3 * (b + 1)) + 8 * 2 * int(sum(s.scn.query_lens))
    # With MetadataConfig(token_history=True) the history adds int32 [max_num_reqs, max_model_len] (what
    # StepBuffers allocates; this configuration has none, so it is computed, not measured).
    history = 4 * meta.config.max_num_reqs * meta.config.max_model_len
    return dict(
        buffers_bytes=held,
        token_history_bytes=history,
        buffers_with_history_bytes=held + history,
        workspace_bytes=meta.config.workspace_bytes,
        graph_pool_bytes=0,
        strictly_needed_bytes=needed,
    )


# --------------------------------------------------------------------------------------------------
# Summary against TARGETS (pure functions of the results dict: exercised without a GPU)
# --------------------------------------------------------------------------------------------------
def num(v: float | None, fmt: str, suffix: str = "") -> str:
    """A table cell: ``v`` formatted, or a dash where it was not measured."""
    return "—" if v is None else format(v, fmt) + suffix


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or not den > 0:
        return None
    return num / den


def _shown(value: float, limit: float, suffix: str = "") -> str:
    """``value`` with as many decimals (2 to 4) as it takes for the shown figure to compare to ``limit`` as
    the figure itself does, so a near miss never reads "0.17 ≤ 0.17 ✗"."""
    text = ""
    for digits in (2, 3, 4):
        text = f"{value:.{digits}f}"
        if (float(text) <= limit) == (value <= limit):
            break
    return text + suffix


def _check(label: str, value: float | None, limit: float | None, shown: str, bound: str) -> dict:
    ok = None if value is None or limit is None else bool(value <= limit)
    mark = {True: "✓", False: "✗", None: "n/a"}[ok]
    return dict(name=label, value=value, limit=limit, ok=ok, text=f"{label} {shown} ≤ {bound} {mark}")


def summarize(results: dict, targets: dict | None = None, host: str = "host_median") -> dict:
    """Per scenario: batchmeta's medians against stock-plan's, each target checked; ``passed`` is True when
    every check passes, False when any fails, None when none fails but some cannot be checked. ``host`` names
    the host figure compared, as in :func:`against_peers`."""
    targets = TARGETS if targets is None else targets
    out = {}
    for name, r in results.items():
        impls = r["impls"]
        tgt = targets.get(name, {})
        stock = impls.get("stock-plan", {})
        bm_name = tgt.get("impl") or ("batchmeta-graph" if "batchmeta-graph" in impls else "batchmeta")
        bm = impls.get(bm_name, {})
        noplan = impls.get("batchmeta-noplan", {})
        host_ratio = _ratio(bm.get(host), stock.get(host))
        noplan_ratio = _ratio(noplan.get(host), stock.get(host))
        # A row checked against another implementation's GPU µs (gpu_vs: one running the same forward) has no
        # meaningful ratio to the stock plan, which runs no attention.
        gpu_ratio = None if "gpu_vs" in tgt else _ratio(bm.get("gpu_median"), stock.get("gpu_median"))
        eager_ratio = None
        checks = []
        if "host" in tgt:
            shown = "n/a" if host_ratio is None else _shown(host_ratio, tgt["host"])
            checks.append(_check("host", host_ratio, tgt["host"], shown, f"{tgt['host']:g}"))
        if "noplan" in tgt:
            shown = "n/a" if noplan_ratio is None else _shown(noplan_ratio, tgt["noplan"])
            checks.append(_check("noplan", noplan_ratio, tgt["noplan"], shown, f"{tgt['noplan']:g}"))
        if "host_vs" in tgt:
            other, other_impl = (tgt["host_vs"], "batchmeta") if isinstance(tgt["host_vs"], str) else tgt["host_vs"]
            ref = results.get(other, {}).get("impls", {}).get(other_impl, {}).get(host)
            value = bm.get(host)
            eager_ratio = _ratio(value, ref)
            if value is None or ref is None:
                checks.append(
                    dict(name="host", value=None, limit=None, ok=None, text=f"host vs {other} n/a ({other} not run)")
                )
            else:
                checks.append(
                    _check("host", value, ref, _shown(value, ref, " µs"), f"{other} {other_impl} {_shown(ref, ref)} µs")
                )
        if "gpu_ratio" in tgt:
            lim = tgt["gpu_ratio"]
            shown = "n/a" if gpu_ratio is None else _shown(gpu_ratio, lim, TIMES)
            checks.append(_check("GPU", gpu_ratio, lim, shown, f"{lim:g}{TIMES}"))
        if "gpu_us" in tgt:
            lim, value = tgt["gpu_us"], bm.get("gpu_median")
            shown = "n/a" if value is None else _shown(value, lim, " µs")
            checks.append(_check("GPU", value, lim, shown, f"{lim:g} µs"))
        if "gpu_vs" in tgt:
            other, other_impl, lim = tgt["gpu_vs"]
            ref = results.get(other, {}).get("impls", {}).get(other_impl, {}).get("gpu_median")
            value = _ratio(bm.get("gpu_median"), ref)
            shown = "n/a" if value is None else _shown(value, lim, TIMES)
            checks.append(_check(f"GPU vs {other_impl}", value, lim, shown, f"{lim:g}{TIMES}"))
        oks = [c["ok"] for c in checks]
        passed = False if False in oks else (None if None in oks or not oks else True)
        out[name] = dict(
            what=r.get("what", ""),
            batchmeta_impl=bm_name,
            stock_plan_host_us=stock.get(host),
            batchmeta_host_us=bm.get(host),
            host_ratio=host_ratio,
            eager_ratio=eager_ratio,
            noplan_ratio=noplan_ratio,
            gpu_ratio=gpu_ratio,
            targets=tgt,
            checks=checks,
            passed=passed,
        )
    return out


def summary_lines(summary: dict) -> list[str]:
    """The summary table, in markdown."""

    lines = [
        "| scenario | stock-plan host µs | batchmeta host µs | batchmeta / stock-plan | graph / eager host "
        "| batchmeta-noplan / stock-plan | GPU µs batchmeta / stock-plan | target | pass/miss |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, s in summary.items():
        bm = "" if s["batchmeta_impl"] == "batchmeta" else f" ({s['batchmeta_impl']})"
        checks = "; ".join(c["text"] for c in s["checks"]) or "no target"
        verdict = {True: "**pass**", False: "**miss**", None: "n/a"}[s["passed"]]
        lines.append(
            f"| {name} | {num(s['stock_plan_host_us'], '.1f')} | {num(s['batchmeta_host_us'], '.1f')}{bm} | "
            f"{num(s['host_ratio'], '.3f')} | {num(s.get('eager_ratio'), '.3f')} | {num(s['noplan_ratio'], '.3f')} | "
            f"{num(s['gpu_ratio'], '.2f', TIMES)} | {checks} | {verdict} |"
        )
    return lines


def against_peers(results: dict, targets: dict | None = None, host: str = "host_median") -> dict:
    """Per scenario where a peer ran: batchmeta (``batchmeta-graph`` under graphs) against the best peer, host µs
    against the fastest of :data:`PEERS`, GPU µs against ``peer-glue``, each checked against ``targets``
    (default :data:`PEER_TARGETS`); ``passed`` as in :func:`summarize`. ``host`` names the host figure compared:
    ``host_median`` (steps interleaved) or ``host_run_median`` (each implementation's steps back to back)."""
    targets = PEER_TARGETS if targets is None else targets
    out = {}
    for name, r in results.items():
        impls = r["impls"]
        peers = {p: impls[p] for p in PEERS if p in impls}
        bm_name = "batchmeta-graph" if "batchmeta-graph" in impls else "batchmeta"
        bm = impls.get(bm_name)
        if not peers or bm is None:
            continue
        best = min(peers, key=lambda p: peers[p][host])
        host_ratio = _ratio(bm[host], peers[best][host])
        glue = peers.get("peer-glue", {})
        gpu_ratio = _ratio(bm["gpu_median"], glue.get("gpu_median"))
        checks = [
            _check("host", host_ratio, targets["host"], _shown(host_ratio, targets["host"]), f"{targets['host']:g}")
            if host_ratio is not None
            else dict(name="host", value=None, limit=None, ok=None, text="host n/a"),
            _check(
                "GPU", gpu_ratio, targets["gpu"], _shown(gpu_ratio, targets["gpu"], TIMES), f"{targets['gpu']:g}{TIMES}"
            )
            if gpu_ratio is not None
            else dict(name="GPU", value=None, limit=None, ok=None, text="GPU n/a (no peer-glue)"),
        ]
        oks = [c["ok"] for c in checks]
        out[name] = dict(
            batchmeta_impl=bm_name,
            best_peer=best,
            best_peer_host_us=peers[best][host],
            batchmeta_host_us=bm[host],
            host_ratio=host_ratio,
            peer_glue_gpu_us=glue.get("gpu_median"),
            batchmeta_gpu_us=bm["gpu_median"],
            gpu_ratio=gpu_ratio,
            checks=checks,
            passed=False if False in oks else (None if None in oks else True),
        )
    return out


def against_peers_lines(rows: dict) -> list[str]:
    """The against-the-peers table, in markdown."""

    lines = [
        "| scenario | best peer (host) | its host µs | batchmeta host µs | ratio | peer-glue GPU µs | batchmeta GPU µs "
        "| ratio | target | pass/miss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, r in rows.items():
        bm = "" if r["batchmeta_impl"] == "batchmeta" else f" ({r['batchmeta_impl']})"
        verdict = {True: "**pass**", False: "**miss**", None: "n/a"}[r["passed"]]
        lines.append(
            f"| {name} | {r['best_peer']} | {num(r['best_peer_host_us'], '.1f')} | "
            f"{num(r['batchmeta_host_us'], '.1f')}{bm} | {num(r['host_ratio'], '.3f')} | "
            f"{num(r['peer_glue_gpu_us'], '.1f')} | {num(r['batchmeta_gpu_us'], '.1f')} | "
            f"{num(r['gpu_ratio'], '.2f', TIMES)} | {'; '.join(c['text'] for c in r['checks'])} | {verdict} |"
        )
    return lines


# What a graph scenario with a forward compares: (label, graph implementation, eager implementation).
GRAPH_PAIRS = (
    ("prepare only", "batchmeta-graph", "batchmeta"),
    ("prepare + forward", "batchmeta-graph+replay", "batchmeta+fwd"),
)
# The eager scenario whose batch a graph scenario repeats, for its prepare-only row.
GRAPH_OF = {"S_graph": "S"}


def against_world1(results: dict) -> list[dict]:
    """Per context-parallel scenario (those measuring ``batchmeta-world1``): a rank's ``batchmeta`` and
    ``batchmeta-noplan`` host and GPU medians against the same batch's with ``world_size=1``, and their ratios."""
    rows = []
    for name, r in results.items():
        impls = r["impls"]
        if "batchmeta-world1" not in impls:
            continue
        for rank_impl, world1_impl in (
            ("batchmeta", "batchmeta-world1"),
            ("batchmeta-noplan", "batchmeta-world1-noplan"),
        ):
            rm, wm = impls.get(rank_impl, {}), impls.get(world1_impl, {})
            rows.append(
                dict(
                    scenario=name,
                    rank=rank_impl,
                    world1=world1_impl,
                    rank_host_us=rm.get("host_median"),
                    world1_host_us=wm.get("host_median"),
                    host_ratio=_ratio(rm.get("host_median"), wm.get("host_median")),
                    rank_gpu_us=rm.get("gpu_median"),
                    world1_gpu_us=wm.get("gpu_median"),
                    gpu_ratio=_ratio(rm.get("gpu_median"), wm.get("gpu_median")),
                )
            )
    return rows


def against_world1_lines(rows: list[dict]) -> list[str]:
    """The context-parallel table, in markdown."""

    lines = [
        "| scenario | rank | world 1 | rank host µs | world 1 host µs | ratio | rank GPU µs | world 1 GPU µs | ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['rank']} | {r['world1']} | {num(r['rank_host_us'], '.1f')} | "
            f"{num(r['world1_host_us'], '.1f')} | {num(r['host_ratio'], '.2f', TIMES)} | "
            f"{num(r['rank_gpu_us'], '.1f')} | {num(r['world1_gpu_us'], '.1f')} | {num(r['gpu_ratio'], '.2f', TIMES)} |"
        )
    return lines


def graph_vs_eager(results: dict) -> list[dict]:
    """Per graph scenario with a forward (those measuring ``batchmeta+fwd``): host and GPU medians of each graph
    implementation beside its eager twin from the same run, interleaved (:data:`GRAPH_PAIRS`), and the
    prepare-only graph step against the eager scenario it repeats (:data:`GRAPH_OF`) when that ran too."""
    rows = []
    for name, r in results.items():
        impls = r["impls"]
        if "batchmeta+fwd" not in impls:
            continue
        pairs = [(label, name, g, name, e) for label, g, e in GRAPH_PAIRS]
        eager_scn = GRAPH_OF.get(name)
        if eager_scn in results:
            pairs.append((f"prepare only, against {eager_scn}", name, "batchmeta-graph", eager_scn, "batchmeta"))
        for label, gs, g, es, e in pairs:
            gm = results[gs]["impls"].get(g, {})
            em = results[es]["impls"].get(e, {})
            rows.append(
                dict(
                    scenario=name,
                    what=label,
                    graph=f"{gs} {g}",
                    eager=f"{es} {e}",
                    graph_host_us=gm.get("host_median"),
                    eager_host_us=em.get("host_median"),
                    host_ratio=_ratio(gm.get("host_median"), em.get("host_median")),
                    graph_gpu_us=gm.get("gpu_median"),
                    eager_gpu_us=em.get("gpu_median"),
                    gpu_ratio=_ratio(gm.get("gpu_median"), em.get("gpu_median")),
                    graph_syncs=gm.get("syncs"),
                    eager_syncs=em.get("syncs"),
                )
            )
    return rows


def graph_vs_eager_lines(rows: list[dict]) -> list[str]:
    """The graph-beside-eager table, in markdown (no lines without rows)."""
    if not rows:
        return []

    lines = [
        "| scenario | step | graph | eager | host µs graph / eager | ratio | GPU µs graph / eager | ratio | syncs |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['what']} | {r['graph']} | {r['eager']} | "
            f"{num(r['graph_host_us'], '.1f')} / {num(r['eager_host_us'], '.1f')} | {num(r['host_ratio'], '.3f')} | "
            f"{num(r['graph_gpu_us'], '.1f')} / {num(r['eager_gpu_us'], '.1f')} | {num(r['gpu_ratio'], '.2f', TIMES)} "
            f"| {r['graph_syncs']} / {r['eager_syncs']} |"
        )
    return lines


def main() -> int:
    global HEADS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", nargs="*", help="scenario names to run (default: all)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--head-dim", type=int, default=128, help="attention head size (a FlashInfer JIT variant)")
    parser.add_argument(
        "--prefill-backend",
        choices=PREFILL_BACKENDS,
        default="fa2",
        help="FlashInfer backend= of the prefill wrappers, for batchmeta and the stock baselines alike",
    )
    args = parser.parse_args()
    HEADS = (HEADS[0], HEADS[1], args.head_dim)
    if not torch.cuda.is_available():
        print("bench_steps needs a CUDA device and FlashInfer", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    chosen = [s for s in scenarios(rng) if not args.only or s.name in args.only]
    total = len(chosen) * args.steps
    done = [0]

    def progress():
        done[0] += 1
        filled = int(30 * done[0] / total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done[0]}/{total} steps")
        sys.stderr.flush()

    results, memory = {}, None
    for scn in chosen:
        if scn.cp:  # last, and apart: a failure here must not lose the other scenarios' report
            try:
                s = build(scn, rng, prefill_backend=args.prefill_backend)
                impls = {
                    "batchmeta-world1": impl_batchmeta(s.world1, graph=False),
                    "batchmeta": impl_batchmeta(s, graph=False),
                    "batchmeta-noplan": impl_batchmeta(s, graph=False, plan=False),
                    "batchmeta-world1-noplan": impl_batchmeta(s.world1, graph=False, plan=False),
                }
                results[scn.name] = dict(what=scn.what, impls=measure(impls, args.steps, progress))
            except Exception as e:  # reported, not raised
                print(f"\nbench_steps: {scn.name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        s = build(scn, rng, prefill_backend=args.prefill_backend)
        if scn.forward:  # graph beside eager on one batch; the glue's cost is S's row already
            fwd = ForwardPass(s)
            fwd.capture(s)
            impls = {
                "stock-plan": impl_stock_plan(s),
                "batchmeta": impl_batchmeta(s, graph=False),
                "batchmeta-graph": impl_batchmeta(s, graph=True),
                "batchmeta+fwd": impl_batchmeta(s, graph=False, forward=fwd),
                "batchmeta-graph+replay": impl_batchmeta(s, graph=True, forward=fwd),
            }
        elif scn.graph:
            impls = {
                "eager-glue": impl_eager_glue(s),
                "stock-plan": impl_stock_plan(s),
                "batchmeta-graph": impl_batchmeta(s, graph=True),
            }
        else:
            impls = {
                "eager-glue": impl_eager_glue(s),
                "stock-plan": impl_stock_plan(s),
                "batchmeta": impl_batchmeta(s, graph=False),
                "batchmeta-noplan": impl_batchmeta(s, graph=False, plan=False),
            }
        if not scn.forward:  # the peers' own paths
            if scn.decode and scn.draft == 0:
                impls["fast-decode-plan"] = impl_fast_decode_plan(s)
            impls["peer-glue"] = impl_peer_glue(s)
        results[scn.name] = dict(what=scn.what, impls=measure(impls, args.steps, progress))
        if scn.name == "D4":
            memory = memory_report(s)
        del s
        torch.cuda.empty_cache()
    sys.stderr.write("\n")

    device = torch.cuda.get_device_name().replace(" ", "-")
    stamp = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import flashinfer

    fi_version = flashinfer.__version__
    # Two FlashInfer releases measured on one day get a report each.
    stem = f"{device}-{stamp}-flashinfer-{fi_version}"

    def base(suffix: str) -> Path:  # not Path.with_suffix: the version's dots would read as a suffix
        return out / (stem + suffix)

    lines = [
        f"# batchmeta per-step cost on {torch.cuda.get_device_name()} ({stamp})",
        "",
        f"torch {torch.__version__}; FlashInfer {fi_version}; heads {HEADS}; bf16; "
        f"prefill backend {args.prefill_backend}; "
        f"{args.steps} interleaved steps per implementation, then {args.steps} back to back.",
        "",
        "| scenario | implementation | host µs median | host µs p90 | host µs median, back to back | GPU µs median "
        "| syncs/step |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        for impl, m in r["impls"].items():
            lines.append(
                f"| {name}: {r['what']} | {impl} | {m['host_median']:.1f} | {m['host_p90']:.1f} | "
                f"{m['host_run_median']:.1f} | {m['gpu_median']:.1f} | {m['syncs']} |"
            )
    summary = summarize(results)
    lines += [
        "",
        "Summary against the speed targets (ratios of medians from this run; batchmeta is batchmeta-graph for D2 "
        "and batchmeta-graph+replay for S_graph; graph / eager host: D2 against D1's batchmeta, S_graph against "
        "batchmeta+fwd):",
        "",
        *summary_lines(summary),
    ]
    peers = against_peers(results)
    if peers:
        lines += [
            "",
            f"Against the best peer (host: the fastest of {', '.join(PEERS)}; GPU: peer-glue, the peer path that "
            "builds the step's metadata; medians from this run):",
            "",
            *against_peers_lines(peers),
        ]
    # The same checks on each implementation's steps timed back to back: caches hold that step's own code and
    # data, as in an engine whose loop between two steps is short (a graph replay and a sampler).
    summary_run = summarize(results, host="host_run_median")
    peers_run = against_peers(results, host="host_run_median")
    lines += [
        "",
        "Back to back: the summary against the speed targets with host µs from each implementation's steps run "
        "consecutively (GPU µs as above):",
        "",
        *summary_lines(summary_run),
    ]
    if peers_run:
        lines += ["", "Back to back: against the best peer:", "", *against_peers_lines(peers_run)]
    pairs = graph_vs_eager(results)
    if pairs:
        lines += [
            "",
            "CUDA graphs beside eager on the same batch (medians; graph and eager implementations interleaved in one "
            "run, except the row against another scenario):",
            "",
            *graph_vs_eager_lines(pairs),
        ]
    cp_rows = against_world1(results)
    if cp_rows:
        lines += [
            "",
            "Context parallelism: a rank's step (rank 0 of the world) against the same batch with world_size=1 "
            "(medians, interleaved in one run):",
            "",
            *against_world1_lines(cp_rows),
        ]
    if memory:
        lines += [
            "",
            "Device memory for D4's configuration (bytes): " + ", ".join(f"{k} {v:,}" for k, v in memory.items()),
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    base(".md").write_text(text)
    raw = {
        k: dict(what=v["what"], impls={i: {kk: vv for kk, vv in m.items()} for i, m in v["impls"].items()})
        for k, v in results.items()
    }
    base(".json").write_text(
        json.dumps(
            dict(
                results=raw,
                memory=memory,
                prefill_backend=args.prefill_backend,
                flashinfer=fi_version,
                summary=summary,
                against_peers=peers,
                summary_back_to_back=summary_run,
                against_peers_back_to_back=peers_run,
                graph_vs_eager=pairs,
                against_world1=cp_rows,
            ),
            indent=1,
        )
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(results)
        impl_names = sorted({i for r in results.values() for i in r["impls"]})
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / len(impl_names)
        for j, impl in enumerate(impl_names):
            ys = [results[n]["impls"].get(impl, {}).get("host_median", math.nan) for n in names]
            ax.bar([i + j * width for i in range(len(names))], ys, width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
        ax.set_yscale("log")
        ax.set_ylabel("host µs per step (median)")
        ax.set_title(f"batchmeta per-step host cost, {torch.cuda.get_device_name()}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(base(".png"), dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot written", file=sys.stderr)
    if os.environ.get("OUT") and Path(os.environ["OUT"]).resolve() != out.resolve():  # --out $OUT: written there
        for suffix in (".md", ".json", ".png"):
            if base(suffix).exists():
                shutil.copy(base(suffix), os.environ["OUT"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
