"""Draft rounds: ``k`` drafting steps as ``k`` ``prepare_decode`` calls, as one draft loop, and as one CUDA graph.

Run on a machine with CUDA and FlashInfer:

    python benchmarks/bench_draft_loop.py [--batch 32] [--ks 1 3 5] [--rounds 100] [--layers 1] [--out DIR]

Writes ``<out>/<device>-<date>-draft-loop.{md,json}`` (``--out`` defaults to ``benchmarks/results/``; both files
are copied to ``$OUT`` if set). Without CUDA (or with ``--device cpu``) the same rounds run through the torch
fallbacks as a smoke test: host figures only, no GPU figures.

The drafter: an embedding, ``--layers`` attention layers (q/k/v projections, ``ops.store_kv`` at the step's slot
mapping, ``step.attention``, output projection, residual) and a tied unembedding; its token is the argmax, on the
device, written into a static buffer. ``--batch`` requests with random prompts are prefilled and their first
token accepted; then each round drafts ``k`` tokens, every row ``1 .. k + 1`` tokens further than in the round
before (what its verify step accepted; a fixed pseudo-random walk, the same for every way). Three ways, per ``k``:

- ``decode x k``: ``k`` plain ``prepare_decode(idx, c + j)`` calls, each followed by the forward and the drafted
  token written into the token history at ``c + j + 1`` (a device scatter), where the next call gathers it;
- ``loop``: ``prepare_draft(idx, c, num_steps=k)`` (every step staged, planned once, step 0 launched), then
  ``round.run(forward)`` (the GPU writes each later step);
- ``graph`` (CUDA): ``capture_draft_graph(batch, k, forward)`` once, then per round ``prepare_draft(...,
  cuda_graph=True)`` and ``replay_draft_graph``.

Figures per round (medians over ``--repeats`` alternated passes):

- planned: the share of rounds whose ``prepare_draft`` planned FlashInfer (the others took an earlier round's
  plan, made with headroom: ``batchmeta.draft.plan_headroom``);
- GPU busy µs: one round's device time (below);
- host µs: wall time from the round's first ``prepare_*`` until its last GPU work is enqueued, with the device
  synchronized after every round (outside the timed span), so no wait for the GPU is inside it; for ``graph``
  also ``prepare_draft`` alone (the rest is ``replay_draft_graph``);
- GPU idle µs: the GPU's period per round when rounds run back to back (events recorded before each round's first
  ``prepare_*`` and after its last work; ``(last end - first start) / rounds``) minus the round's device time,
  measured by enqueueing one round behind a sleeping kernel (``torch.cuda._sleep``) long enough for the host to
  enqueue all of it, so its kernels run back to back (``decode x k``: each step alone, summed, since a third
  ``prepare_decode`` behind the sleep would wait for the first one's pinned staging buffer). Clamped at 0.

Checks: every way drafts the same tokens as ``decode x k`` from the same state (history and caches restored
before each way); a graph's drafts may differ where FlashInfer's graph plan splits KV differently (reported, not
failed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from batchmeta import BatchMetadata, KVGroup, MetadataConfig, ops

MODES = ("decode x k", "loop", "graph")


class Drafter:
    """A small attention model; ``forward(step)`` returns the argmax token of each row (``[Bp]``, static)."""

    def __init__(self, args, device: torch.device, dtype: torch.dtype, num_pages: int):
        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        h, heads, kv_heads = args.hidden, args.heads, args.kv_heads
        self.head_dim = h // heads
        self.heads, self.kv_heads = heads, kv_heads

        def w(*shape):
            return (torch.randn(*shape, generator=gen) * shape[0] ** -0.5).to(device, dtype)

        self.embed = w(args.vocab, h)
        self.layers = [
            (w(h, heads * self.head_dim), w(h, 2 * kv_heads * self.head_dim), w(heads * self.head_dim, h))
            for _ in range(args.layers)
        ]
        shape = (num_pages, args.page_size, kv_heads, self.head_dim)
        self.caches = [
            (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(args.layers)
        ]
        self.tokens = torch.zeros(args.batch, dtype=torch.int64, device=device)

    def forward(self, step) -> torch.Tensor:
        n = step.padded_num_reqs
        x = self.embed[step.input_ids[:n]]
        for (wq, wkv, wo), (k_cache, v_cache) in zip(self.layers, self.caches, strict=True):
            q = (x @ wq).view(n, self.heads, self.head_dim)
            kv = (x @ wkv).view(n, 2, self.kv_heads, self.head_dim)
            ops.store_kv(kv[:, 0].contiguous(), kv[:, 1].contiguous(), step.slot_mappings[0][:n], k_cache, v_cache)
            x = x + step.attention(q, k_cache, v_cache).reshape(n, -1) @ wo
        self.tokens[:n] = (x @ self.embed.t()).argmax(-1)
        return self.tokens


class Bench:
    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.cuda = device.type == "cuda"
        dtype = torch.bfloat16 if self.cuda else torch.float32
        b, k_max, ps = args.batch, max(args.ks), args.page_size
        rng = np.random.default_rng(args.seed)
        self.prompts = rng.integers(args.prompt_len * 3 // 4, args.prompt_len * 5 // 4 + 1, b)
        # Each round's rows are 1 .. k + 1 tokens further than the last round's (growth[k][i]: round i's offset).
        n = args.warmup + args.rounds
        self.growth = {
            k: np.concatenate([np.zeros((1, b), np.int64), np.cumsum(rng.integers(1, k + 2, (n - 1, b)), axis=0)])
            for k in sorted(set(args.ks) | {1})
        }
        max_len = int(self.prompts.max()) + 8 + 2 * k_max + int(max(g[-1].max() for g in self.growth.values()))
        pages_per_req = -(-max_len // ps)
        cfg = MetadataConfig(
            max_num_reqs=b,
            max_num_tokens=max(int(self.prompts.sum()), b * (1 + k_max)),
            max_model_len=max_len,
            kv_groups=(KVGroup(page_size=ps),),
            num_qo_heads=args.heads,
            num_kv_heads=args.kv_heads,
            head_dim=args.hidden // args.heads,
            q_dtype=dtype,
            kv_dtype=dtype,
            num_kv_pages=b * pages_per_req + 1,
            token_history=True,
            max_draft_tokens=k_max,
            cuda_graph_batch_sizes=(b,) if self.cuda else (),
            device=device,
        )
        self.meta = meta = BatchMetadata(cfg)
        self.model = Drafter(args, device, dtype, cfg.num_kv_pages)
        self.idx = list(range(b))
        for r in self.idx:
            meta.block_tables.append(r, list(range(1 + r * pages_per_req, 1 + (r + 1) * pages_per_req)))
            meta.stage_prompt(r, rng.integers(0, args.vocab, int(self.prompts[r])).tolist())
        # The prompts' tokens go into the history; their KV stays zero (the drafter's timing does not
        # depend on the values). The first sampled token is random.
        step = meta.prepare_prefill(self.idx, query_lens=self.prompts, cache_lens=[0] * b)
        first = torch.tensor(rng.integers(0, args.vocab, b), device=device)
        self.cache_lens = meta.accept_tokens(step, None, first, [1] * b, self.prompts).cache_lens
        self.idx_dev = torch.tensor(self.idx, device=device)
        self.snapshot = self._state()
        self.graphs: set[int] = set()

    def _state(self) -> list[torch.Tensor]:
        return [self.meta.token_ids.clone()] + [c.clone() for pair in self.model.caches for c in pair]

    def restore(self) -> None:
        now = [self.meta.token_ids] + [c for pair in self.model.caches for c in pair]
        for dst, src in zip(now, self.snapshot, strict=True):
            dst.copy_(src)

    def enqueue(self, mode: str, k: int, i: int, steps: range | None = None) -> torch.Tensor:
        """Round ``i``; returns its ``[B, k]`` drafts (a device tensor). ``steps``: with ``decode x k``, only
        these of the round's steps."""
        meta, clens = self.meta, self.cache_lens + self.growth[k][i]
        if mode == "decode x k":
            out = torch.zeros(len(self.idx), k, dtype=torch.int64, device=self.device)
            for j in range(k) if steps is None else steps:
                step = meta.prepare_decode(self.idx, clens + j)
                with step:
                    tokens = self.model.forward(step)[: len(self.idx)]
                    # The drafted token after each row's position, where the next call gathers it.
                    meta.token_ids[self.idx_dev, step.positions + 1] = tokens.to(meta.token_ids.dtype)
                out[:, j] = tokens
            return out
        if mode == "loop":
            round_ = meta.prepare_draft(self.idx, clens, num_steps=k)
            self.planned = round_.planned
            return round_.run(self.model.forward)
        if k not in self.graphs:
            meta.capture_draft_graph(len(self.idx), k, self.model.forward)
            self.graphs.add(k)
        round_ = meta.prepare_draft(self.idx, clens, num_steps=k, cuda_graph=True)
        self.prepared_at = time.perf_counter()
        self.planned = round_.planned
        meta.replay_draft_graph(round_)
        return round_.draft_token_ids

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def host_us(self, mode: str, k: int) -> tuple[list[float], np.ndarray, list[float], float | None]:
        """Host µs per round (synchronized between rounds), every round's drafts, (graph) the µs of each
        round's ``prepare_draft`` alone (the rest is ``replay_draft_graph``) and the share of timed rounds that
        planned FlashInfer (None for ``decode x k``: every step plans)."""
        self.restore()
        times, drafts, prepared, planned = [], [], [], []
        for i in range(self.args.warmup + self.args.rounds):
            self.sync()
            t0 = time.perf_counter()
            out = self.enqueue(mode, k, i)
            t1 = time.perf_counter()
            if i >= self.args.warmup:
                times.append((t1 - t0) * 1e6)
                if mode == "graph":
                    prepared.append((self.prepared_at - t0) * 1e6)
                if mode != "decode x k":
                    planned.append(self.planned)
            drafts.append(out.clone())
        self.sync()
        return times, torch.stack(drafts).cpu().numpy(), prepared, (float(np.mean(planned)) if planned else None)

    def prepare_decode_us(self, k: int | None = None) -> list[float]:
        """Host µs of one ``prepare_decode`` of the batch (under CUDA graphs where the rounds are), the
        target's yardstick: a replayed round should cost the host less than this one call. With ``k``
        (CUDA), each call is followed by a replayed round of ``k`` steps, not timed, so every call
        starts, as a timed round does, after a wait of one round's device time (a host that waited
        longer runs the next call slower)."""
        self.restore()
        times = []
        for i in range(self.args.warmup + self.args.rounds):
            self.sync()
            t0 = time.perf_counter()
            self.meta.prepare_decode(self.idx, self.cache_lens + self.growth[1][i], cuda_graph=self.cuda)
            t1 = time.perf_counter()
            if i >= self.args.warmup:
                times.append((t1 - t0) * 1e6)
            if k is not None:
                self.enqueue("graph", k, i)
        self.sync()
        return times

    def gpu_us(self, mode: str, k: int) -> tuple[float | None, float | None]:
        """GPU idle µs per round (the period per round back to back minus one round's device time) and that
        device time (CUDA only)."""
        if not self.cuda:
            return None, None
        self.restore()
        n = self.args.rounds
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            starts[i].record()
            self.enqueue(mode, k, i)
            ends[i].record()
        self.sync()
        period = starts[0].elapsed_time(ends[-1]) * 1e3 / n
        # One round's work back to back: enqueued behind a sleeping kernel, so the host is ahead. The
        # k plain decode steps go one at a time (summed): a third prepare_decode behind the sleep
        # would wait for the first one's pinned buffer, leaving the GPU idle in the measurement.
        parts = [range(j, j + 1) for j in range(k)] if mode == "decode x k" else [None]
        busy = []
        for i in range(3):
            total = 0.0
            for part in parts:
                self.sync()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(50_000_000)
                start.record()
                self.enqueue(mode, k, i, part)
                end.record()
                self.sync()
                total += start.elapsed_time(end) * 1e3
            busy.append(total)
        return max(0.0, period - min(busy)), min(busy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5], help="draft steps per round")
    parser.add_argument("--rounds", type=int, default=100, help="timed rounds per pass")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="alternated passes (medians reported)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8, help="query heads (head dim = hidden / heads)")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    bench = Bench(args, device)
    modes = [m for m in MODES if m != "graph" or cuda]
    results: dict[str, dict[str, dict]] = {}
    checks, failed = [], False
    one_prepare = statistics.median(statistics.median(bench.prepare_decode_us()) for _ in range(args.repeats))
    matched: dict[str, float] = {}
    for k in args.ks:
        runs: dict[str, list] = {m: [] for m in modes}
        drafts: dict[str, np.ndarray] = {}
        for _ in range(args.repeats):
            for mode in modes:
                times, out, prepared, planned = bench.host_us(mode, k)
                idle, busy = bench.gpu_us(mode, k)
                runs[mode].append(
                    (
                        statistics.median(times),
                        float(np.percentile(times, 90)),
                        idle,
                        statistics.median(prepared) if prepared else None,
                        busy,
                        planned,
                    )
                )
                drafts[mode] = out
        results[str(k)] = {}
        if cuda:  # the yardstick after the same device wait as a round (see prepare_decode_us)
            matched[str(k)] = statistics.median(
                statistics.median(bench.prepare_decode_us(k)) for _ in range(args.repeats)
            )
        for mode in modes:
            idle = [r[2] for r in runs[mode] if r[2] is not None]
            busy = [r[4] for r in runs[mode] if r[4] is not None]
            planned = [r[5] for r in runs[mode] if r[5] is not None]
            results[str(k)][mode] = {
                "host_us_median": statistics.median(r[0] for r in runs[mode]),
                "host_us_p90": statistics.median(r[1] for r in runs[mode]),
                "gpu_idle_us": statistics.median(idle) if idle else None,
                "gpu_busy_us": statistics.median(busy) if busy else None,
                "planned_share": statistics.mean(planned) if planned else None,
            }
            if mode == "graph":  # the round's prepare_draft alone; the rest is the replay
                results[str(k)][mode]["prepare_draft_us"] = statistics.median(r[3] for r in runs[mode])
            if mode != "decode x k":
                same = bool(np.array_equal(drafts[mode], drafts["decode x k"]))
                results[str(k)][mode]["drafts_equal_decode_x_k"] = same
                if not same:
                    checks.append(f"k={k}: {mode} drafted other tokens than decode x k")
                    failed |= mode == "loop" or not cuda
    name = torch.cuda.get_device_name(device).replace(" ", "-") if cuda else "cpu"
    stamp = datetime.date.today().isoformat()
    best = "graph" if cuda else "loop"
    target = {
        k: {
            "round_us": r[best]["host_us_median"],
            "prepare_decode_us": matched.get(k, one_prepare),
            "ratio": r[best]["host_us_median"] / matched.get(k, one_prepare),
            "ratio_vs_quiet": r[best]["host_us_median"] / one_prepare,
        }
        for k, r in results.items()
    }
    data = {
        "device": name,
        "date": stamp,
        "args": vars(args),
        "results": results,
        "prepare_decode_us": one_prepare,
        "prepare_decode_us_after_a_round": matched,
        "round_vs_one_prepare_decode": target,
        "checks": checks,
        "failed": failed,
    }
    lines = [
        f"# Draft rounds on {name} ({stamp})",
        "",
        f"batch {args.batch}, {args.layers} layer(s), hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, "
        f"page size {args.page_size}, prompts ~{args.prompt_len}; medians of {args.repeats} passes of {args.rounds} "
        "rounds.",
        "",
        "| k | way | host µs / round (median) | p90 | GPU busy µs / round | GPU idle µs / round | rounds planned "
        "| drafts = decode x k |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for k, per_mode in results.items():
        for mode, r in per_mode.items():
            idle = "n/a" if r["gpu_idle_us"] is None else f"{r['gpu_idle_us']:.1f}"
            busy = "n/a" if r["gpu_busy_us"] is None else f"{r['gpu_busy_us']:.1f}"
            share = "every step" if r["planned_share"] is None else f"{100 * r['planned_share']:.0f}%"
            same = {True: "yes", False: "no", None: "-"}[r.get("drafts_equal_decode_x_k")]
            lines.append(
                f"| {k} | {mode} | {r['host_us_median']:.1f} | {r['host_us_p90']:.1f} | {busy} | {idle} | {share} "
                f"| {same} |"
            )
    lines += [
        "",
        f"Target: a {best} round costs the host less than one `prepare_decode` of the same batch "
        f"({'cuda_graph=True; ' if cuda else ''}{one_prepare:.1f} µs median with the device idle"
        + (
            "; after the device time of one round of k steps, as every timed round starts, in the table: a host "
            "that waited longer runs slower"
            if cuda
            else ""
        )
        + "):",
        "",
        f"| k | {best} round host µs | one prepare_decode µs | ratio | ratio to the idle-device one | target |",
        "|---|---:|---:|---:|---:|---|",
        *(
            f"| {k} | {t['round_us']:.1f} | {t['prepare_decode_us']:.1f} | {t['ratio']:.2f} | "
            f"{t['ratio_vs_quiet']:.2f} | {'✓' if t['ratio'] < 1 else '✗'} |"
            for k, t in target.items()
        ),
        "",
        *(
            [
                "Of a graph round's host µs, `prepare_draft` alone (the rest is `replay_draft_graph`):",
                "",
                "| k | prepare_draft µs | replay µs |",
                "|---|---:|---:|",
                *(
                    f"| {k} | {r['graph']['prepare_draft_us']:.1f} | "
                    f"{r['graph']['host_us_median'] - r['graph']['prepare_draft_us']:.1f} |"
                    for k, r in results.items()
                ),
                "",
            ]
            if cuda
            else []
        ),
        *(f"- {c}" for c in checks),
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{stamp}-draft-loop"
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if os.environ.get("OUT"):
        for suffix in (".json", ".md"):
            shutil.copy(stem.with_suffix(suffix), os.environ["OUT"])
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
