"""Per-step metadata cost: batchmeta against the glue engines write today, measured in one run.

Run on a machine with CUDA and FlashInfer:  python benchmarks/bench_steps.py
Writes ``benchmarks/results/<device>-<date>.{md,json,png}`` (and copies them to ``$OUT`` if set).

Implementations, A/B interleaved step by step:

- ``eager-glue``: what engines hand-write: lengths copied to the GPU as tensors, indptr and
  last_page_len by torch ops on the GPU, ragged kv_indices by masking the padded table, positions
  and slots by torch ops, and FlashInfer's stock ``plan()`` fed device tensors;
- ``stock-plan``: FlashInfer's stock ``plan()`` alone, fed host tensors prepared beforehand (the floor
  of the stock API, no metadata built);
- ``batchmeta``: ``BatchMetadata.prepare_*`` (metadata kernels, one staging copy, plans), eager, and
  under CUDA graphs (plan for the graph wrappers) where the scenario allows;
- ``batchmeta-noplan``: the same with ``plan_attention=False`` (engines whose attention reads block
  tables and lengths directly): the metadata alone.

Figures per step: host µs (what the engine's CPU pays; median, p90); GPU µs (CUDA events around the
step's device work, enqueued behind a sleeping kernel so the host's pace is excluded; an
implementation that syncs waits for the GPU, so its gaps count); host syncs (torch's sync debug
mode, counted in a separate pass); and host→device bytes the implementation itself copies
(FlashInfer's own plan copies are the same for all and not counted).
"""

from __future__ import annotations

import argparse
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

from batchmeta import BatchMetadata, KVGroup, MetadataConfig


@dataclass
class Scenario:
    name: str
    what: str
    cache_lens: list[int]
    query_lens: list[int]
    page_size: int = 16
    graph: bool = False
    draft: int = 0

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
    for s in out:
        s.cache_lens = [min(c, 40000) for c in s.cache_lens]
    return out


HEADS = (32, 8, 128)  # num_qo_heads, num_kv_heads, head_dim (Llama-3-8B-like); --head-dim changes the last


@dataclass
class Setup:
    scn: Scenario
    meta: BatchMetadata
    idx: np.ndarray
    noplan: BatchMetadata | None = None
    host: dict = field(default_factory=dict)
    dev: dict = field(default_factory=dict)


