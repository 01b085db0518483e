"""A small serving loop over the metadata ops: ``python -m batchmeta.demo``.

Requests arrive with random prompt and output lengths; pages are allocated from a free list into
persistent per-request block tables (two KV-cache groups with different page sizes); prefill is
chunked under a token budget; decode follows. Each step builds the metadata with the ops (host
indptrs with numpy, positions / slot mappings / kv_indices / the per-step block table on the
device), writes the step's keys into a paged cache with ``store_kv``, and checks everything against
a plain per-request Python computation. Runs on the GPU when there is one, else on the CPU with the
torch fallbacks. The lifecycle object that owns all of this arrives with ``BatchMetadata``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from batchmeta import ops


def _naive_slots(table_row: list[int], positions: range, page_size: int) -> list[int]:
    return [table_row[p // page_size] * page_size + p % page_size for p in positions]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-num-reqs", type=int, default=8)
    parser.add_argument("--token-budget", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(args.seed)
    page_sizes = (16, 4)
    max_model_len = 256
    num_pages = [args.max_num_reqs * max_model_len // ps + 1 for ps in page_sizes]
    widths = [max_model_len // ps for ps in page_sizes]
    max_tokens = args.token_budget
    heads, head_dim = 2, 8

    tables = [torch.zeros(args.max_num_reqs, w, dtype=torch.int32, device=dev) for w in widths]
    num_blocks = [torch.zeros(args.max_num_reqs, dtype=torch.int32, device=dev) for _ in page_sizes]
    host_tables = [[[] for _ in range(args.max_num_reqs)] for _ in page_sizes]
    free_pages = [list(range(1, n)) for n in num_pages]  # page 0 stays free: the padding page
    k_caches = [torch.zeros(n, ps, heads, head_dim, device=dev) for n, ps in zip(num_pages, page_sizes, strict=True)]

    positions = torch.empty(max_tokens, dtype=torch.int64, device=dev)
    slot_mappings = [torch.empty(max_tokens, dtype=torch.int64, device=dev) for _ in page_sizes]
    kv_indices = [torch.empty(args.max_num_reqs * w, dtype=torch.int32, device=dev) for w in widths]
    step_tables = [torch.empty(args.max_num_reqs, w, dtype=torch.int32, device=dev) for w in widths]
    qo_indptr = np.zeros(args.max_num_reqs + 1, np.int32)
    kv_indptr = [np.zeros(args.max_num_reqs + 1, np.int32) for _ in page_sizes]
    last_page_len = [np.zeros(args.max_num_reqs, np.int32) for _ in page_sizes]

    waiting = [(int(rng.integers(4, 120)), int(rng.integers(1, 24))) for _ in range(args.requests)]
    running: dict[int, dict] = {}  # slot -> {prompt, output, cached}
    free_slots = list(range(args.max_num_reqs))
    steps = tokens_total = failures = 0
    host_us: list[float] = []

    print(f"batchmeta demo on {dev}: {args.requests} requests, page sizes {page_sizes}, token budget {max_tokens}")
    print(f"{'step':>4} {'reqs':>4} {'prefill':>7} {'decode':>6} {'tokens':>6} {'pages g0/g1':>11}  check")
    while waiting or running:
        while waiting and free_slots:
            prompt, output = waiting.pop()
            running[free_slots.pop()] = {"prompt": prompt, "output": output, "cached": 0}
        # Schedule: decodes first (1 token each), then prefill chunks within the budget.
        batch, budget = [], max_tokens
        for slot, r in sorted(running.items(), key=lambda kv: kv[1]["cached"] < kv[1]["prompt"]):
            n = 1 if r["cached"] >= r["prompt"] else min(r["prompt"] - r["cached"], budget)
            if n > 0 and budget >= n:
                batch.append((slot, n))
                budget -= n
        # Allocate pages so every table covers cached + new tokens.
        for slot, n in batch:
            need = running[slot]["cached"] + n
            for g, ps in enumerate(page_sizes):
                row = host_tables[g][slot]
                while len(row) * ps < need:
                    row.append(free_pages[g].pop())
                tables[g][slot, : len(row)] = torch.tensor(row, dtype=torch.int32)
                num_blocks[g][slot] = len(row)

        t0 = time.perf_counter()
        idx = np.array([s for s, _ in batch], np.int32)
        qlens = np.array([n for _, n in batch], np.int32)
        clens = np.array([running[s]["cached"] for s, _ in batch], np.int32)
        seq = clens + qlens
        num_reqs = len(batch)
        ops.fill_qo_indptr(qlens, qo_indptr)
        for g, ps in enumerate(page_sizes):
            ops.fill_kv_indptr(seq, ps, kv_indptr[g])
            ops.fill_kv_last_page_len(seq, ps, last_page_len[g])
        staged = torch.from_numpy(np.concatenate([idx, clens, qo_indptr[: num_reqs + 1]])).to(dev, non_blocking=True)
        idx_d, clens_d, qo_d = staged[:num_reqs], staged[num_reqs : 2 * num_reqs], staged[2 * num_reqs :]
        ops.compute_slot_mappings(idx_d, qo_d, clens_d, tables, page_sizes, slot_mappings=slot_mappings,
                                  positions=positions)  # fmt: skip
        for g in range(len(page_sizes)):
            indptr_d = torch.from_numpy(kv_indptr[g][: num_reqs + 1]).to(dev, non_blocking=True)
            ops.write_kv_indices(tables[g], indptr_d, out=kv_indices[g], idx_mapping=idx_d)
        ops.gather_block_tables(idx_d, tables, num_blocks, out=step_tables)
        host_us.append((time.perf_counter() - t0) * 1e6)

        num_tokens = int(qo_indptr[num_reqs])
        keys = torch.randn(num_tokens, heads, head_dim, device=dev)
        for g in range(len(page_sizes)):
            ops.store_kv(keys, keys, slot_mappings[g], k_caches[g], k_caches[g])

        # Check against a per-request Python computation.
        ok = True
        pos_h = positions.cpu().tolist()
        for g, ps in enumerate(page_sizes):
            slots_h = slot_mappings[g].cpu().tolist()
            expect_slots, expect_pos, expect_idx = [], [], []
            for slot, n in batch:
                c = running[slot]["cached"]
                row = host_tables[g][slot]
                expect_pos += list(range(c, c + n))
                expect_slots += _naive_slots(row, range(c, c + n), ps)
                expect_idx += row[: (c + n + ps - 1) // ps]
            ok &= slots_h[:num_tokens] == expect_slots and all(s == -1 for s in slots_h[num_tokens:])
            ok &= pos_h[:num_tokens] == expect_pos
            ok &= kv_indices[g][: kv_indptr[g][num_reqs]].cpu().tolist() == expect_idx
            s = slot_mappings[g][:num_tokens]
            ok &= torch.equal(k_caches[g].view(-1, heads, head_dim)[s], keys)
            for b, (slot, _) in enumerate(batch):
                n_pages = int(num_blocks[g][slot])
                ok &= step_tables[g][b, :n_pages].cpu().tolist() == host_tables[g][slot]
        failures += not ok
        steps += 1
        tokens_total += num_tokens
        n_prefill = sum(1 for s, n in batch if running[s]["cached"] < running[s]["prompt"])
        used = [num_pages[g] - 1 - len(free_pages[g]) for g in range(len(page_sizes))]
        print(f"{steps:>4} {num_reqs:>4} {n_prefill:>7} {num_reqs - n_prefill:>6} {num_tokens:>6} "
              f"{used[0]:>5}/{used[1]:<5}  {'ok' if ok else 'MISMATCH'}")  # fmt: skip

        # Advance: a request finishes after its prompt and its output tokens.
        for slot, n in batch:
            r = running[slot]
            r["cached"] += n
            if r["cached"] >= r["prompt"] + r["output"]:
                for g in range(len(page_sizes)):
                    free_pages[g] += host_tables[g][slot]
                    host_tables[g][slot] = []
                    num_blocks[g][slot] = 0
                del running[slot]
                free_slots.append(slot)

    print()
    print("| steps | tokens | host µs per step (median) | host µs per step (p90) | all checks passed |")
    print("|---:|---:|---:|---:|---|")
    p90 = float(np.percentile(host_us, 90))
    print(f"| {steps} | {tokens_total} | {statistics.median(host_us):.0f} | {p90:.0f} | {failures == 0} |")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
