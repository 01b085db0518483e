"""Host µs per launch: Triton's normal launch vs batchmeta's launch cache, measured in one run.

Run on a machine with CUDA:  python benchmarks/bench_launch.py

For each kernel, bursts of launches are timed on the host: what the engine's CPU pays. Bursts are
short and the GPU is drained between them (untimed), so the launch queue never fills and the host
never waits for the GPU inside a timed burst. Plain and cached bursts alternate; the table shows
medians over all bursts and the ratio plain / cached.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import triton

from batchmeta.launch import CachedKernel
from batchmeta.ops import block_table, kv_cache, positions


@triton.jit
def _empty(x_ptr):
    pass


def _cases(dev: torch.device):
    """(name, JITFunction, grid, args) for kernels of the per-step path, at decode-like sizes."""
    b = 256
    table = torch.randint(0, 1 << 20, (1024, 256), dtype=torch.int32, device=dev)
    idx = torch.randperm(1024, device=dev)[:b].to(torch.int32)
    seq = torch.randint(1, 4096, (b,), dtype=torch.int32, device=dev)
    indptr = torch.zeros(b + 1, dtype=torch.int32, device=dev)
    indptr[1:] = torch.cumsum((seq + 15) // 16, 0)
    kv_indices = torch.empty(b * 256, dtype=torch.int32, device=dev)
    qsl = torch.arange(b + 1, dtype=torch.int32, device=dev)
    pos = torch.empty(512, dtype=torch.int64, device=dev)
    slots = torch.empty(512, dtype=torch.int64, device=dev)
    key = torch.randn(b, 8, 128, dtype=torch.float16, device=dev)
    cache = torch.zeros(4096, 16, 8, 128, dtype=torch.float16, device=dev)

    ragged_args = (
        table,
        table.stride(0),
        table.shape[1],
        idx,
        indptr,
        seq,
        1,
        kv_indices,
        kv_indices.numel(),
        True,
        False,
        256,
    )
    group = [table, table.stride(0), table.shape[1], 16, slots, slots.numel()]
    slot_args = (idx, qsl, seq, pos, pos.numel(), b, *group, *group, *group, *group, 1, True, 256)
    # Key and value of 8 heads x 128, unscaled (no float8): the plain-cast specialisation.
    store_args = (
        key,
        key,
        *key.stride(),
        *key.stride(),
        slots,
        cache,
        *cache.stride(),
        cache,
        *cache.stride(),
        16,
        cache.shape[0] * 16,
        8,
        128,
        8,
        128,
        1.0,
        1.0,
        512,
        False,
        False,
        False,
        0.0,
        0.0,
    )
    slots.zero_()
    empty_args = (kv_indices,)
    return [
        ("empty kernel (1 arg)", _empty, (1,), empty_args),
        ("kv_indices (12 args)", block_table._ragged_kernel, (b,), ragged_args),
        ("slot mapping (33 args)", positions._slot_mapping_kernel, (b + 1, 1), slot_args),
        ("store_kv (30 args)", kv_cache._store_kv_kernel, (b,), store_args),
    ]


def _burst_us(fn, burst: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter_ns()
    for _ in range(burst):
        fn()
    t1 = time.perf_counter_ns()
    return (t1 - t0) / burst / 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=32, help="launches per timed burst")
    parser.add_argument("--bursts", type=int, default=400, help="timed bursts per implementation")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_launch needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    rows = []
    for name, fn, grid, kargs in _cases(dev):
        cached = CachedKernel(fn)
        plain = lambda fn=fn, grid=grid, kargs=kargs: fn[grid](*kargs)
        fast = lambda cached=cached, grid=grid, kargs=kargs: cached.launch(grid, kargs)
        plain()
        fast()
        fast()  # compile, then fill the cache
        plain_us, cached_us = [], []
        for _ in range(args.bursts):
            plain_us.append(_burst_us(plain, args.burst))
            cached_us.append(_burst_us(fast, args.burst))
        torch.cuda.synchronize()
        assert cached.hits >= args.bursts * args.burst, "the cached path was not taken"
        p, c = statistics.median(plain_us), statistics.median(cached_us)
        rows.append((name, p, c, p / c))
    print()
    print("| kernel | plain launch (host µs) | cached launch (host µs) | plain / cached |")
    print("|---|---:|---:|---:|")
    for name, p, c, r in rows:
        print(f"| {name} | {p:.2f} | {c:.2f} | {r:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
