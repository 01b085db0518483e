"""Decode-loop throughput: a synchronous engine loop against one overlapped through batchmeta's token history.

Run on a machine with CUDA and FlashInfer:

    python benchmarks/bench_decode_loop.py [--batch 64] [--steps 200] [--layers 4] [--hidden 512] [--heads 8]
        [--kv-heads 2] [--graphs] [--spec K] [--out DIR]

Writes ``<out>/<device>-<date>-decode-loop[-specK].{md,json}`` (``--out`` defaults to ``benchmarks/results/``; both
files are copied to ``$OUT`` if set). Without CUDA (or with ``--device cpu``) the same loops run slowly through
the torch fallbacks, as a smoke test: no GPU figures then.

The model: an embedding, ``--layers`` attention layers (RMS norm, q/k/v projections, ``ops.store_kv`` into a
paged KV cache at the step's slot mapping, ``step.attention``, output projection, residual), a final norm and
projection, and the tied unembedding; the next token is the argmax, on the device. ``--batch`` requests with
random prompts (``--prompt-len`` tokens on average) are prefilled in one step, then decoded for ``--warmup``
untimed and ``--steps`` timed steps, pages appended to their block tables as they grow. Two loops:

- ``sync``: every step the host reads the sampled tokens (``.tolist()``, which waits for the GPU) and passes
  them to the next step's input ids (a pinned buffer, copied without blocking): the GPU idles while the host
  reads, bookkeeps and prepares the next step (metadata, plans, kernel launches).
- ``overlap``: ``MetadataConfig(token_history=True)``: prompts staged with ``meta.stage_prompt``; each step's
  model input is ``step.input_ids`` (gathered from the history by the step's own launch); after sampling,
  ``meta.accept_tokens`` writes the sampled tokens into the history on the device, and the host goes on to
  prepare the next step while the GPU still runs this one. Sampled tokens come back one step late: a
  non-blocking copy into pinned memory per step, collected when its event has completed (``Event.query``, never
  a wait). Before ``prepare_decode`` of step N+1 the host waits for an event recorded right after step N's
  ``prepare_*`` (the GPU has started step N): FlashInfer's ``plan()`` writes its plan into one pinned host buffer
  per wrapper and enqueues an asynchronous copy from it, so planning N+1 before the GPU has made N's copy would
  replace N's plan. The wait never leaves the GPU without work (step N's forward is queued behind it);
  ``--no-plan-fence`` drops it, to probe that race (the token check below then fails if it bites).

``--graphs`` runs both loops a second time with decode steps replayed from CUDA graphs (one captured per
BatchMetadata for the batch, the forward and the argmax inside; the sync loop's graph reads a static input-ids
buffer, the overlapped one ``step.input_ids``). Loops alternate, ``--repeats`` times; figures are medians over
the repeats.

Figures per loop (timed steps only):

- tokens/s: ``batch * steps`` over the wall time from the first timed step to the last token on the host;
- host µs per step: wall time of one loop iteration minus the time the host was blocked waiting for the GPU
  (``sync``: the ``.tolist()``; ``overlap``: the plan fence), median and p90: the host's own work per step. A
  wait inside batchmeta (its pinned staging ring, when the host runs two steps ahead) is not subtracted;
- GPU idle µs per step: the GPU timeline's mean period per step minus the step's device time. The period comes
  from CUDA events recorded at the start of every step (before its ``prepare_*``) and after its last GPU work:
  events are stamped when the GPU reaches them, so the span from the first step's start to the last step's end,
  over ``steps``, is the GPU's time per step in the loop. The device time is measured afterwards (calibration):
  the last step's GPU work (prepare, inputs, forward, sampling, and for ``overlap`` ``accept_tokens`` and the
  readback copy; all idempotent for that step) enqueued ``--calib`` times behind a sleeping kernel long enough
  for the host to enqueue all of it (checked with an event before the sleep; doubled and retried if not),
  timed with events: device work back to back, without the host's pace. ``idle = period - device time``
  (clamped at 0) counts every gap, between steps and between the kernels of one step (an eager forward waiting
  for its launches); the gap between a step's last work and the next step's first is given separately
  (median). The events add about two ``record()`` calls (a few µs) of host time per step to both loops.
- host syncs per step: the device-to-host waits the host did not ask for (``.tolist()``, ``.item()``, a
  blocking copy), counted by torch's sync debug mode in the warm-up steps after the first (the timed steps are
  not watched, so they pay nothing for it); where they happened is listed under the checks. The synchronous
  loops have their one ``.tolist()`` a step; an overlapped loop should have none.

``--spec K``: speculative decoding instead, both loops on a ``MetadataConfig(token_history=True,
max_draft_tokens=K)``. Each decode step verifies ``1 + K`` tokens per request (the last accepted token, then K
drafts, gathered from the token history as ``step.input_ids``): the model's argmax at every token are the target
tokens, and the accepted count is ``1 + `` the drafts that match the targets before them up to the first mismatch
(greedy verification, on the device; the count includes the bonus token). ``meta.accept_tokens(step, None,
targets, counts, prompt_lens)`` writes the accepted tokens into the history; a drafter on the device then proposes
the next K drafts and ``meta.write_drafts`` puts them after each request's next length. The drafter (prompt
lookup, torch ops, nothing read by the host): the K tokens that followed the latest earlier occurrence of the
request's last accepted token in its own history, else that token repeated; it keeps its own copy of the lengths
on the device (adding each step's counts). Drafts, counts and tokens depend only on the model's outputs, so both
loops accept the same tokens. Loops:

- ``sync``: the host reads each step's counts and target tokens (one ``.tolist()``, which waits for the GPU)
  and passes host counts to ``accept_tokens``: exact next lengths; then drafts, and the next step.
- ``overlap``: the counts stay on the device (``accept_tokens`` returns upper bounds, ``c + 1 + K``, of the next
  lengths, passed to the next ``prepare_decode`` as they are; pages held for ``bound + 1 + K``); counts and targets
  come back one step late as in the plain overlapped loop, with the same plan fence.

With ``--graphs`` the forward and the verification are captured per BatchMetadata
(``capture_decode_graph(bs, forward, num_draft_tokens=K)``, replayed after ``prepare_decode(...,
num_draft_tokens=K, cuda_graph=True)``), and so is the drafter (``torch.cuda.CUDAGraph``). Tokens/s counts the
accepted tokens; the report adds the mean accepted tokens per request a step. The calibration (GPU busy time)
enqueues further steps behind the sleeping kernel (device counts in both loops: the host cannot wait there), so
the buffers are sized for ``8 * --calib`` more steps. Token checks: each step's accepted tokens, and each
request's token history read back at the end of the run (which must also hold the prompt then the accepted
tokens: a run whose history does not fails).

Both loops must sample identical tokens (the same kernels on the same inputs): any difference fails the run
(exit status 1, after the report is written, naming the first differing step and request). Tokens are
compared between eager and CUDA-graph runs too, for information only (their attention kernels differ).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import attrs
import numpy as np
import torch

from batchmeta import BatchMetadata, KVGroup, MetadataConfig, ops

HAS_TOKEN_HISTORY = "token_history" in attrs.fields_dict(MetadataConfig)
HAS_SPECULATION = hasattr(BatchMetadata, "write_drafts") and "max_draft_tokens" in attrs.fields_dict(MetadataConfig)
LOOPS = ("sync", "overlap")
TIMES = "\N{MULTIPLICATION SIGN}"  # spelt out: ruff flags the literal sign as ambiguous


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
class TinyModel:
    """Embedding, ``layers`` attention layers through batchmeta, final norm and projection, tied unembedding."""

    def __init__(self, args, num_pages: int, device: torch.device, dtype: torch.dtype):
        gen = torch.Generator().manual_seed(args.seed)
        h, hq, hkv = args.hidden, args.heads, args.kv_heads
        d = h // hq
        self.hidden, self.shape = h, (hq, hkv, d)

        def w(*shape, scale):
            return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

        s = h**-0.5
        self.emb = w(args.vocab, h, scale=1.0)
        self.layers = [
            dict(
                wq=w(h, hq * d, scale=s), wk=w(h, hkv * d, scale=s), wv=w(h, hkv * d, scale=s), wo=w(hq * d, h, scale=s)
            )
            for _ in range(args.layers)
        ]
        self.final = w(h, h, scale=s)  # without it the tied unembedding mostly predicts the input token again
        self.caches = [
            tuple(torch.zeros(num_pages, args.page_size, hkv, d, dtype=dtype, device=device) for _ in range(2))
            for _ in range(args.layers)
        ]

    def forward(self, ids: torch.Tensor, step, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Next token ids (int64, argmax) of ``ids`` ``[T]``' last tokens: at ``rows``, else at every token."""
        hq, hkv, d = self.shape
        x = self.emb[ids]
        t = x.shape[0]
        for layer, (k_cache, v_cache) in zip(self.layers, self.caches, strict=True):
            y = torch.nn.functional.rms_norm(x, (self.hidden,), eps=1e-6)
            q = (y @ layer["wq"]).view(t, hq, d)
            k = (y @ layer["wk"]).view(t, hkv, d)
            v = (y @ layer["wv"]).view(t, hkv, d)
            ops.store_kv(k, v, step.slot_mappings[0], k_cache, v_cache)
            a = step.attention(q, k_cache, v_cache, k=k, v=v)
            x = x + a.reshape(t, hq * d) @ layer["wo"]
        if rows is not None:
            x = x[rows]
        y = torch.nn.functional.rms_norm(x, (self.hidden,), eps=1e-6) @ self.final
        return (y @ self.emb.T).argmax(-1)


