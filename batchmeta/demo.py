"""A small serving loop on :class:`~batchmeta.BatchMetadata`: ``python -m batchmeta.demo``.

Requests arrive with random prompt and output lengths. A scheduler allocates pages from a free list
(two KV-cache groups: full attention with 16-token pages, and a sliding window with 4-token pages),
chunks prefills under a token budget beside running decodes, and frees pages when a request
finishes. A two-layer random-weight attention model (one layer per group) runs every step through
``store_kv`` and the planned attention of ``batchmeta.current_step()``; on a GPU decode-only steps
replay CUDA graphs. On sampled steps every layer's attention is checked against a dense float32
reference kept on the side. Runs on the CPU (torch fallbacks) when there is no GPU.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np
import torch

import batchmeta
from batchmeta import BatchMetadata, KVGroup, MetadataConfig, ops


class TinyModel:
    """Embedding, ``len(layer_groups)`` attention layers (residual), tied unembedding."""

    def __init__(self, cfg: MetadataConfig, num_pages: int, vocab: int, dtype: torch.dtype, seed: int):
        gen = torch.Generator().manual_seed(seed)
        hq, hkv, d = cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim
        self.hidden = hq * d
        self.dtype = dtype
        dev = cfg.device

        def w(*shape, scale):
            return (torch.randn(*shape, generator=gen) * scale).to(device=dev, dtype=dtype)

        self.emb = w(vocab, self.hidden, scale=1.0)
        self.layer_groups = list(range(len(cfg.kv_groups)))
        s = 1 / math.sqrt(self.hidden)
        self.layers = [
            dict(
                wq=w(self.hidden, hq * d, scale=s),
                wk=w(self.hidden, hkv * d, scale=s),
                wv=w(self.hidden, hkv * d, scale=s),
                wo=w(hq * d, self.hidden, scale=s),
            )
            for _ in self.layer_groups
        ]
        self.caches = [
            (
                torch.zeros(num_pages, grp.page_size, hkv, d, dtype=dtype, device=dev),
                torch.zeros(num_pages, grp.page_size, hkv, d, dtype=dtype, device=dev),
            )
            for grp in cfg.kv_groups
        ]
        self.shape = (hq, hkv, d)

    def forward(self, tokens: torch.Tensor, record: list | None = None) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` of ``tokens`` ``[T]``; ``record`` gets (q, k, v, attn) per layer."""
        step = batchmeta.current_step()  # what an attention layer deep in a model does
        hq, hkv, d = self.shape
        x = self.emb[tokens]
        t = x.shape[0]
        for layer, g in zip(self.layers, self.layer_groups, strict=True):
            q = (x @ layer["wq"]).view(t, hq, d)
            k = (x @ layer["wk"]).view(t, hkv, d)
            v = (x @ layer["wv"]).view(t, hkv, d)
            k_cache, v_cache = self.caches[g]
            ops.store_kv(k, v, step.slot_mappings[g], k_cache, v_cache)
            a = step.attention(q, k_cache, v_cache, group=g, k=k, v=v)
            if record is not None:
                record.append((q, k, v, a))
            x = x + a.reshape(t, hq * d) @ layer["wo"]
        return x


def _dense_attention(q, k, v, window_left):
    """float32 causal attention of the last ``len(q)`` positions over all of ``k``/``v``."""
    n, length = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(rep, 1)
    v = v.float().repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k) / math.sqrt(q.shape[-1])
    qpos = torch.arange(length - n, length, device=q.device)[:, None]
    kpos = torch.arange(length, device=q.device)[None, :]
    mask = kpos <= qpos
    if window_left >= 0:
        mask &= kpos >= qpos - window_left
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)


