"""Mixed steps: one paged-prefill wrapper over every row, or decode rows split off to the decode wrapper?

Run on a machine with CUDA and FlashInfer:  python benchmarks/bench_mixed_split.py

Scenario M1 of ``bench_steps.py`` (one 2048-token chunk over a 1024-token prefix beside 255 decode
rows of ~4K context; heads (32, 8, d), page size 16, bf16). Measures, per attention layer, the GPU
µs (CUDA events over many layers back to back) and host µs of ``run()`` for:

- ``one-prefill``: one ``BatchPrefillWithPagedKVCacheWrapper`` (FA2) over all 256 rows;
- ``split``: a ``BatchDecodeWithPagedKVCacheWrapper`` over the 255 decode rows plus the prefill
  wrapper over the chunk row, writing one output (what vLLM's FlashInfer backend does);

and the host µs of planning each way (stock ``plan()``, an upper bound of the fast planners).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def main() -> int:
    import flashinfer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=64)
    args = parser.parse_args()
    hq, hkv, d, ps = 32, 8, args.head_dim, 16
    dt = torch.bfloat16
    rng = np.random.default_rng(0)
    cache = np.array([1024, *[max(1, int(x)) for x in rng.normal(4096, 1024, 255)]])
    query = np.array([2048] + [1] * 255)
    # Decode rows first, as engines are asked to order them; the chunk last.
    cache, query = np.roll(cache, -1), np.roll(query, -1)
    seq = cache + query
    pages = -(-seq // ps)
    num_pages = int(pages.sum()) + 1
    kv = torch.randn(num_pages, 2, ps, hkv, d, dtype=dt, device="cuda")
    indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    indices = torch.from_numpy(rng.permutation(np.arange(1, num_pages))[: indptr[-1]].astype(np.int32)).cuda()
    last = ((seq - 1) % ps + 1).astype(np.int32)
    qo = np.concatenate([[0], np.cumsum(query)]).astype(np.int32)
    q = torch.randn(int(qo[-1]), hq, d, dtype=dt, device="cuda")
    t = torch.from_numpy
    ws = [torch.zeros(128 << 20, dtype=torch.uint8, device="cuda") for _ in range(3)]
    one = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws[0], "NHD", backend="fa2")
    dec = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws[1], "NHD", use_tensor_cores=hq // hkv > 4)
    pre = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws[2], "NHD", backend="fa2")
    nd = 255
    kw = dict(q_data_type=dt, kv_data_type=dt)

    def plan_one():
        one.plan(t(qo), t(indptr), indices, t(last), hq, hkv, d, ps, causal=True, **kw)

    def plan_split():
        dec.plan(t(indptr[: nd + 1]), indices, t(last[:nd]), hq, hkv, d, ps, **kw)
        pre_kv = indptr[nd:] - indptr[nd]
        pre.plan(t(qo[nd:] - qo[nd]), t(pre_kv), indices[indptr[nd] :], t(last[nd:]), hq, hkv, d, ps, causal=True, **kw)

    out = torch.empty_like(q)

    def run_one():
        one.run(q, kv, out=out)

    def run_split():
        dec.run(q[:nd], kv, out=out[:nd])
        pre.run(q[nd:], kv, out=out[nd:])

    def host_us(fn, n=200):
        for _ in range(5):
            fn()
        xs = []
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter_ns()
            fn()
            xs.append((time.perf_counter_ns() - t0) / 1e3)
        return statistics.median(xs)

    def gpu_us(fn, n=20):
        xs = []
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(n):
            torch.cuda.synchronize()
            torch.cuda._sleep(5_000_000)
            s.record()
            for _ in range(args.layers):
                fn()
            e.record()
            torch.cuda.synchronize()
            xs.append(s.elapsed_time(e) * 1e3 / args.layers)
        return statistics.median(xs)

    plan_one()
    plan_split()
    run_one()
    ref = out.clone()
    run_split()
    err = (out.float() - ref.float()).abs().max().item()
    rows = [
        ("plan host µs", host_us(plan_one), host_us(plan_split)),
        ("run host µs per layer", host_us(run_one), host_us(run_split)),
        ("run GPU µs per layer", gpu_us(run_one), gpu_us(run_split)),
    ]
    print(f"# Mixed step (M1): one prefill wrapper vs split, {torch.cuda.get_device_name()}, head_dim {d}\n")
    print("| | one-prefill | split | split / one |\n|---|---:|---:|---:|")
    for name, a, b in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    print(f"\nmax |split - one| = {err:.3g} (different kernels: not bit-identical)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