# --------------------------------------------------------------------------------------------------
# One engine: model, BatchMetadata objects (one per loop), requests, static buffers, CUDA graphs
# --------------------------------------------------------------------------------------------------
class Engine:
    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.cuda = device.type == "cuda"
        rng = np.random.default_rng(args.seed)
        b, ps = args.batch, args.page_size
        lo, hi = max(1, int(args.prompt_len * 0.75)), max(1, int(args.prompt_len * 1.25))
        self.prompt_lens = rng.integers(lo, hi + 1, b).astype(np.int64)
        self.prompts = [rng.integers(0, args.vocab, int(n)).astype(np.int64) for n in self.prompt_lens]
        self.idx = np.arange(b, dtype=np.int64)
        self.decode_steps = args.warmup + args.steps
        k = self.k = args.spec
        if k:
            # Speculative: the overlapped loop's bounds grow by 1 + k a step (every draft accepted), and the
            # calibration goes on decoding (up to 8 tries per timed replay, see device_time_us); pages for the
            # next step's 1 + k tokens after the bound, drafts written up to k past the device length.
            self.calib_steps = 8 * args.calib + 1
            max_len = int(self.prompt_lens.max()) + (1 + k) * (self.decode_steps + self.calib_steps + 1) + k + 2
        else:
            # Positions up to prompt + decode steps are written (accept_tokens writes one past the last step's token).
            max_len = int(self.prompt_lens.max()) + self.decode_steps + 2
        self.max_len = -(-max_len // ps) * ps
        self.num_pages = b * (self.max_len // ps) + 1  # page 0: CUDA-graph padding rows read it
        dtype = torch.bfloat16 if self.cuda else torch.float32
        self.model = TinyModel(args, self.num_pages, device, dtype)
        self.graph_sizes = (b,) if args.graphs else ()
        base = dict(
            max_num_reqs=b,
            max_num_tokens=max(int(self.prompt_lens.sum()), b * (1 + k)),
            max_model_len=self.max_len,
            kv_groups=(KVGroup(page_size=ps),),
            num_qo_heads=args.heads,
            num_kv_heads=args.kv_heads,
            head_dim=args.hidden // args.heads,
            q_dtype=dtype,
            kv_dtype=dtype,
            device=device,
            num_kv_pages=self.num_pages,
            cuda_graph_batch_sizes=self.graph_sizes,
        )
        if k:
            # Both speculative loops gather their inputs (last token, drafts) from the token history.
            spec = dict(base, token_history=True, max_draft_tokens=k)
            self.metas = {name: BatchMetadata(MetadataConfig(**spec)) for name in LOOPS}
        else:
            self.metas = {"sync": BatchMetadata(MetadataConfig(**base))}
            if HAS_TOKEN_HISTORY:
                self.metas["overlap"] = BatchMetadata(MetadataConfig(**base, token_history=True))
        pin = self.cuda
        self.inp_host = torch.zeros(b, dtype=torch.int64, pin_memory=pin)  # sync loop: tokens in
        self.inp_np = self.inp_host.numpy()
        self.inp_dev = torch.zeros(b, dtype=torch.int64, device=device)
        self.next_buf = torch.zeros(b, dtype=torch.int64, device=device)  # the graphs' sampled tokens
        self.scratch = torch.zeros(b, dtype=torch.int64, pin_memory=pin)  # calibration's readback
        self.pages_held = np.zeros(b, dtype=np.int64)
        self.free_pages: list[int] = []
        if k:
            bp = self.metas["sync"].graph_batch_size(b) if args.graphs else b
            self.targets = torch.zeros(bp, 1 + k, dtype=torch.int64, device=device)  # verify: target tokens
            self.counts = torch.zeros(bp, dtype=torch.int64, device=device)  # verify: accepted tokens per row
            # The drafter's own copy of each request's next cache length (the position of its last accepted
            # token), double-buffered: step i reads lens[i % 2] and writes lens[(i + 1) % 2], so that a step's
            # drafter can be enqueued again (the calibration) and graphs read and write fixed buffers.
            self.lens = torch.zeros(2, b, dtype=torch.int64, device=device)
            self.drafts = torch.zeros(b, k, dtype=torch.int64, device=device)
            self.positions = torch.arange(self.max_len, device=device)
            self.draft_graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}
        if args.graphs:
            self.capture()

    def capture(self) -> None:
        bp = self.metas["sync"].graph_batch_size(self.args.batch)
        model, nxt = self.model, self.next_buf
        if self.k:
            for name, meta in self.metas.items():
                meta.capture_decode_graph(bp, self.verify, num_draft_tokens=self.k)
                for parity in (0, 1):
                    self.draft_graphs[(name, parity)] = _capture(lambda m=meta, p=parity: self._draft(m, p))
            return

        def sync_forward(step):
            n = step.padded_num_reqs
            nxt[:n] = model.forward(self.inp_dev[:n], step)

        def overlap_forward(step):
            n = step.padded_num_reqs
            nxt[:n] = model.forward(step.input_ids[:n], step)

        for name, fwd in (("sync", sync_forward), ("overlap", overlap_forward)):
            if name in self.metas:
                self.metas[name].capture_decode_graph(bp, fwd)

    # Speculative decoding: verify and draft, on the device, nothing read by the host.
    def verify(self, step) -> None:
        """The model on the step's ``1 + k`` tokens per row (the last accepted one, then the drafts) and greedy
        verification: ``targets`` ``[n, 1 + k]`` (argmax at every token), ``counts`` ``[n]`` (the drafts that match
        the targets before them, up to the first mismatch, plus the bonus token)."""
        n, k = step.padded_num_reqs, self.k
        ids = step.input_ids[: n * (1 + k)]
        t = self.model.forward(ids, step).view(n, 1 + k)
        d = ids.view(n, 1 + k)[:, 1:]
        self.targets[:n].copy_(t)
        self.counts[:n].copy_(1 + torch.cumprod((t[:, :-1] == d).long(), 1).sum(1))

    def _draft(self, meta: BatchMetadata, parity: int) -> None:
        """Prompt lookup on the device: each request's next length (``lens[parity] + counts``, the position of
        its last accepted token) into ``lens[1 - parity]``, then the ``k`` tokens after the latest earlier
        occurrence of that token in its history (ending at or before it), else the token repeated."""
        b, k = self.args.batch, self.k
        hist, pos = meta.token_ids[:b, : self.max_len], self.positions
        last_pos = self.lens[1 - parity]
        torch.add(self.lens[parity], self.counts[:b], out=last_pos)
        last = hist.gather(1, last_pos[:, None])
        match = (hist == last) & (pos <= (last_pos - k)[:, None])  # the k tokens after a match are known
        after = torch.where(match, pos + 1, 0).amax(1, keepdim=True)  # first position after the latest match
        found = hist.gather(1, (after + self.positions[:k]).clamp(max=self.max_len - 1))
        self.drafts.copy_(torch.where(after > 0, found, last))

    def draft(self, name: str, parity: int, graph: bool) -> torch.Tensor:
        """``_draft`` (eager, or replayed from its CUDA graph); returns the ``[batch, k]`` drafts."""
        if graph:
            self.draft_graphs[(name, parity)].replay()
        else:
            self._draft(self.metas[name], parity)
        return self.drafts

    # Pages: every run starts from the same free list, so both loops place their requests alike.
    def reset(self, meta: BatchMetadata) -> None:
        for r in range(self.args.batch):
            meta.block_tables.reset(r)
        self.pages_held[:] = 0
        self.free_pages = list(range(self.num_pages - 1, 0, -1))

    def ensure_pages(self, meta: BatchMetadata, lengths: np.ndarray) -> None:
        """Pages for ``lengths`` tokens per request (appended to the block tables, staged on the host)."""
        need = -(-lengths // self.args.page_size) - self.pages_held
        for r in np.flatnonzero(need > 0).tolist():
            n = int(need[r])
            meta.block_tables.append(r, [self.free_pages.pop() for _ in range(n)])
            self.pages_held[r] += n


# --------------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------------
def _now() -> float:
    return time.perf_counter()


class StepEvents:
    """CUDA events at the start and end of every timed step's GPU work (none on the CPU)."""

    def __init__(self, n: int, cuda: bool):
        make = (lambda: torch.cuda.Event(enable_timing=True)) if cuda else (lambda: None)
        self.begin = [make() for _ in range(n)]
        self.end = [make() for _ in range(n)]
        self.cuda = cuda

    def record(self, which: list, j: int) -> None:
        if self.cuda and 0 <= j < len(which):
            which[j].record()

    def figures(self) -> dict:
        """Mean GPU period per step and the median gap between steps, µs (after a sync)."""
        if not self.cuda or not self.begin:
            return dict(gpu_period_us=None, gpu_gap_us=None)
        n = len(self.begin)
        span = self.begin[0].elapsed_time(self.end[-1]) * 1e3
        gaps = [self.end[j].elapsed_time(self.begin[j + 1]) * 1e3 for j in range(n - 1)]
        return dict(gpu_period_us=span / n, gpu_gap_us=statistics.median(gaps) if gaps else None)


def device_time_us(enqueue, reps: int, max_calls: int | None = None) -> float | None:
    """Median device time of ``enqueue()``'s GPU work, enqueued behind a sleeping kernel (None on the CPU).
    ``enqueue`` is called at most ``max_calls`` times (default ``8 * reps``)."""
    if not torch.cuda.is_available() or reps <= 0:
        return None
    cycles, times = 2_000_000, []
    pre, start, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    for _ in range(min(8 * reps, max_calls or 8 * reps)):
        torch.cuda.synchronize()
        t0 = _now()
        pre.record()
        torch.cuda._sleep(cycles)
        start.record()
        enqueue()
        t1 = _now()
        end.record()
        torch.cuda.synchronize()
        if (t1 - t0) * 1e6 > 0.8 * pre.elapsed_time(start) * 1e3:  # the sleep ended before the host was done
            if cycles >= 2_000_000 << 8:  # a sleep of about 0.3 s on an H100 and still late: enqueue() waits
                raise RuntimeError("device_time_us: enqueue() waited for the GPU (a host sync in the step)")
            cycles *= 2
            continue
        times.append(start.elapsed_time(end) * 1e3)
        if len(times) == reps:
            break
    return statistics.median(times) if times else None


class HostParts:
    """Host µs per part of a step (``with parts("name"):``), kept for the steps after ``start(True)``;
    ``medians()`` per part. A timer costs well under a microsecond."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}
        self.on = False

    def start(self, on: bool) -> None:
        self.on = on

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = _now()
        try:
            yield
        finally:
            if self.on:
                self.times.setdefault(name, []).append((_now() - t0) * 1e6)

    def medians(self) -> dict[str, float]:
        return {name: statistics.median(v) for name, v in self.times.items()}


class SyncCounter:
    """The host syncs (device to host waits the host did not ask for: ``.tolist()``, ``.item()``, a blocking
    copy) in the steps run under ``watch(True)``, counted by torch's sync debug mode in "warn" (CUDA only).
    The loops watch their warm-up steps after the first, so the timed steps pay nothing for it."""

    def __init__(self, cuda: bool):
        self.cuda, self.syncs, self.steps = cuda, 0, 0
        self.sites: dict[str, int] = {}  # "file:line" of the Python code that synced -> count

    @contextlib.contextmanager
    def watch(self, on: bool):
        if not (on and self.cuda):
            yield
            return
        with warnings.catch_warnings(record=True) as log:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        self.steps += 1
        for w in log:
            if "called a synchronizing" in str(w.message):  # not the "prototype feature" notice
                self.syncs += 1
                site = f"{Path(w.filename).name}:{w.lineno}"
                self.sites[site] = self.sites.get(site, 0) + 1

    def figures(self) -> dict:
        per_step = self.syncs / self.steps if self.steps else None
        return dict(host_syncs_per_step=per_step, sync_sites=self.sites)


def _capture(fn) -> torch.cuda.CUDAGraph:
    """``fn`` (device work on fixed buffers) as a CUDA graph, after a warm-up run on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------
# The loops
# --------------------------------------------------------------------------------------------------
def run_sync(eng: Engine, graph: bool) -> dict:
    """Each step reads its sampled tokens on the host and feeds them to the next step."""
    args, meta, model, cuda = eng.args, eng.metas["sync"], eng.model, eng.cuda
    b, idx, prompt_lens = args.batch, eng.idx, eng.prompt_lens
    eng.reset(meta)
    eng.ensure_pages(meta, prompt_lens)
    ids = torch.from_numpy(np.concatenate(eng.prompts)).to(eng.device)
    with meta.prepare_prefill(idx, query_lens=prompt_lens, cache_lens=np.zeros(b, np.int64)) as step:
        tokens = model.forward(ids, step, rows=step.logits_indices.long()).tolist()
    out = [tokens]
    clens = prompt_lens.copy()

    def enqueue(clens, tokens):
        step = meta.prepare_decode(idx, clens, cuda_graph=graph)
        eng.inp_np[:] = tokens
        eng.inp_dev.copy_(eng.inp_host, non_blocking=True)
        with step:
            if graph:
                meta.replay_decode_graph(step)
                return eng.next_buf[:b]
            return model.forward(eng.inp_dev, step)

    ev = StepEvents(args.steps, cuda)
    host, blocked = [], []
    syncs = SyncCounter(cuda)
    _sync(cuda)
    t_start = _now()
    for i in range(eng.decode_steps):
        j = i - args.warmup
        if j == 0:
            _sync(cuda)
            t_start = _now()
        t0 = _now()
        ev.record(ev.begin, j)
        with syncs.watch(0 < i < args.warmup):
            eng.ensure_pages(meta, clens + 1)
            nxt = enqueue(clens, tokens)
            ev.record(ev.end, j)
            tw = _now()
            inputs, tokens = tokens, nxt.tolist()  # waits for the GPU
            tw = _now() - tw
        clens = clens + 1
        out.append(tokens)
        if j >= 0:
            host.append((_now() - t0 - tw) * 1e6)
            blocked.append(tw * 1e6)
    wall = _now() - t_start
    res = dict(tokens=np.array(out, dtype=np.int64), wall_s=wall, host_us=host, blocked_us=blocked, **ev.figures())
    res.update(syncs.figures())
    res["gpu_busy_us"] = device_time_us(lambda: enqueue(clens - 1, inputs), args.calib)
    return res


class Readback:
    """Sampled tokens back to the host one step late: a non-blocking copy into a pinned row per step and an
    event, collected when the event has completed (``query()``, never a wait)."""

    def __init__(self, rows: int, b: int, cuda: bool, cols: int = 0):
        self.host = torch.zeros(rows, b, dtype=torch.int64, pin_memory=cuda)
        # Speculative: per step also the [b, cols] target tokens (``host``: the accepted counts).
        self.host_cols = torch.zeros(rows, b, cols, dtype=torch.int64, pin_memory=cuda) if cols else None
        self.events = [torch.cuda.Event() if cuda else None for _ in range(rows)]
        self.pushed = self.collected = 0
        self.lag: list[int] = []  # per step: the later steps pushed before its tokens were seen on the host

    def push(self, tokens: torch.Tensor, cols: torch.Tensor | None = None) -> None:
        self.host[self.pushed].copy_(tokens, non_blocking=True)
        if cols is not None:
            self.host_cols[self.pushed].copy_(cols, non_blocking=True)  # type: ignore[index]
        ev = self.events[self.pushed]
        if ev is not None:
            ev.record()
        self.pushed += 1

    def poll(self) -> None:
        while self.collected < self.pushed:
            ev = self.events[self.collected]
            if ev is not None and not ev.query():
                return
            self.lag.append(self.pushed - 1 - self.collected)
            self.collected += 1


def run_overlap(eng: Engine, graph: bool) -> dict:
    """Token history: the host prepares step N+1 before it has seen step N's tokens."""
    args, meta, model, cuda = eng.args, eng.metas["overlap"], eng.model, eng.cuda
    b, idx, prompt_lens = args.batch, eng.idx, eng.prompt_lens
    ones = np.ones(b, np.int64)
    eng.reset(meta)
    eng.ensure_pages(meta, prompt_lens)
    for r, prompt in enumerate(eng.prompts):
        meta.stage_prompt(r, prompt)
    rb = Readback(1 + eng.decode_steps, b, cuda)
    prepared = torch.cuda.Event() if cuda else None
    fence = cuda and not args.no_plan_fence
    with meta.prepare_prefill(idx, query_lens=prompt_lens, cache_lens=np.zeros(b, np.int64)) as step:
        if prepared is not None:
            prepared.record()
        nxt = model.forward(step.input_ids, step, rows=step.logits_indices.long())
    clens, _ = meta.accept_tokens(step, meta.token_ids, nxt, ones, prompt_lens)
    rb.push(nxt)

    def enqueue(clens, readback):
        step = meta.prepare_decode(idx, clens, cuda_graph=graph)
        if prepared is not None:
            prepared.record()  # the GPU has taken this step's plan once it gets here
        with step:
            if graph:
                meta.replay_decode_graph(step)
                nxt = eng.next_buf[:b]
            else:
                nxt = model.forward(step.input_ids, step)
        new_clens, _ = meta.accept_tokens(step, meta.token_ids, nxt, ones, prompt_lens)
        readback(nxt)
        return new_clens

    ev = StepEvents(args.steps, cuda)
    host, blocked = [], []
    syncs = SyncCounter(cuda)
    _sync(cuda)
    t_start = _now()
    for i in range(eng.decode_steps):
        j = i - args.warmup
        if j == 0:
            _sync(cuda)
            t_start = _now()
        t0 = _now()
        ev.record(ev.begin, j)
        eng.ensure_pages(meta, clens + 1)
        tw = 0.0
        if fence:
            tw = _now()
            prepared.synchronize()  # type: ignore[union-attr]
            tw = _now() - tw
        last = clens
        with syncs.watch(0 < i < args.warmup):
            clens = enqueue(clens, rb.push)
            ev.record(ev.end, j)
            rb.poll()
        if j >= 0:
            host.append((_now() - t0 - tw) * 1e6)
            blocked.append(tw * 1e6)
    _sync(cuda)
    rb.poll()
    wall = _now() - t_start
    if rb.collected != rb.pushed:
        raise RuntimeError("overlap loop: tokens not read back after a sync")
    lag = rb.lag[1 + args.warmup :]
    res = dict(tokens=rb.host.numpy().copy(), wall_s=wall, host_us=host, blocked_us=blocked, **ev.figures())
    res.update(syncs.figures())
    res["readback_lag_steps"] = statistics.median(lag) if lag else None
    res["gpu_busy_us"] = device_time_us(
        lambda: enqueue(last, lambda t: eng.scratch.copy_(t, non_blocking=True)), args.calib
    )
    return res


def run_spec(eng: Engine, graph: bool, loop: str) -> dict:
    """Speculative decoding, ``k`` drafts a step from the device drafter (``Engine._draft``), greedy verification
    on the device (``Engine.verify``). ``sync``: the host reads each step's accepted counts (and target tokens;
    one ``.tolist()``, which waits for the GPU) and passes host counts to ``accept_tokens`` (exact lengths);
    ``overlap``: the counts stay on the device (``accept_tokens`` returns upper bounds of the lengths, passed to
    the next step as they are), read back one step late like the plain overlapped loop's tokens."""
    args, meta, cuda, k = eng.args, eng.metas[loop], eng.cuda, eng.k
    b, idx, prompt_lens = args.batch, eng.idx, eng.prompt_lens
    sync = loop == "sync"
    eng.reset(meta)
    eng.ensure_pages(meta, prompt_lens)
    for r, prompt in enumerate(eng.prompts):
        meta.stage_prompt(r, prompt)
    rows = 1 + eng.decode_steps
    rb = None if sync else Readback(rows, b, cuda, cols=1 + k)
    out = np.zeros((rows, b, 2 + k), dtype=np.int64)  # sync: per step [count, targets...] of every request
    prepared = torch.cuda.Event() if cuda and not sync else None
    fence = prepared is not None and not args.no_plan_fence
    counts, targets = eng.counts[:b], eng.targets[:b]

    def read_now() -> np.ndarray:
        return np.array(torch.cat((counts[:, None], targets), 1).tolist(), dtype=np.int64)  # waits for the GPU

    parts = HostParts()

    def launch(clens):
        with parts("prepare_decode"):
            step = meta.prepare_decode(idx, clens, num_draft_tokens=k, cuda_graph=graph)
            if prepared is not None:
                prepared.record()  # the GPU has taken this step's plan once it gets here
        with parts("forward (verify)"), step:
            if graph:
                meta.replay_decode_graph(step)
            else:
                eng.verify(step)
        return step

    def finish(step, num_accepted, parity: int) -> np.ndarray:
        with parts("accept_tokens"):
            acc = meta.accept_tokens(step, None, targets, num_accepted, prompt_lens)
        with parts("drafter"):
            drafts = eng.draft(loop, parity, graph)
        with parts("write_drafts"):
            meta.write_drafts(step, drafts)
        return acc.cache_lens

    # Prefill: one token per request, accepted with host counts (exact lengths), then the first drafts.
    with meta.prepare_prefill(idx, query_lens=prompt_lens, cache_lens=np.zeros(b, np.int64)) as step:
        if prepared is not None:
            prepared.record()
        nxt = eng.model.forward(step.input_ids, step, rows=step.logits_indices.long())
    targets[:, 0].copy_(nxt)
    counts.fill_(1)
    eng.lens[0].copy_(torch.from_numpy(prompt_lens - 1))  # the drafter adds the count: the prompt's length
    clens = finish(step, np.ones(b, np.int64), 0)
    if sync:
        out[0] = read_now()
    else:
        rb.push(counts, targets)  # type: ignore[union-attr]
    parity = 1

    ev = StepEvents(args.steps, cuda)
    host, blocked = [], []
    syncs = SyncCounter(cuda)
    _sync(cuda)
    t_start = _now()
    for i in range(eng.decode_steps):
        j = i - args.warmup
        if j == 0:
            _sync(cuda)
            t_start = _now()
        t0 = _now()
        ev.record(ev.begin, j)
        parts.start(j >= 0)
        with parts("pages (engine)"):
            eng.ensure_pages(meta, clens + 1 + k)  # overlap: clens are bounds, whose pages the engine must hold
        tw = 0.0
        if fence:
            tw = _now()
            prepared.synchronize()  # type: ignore[union-attr]
            tw = _now() - tw
        with syncs.watch(0 < i < args.warmup):
            step = launch(clens)
            if sync:
                tw = _now()
                out[1 + i] = read_now()
                tw = _now() - tw
                clens = finish(step, out[1 + i, :, 0], parity)
                ev.record(ev.end, j)
            else:
                clens = finish(step, counts, parity)
                with parts("readback"):
                    rb.push(counts, targets)  # type: ignore[union-attr]
                    ev.record(ev.end, j)
                    rb.poll()  # type: ignore[union-attr]
        parity = 1 - parity
        if j >= 0:
            host.append((_now() - t0 - tw) * 1e6)
            blocked.append(tw * 1e6)
    _sync(cuda)
    res: dict = {}
    if not sync:
        rb.poll()  # type: ignore[union-attr]
        if rb.collected != rb.pushed:  # type: ignore[union-attr]
            raise RuntimeError("overlap loop: tokens not read back after a sync")
        out[:, :, 0] = rb.host.numpy()  # type: ignore[union-attr]
        out[:, :, 1:] = rb.host_cols.numpy()  # type: ignore[union-attr]
        lag = rb.lag[1 + args.warmup :]  # type: ignore[union-attr]
        res["readback_lag_steps"] = statistics.median(lag) if lag else None
    wall = _now() - t_start
    # Each step's accepted tokens (-1 past the count), and the token history read back at the end.
    n_acc = out[:, :, 0]
    if n_acc.min() < 1 or n_acc.max() > 1 + k:
        raise RuntimeError(f"{loop} loop: accepted counts outside 1..{1 + k}")
    accepted = np.where(np.arange(1 + k) < n_acc[:, :, None], out[:, :, 1:], -1)
    lens = eng.lens[parity].cpu().numpy()
    hist = meta.token_ids[:b].cpu().numpy()
    history = [hist[r, : lens[r] + 1].copy() for r in range(b)]
    res["consistency"] = None
    for r in range(b):
        got = accepted[:, r][accepted[:, r] >= 0]
        want = history[r][prompt_lens[r] :]
        if lens[r] != prompt_lens[r] + n_acc[:, r].sum() - 1 or not np.array_equal(got, want):
            res["consistency"] = (
                f"request {r}: the token history (length {lens[r] + 1}) does not hold the prompt then the accepted "
                f"tokens ({prompt_lens[r]} + {int(n_acc[:, r].sum())})"
            )
            break
    res.update(tokens=accepted, history=history, wall_s=wall, host_us=host, blocked_us=blocked, **ev.figures())
    res.update(syncs.figures())
    res["host_parts_us"] = parts.medians()
    res["accepted"] = int(n_acc[1 + args.warmup :].sum())
    res["accepted_hist"] = np.bincount(n_acc[1 + args.warmup :].ravel(), minlength=2 + k)[1:].tolist()

    # Calibration: further steps (device counts in both loops: the host cannot wait behind the sleeping kernel),
    # each enqueued behind the sleep; the sync loop's readback becomes a non-blocking copy.
    state = [clens, parity]
    # Contiguous pinned destinations: a copy into a strided view of pinned memory goes through a pageable
    # temporary and waits for the GPU.
    scratch = torch.zeros(b, 2 + k, dtype=torch.int64, pin_memory=cuda)
    scratch_counts = torch.zeros(b, dtype=torch.int64, pin_memory=cuda)
    scratch_targets = torch.zeros(b, 1 + k, dtype=torch.int64, pin_memory=cuda)

    def calib_step():
        c, p = state
        eng.ensure_pages(meta, c + 1 + k)
        step = launch(c)
        if sync:
            scratch.copy_(torch.cat((counts[:, None], targets), 1), non_blocking=True)
        state[0] = finish(step, counts, p)
        if not sync:
            scratch_counts.copy_(counts, non_blocking=True)
            scratch_targets.copy_(targets, non_blocking=True)
        state[1] = 1 - p

    res["gpu_busy_us"] = device_time_us(calib_step, args.calib, max_calls=eng.calib_steps)
    return res


# --------------------------------------------------------------------------------------------------
# Figures, checks, report
# --------------------------------------------------------------------------------------------------
def figures(res: dict, batch: int, steps: int) -> dict:
    """One run's figures (see the module docstring)."""
    period, busy = res.get("gpu_period_us"), res.get("gpu_busy_us")
    idle = None if period is None or busy is None else max(0.0, period - busy)
    accepted = res.get("accepted", batch * steps)  # speculative: the accepted tokens, else one per request a step
    return dict(
        tokens_per_s=accepted / res["wall_s"],
        accepted_per_step=accepted / (batch * steps),
        step_us=res["wall_s"] / steps * 1e6,
        host_us=statistics.median(res["host_us"]),
        host_p90_us=float(np.percentile(res["host_us"], 90)),
        blocked_us=statistics.median(res["blocked_us"]),
        gpu_period_us=period,
        gpu_busy_us=busy,
        gpu_idle_us=idle,
        gpu_idle_frac=None if idle is None or not period else idle / period,
        gpu_gap_us=res.get("gpu_gap_us"),
        readback_lag_steps=res.get("readback_lag_steps"),
        host_syncs_per_step=res.get("host_syncs_per_step"),
        sync_sites=res.get("sync_sites"),
        host_parts_us=res.get("host_parts_us"),
    )


def _median_of(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def first_difference(a: np.ndarray, b: np.ndarray) -> str | None:
    """Where two token arrays ``[steps, batch]`` first differ (step 0: the prefill's token), or None."""
    if a.shape != b.shape:
        return f"shapes {a.shape} and {b.shape}"
    diff = np.argwhere(a != b)
    if not len(diff):
        return None
    s, r = diff[0][:2]
    what = "the prefill's token" if s == 0 else f"decode step {s}"
    va, vb = (np.asarray(x[s, r]).tolist() for x in (a, b))  # speculative: the step's accepted tokens, -1 past them
    return f"{what}, request {r}: {va} vs {vb} ({len(diff)} of {a.size} entries differ)"


def history_difference(a: list[np.ndarray], b: list[np.ndarray]) -> str | None:
    """Where two runs' final token histories (one array per request) first differ, or None."""
    for r, (x, y) in enumerate(zip(a, b, strict=True)):
        if len(x) != len(y):
            return f"request {r}'s history: {len(x)} vs {len(y)} tokens"
        diff = np.flatnonzero(x != y)
        if len(diff):
            return f"request {r}'s history, position {diff[0]}: {x[diff[0]]} vs {y[diff[0]]}"
    return None


def _num(v, fmt: str, suffix: str = "") -> str:
    return "—" if v is None else format(v, fmt) + suffix


def _ratio(a, b):
    return None if a is None or b is None or not b else a / b


def report(args, device_name: str, summary: dict, checks: list[str], failed: bool) -> str:
    spec = args.spec
    title = f"speculative decode loop ({spec} drafts a step)" if spec else "decode loop"
    acc_head, acc_rule = (" accepted tokens/step |", "---:|") if spec else ("", "")
    lines = [
        f"# batchmeta {title} on {device_name} ({datetime.date.today().isoformat()})",
        "",
        f"torch {torch.__version__}; batch {args.batch}, {args.steps} timed decode steps after {args.warmup}, "
        f"prompts ~{args.prompt_len} tokens; {args.layers} layers, hidden {args.hidden}, heads "
        f"{args.heads}/{args.kv_heads} (head dim {args.hidden // args.heads}), vocab {args.vocab}, page size "
        f"{args.page_size}; plan fence {'off' if args.no_plan_fence else 'on'}; medians of {args.repeats} "
        f"alternated runs. Method: see the docstring of benchmarks/bench_decode_loop.py.",
        *(
            [
                "",
                f"Speculative: {spec} drafts per request a step (prompt lookup on the device), greedy verification "
                "on the device; tokens/s counts accepted tokens; accepted tokens/step: per request, the bonus token "
                "included.",
            ]
            if spec
            else []
        ),
        "",
        f"| mode | loop | tokens/s |{acc_head} µs/step (wall) | host µs/step (p90) | host blocked µs/step | "
        "GPU period µs/step | GPU busy µs/step | GPU idle µs/step | GPU idle % | gap between steps µs | "
        "host syncs/step |",
        f"|---|---|---:|{acc_rule}---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, loops in summary.items():
        for loop, f in loops.items():
            if loop == "ratios":
                continue
            idle_pct = None if f["gpu_idle_frac"] is None else 100 * f["gpu_idle_frac"]
            cells = [
                _num(f["tokens_per_s"], ".0f"),
                *([_num(f["accepted_per_step"], ".2f")] if spec else []),
                _num(f["step_us"], ".1f"),
                f"{_num(f['host_us'], '.1f')} ({_num(f['host_p90_us'], '.1f')})",
                _num(f["blocked_us"], ".1f"),
                _num(f["gpu_period_us"], ".1f"),
                _num(f["gpu_busy_us"], ".1f"),
                _num(f["gpu_idle_us"], ".1f"),
                _num(idle_pct, ".0f", "%"),
                _num(f["gpu_gap_us"], ".1f"),
                _num(f["host_syncs_per_step"], ".2f"),
            ]
            lines.append(f"| {mode} | {loop} | " + " | ".join(cells) + " |")
    columns = [(m, n) for m, loops in summary.items() for n, f in loops.items() if f.get("host_parts_us")]
    if columns:
        part_names = list(dict.fromkeys(p for m, n in columns for p in summary[m][n]["host_parts_us"]))
        lines += [
            "",
            "Host µs of a step by part (medians; the sync loops' wait for the GPU is not in any part):",
            "",
            "| part | " + " | ".join(f"{m} {n}" for m, n in columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for part in part_names:
            cells = [_num(summary[m][n]["host_parts_us"].get(part), ".1f") for m, n in columns]
            lines.append(f"| {part} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Overlapped / sync (same mode):",
        "",
        "| mode | tokens/s | host µs/step | GPU idle µs/step |",
        "|---|---:|---:|---:|",
    ]
    for mode, loops in summary.items():
        r = loops.get("ratios")
        if r:
            lines.append(
                f"| {mode} | {_num(r['tokens_per_s'], '.2f', TIMES)} | {_num(r['host_us'], '.2f', TIMES)} | "
                f"{_num(r['gpu_idle_us'], '.2f', TIMES)} |"
            )
    lines += ["", "Checks:", "", *[f"- {c}" for c in checks]]
    if failed:
        lines += ["", "**FAILED: the overlapped loop sampled other tokens than the synchronous one (see the checks).**"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="requests decoded together")
    parser.add_argument("--steps", type=int, default=200, help="timed decode steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed decode steps before them")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8, help="query heads (head dim = hidden / heads)")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt-len", type=int, default=256, help="mean prompt length (±25%%)")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--graphs", action="store_true", help="also run both loops with CUDA-graph decode")
    parser.add_argument("--repeats", type=int, default=3, help="alternated runs of each loop (medians reported)")
    parser.add_argument("--calib", type=int, default=10, help="back-to-back replays timing a step's device work")
    parser.add_argument(
        "--no-plan-fence",
        action="store_true",
        help="overlap: prepare step N+1 without waiting for the GPU to start step N (FlashInfer plan-buffer race)",
    )
    parser.add_argument(
        "--spec",
        type=int,
        default=0,
        metavar="K",
        help="speculative decoding: K drafts a step (device prompt lookup), both loops; 0: plain decode",
    )
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if args.hidden % args.heads or args.heads % args.kv_heads:
        parser.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    if args.steps < 2 or args.batch < 1 or args.repeats < 1:
        parser.error("--steps >= 2, --batch >= 1 and --repeats >= 1")
    if args.spec < 0:
        parser.error("--spec >= 0")
    if args.spec and not HAS_SPECULATION:
        parser.error("--spec: this batchmeta has no speculative API (accept_tokens counts, write_drafts)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.graphs and device.type != "cuda":
        parser.error("--graphs needs CUDA (and FlashInfer)")
    if not HAS_TOKEN_HISTORY:
        print(
            "bench_decode_loop: this batchmeta has no MetadataConfig(token_history=...): sync loop only",
            file=sys.stderr,
        )

    t0 = _now()
    eng = Engine(args, device)
    modes = ["eager", *(["graphs"] if args.graphs else [])]
    loops = [name for name in LOOPS if name in eng.metas]
    if args.spec:
        runners = {name: (lambda eng, graph, name=name: run_spec(eng, graph, name)) for name in LOOPS}
    else:
        runners = {"sync": run_sync, "overlap": run_overlap}
    runs: dict[str, dict[str, list[dict]]] = {m: {name: [] for name in loops} for m in modes}
    tokens: dict[tuple[str, str], list[np.ndarray]] = {}
    histories: dict[tuple[str, str], list[list[np.ndarray]]] = {}
    checks, failed = [], False
    for rep in range(args.repeats):
        for mode in modes:
            for name in loops if rep % 2 == 0 else loops[::-1]:  # alternate which loop goes first
                res = runners[name](eng, graph=mode == "graphs")
                tokens.setdefault((mode, name), []).append(res.pop("tokens"))
                if "history" in res:
                    histories.setdefault((mode, name), []).append(res.pop("history"))
                if res.get("consistency"):
                    failed = True
                    checks.append(f"{mode}: {name} run {rep + 1}: {res['consistency']}")
                fig = figures(res, args.batch, args.steps)
                runs[mode][name].append(dict(fig, raw=res))
                print(
                    f"{mode} {name} run {rep + 1}/{args.repeats}: {fig['tokens_per_s']:.0f} tokens/s, "
                    f"{fig['accepted_per_step']:.2f} accepted/step, host {fig['host_us']:.1f} µs/step "
                    f"({_now() - t0:.0f} s)",
                    file=sys.stderr,
                )

    # Token checks: every run of a mode against its first synchronous run (speculative: each step's accepted
    # tokens, and the token history read back at the end of the run).
    for mode in modes:
        ref = tokens[(mode, "sync")][0]
        for name in loops:
            for k, got in enumerate(tokens[(mode, name)]):
                if name == "sync" and k == 0:
                    continue
                where = first_difference(ref, got)
                if where is None and histories:
                    where = history_difference(histories[(mode, "sync")][0], histories[(mode, name)][k])
                if where is not None:
                    failed = True
                    checks.append(f"{mode}: {name} run {k + 1} differs from sync run 1: {where}")
        if not any(c.startswith(f"{mode}:") for c in checks):
            n = sum(len(v) for (m, _), v in tokens.items() if m == mode)
            if args.spec:
                seqs = [ref[:, r][ref[:, r] >= 0] for r in range(ref.shape[1])]
                counts = (ref >= 0).sum(2)[1:]  # decode steps' accepted counts
                checks.append(
                    f"{mode}: all {n} runs accepted identical tokens ({sum(map(len, seqs))} each, token histories "
                    f"identical; every request's {min(map(len, seqs))}+ tokens hold at least "
                    f"{min(len(np.unique(q)) for q in seqs)} distinct ids; decode steps accepting 1..{1 + args.spec} "
                    f"tokens: {np.bincount(counts.ravel(), minlength=2 + args.spec)[1:].tolist()})"
                )
            else:
                distinct = min(len(np.unique(ref[:, r])) for r in range(ref.shape[1]))
                checks.append(
                    f"{mode}: all {n} runs sampled identical tokens ({ref.size} each; every request's "
                    f"{ref.shape[0]} tokens hold at least {distinct} distinct ids)"
                )
    if len(modes) == 2:
        where = first_difference(tokens[("eager", "sync")][0], tokens[("graphs", "sync")][0])
        if where is None and histories:
            where = history_difference(histories[("eager", "sync")][0], histories[("graphs", "sync")][0])
        checks.append(
            "eager vs graphs (information only): "
            + ("identical tokens" if where is None else f"first difference at {where}")
        )

    summary: dict[str, dict] = {}
    keys = (
        "tokens_per_s",
        "accepted_per_step",
        "step_us",
        "host_us",
        "host_p90_us",
        "blocked_us",
        "gpu_period_us",
        "gpu_busy_us",
        "gpu_idle_us",
        "gpu_idle_frac",
        "gpu_gap_us",
        "readback_lag_steps",
        "host_syncs_per_step",
    )
    for mode in modes:
        summary[mode] = {name: {k: _median_of(runs[mode][name], k) for k in keys} for name in loops}
        for name in loops:
            names = [n for r in runs[mode][name] for n in (r.get("host_parts_us") or {})]
            if names:
                summary[mode][name]["host_parts_us"] = {
                    n: _median_of([r["host_parts_us"] for r in runs[mode][name]], n) for n in dict.fromkeys(names)
                }
            sites: dict[str, int] = {}
            for r in runs[mode][name]:
                for site, n in (r.get("sync_sites") or {}).items():
                    sites[site] = sites.get(site, 0) + n
            if sites:
                checks.append(
                    f"{mode} {name}: host syncs in the watched warm-up steps at "
                    + ", ".join(f"{site} ({n})" for site, n in sorted(sites.items()))
                )
        if "overlap" in summary[mode]:
            o, s = summary[mode]["overlap"], summary[mode]["sync"]
            summary[mode]["ratios"] = {k: _ratio(o[k], s[k]) for k in ("tokens_per_s", "host_us", "gpu_idle_us")}

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    text = report(args, device_name, summary, checks, failed)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = f"-spec{args.spec}" if args.spec else ""
    base = out / f"{device_name.replace(' ', '-')}-{datetime.date.today().isoformat()}-decode-loop{spec}"
    base.with_suffix(".md").write_text(text)
    base.with_suffix(".json").write_text(
        json.dumps(
            dict(
                args=vars(args),
                device=device_name,
                torch=torch.__version__,
                summary=summary,
                checks=checks,
                failed=failed,
                runs=runs,
            ),
            indent=1,
        )
    )
    if os.environ.get("OUT") and Path(os.environ["OUT"]).resolve() != out.resolve():
        for suffix in (".md", ".json"):
            shutil.copy(base.with_suffix(suffix), os.environ["OUT"])
    if failed:
        print(
            "bench_decode_loop: FAILED: the overlapped loop sampled other tokens than the synchronous one:",
            file=sys.stderr,
        )
        for c in checks:
            print(f"  {c}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