class _Progress:
    """A one-line progress bar on stderr, redrawn with ``\\r``; draws nothing unless enabled."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.start = total, enabled, time.perf_counter()
        self.last = 0.0

    def update(self, done: int, steps: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.2 and done < self.total):
            return
        self.last = now
        filled = int(30 * done / self.total)
        rate = steps / max(time.perf_counter() - self.start, 1e-9)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} requests, {steps} steps, {rate:.0f} steps/s"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _stderr_is_tty() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batchmeta.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-num-reqs", type=int, default=8)
    parser.add_argument("--token-budget", type=int, default=128)
    parser.add_argument("--check-every", type=int, default=4, help="check attention every N steps (and the last)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if on_gpu else "cpu")
    use_graphs = on_gpu and not args.no_cuda_graphs
    rng = np.random.default_rng(args.seed)
    num_pages = 1024
    graph_sizes = tuple(s for s in (1, 2, 4, 8, 16, 32) if s <= args.max_num_reqs)
    dtype = torch.float16 if on_gpu else torch.float32  # float32 on the CPU: nothing is planned there
    cfg = MetadataConfig(
        max_num_reqs=args.max_num_reqs,
        max_num_tokens=args.token_budget,
        max_model_len=512,
        kv_groups=(KVGroup(page_size=16), KVGroup(page_size=4, window_left=32)),
        num_qo_heads=4,
        num_kv_heads=2,
        head_dim=64,
        q_dtype=dtype,
        kv_dtype=dtype,
        device=dev,
        num_kv_pages=num_pages,
        cuda_graph_batch_sizes=graph_sizes if use_graphs else (),
    )
    meta = BatchMetadata(cfg)
    model = TinyModel(cfg, num_pages, vocab=1000, dtype=dtype, seed=args.seed)
    groups = cfg.kv_groups

    # Static buffers for the CUDA graphs: input tokens in, hidden states and per-layer q/k/v/attn out.
    bmax = args.max_num_reqs
    tok_buf = torch.zeros(bmax, dtype=torch.long, device=dev)
    out_buf = torch.zeros(bmax, model.hidden, dtype=dtype, device=dev)
    rec_bufs: list[list[torch.Tensor]] = []

    def graph_forward(step):
        n = step.padded_num_reqs
        rec: list = []
        out_buf[:n] = model.forward(tok_buf[:n], rec)
        if not rec_bufs:
            rec_bufs.extend([[torch.zeros((bmax, *t.shape[1:]), dtype=t.dtype, device=dev) for t in r] for r in rec])
        for bufs, r in zip(rec_bufs, rec, strict=True):
            for buf, t in zip(bufs, r, strict=True):
                buf[:n] = t

    if use_graphs:
        for s in graph_sizes:
            meta.capture_decode_graph(s, graph_forward)

    waiting = [
        dict(prompt=rng.integers(0, 1000, int(rng.integers(8, 200))).tolist(), output=int(rng.integers(4, 40)))
        for _ in range(args.requests)
    ]
    running: dict[int, dict] = {}  # request slot (req_idx) -> request state
    free_req_idxs = list(range(args.max_num_reqs))
    free_pages = [list(range(num_pages - 1, 0, -1)) for _ in groups]  # page 0: CUDA-graph padding
    steps = tokens_total = checks = failures = graph_steps = finished = 0
    prepare_us: list[float] = []
    # Redraw the bar only on a terminal: in a log file every `\r` update would be kept.
    progress = _Progress(args.requests, enabled=not args.no_progress and _stderr_is_tty())

    while waiting or running:
        while waiting and free_req_idxs:
            r = waiting.pop()
            r.update(tokens=list(r["prompt"]), cached=0, dense=[([], []) for _ in model.layers])
            running[free_req_idxs.pop()] = r
        # Schedule: every decode (1 token), then prefill chunks within the remaining budget.
        batch, budget = [], args.token_budget
        order = sorted(running.items(), key=lambda kv: kv[1]["cached"] < len(kv[1]["prompt"]))
        for req_idx, r in order:
            n = 1 if r["cached"] >= len(r["prompt"]) else min(len(r["prompt"]) - r["cached"], budget)
            if 0 < n <= budget:
                batch.append((req_idx, n))
                budget -= n
        if not batch:
            raise RuntimeError("demo scheduler: nothing schedulable; the token budget is below one decode per request")
        for req_idx, n in batch:  # pages for cached + new tokens, staged on the host
            r = running[req_idx]
            new = []
            for g, grp in enumerate(groups):
                need = -(-(r["cached"] + n) // grp.page_size) - meta.block_tables.num_pages(req_idx, g)
                new.append([free_pages[g].pop() for _ in range(max(need, 0))])
            meta.block_tables.append(req_idx, new)

        idx = [s for s, _ in batch]
        qlens = [n for _, n in batch]
        clens = [running[s]["cached"] for s in idx]
        tokens = torch.tensor(
            [t for s, n in batch for t in running[s]["tokens"][running[s]["cached"] :][:n]],
            dtype=torch.long,
            device=dev,
        )
        decode_only = all(q == 1 for q in qlens) and all(running[s]["cached"] >= len(running[s]["prompt"]) for s in idx)
        check = steps % args.check_every == 0 or len(running) == 1
        t0 = time.perf_counter()
        if decode_only:
            ctx = meta.prepare_decode(idx, clens, cuda_graph=use_graphs)
        else:
            ctx = meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens)
        with ctx as step:
            prepare_us.append((time.perf_counter() - t0) * 1e6)
            if step.cuda_graph:
                tok_buf[: len(idx)] = tokens
                meta.replay_decode_graph(step)
                hidden = out_buf[: len(idx)]
                rec = [[t[: len(idx)] for t in bufs] for bufs in rec_bufs]
                graph_steps += 1
            else:
                rec = []
                hidden = model.forward(tokens, rec)
            next_tokens = (hidden[step.logits_indices.long()] @ model.emb.T).argmax(-1).tolist()

        # Keep the dense reference, and check attention against it on sampled steps.
        ok = True
        for li, (q, k, v, a) in enumerate(rec):
            off = 0
            for req_idx, n in batch:
                dk, dv = running[req_idx]["dense"][li]
                dk.append(k[off : off + n].float())
                dv.append(v[off : off + n].float())
                if check:
                    ref = _dense_attention(
                        q[off : off + n], torch.cat(dk), torch.cat(dv), groups[model.layer_groups[li]].window_left
                    )
                    ok &= torch.allclose(a[off : off + n].float(), ref, rtol=2e-2, atol=2e-2)
                off += n
        checks += check
        failures += check and not ok

        for (req_idx, n), nxt in zip(batch, next_tokens, strict=True):
            r = running[req_idx]
            r["cached"] += n
            if r["cached"] >= len(r["prompt"]):
                r["tokens"].append(nxt)
            if r["cached"] >= len(r["prompt"]) + r["output"]:
                for g in range(len(groups)):
                    free_pages[g] += meta.block_tables.pages(req_idx, g).tolist()
                meta.block_tables.reset(req_idx)
                del running[req_idx]
                free_req_idxs.append(req_idx)
                finished += 1
        steps += 1
        tokens_total += len(tokens)
        progress.update(finished, steps)
    progress.close()

    p90 = float(np.percentile(prepare_us, 90))
    mode = "CUDA graphs for decode" if use_graphs else "eager"
    sizes = [g.page_size for g in groups]
    print(
        f"batchmeta demo on {dev} ({mode}): {args.requests} requests, page sizes {sizes}, "
        f"window {groups[1].window_left}"
    )
    print()
    print("| steps | graph steps | tokens | host µs per prepare (median) | (p90) | checked steps | all checks passed |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    print(
        f"| {steps} | {graph_steps} | {tokens_total} | {statistics.median(prepare_us):.0f} | {p90:.0f} | "
        f"{checks} | {failures == 0} |"
    )
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