def build(scn: Scenario, rng) -> Setup:
    b = len(scn.cache_lens)
    seq = np.array(scn.cache_lens) + np.array(scn.query_lens)
    max_len = int(seq.max()) + 64
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
    )
    meta = BatchMetadata(cfg)
    noplan = BatchMetadata(attrs.evolve(cfg, plan_attention=False))
    num_pages = int(sum(-(-seq // scn.page_size))) + 1
    perm = rng.permutation(np.arange(1, num_pages + 1))
    start = 0
    for r in range(b):
        n = -(-int(seq[r]) // scn.page_size)
        for m in (meta, noplan):
            m.block_tables.append(r, perm[start : start + n].tolist())
        start += n
    idx = np.arange(b)
    s = Setup(scn, meta, idx, noplan=noplan)
    # Host arrays for the stock plan, and device kv_indices, prepared once (not timed).
    with meta.prepare_prefill(idx, scn.query_lens, scn.cache_lens) as step:
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
def _wrappers(decode: bool):
    import flashinfer

    ws = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    if decode:
        return flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=HEADS[0] // HEADS[1] > 4)
    return flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")


def _plan(w, decode, qo, kv, indices, last, ps):
    if decode:
        w.plan(kv, indices, last, *HEADS, ps, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    else:
        w.plan(qo, kv, indices, last, *HEADS, ps, causal=True, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)


def impl_eager_glue(s: Setup):
    scn = s.scn
    ps = scn.page_size
    decode = scn.decode and scn.draft == 0
    w = _wrappers(decode)
    table = s.dev["table"]
    width = table.shape[1]
    cols = torch.arange(width, device="cuda")
    cache_l, query_l, idx_l = list(scn.cache_lens), list(scn.query_lens), s.idx.tolist()
    nbytes = 4 * 3 * len(cache_l)

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

    return step, nbytes


def impl_stock_plan(s: Setup):
    scn = s.scn
    decode = scn.decode and scn.draft == 0
    w = _wrappers(decode)
    h, ind = s.host, s.dev["kv_indices"]

    def step():
        _plan(w, decode, h["qo"], h["kv"], ind, h["last"], scn.page_size)

    return step, 0


def impl_batchmeta(s: Setup, graph: bool, plan: bool = True):
    scn, meta = s.scn, (s.meta if plan else s.noplan)
    idx, q, c = s.idx, np.array(scn.query_lens), np.array(scn.cache_lens)
    nbytes = 4 * meta._layout.fixed_end

    if scn.decode:

        def step():
            with meta.prepare_decode(idx, c, num_draft_tokens=scn.draft, cuda_graph=graph):
                pass

    else:

        def step():
            with meta.prepare_prefill(idx, q, c):
                pass

    return step, nbytes


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
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def measure(impls: dict, steps: int, progress) -> dict:
    res = {name: dict(host=[], gpu=[]) for name in impls}
    for fn, _ in impls.values():  # warm up: kernels compiled, wrappers built, FlashInfer JIT loaded
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for name, (fn, nbytes) in impls.items():
        res[name]["syncs"] = _count_syncs(fn)
        res[name]["h2d_bytes"] = nbytes
    names = list(impls)
    shuffle = np.random.default_rng(1)
    for _ in range(steps):
        # Interleaved A/B in an order shuffled each step (seeded): the step run just before evicts
        # caches, and which one it is changes the figures, so no implementation always follows another.
        for name in shuffle.permutation(names):  # host time, GPU idle
            fn = impls[name][0]
            torch.cuda.synchronize()
            t0 = time.perf_counter_ns()
            fn()
            t1 = time.perf_counter_ns()
            res[name]["host"].append((t1 - t0) / 1e3)
        for name, (fn, _) in impls.items():  # GPU time: the step is enqueued behind a sleeping kernel,
            torch.cuda.synchronize()  # so the events time its device work, not the host's pace
            torch.cuda._sleep(2_000_000)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            res[name]["gpu"].append(start.elapsed_time(end) * 1e3)
        progress()
    for r in res.values():
        r["host_median"] = statistics.median(r["host"])
        r["host_p90"] = float(np.percentile(r["host"], 90))
        r["gpu_median"] = statistics.median(r["gpu"])
    return res


def memory_report(s: Setup) -> dict:
    meta = s.meta
    tensors = [
        meta.block_tables.flat,
        meta._staging.dev,
        meta._accept_staging.dev,
        meta._buffers.out32,
        meta._buffers.out64,
    ]
    held = sum(t.numel() * t.element_size() for t in tensors)
    b = len(s.scn.cache_lens)
    seq = np.array(s.scn.cache_lens) + np.array(s.scn.query_lens)
    pages = int(sum(-(-seq // s.scn.page_size)))
    width = meta.block_tables.tables[0].shape[1]
    needed = 4 * (b * width + pages + 3 * (b + 1)) + 8 * 2 * int(sum(s.scn.query_lens))
    return dict(
        buffers_bytes=held,
        workspace_bytes=meta.config.workspace_bytes,
        graph_pool_bytes=0,
        strictly_needed_bytes=needed,
    )


def main() -> int:
    global HEADS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", nargs="*", help="scenario names to run (default: all)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--head-dim", type=int, default=128, help="attention head size (a FlashInfer JIT variant)")
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
        s = build(scn, rng)
        impls = {
            "eager-glue": impl_eager_glue(s),
            "stock-plan": impl_stock_plan(s),
            "batchmeta": impl_batchmeta(s, graph=False),
            "batchmeta-noplan": impl_batchmeta(s, graph=False, plan=False),
        }
        if scn.graph:
            impls = {
                "eager-glue": impls["eager-glue"],
                "stock-plan": impls["stock-plan"],
                "batchmeta-graph": impl_batchmeta(s, graph=True),
            }
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
    base = out / f"{device}-{stamp}"
    lines = [
        f"# batchmeta per-step cost on {torch.cuda.get_device_name()} ({stamp})",
        "",
        f"torch {torch.__version__}; heads {HEADS}; bf16; {args.steps} interleaved steps per implementation.",
        "",
        "| scenario | implementation | host µs median | host µs p90 | GPU µs median | syncs/step | H2D bytes/step |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        for impl, m in r["impls"].items():
            lines.append(
                f"| {name}: {r['what']} | {impl} | {m['host_median']:.1f} | {m['host_p90']:.1f} | "
                f"{m['gpu_median']:.1f} | {m['syncs']} | {m['h2d_bytes']} |"
            )
    if memory:
        lines += [
            "",
            "Device memory for D4's configuration (bytes): " + ", ".join(f"{k} {v:,}" for k, v in memory.items()),
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    base.with_suffix(".md").write_text(text)
    raw = {
        k: dict(what=v["what"], impls={i: {kk: vv for kk, vv in m.items()} for i, m in v["impls"].items()})
        for k, v in results.items()
    }
    base.with_suffix(".json").write_text(json.dumps(dict(results=raw, memory=memory), indent=1))
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
        fig.savefig(base.with_suffix(".png"), dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot written", file=sys.stderr)
    if os.environ.get("OUT"):
        for suffix in (".md", ".json", ".png"):
            if base.with_suffix(suffix).exists():
                shutil.copy(base.with_suffix(suffix), os.environ["OUT"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
