"""Context-parallel decode (DCP): a rank's per-step cost with every request's KV spread over ranks.

Run with one GPU per rank (NCCL):  python benchmarks/bench_cp.py [--world 2] [--batch 64] [--context 16384]
CPU smoke run (gloo, torch fallbacks, host µs only):  python benchmarks/bench_cp.py --device cpu

``--world`` processes are spawned (``torch.multiprocessing``), one per rank, in one process group (NCCL on
``cuda:rank``, gloo on the CPU). Each rank's ``BatchMetadata`` has ``ContextParallel(world, rank,
interleave)``: it holds pages for its share of every request's tokens (``local_len``) and runs the same
decode steps, B rows of ``--context`` tokens (±25%) one position further each step. Per step and rank:

- host µs of ``prepare_decode`` (with FlashInfer's plans, where planned), synchronized before each step;
- GPU µs (CUDA events, enqueued behind a sleeping kernel so the host's pace is excluded) of the step's
  device work: ``prepare_decode``'s launch and copies, the new token's KV stored (``ops.store_kv``), the
  rank's partial attention (``step.cp_partial_attention``: its share of the cached context, and on rank 0
  the new token), and separately the merge (``batchmeta.distributed.cp_lse_ag_out_ar``: all-gather of the
  lses, rescale, all-reduce of the outputs), one layer;

beside the same steps on rank 0 with ``world_size=1`` (the whole KV on one device, ``step.attention``), in
the same run. Medians over ``--steps`` steps; rank 0 writes ``<out>/<device>-<date>-cp<world>.{md,json}``
(copied to ``$OUT`` if set).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's batchmeta
from batchmeta import BatchMetadata, ContextParallel, KVGroup, MetadataConfig, ops
from batchmeta.context_parallel import local_len
from batchmeta.distributed import cp_lse_ag_out_ar

PAGE = 16


def _config(args, cp: ContextParallel, device: torch.device) -> MetadataConfig:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    max_len = int(args.context * 1.25) + args.steps + args.warmup + 8
    return MetadataConfig(
        max_num_reqs=args.batch,
        max_num_tokens=args.batch,
        max_model_len=max_len,
        kv_groups=(KVGroup(page_size=PAGE),),
        num_qo_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        q_dtype=dtype,
        kv_dtype=dtype,
        device=device,
        num_kv_pages=args.batch * (-(-int(local_len(max_len, cp)) // PAGE)) + 1,
        context_parallel=cp,
    )


class RankBench:
    """One rank's ``BatchMetadata``, KV cache (random keys and values) and step loop."""

    def __init__(self, args, cp: ContextParallel, device: torch.device, cache_lens: np.ndarray):
        self.args, self.cp, self.device = args, cp, device
        self.cuda = device.type == "cuda"
        self.meta = meta = BatchMetadata(_config(args, cp, device))
        cfg = meta.config
        dtype, hq, hkv, d = cfg.kv_dtype, cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim
        gen = torch.Generator().manual_seed(cp.rank + 1)
        shape = (cfg.num_kv_pages, PAGE, hkv, d)
        self.k_cache = torch.randn(shape, generator=gen).to(device, dtype)
        self.v_cache = torch.randn(shape, generator=gen).to(device, dtype)
        pages = -(-int(local_len(cfg.max_model_len, cp)) // PAGE)
        for r in range(args.batch):  # every page a request will need, up front
            meta.block_tables.append(r, list(range(1 + r * pages, 1 + (r + 1) * pages)))
        self.idx = np.arange(args.batch, dtype=np.int64)
        self.cache_lens = cache_lens
        b = args.batch
        self.q = torch.randn(b, hq, d, generator=gen).to(device, dtype)
        self.k = torch.randn(b, hkv, d, generator=gen).to(device, dtype)
        self.v = torch.randn(b, hkv, d, generator=gen).to(device, dtype)
        self.sharded = cp.world_size > 1

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def prepare(self, i: int):
        return self.meta.prepare_decode(self.idx, self.cache_lens + i)

    def attend(self, step) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        ops.store_kv(self.k, self.v, step.slot_mappings[0], self.k_cache, self.v_cache)
        if self.sharded:
            return step.cp_partial_attention(self.q, self.k_cache, self.v_cache, k=self.k, v=self.v)
        return step.attention(self.q, self.k_cache, self.v_cache)

    def gpu_us(self, fn) -> float | None:
        """CUDA-event µs of ``fn``'s device work, enqueued behind a sleeping kernel."""
        if not self.cuda:
            return None
        self.sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(2_000_000)
        start.record()
        fn()
        end.record()
        self.sync()
        return start.elapsed_time(end) * 1e3

    def run(self, group) -> dict:
        """Per-step figures (medians): host µs of the prepare, GPU µs of prepare + attention, of the merge."""
        host, gpu_step, gpu_merge = [], [], []
        for i in range(self.args.warmup + self.args.steps):
            self.sync()
            t0 = time.perf_counter()
            step = self.prepare(i)
            t1 = time.perf_counter()
            with step:
                res = self.attend(step)
                if self.sharded:
                    out, lse = res
                    cp_lse_ag_out_ar(out.clone(), lse, group)
            if i < self.args.warmup:
                continue
            host.append((t1 - t0) * 1e6)

            def device_step(i=i):
                with self.prepare(i) as st:
                    return self.attend(st)

            if self.cuda:
                gpu_step.append(self.gpu_us(device_step))
                if self.sharded:
                    out, lse = device_step()
                    gpu_merge.append(self.gpu_us(lambda out=out, lse=lse: cp_lse_ag_out_ar(out.clone(), lse, group)))

        def med(xs):
            return statistics.median(xs) if xs else None

        return {
            "world_size": self.cp.world_size,
            "rank": self.cp.rank,
            "host_us": med(host),
            "host_us_p90": float(np.percentile(host, 90)),
            "gpu_step_us": med(gpu_step),
            "gpu_merge_us": med(gpu_merge),
            "local_kv_tokens": int(local_len(self.cache_lens, self.cp).sum()),
        }


def _rank_main(rank: int, world: int, init_method: str, args, results) -> None:
    import torch.distributed as dist

    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:  # ranks share the CPU's cores: one thread each rather than each rank's pool over all of them
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        rng = np.random.default_rng(args.seed)  # the same batch on every rank
        cache_lens = rng.integers(int(args.context * 0.75), int(args.context * 1.25) + 1, args.batch)
        rows = [RankBench(args, ContextParallel(world, rank, interleave=args.interleave), device, cache_lens).run(None)]
        dist.barrier()
        if rank == 0:  # the whole KV on one device, the same steps
            rows.append(RankBench(args, ContextParallel(1, 0), device, cache_lens).run(None))
        results.put((rank, rows))
    except BaseException:
        import traceback

        results.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2, help="ranks (one GPU each on cuda)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=16384, help="mean cache length (±25%%)")
    parser.add_argument("--interleave", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.device_count() >= args.world else "cpu"
    if args.world < 2:
        parser.error(f"--world: expected at least 2 ranks, got {args.world}")
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        parser.error(f"--world {args.world}: needs {args.world} GPUs, {torch.cuda.device_count()} visible")
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    got = {}
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        procs = [ctx.Process(target=_rank_main, args=(r, args.world, init, args, results)) for r in range(args.world)]
        for p in procs:
            p.start()
        try:
            for _ in range(args.world):
                rank, rows = results.get(timeout=1800)
                if isinstance(rows, str):
                    print(f"rank {rank} failed:\n{rows}", file=sys.stderr)
                    return 1
                got[rank] = rows
        finally:
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
    rows = [row for r in range(args.world) for row in got[r]]
    name = torch.cuda.get_device_name(0).replace(" ", "-") if args.device == "cuda" else "cpu"
    stamp = datetime.date.today().isoformat()
    lines = [
        f"# Context-parallel decode on {name} ({stamp})",
        "",
        f"{args.world} ranks ({args.device}{', NCCL' if args.device == 'cuda' else ', gloo'}), interleave "
        f"{args.interleave}; decode B={args.batch}, context ~{args.context} (±25%), page {PAGE}, heads "
        f"{args.heads}/{args.kv_heads}, head dim {args.head_dim}; medians of {args.steps} steps after {args.warmup}. "
        "Method: see the docstring of benchmarks/bench_cp.py.",
        "",
        "| world size | rank | KV tokens held | host µs prepare_decode (p90) | GPU µs step (prepare, store, "
        "attention) | GPU µs merge |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['world_size']} | {r['rank']} | {r['local_kv_tokens']} | {_fmt(r['host_us'])} "
            f"({_fmt(r['host_us_p90'])}) | {_fmt(r['gpu_step_us'])} | {_fmt(r['gpu_merge_us'])} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{stamp}-cp{args.world}"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    if os.environ.get("OUT") and Path(os.environ["OUT"]).resolve() != out.resolve():
        for suffix in (".md", ".json"):
            shutil.copy(out / f"{stem}{suffix}", os.environ["OUT"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
