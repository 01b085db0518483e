"""The host path of a step on the CPU, with the device work stubbed: a microbenchmark for any machine.

Run anywhere (no GPU needed):  python benchmarks/profile_host.py [--batch 256] [--steps 3000] [--cprofile]

Builds a D1-like ``BatchMetadata`` (bench_steps' D1: decode, B=256, context ~4K, page 16, heads 32/8,
head dim 64) on ``device="cpu"``, replaces its bound fill launches (``StepLauncher.fills``, one per
pinned staging buffer) with no-ops, and times ``with meta.prepare_decode(idx, cache_lens):`` over many
steps (int64 numpy inputs, as bench_steps passes them; ``--lists`` for lists). What is left is the
host's Python and numba work of a step (conversion and checks of the batch, staging, views, the
``Step``, the context variable), without the launch (a bound, check-free call on CUDA) and without
FlashInfer's plan (not made on the CPU). Prints the median over ``--repeats`` runs of the mean µs
per step, and with ``--cprofile`` the functions that take the time.

The numbers are this machine's, not an H100 host's: compare before and after a change on the same
machine, in the same run where possible.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's batchmeta, not an installed one
from batchmeta import BatchMetadata, KVGroup, MetadataConfig


def build(batch: int, page_size: int = 16, context: int = 4096, seed: int = 0) -> tuple[BatchMetadata, list, list]:
    """A D1-like BatchMetadata on the CPU with its fills stubbed, and the step's ``(idx, cache_lens)`` lists."""
    rng = np.random.default_rng(seed)
    cache = [max(1, int(x)) for x in rng.normal(context, context * 0.25, batch)]
    cache = [min(c, 40000) for c in cache]
    seq = np.array(cache) + 1
    cfg = MetadataConfig(
        max_num_reqs=batch,
        max_num_tokens=batch,
        max_model_len=int(seq.max()) + 64,
        kv_groups=(KVGroup(page_size=page_size),),
        num_qo_heads=32,
        num_kv_heads=8,
        head_dim=64,
        q_dtype=torch.bfloat16,
        kv_dtype=torch.bfloat16,
        device="cpu",
    )
    meta = BatchMetadata(cfg)
    start = 1
    for r in range(batch):
        n = -(-int(seq[r]) // page_size)
        meta.block_tables.append(r, list(range(start, start + n)))
        start += n
    idx = list(range(batch))
    meta.prepare_decode(idx, cache)  # applies the staged pages (with the real fill) and warms the caches
    meta._launcher.fills = [lambda *a, **k: None for _ in meta._launcher.fills]  # the device work, stubbed
    return meta, idx, cache


def time_steps(meta: BatchMetadata, idx, cache, steps: int) -> float:
    """Mean µs per ``with meta.prepare_decode(idx, cache):`` over ``steps`` steps (bench_steps' step)."""
    prepare = meta.prepare_decode
    t0 = time.perf_counter_ns()
    for _ in range(steps):
        with prepare(idx, cache):
            pass
    return (time.perf_counter_ns() - t0) / steps / 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--lists", action="store_true", help="pass idx and cache_lens as lists (default: int64 numpy)")
    parser.add_argument("--cprofile", action="store_true", help="also print cProfile's top functions")
    args = parser.parse_args()
    meta, idx, cache = build(args.batch)
    if not args.lists:  # as bench_steps passes them
        idx, cache = np.array(idx, np.int64), np.array(cache, np.int64)
    time_steps(meta, idx, cache, args.steps // 10)  # warm-up
    runs = [time_steps(meta, idx, cache, args.steps) for _ in range(args.repeats)]
    what = "lists" if args.lists else "int64 numpy arrays"
    print(
        f"prepare_decode, B={args.batch}, inputs as {what}, fills stubbed: "
        f"{statistics.median(runs):.2f} µs/step (median of {args.repeats} x {args.steps}; "
        f"min {min(runs):.2f}, max {max(runs):.2f})"
    )
    if args.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        time_steps(meta, idx, cache, args.steps)
        prof.disable()
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
