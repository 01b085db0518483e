"""Where the host microseconds of one step go (a scenario of bench_steps; D1, B=256 decode, by default).

Run on a machine with CUDA and FlashInfer:  python benchmarks/profile_step.py [--scenario D1]

Times each part of ``BatchMetadata.prepare_decode`` (``prepare_prefill`` for P1 and M1) separately,
by wrapping the internal calls with counters (each wrapper adds well under a microsecond), over many
steps with the GPU idle, and prints the median microseconds per part beside the whole step. The
parts:

- validate: host-side checks of the batch (``BatchChecker.check``; 0 on the compiled path, whose
  checks are part of its one call);
- host arrays: the staged block-table writes taken and the step's arrays written into the pinned
  staging buffer (``BlockTables.take_staged``, then ``HostPath.stage``, which also checks, or
  numpy's ``staging.stage_step``);
- upload: a host→device copy (none per step since the kernel reads pinned staging in place; kept
  for older trees and the rare excess block-table writes);
- fill: the one bound kernel launch (staged block-table writes and every metadata field);
- plan: FlashInfer planning (``StepPlanner.plan``);
- views + Step: the rest of ``BatchMetadata._prepare`` (views looked up, the ``Step`` made);
- context: entering and leaving ``with`` (the ContextVar).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="D1")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--no-plan", action="store_true", help="profile the plan_attention=False object")
    parser.add_argument("--cprofile", action="store_true", help="also print cProfile's top functions")
    parser.add_argument(
        "--interleave", action="store_true", help="run stock-plan and eager-glue steps in between, as bench_steps does"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "profile_step.py: needs a CUDA GPU (and FlashInfer: pip install 'batchmeta[flashinfer]'); "
            "this machine has none",
            file=sys.stderr,
        )
        return 2
    bench_steps.HEADS = (*bench_steps.HEADS[:2], args.head_dim)
    rng = np.random.default_rng(0)
    scn = next(s for s in bench_steps.scenarios(rng) if s.name == args.scenario)
    setup = bench_steps.build(scn, rng)
    meta = setup.noplan if args.no_plan else setup.meta
    idx, cache, query = setup.idx, np.array(scn.cache_lens), np.array(scn.query_lens)
    times: dict[str, list[float]] = defaultdict(list)
    current: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter_ns()
            try:
                return fn(*a, **k)
            finally:
                current[name] += (time.perf_counter_ns() - t0) / 1e3

        return wrapper

    # Methods of the object's parts are wrapped on the instances; stage_step where its caller finds it
    # (batchmeta/launcher.py, metadata.py in trees before the launcher).
    stage_home = sys.modules.get("batchmeta.launcher") or sys.modules[type(meta).__module__]
    stage_home.stage_step = timed("stage", stage_home.stage_step)
    type(meta)._prepare = timed("prepare", type(meta)._prepare)
    meta._checker.check = timed("validate", meta._checker.check)
    if getattr(meta, "_host_path", None) is not None:  # the compiled path: checks and staging in one call
        meta._host_path.stage = timed("stage", meta._host_path.stage)
    planner = meta._launcher.planner if hasattr(meta, "_launcher") else meta._planner
    planner.plan = timed("plan", planner.plan)
    meta.block_tables.take_staged = timed("take_staged", meta.block_tables.take_staged)
    meta._staging.upload = timed("upload", meta._staging.upload)
    meta._scatter = timed("scatter", meta._scatter)
    if hasattr(meta, "_launcher"):
        meta._launcher.fills = [timed("fill", f) for f in meta._launcher.fills]
    elif hasattr(meta, "_fills"):  # trees before the launcher
        meta._fills = [timed("fill", f) for f in meta._fills]
    else:  # trees before zero-copy staging
        meta._fill = timed("fill", meta._fill)

    def step():
        t0 = time.perf_counter_ns()
        if scn.decode:
            ctx = meta.prepare_decode(idx, cache, num_draft_tokens=scn.draft, cuda_graph=scn.graph)
        else:
            ctx = meta.prepare_prefill(idx, query_lens=query, cache_lens=cache)
        t1 = time.perf_counter_ns()
        with ctx:
            pass
        t2 = time.perf_counter_ns()
        current["context"] += (t2 - t1) / 1e3
        current["total"] += (t2 - t0) / 1e3

    others = [bench_steps.impl_stock_plan(setup), bench_steps.impl_eager_glue(setup)] if args.interleave else []
    for _ in range(20):
        step()
    for i in range(args.steps):
        current.clear()
        # Steady decode at B=256, page 16 stages about 16 page appends per step: stage as many
        # writes (the rows' unchanged page counts) so the scatter launch runs every step.
        for r in range(i % 16, len(idx), 16):
            meta.block_tables._set_count(0, r, meta.block_tables.num_pages(r))
        for other in others:
            torch.cuda.synchronize()
            other()
        torch.cuda.synchronize()
        step()
        for k, v in current.items():
            times[k].append(v)
    if args.cprofile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            step()
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    med = {k: statistics.median(v) for k, v in times.items()}
    inside = ("stage", "take_staged", "upload", "scatter", "fill", "plan")
    parts = {
        "validate": med.get("validate", 0.0),
        "host arrays": med.get("stage", 0.0) + med.get("take_staged", 0.0),
        "upload (1 H2D copy)": med.get("upload", 0.0),
        "fill launch": med.get("fill", 0.0) + med.get("scatter", 0.0),
        "plan": med.get("plan", 0.0),
        "views + Step": med["prepare"] - sum(med.get(k, 0.0) for k in inside),
        "context enter/exit": med["context"],
    }
    parts["other (call overhead, args)"] = med["total"] - sum(parts.values())
    name = torch.cuda.get_device_name()
    notes = (" (plan_attention=False)" if args.no_plan else "") + (" (interleaved)" if args.interleave else "")
    print(f"# Host µs of one {scn.name} step ({scn.what}) on {name}, median of {args.steps}{notes}\n")
    print("| part | µs |\n|---|---:|")
    for k, v in parts.items():
        print(f"| {k} | {v:.1f} |")
    print(f"| **total** | **{med['total']:.1f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
