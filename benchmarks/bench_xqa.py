"""A decode step without a plan: FlashInfer's XQA decode against its FA2 decode, on batchmeta's metadata.

Run on a machine with an sm90+ GPU and FlashInfer >= 0.7.4:  python benchmarks/bench_xqa.py [--head-dim 64]

XQA (``flashinfer.decode.xqa_batch_decode_with_kv_cache``) reads a block table ``[B, pages]`` and
``seq_lens`` directly: no plan. For the decode scenarios of ``bench_steps.py`` (same batches, heads,
bf16) this measures, in one run:

- GPU µs of one attention call: FA2 (the step's planned ``BatchDecodeWithPagedKVCacheWrapper``, what
  ``step.attention`` runs) and XQA over the same cache, CUDA events around ``--iters`` back-to-back
  calls;
- the largest difference between the two outputs, and each against a float32 reference on a few rows;
- host µs of the whole step as an engine pays it: ``prepare_decode`` (planned) then the FA2 call,
  against ``prepare_decode`` of a ``BatchMetadata(plan_attention=False)`` then the XQA call (the
  block table is the request slots' own, the batch being slots ``0..B-1``; another batch would need
  its rows gathered first), medians of ``--steps`` steps, each after a sync.

XQA takes page sizes 16, 32, 64 and 128 only (D5, page size 1, is reported as unsupported), and a
speculative step (``q_len_per_req > 1``) needs a draft mask of its own format: not measured here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_steps


def _gpu_us(fn, iters: int) -> float:
    """Device µs per call: ``iters`` calls enqueued behind a sleeping kernel, so the host's pace (the Python
    around each launch) is not what the events time."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(20_000_000)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def _reference(q, k_cache, v_cache, table, seq, rows, page_size) -> torch.Tensor:
    """float32 attention of the given rows over their pages (the last query attends to every key)."""
    hq, hkv, d = q.shape[1], k_cache.shape[2], q.shape[2]
    out = []
    for r in rows:
        n = int(seq[r])
        pages = table[r, : -(-n // page_size)].long()
        k = k_cache[pages].reshape(-1, hkv, d)[:n].float().repeat_interleave(hq // hkv, 1)
        v = v_cache[pages].reshape(-1, hkv, d)[:n].float().repeat_interleave(hq // hkv, 1)
        s = torch.einsum("hd,nhd->hn", q[r].float(), k) / d**0.5
        out.append(torch.einsum("hn,nhd->hd", s.softmax(-1), v))
    return torch.stack(out)


def run(scn, args, rng) -> dict:
    from flashinfer.decode import xqa_batch_decode_with_kv_cache

    setup = bench_steps.build(scn, rng)
    meta, noplan, idx = setup.meta, setup.noplan, setup.idx
    b, ps = len(idx), scn.page_size
    hq, hkv, d = bench_steps.HEADS
    cache = np.array(scn.cache_lens)
    gen = torch.Generator(device="cuda").manual_seed(0)
    pages = setup.num_pages + 1
    k_cache = torch.randn(pages, ps, hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    v_cache = torch.randn(pages, ps, hkv, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    q = torch.randn(b, hq, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    out_xqa = torch.empty_like(q)
    table = meta.block_tables.tables[0][:b]  # both objects hold the same pages; meta's are written
    row = {"scenario": scn.name, "what": scn.what, "B": b, "page_size": ps}

    step = meta.prepare_decode(idx, cache)
    seq_u32 = step.seq_lens[:b].view(torch.uint32)
    max_seq = int(cache.max()) + 1

    def fa2():
        return step.attention(q, k_cache, v_cache)

    def xqa():
        return xqa_batch_decode_with_kv_cache(
            q, (k_cache, v_cache), workspace, table, seq_u32, max_seq, bmm1_scale=d**-0.5, out=out_xqa
        )

    with step:
        ref_out = fa2().clone()
        if ps not in (16, 32, 64, 128):
            row["xqa"] = f"unsupported page size {ps}"
            row["fa2_gpu_us"] = _gpu_us(fa2, args.iters)
            return row
        xqa()
        torch.cuda.synchronize()
        rows = sorted({0, b // 2, b - 1})
        dense = _reference(q, k_cache, v_cache, table, step.seq_lens_host, rows, ps)
        row["max_diff_xqa_fa2"] = float((out_xqa.float() - ref_out.float()).abs().max())
        row["max_diff_fa2_ref"] = float((ref_out[rows].float() - dense).abs().max())
        row["max_diff_xqa_ref"] = float((out_xqa[rows].float() - dense).abs().max())
        row["fa2_gpu_us"] = _gpu_us(fa2, args.iters)
        row["xqa_gpu_us"] = _gpu_us(xqa, args.iters)

    def step_fa2():
        with meta.prepare_decode(idx, cache) as s:
            s.attention(q, k_cache, v_cache)

    def step_xqa():
        with noplan.prepare_decode(idx, cache) as s:
            seq = s.seq_lens[:b].view(torch.uint32)
            xqa_batch_decode_with_kv_cache(
                q, (k_cache, v_cache), workspace, table, seq, max_seq, bmm1_scale=d**-0.5, out=out_xqa
            )

    host = {"fa2": [], "xqa": []}
    for i in range(args.steps + 5):
        for name, fn in (("fa2", step_fa2), ("xqa", step_xqa)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if i >= 5:
                host[name].append((time.perf_counter() - t0) * 1e6)
    row["fa2_step_host_us"] = statistics.median(host["fa2"])
    row["xqa_step_host_us"] = statistics.median(host["xqa"])
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--scenarios", nargs="+", default=["D1", "D3", "D4", "D5"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_xqa.py: needs a CUDA GPU (sm90+) and FlashInfer >= 0.7.4", file=sys.stderr)
        return 2
    import flashinfer

    bench_steps.HEADS = (*bench_steps.HEADS[:2], args.head_dim)
    rng = np.random.default_rng(0)
    scns = {s.name: s for s in bench_steps.scenarios(rng)}
    print(f"# XQA vs FA2 decode on {torch.cuda.get_device_name()} (FlashInfer {flashinfer.__version__})")
    print(f"heads {bench_steps.HEADS}, bf16\n")
    cols = ["scenario", "B", "page_size", "fa2_gpu_us", "xqa_gpu_us", "fa2_step_host_us", "xqa_step_host_us"]
    cols += ["max_diff_xqa_fa2", "max_diff_fa2_ref", "max_diff_xqa_ref", "xqa"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for name in args.scenarios:
        try:
            row = run(scns[name], args, np.random.default_rng(0))
        except Exception as e:  # report and go on: one unsupported shape must not hide the others
            first = str(e).splitlines()[0] if str(e) else ""
            row = {"scenario": name, "xqa": f"{type(e).__name__}: {first[:160]}"}
            # The whole message (a JIT build's compiler output runs to many lines) on stderr.
            print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        cells = [row.get(c, "") for c in cols]
        print("| " + " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
