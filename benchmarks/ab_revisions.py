"""Host µs per step of two revisions of batchmeta, in one process, alternated step by step.

Separate runs of ``profile_step.py`` on one machine differ by up to 2× as the host's speed drifts;
alternating the two revisions' steps in one process makes the drift hit both alike, so their ratio
holds to about 2%. Run on a machine with CUDA and FlashInfer, from the project root:

    git archive <rev> | tar -x -C /tmp/base          # the other revision's tree (any copy will do)
    python benchmarks/ab_revisions.py --base-tree /tmp/base [--scenarios D1 P1] [--steps 400]

The other tree's ``batchmeta`` is copied and renamed ``batchmeta_base`` (so both import side by
side); scenarios and inputs come from this tree's ``bench_steps.py``. Prints a markdown table:
median host µs of ``prepare_*`` plus entering and leaving the step, with and without FlashInfer
planning, and the median of the per-step ratios (this tree / the other).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def import_base(tree: Path):
    """The other revision's package, imported as ``batchmeta_base``."""
    dst = Path(tempfile.mkdtemp()) / "batchmeta_base"
    shutil.copytree(tree / "batchmeta", dst)
    for f in dst.rglob("*.py"):
        f.write_text(re.sub(r"\bbatchmeta\b", "batchmeta_base", f.read_text()))
    sys.path.insert(0, str(dst.parent))
    import batchmeta_base

    return batchmeta_base


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-tree", type=Path, required=True, help="a checkout of the other revision")
    parser.add_argument("--scenarios", nargs="+", default=["D1", "D2", "D3", "D4", "P1", "S"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import bench_steps

    import batchmeta

    base = import_base(args.base_tree)
    bench_steps.HEADS = (*bench_steps.HEADS[:2], args.head_dim)
    scns = {s.name: s for s in bench_steps.scenarios(np.random.default_rng(0))}
    print(
        f"# Host µs per step: this tree vs {args.base_tree} on {torch.cuda.get_device_name()}, one process, "
        f"alternated, median of {args.steps}\n"
    )
    print("| scenario | step | other tree | this tree | ratio of medians | median of per-step ratios |")
    print("|---|---|---:|---:|---:|---:|")
    this_classes = bench_steps.BatchMetadata, bench_steps.KVGroup, bench_steps.MetadataConfig
    base_classes = base.BatchMetadata, base.KVGroup, base.MetadataConfig
    assert this_classes[0] is batchmeta.BatchMetadata
    for name in args.scenarios:
        scn = scns[name]
        new = bench_steps.build(scn, np.random.default_rng(1))
        bench_steps.BatchMetadata, bench_steps.KVGroup, bench_steps.MetadataConfig = base_classes
        try:
            old = bench_steps.build(scn, np.random.default_rng(1))
        finally:
            bench_steps.BatchMetadata, bench_steps.KVGroup, bench_steps.MetadataConfig = this_classes
        idx, cache, qlens = new.idx, np.array(scn.cache_lens), np.array(scn.query_lens)
        for plan in (True,) if scn.graph else (True, False):
            metas = {"base": old.meta if plan else old.noplan, "this": new.meta if plan else new.noplan}
            times: dict[str, list[float]] = {k: [] for k in metas}

            def step(m, scn=scn, idx=idx, cache=cache, qlens=qlens):
                if scn.decode:
                    s = m.prepare_decode(idx, cache, num_draft_tokens=scn.draft, cuda_graph=scn.graph)
                else:
                    s = m.prepare_prefill(idx, query_lens=qlens, cache_lens=cache)
                with s:
                    pass

            for i in range(args.steps + 20):
                for k in ("base", "this") if i % 2 else ("this", "base"):
                    m = metas[k]
                    for r in range(i % 16, len(idx), 16):  # stage block-table writes, as profile_step does
                        m.block_tables._set_count(0, r, m.block_tables.num_pages(r))
                    torch.cuda.synchronize()
                    t0 = time.perf_counter_ns()
                    step(m)
                    t1 = time.perf_counter_ns()
                    if i >= 20:
                        times[k].append((t1 - t0) / 1e3)
            b, a = statistics.median(times["base"]), statistics.median(times["this"])
            ratio = statistics.median([y / x for x, y in zip(times["base"], times["this"], strict=True)])
            print(
                f"| {name} {scn.what} | {'plan' if plan else 'no plan'} | {b:.1f} | {a:.1f} | {a / b:.3f} | "
                f"{ratio:.3f} |"
            )
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
