"""Attention across context-parallel ranks (issue 21, part 2): every step kind, against a single-rank
dense float32 reference; ranks simulated in one process (``cp_partial_attention`` merged with
``ops.correct_attn_out``) and real ranks over gloo (``step.attention`` merging through the group)."""

import math
import multiprocessing
import os
import traceback

import attrs
import numpy as np
import pytest
import torch

from batchmeta import ContextParallel, KVGroup, MetadataConfig, ops
from batchmeta.attention.torch_ref import paged_attention_torch
from batchmeta.context_parallel import local_len, local_position, owner
from batchmeta.metadata import BatchMetadata

MAX_LEN = 160
WINDOW = 24
HQ, HKV, D = 4, 2, 16
NUM_REQS = 6

# A step of each kind: (kind, idx, query_lens); cache_lens are the rows' current lengths.
SCENARIO = [
    ("prefill", [0, 1, 2, 3], [37, 5, 70, 1]),  # nothing cached: ragged
    ("prefill", [1, 0, 3, 4], [1, 20, 1, 33]),  # mixed: decodes beside chunks over a cached prefix
    ("decode", [0, 1, 2, 3, 4], 1),
    ("spec", [3, 2, 0], 3),  # speculative verify: 1 + 3 tokens per row
    ("prefill", [2, 5], [17, 40]),  # chunked prefill: a cached prefix, and a new request beside it
    ("decode", [4, 3, 2], 1),
]


def make_config(cp, page_sizes, backend="torch", device="cpu", dtype=torch.float32, heads=(HQ, HKV, D)):
    full, window = page_sizes
    return MetadataConfig(
        max_num_reqs=NUM_REQS,
        max_num_tokens=256,
        max_model_len=MAX_LEN,
        kv_groups=(KVGroup(page_size=full), KVGroup(page_size=window, window_left=WINDOW)),
        num_qo_heads=heads[0],
        num_kv_heads=heads[1],
        head_dim=heads[2],
        q_dtype=dtype,
        kv_dtype=dtype,
        device=device,
        max_draft_tokens=3,
        context_parallel=cp,
        backend=backend,
    )


class Rank:
    """One rank: its BatchMetadata, page allocator (pages for its local tokens in the sharded group)
    and one layer's caches per group."""

    def __init__(self, meta):
        self.meta = meta
        cfg = meta.config
        dtype, hkv, d = cfg.kv_dtype, cfg.num_kv_heads, cfg.head_dim
        self.cp = cfg.context_parallel
        self.next = [1] * len(cfg.kv_groups)  # page 0 left unused: a stray write would show
        self.held = {}
        dev = cfg.device
        self.caches = []
        for grp in cfg.kv_groups:
            n = NUM_REQS * (-(-MAX_LEN // grp.page_size)) + 2
            shape = (n, grp.page_size, hkv, d)
            self.caches.append(
                (torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev))
            )

    def tokens(self, g, seq_len):
        return local_len(seq_len, self.cp) if self.meta.config.sharded(g) else seq_len

    def grow(self, req, seq_len):
        groups = self.meta.config.kv_groups
        rows = self.held.setdefault(req, [[] for _ in groups])
        new = []
        for g, grp in enumerate(groups):
            need = max(-(-self.tokens(g, seq_len) // grp.page_size) - len(rows[g]), 0)
            pages = list(range(self.next[g], self.next[g] + need))
            self.next[g] += need
            rows[g] += pages
            new.append(pages)
        self.meta.block_tables.append(req, new)

    def stored(self, g, req, length):
        """``(k, v)`` ``[length, Hkv, D]`` of request ``req`` read back from this rank's cache at
        global positions ``[0, length)``, NaN where this rank does not hold the position."""
        ps = self.meta.config.kv_groups[g].page_size
        kc, vc = self.caches[g]
        hkv, d = kc.shape[2:]
        pos = torch.arange(length)
        mine = owner(pos, self.cp) == self.cp.rank if self.meta.config.sharded(g) else torch.ones(length, dtype=bool)
        loc = local_position(pos, self.cp) if self.meta.config.sharded(g) else pos
        out = []
        for cache in (kc, vc):
            vals = torch.full((length, hkv, d), float("nan"))
            for p in pos[mine].tolist():
                page = self.held[req][g][int(loc[p]) // ps]
                vals[p] = cache[page, int(loc[p]) % ps].float().cpu()
            out.append(vals)
        return out


def dense_reference(q, keys, values, idx, qlens, clens, window_left):
    """Single-rank dense float32 attention: token ``i`` of row ``b`` at position ``c + i`` over the
    request's keys at positions ``<= c + i`` (and ``>= c + i - window_left``)."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    rep, d = q.shape[1] // keys.shape[2], q.shape[2]
    t = 0
    for r, q_len, c in zip(idx, qlens, clens, strict=True):
        for i in range(q_len):
            p = c + i
            lo = max(0, p - window_left) if window_left >= 0 else 0
            k = keys[r][lo : p + 1].float().repeat_interleave(rep, dim=1)
            v = values[r][lo : p + 1].float().repeat_interleave(rep, dim=1)
            s = torch.einsum("hd,khd->hk", q[t].float(), k) / math.sqrt(d)
            out[t] = torch.einsum("hk,khd->hd", torch.softmax(s, -1), v)
            t += 1
    return out


def run_case(ranks, merge, seed=0, backend="torch", no_sync=False):
    """Runs SCENARIO on ``ranks`` (every rank, or only this process's one under gloo, all with the
    same data): each stores its step's k/v, ``merge(rank, step, q, caches, k, v, g)`` gives the
    attention output of group ``g``; yields (step number, group, output, reference)."""
    cfg = ranks[0].meta.config
    dev, dtype, hq, hkv, d = cfg.device, cfg.q_dtype, cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim
    gen = torch.Generator().manual_seed(seed)
    # The model's keys and values, rounded once to the caches' dtype: what every rank stores.
    keys = {g: torch.randn(NUM_REQS, MAX_LEN, hkv, d, generator=gen).to(dtype).float() for g in range(2)}
    values = {g: torch.randn(NUM_REQS, MAX_LEN, hkv, d, generator=gen).to(dtype).float() for g in range(2)}
    lens = {}
    # On a GPU: no host sync in preparing the steps and attending (what an engine runs per step).
    sync_mode = torch.cuda.set_sync_debug_mode if no_sync else (lambda mode: None)
    for n, (kind, idx, q) in enumerate(SCENARIO):
        clens = [lens.get(r, 0) for r in idx]
        qlens = list(q) if kind == "prefill" else [q] * len(idx)
        pos = [(r, c + i) for r, c, q_len in zip(idx, clens, qlens, strict=True) for i in range(q_len)]
        q_t = torch.randn(len(pos), hq, d, generator=gen).to(dtype).float()
        steps = []
        sync_mode("error")
        for rank in ranks:
            for r, c, q_len in zip(idx, clens, qlens, strict=True):
                rank.grow(r, c + q_len)
            if kind == "prefill":
                steps.append(rank.meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens))
            else:
                steps.append(rank.meta.prepare_decode(idx, clens, num_draft_tokens=q - 1))
        sync_mode(0)
        for g in range(2):
            k_new = torch.stack([keys[g][r, p] for r, p in pos]).to(dev, dtype)
            v_new = torch.stack([values[g][r, p] for r, p in pos]).to(dev, dtype)
            q_dev = q_t.to(dev, dtype)
            sync_mode("error")
            for rank, step in zip(ranks, steps, strict=True):
                ops.store_kv(k_new, v_new, step.slot_mappings[g], *rank.caches[g], backend=backend)
            got = merge(ranks, steps, q_dev, k_new, v_new, g)
            sync_mode(0)
            ref = dense_reference(q_t, keys[g], values[g], idx, qlens, clens, [-1, WINDOW][g])
            yield n, g, got, ref
        for r, q_len in zip(idx, qlens, strict=True):
            lens[r] = lens.get(r, 0) + q_len
    # The union of the ranks' stored KV equals the single-rank cache: every position held by its
    # owner (sharded group) or by every rank (window group), with the keys and values written.
    for g in range(2):
        for r, length in lens.items():
            for rank in ranks:
                k, v = rank.stored(g, r, length)
                held = ~torch.isnan(k[:, 0, 0])
                want = (
                    owner(torch.arange(length), rank.cp) == rank.cp.rank if g == 0 else torch.ones(length, dtype=bool)
                )
                assert torch.equal(held, want), (g, r, rank.cp.rank)
                assert torch.equal(k[held], keys[g][r, :length][held])
                assert torch.equal(v[held], values[g][r, :length][held])


def merge_simulated(ranks, steps, q, k, v, g, backend="torch"):
    """Every rank's ``cp_partial_attention`` merged with ``ops.correct_attn_out`` and summed (sharded
    group); rank 0's ``attention`` (window group, the same on every rank)."""
    if not ranks[0].meta.config.sharded(g):
        outs = [s.attention(q, *rk.caches[g], group=g, k=k, v=v) for rk, s in zip(ranks, steps, strict=True)]
        for o in outs[1:] if not q.is_cuda else ():  # (comparing on the GPU would sync)
            assert torch.equal(o, outs[0])
        return outs[0]
    parts = [s.cp_partial_attention(q, *rk.caches[g], group=g, k=k, v=v) for rk, s in zip(ranks, steps, strict=True)]
    lses = torch.stack([lse for _, lse in parts])
    total = torch.zeros_like(q, dtype=torch.float32)
    for rank, (out, _) in enumerate(parts):
        total += ops.correct_attn_out(out.clone(), lses, rank, backend=backend)[0].float()
    return total


@pytest.mark.parametrize("page_sizes", [(16, 1), (1, 16)], ids=["full16-win1", "full1-win16"])
@pytest.mark.parametrize("interleave", [1, 16])
@pytest.mark.parametrize("world_size", [2, 4])
def test_simulated_ranks_equal_dense_reference(world_size, interleave, page_sizes):
    ranks = [
        Rank(BatchMetadata(make_config(ContextParallel(world_size, r, interleave=interleave), page_sizes)))
        for r in range(world_size)
    ]
    for n, g, got, ref in run_case(ranks, merge_simulated):
        torch.testing.assert_close(got.float().cpu(), ref, atol=1e-5, rtol=1e-5, msg=f"step {n}, group {g}")


def test_simulated_ranks_on_the_triton_backend():
    """The same on the Triton kernels (the interpreter on the CPU): the step kernel, and the cached
    pages gathered from the block table by ``ops.write_kv_indices``."""
    ranks = [Rank(BatchMetadata(make_config(ContextParallel(2, r), (16, 1), backend="triton"))) for r in range(2)]
    for n, g, got, ref in run_case(ranks, merge_simulated, backend="triton"):
        torch.testing.assert_close(got.float().cpu(), ref, atol=1e-5, rtol=1e-5, msg=f"step {n}, group {g}")


@pytest.mark.gpu
@pytest.mark.parametrize("page_sizes", [(16, 1), (1, 16)], ids=["full16-win1", "full1-win16"])
@pytest.mark.parametrize("interleave", [1, 16])
@pytest.mark.parametrize("world_size", [2, 4])
def test_gpu_simulated_ranks_equal_single_rank_flashinfer(world_size, interleave, page_sizes):
    """On a GPU, bf16, FlashInfer planned: the ranks simulated in one process (``cp_partial_attention``
    merged with ``ops.correct_attn_out``) equal a single-rank step's FlashInfer attention, with no host
    sync in preparing the steps, storing the KV and attending."""

    def config(cp):
        return make_config(cp, page_sizes, backend=None, device="cuda", dtype=torch.bfloat16, heads=(8, 2, 64))

    single = Rank(BatchMetadata(config(ContextParallel(1, 0))))
    ranks = [
        Rank(BatchMetadata(config(ContextParallel(world_size, r, interleave=interleave)))) for r in range(world_size)
    ]
    pairs = []

    def merge(all_ranks, steps, q, k, v, g):
        want = steps[0].attention(q, *all_ranks[0].caches[g], group=g, k=k, v=v)
        got = merge_simulated(all_ranks[1:], steps[1:], q, k, v, g, backend=None)
        assert all(s.wrappers is not None for s in steps)  # FlashInfer planned (None where sharded)
        pairs.append((want, got))
        return got

    for n, g, got, ref in run_case([single, *ranks], merge, backend=None, no_sync=True):
        want, got = pairs.pop()
        msg = f"step {n}, group {g}"
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2, msg=msg)
        torch.testing.assert_close(got.float().cpu(), ref, atol=2e-2, rtol=2e-2, msg=msg)


def test_world_size_one_attention_is_unchanged():
    """No sharding: ``attention`` is today's, needs no ``k``/``v`` and no process group."""
    ranks = [Rank(BatchMetadata(make_config(ContextParallel(1, 0), (16, 1))))]

    def merge(ranks, steps, q, k, v, g):
        if steps[0].kind == "ragged_prefill":
            return steps[0].attention(q, *ranks[0].caches[g], group=g, k=k, v=v)
        return steps[0].attention(q, *ranks[0].caches[g], group=g)  # the cache alone

    for n, g, got, ref in run_case(ranks, merge):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=f"step {n}, group {g}")


def test_missing_new_keys_or_process_group_are_rejected():
    meta = BatchMetadata(make_config(ContextParallel(2, 1), (16, 1)))
    rank = Rank(meta)
    rank.grow(0, 10)
    step = meta.prepare_decode([0], [7], num_draft_tokens=2)
    q = torch.zeros(3, HQ, D)
    k = torch.zeros(3, HKV, D)
    kc, vc = rank.caches[0]
    with pytest.raises(ValueError, match=r"^k, v: KV-cache group 0 is sharded"):
        step.attention(q, kc, vc, group=0)
    with pytest.raises(ValueError, match=r"^k, v: KV-cache group 0 is sharded"):
        step.cp_partial_attention(q, kc, vc, group=0, k=k)
    with pytest.raises(ValueError, match=r"^k: expected shape"):
        step.attention(q, kc, vc, group=0, k=k[:2], v=k)
    with pytest.raises(ValueError, match=r"^cp_group: torch.distributed is not initialised"):
        step.attention(q, kc, vc, group=0, k=k, v=k)
    with pytest.raises(ValueError, match=r"^group: KV-cache group 1 is not sharded"):
        step.cp_partial_attention(q, *rank.caches[1], group=1, k=k, v=k)
    # The window group is not sharded: today's attention, no k / v needed.
    step.attention(q, *rank.caches[1], group=1)


def test_paged_attention_torch_lse_matches_a_naive_loop():
    gen = torch.Generator().manual_seed(3)
    ps, lens, qlens = 4, [9, 0, 5], [3, 2, 1]
    pages = [[1, 2, 3], [], [5, 4]]
    kc = torch.randn(8, ps, HKV, D, generator=gen)
    vc = torch.randn(8, ps, HKV, D, generator=gen)
    q = torch.randn(sum(qlens), HQ, D, generator=gen)
    qo = np.cumsum([0, *qlens]).astype(np.int32)
    kv_indptr = np.cumsum([0, *[len(p) for p in pages]]).astype(np.int32)
    last = np.array([(n - 1) % ps + 1 if n else 0 for n in lens], np.int32)
    indices = torch.tensor([p for row in pages for p in row], dtype=torch.int32)
    for causal in (False, True):
        out, lse = paged_attention_torch(
            q, kc, vc, qo, kv_indptr, indices, last, causal=causal, logits_soft_cap=5.0, return_lse=True
        )
        assert torch.equal(
            out, paged_attention_torch(q, kc, vc, qo, kv_indptr, indices, last, causal=causal, logits_soft_cap=5.0)
        )
        for b, (n, q_len) in enumerate(zip(lens, qlens, strict=True)):
            keys = torch.cat([kc[p] for p in pages[b]])[:n] if n else torch.zeros(0, HKV, D)
            for i in range(q_len):
                t = int(qo[b]) + i
                for h in range(HQ):
                    seen = n - q_len + i + 1 if causal else n
                    if seen <= 0:
                        assert lse[t, h] == float("-inf")
                        continue
                    logits = keys[:seen, h // (HQ // HKV)] @ q[t, h] / math.sqrt(D)
                    logits = 5.0 * torch.tanh(logits / 5.0)
                    torch.testing.assert_close(lse[t, h], torch.logsumexp(logits, 0))


# --------------------------------------------------------------------------------------------------
# Real ranks: gloo processes
# --------------------------------------------------------------------------------------------------
def _gloo_worker(rank, world_size, init_file, errors):
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            torch.set_num_threads(1)
            for interleave in (1, 16):
                for page_sizes in ((16, 1), (1, 16)):
                    cp = ContextParallel(world_size, rank, interleave=interleave)
                    group = dist.new_group(list(range(world_size)))  # given explicitly on one, the world on the other
                    given = page_sizes == (16, 1)
                    me = Rank(BatchMetadata(make_config(cp, page_sizes), cp_group=group if given else None))

                    def merge(ranks, steps, q, k, v, g):
                        return steps[0].attention(q, *ranks[0].caches[g], group=g, k=k, v=v)

                    for n, g, got, ref in run_case([me], merge):
                        torch.testing.assert_close(
                            got,
                            ref,
                            atol=1e-5,
                            rtol=1e-5,
                            msg=f"rank {rank}, {interleave=}, {page_sizes=}, step {n}, group {g}",
                        )
        finally:
            dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


@pytest.mark.parametrize("world_size", [2, 4])
def test_gloo_ranks_attention_equals_dense_reference(world_size, tmp_path):
    """``world_size`` processes, each one rank over gloo: every step kind, interleave 1 and 16, page
    sizes 1 and 16 in a sharded group beside a sliding-window one; each rank's merged output equals
    the single-rank dense reference, and the union of the ranks' stored KV the single-rank cache."""
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    procs = [
        ctx.Process(target=_gloo_worker, args=(r, world_size, str(tmp_path / "init"), errors))
        for r in range(world_size)
    ]
    # The ranks run as a CPU engine does: torch, not Triton's interpreter (which they would inherit
    # from conftest, at up to seconds a launch).
    interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        for p in procs:
            p.start()
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    for p in procs:
        p.join(timeout=300)
    for p in procs:
        if p.is_alive():
            p.kill()
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert not msgs, "\n".join(msgs)
    assert [p.exitcode for p in procs] == [0] * world_size


def test_a_process_group_that_does_not_match_context_parallel_is_rejected(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        meta = BatchMetadata(make_config(ContextParallel(2, 0), (16, 1)))
        rank = Rank(meta)
        rank.grow(0, 10)
        step = meta.prepare_decode([0], [7])
        q, k = torch.zeros(1, HQ, D), torch.zeros(1, HKV, D)
        with pytest.raises(ValueError, match=r"^cp_group: expected a process group of context_parallel.world_size 2"):
            step.attention(q, *rank.caches[0], group=0, k=k, v=k)  # the world: one rank
    finally:
        dist.destroy_process_group()


def attrs_of(cfg):
    return attrs.asdict(cfg, recurse=False)


@pytest.mark.parametrize("interleave", [1, 16])
def test_token_history_under_context_parallelism_feeds_back_as_on_one_rank(interleave):
    """With ``token_history=True`` every rank gathers the step's ``input_ids`` from its own history,
    fed by ``accept_tokens``: prompts staged in chunks, prefill, mixed, decode and verify steps; every
    rank's ``input_ids``, ``positions`` and history equal one rank's (they are global, like the
    queries), and each rank's slots are its own share."""
    world = 2

    def meta_of(cp):
        return BatchMetadata(
            MetadataConfig(**{**attrs_of(make_config(cp, (16, 1))), "token_history": True, "max_num_reqs": 4})
        )

    single = Rank(meta_of(ContextParallel(1, 0)))
    ranks = [Rank(meta_of(ContextParallel(world, r, interleave=interleave))) for r in range(world)]
    everyone = [single, *ranks]
    gen = np.random.default_rng(interleave)
    prompts = {r: gen.integers(1, 1000, int(n)).tolist() for r, n in enumerate([45, 3, 70])}
    lens = dict.fromkeys(prompts, 0)
    for r, p in prompts.items():
        for rank in everyone:
            rank.meta.stage_prompt(r, p)
    plan = [([0, 1, 2], [30, 3, 40], "prefill"), ([0, 2, 1], [15, 30, 1], "prefill"), ([0, 1, 2], 1, "decode")]
    plan += [([2, 0], 3, "spec"), ([1, 0, 2], 1, "decode")]
    for idx, q, kind in plan:
        clens = [lens[r] for r in idx]
        qlens = list(q) if kind == "prefill" else [q] * len(idx)
        steps = []
        for rank in everyone:
            for r, c, n in zip(idx, clens, qlens, strict=True):
                rank.grow(r, c + n)
            if kind == "prefill":
                steps.append(rank.meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens))
            else:
                steps.append(rank.meta.prepare_decode(idx, clens, num_draft_tokens=q - 1))
        for step in steps[1:]:
            assert torch.equal(step.input_ids, steps[0].input_ids), (kind, idx)
            assert torch.equal(step.positions, steps[0].positions), (kind, idx)
        # Each token's slot is on exactly one rank (the sharded group), as on one rank overall.
        owned = torch.stack([s.slot_mappings[0][: s.num_tokens] >= 0 for s in steps[1:]])
        assert torch.equal(owned.sum(0), torch.ones(steps[0].num_tokens, dtype=torch.int64))
        # The same "model": next tokens from the input ids; a verify step accepts a count per row.
        num_rows = len(idx)
        width = q if kind == "spec" else 1
        sampled = (steps[0].input_ids[: steps[0].num_tokens].view(-1)[-num_rows * width :] * 7 + 3) % 1000
        sampled = sampled.view(num_rows, width) if kind == "spec" else sampled
        counts = [1 + (r % width) for r in idx] if kind == "spec" else [1] * num_rows
        prompt_lens = [len(prompts[r]) for r in idx]
        new_lens = [
            rank.meta.accept_tokens(step, None, sampled, counts, prompt_lens).cache_lens
            for rank, step in zip(everyone, steps, strict=True)
        ]
        for got in new_lens[1:]:
            assert np.array_equal(got, new_lens[0])
        for r, c in zip(idx, new_lens[0].tolist(), strict=True):
            lens[r] = c
        for rank in ranks:
            assert torch.equal(rank.meta.token_ids, single.meta.token_ids)


def test_draft_rounds_are_rejected_under_context_parallelism():
    cfg = MetadataConfig(**{**attrs_of(make_config(ContextParallel(2, 0), (16, 1))), "token_history": True})
    meta = BatchMetadata(cfg)
    with pytest.raises(ValueError, match=r"^context_parallel: draft rounds are not supported yet"):
        meta.prepare_draft([0], [4], num_steps=2)


def test_lora_metadata_under_context_parallelism_is_one_ranks():
    """Multi-LoRA segments are per token, whatever rank holds its KV: every rank's ``step.lora``
    equals one rank's, for a prefill and a decode step over a mix of adapters."""

    def meta_of(cp):
        fields = {**attrs_of(make_config(cp, (16, 1))), "max_loras": 3, "max_lora_rank": 8}
        return BatchMetadata(MetadataConfig(**fields))

    everyone = [Rank(meta_of(ContextParallel(1, 0)))] + [Rank(meta_of(ContextParallel(2, r))) for r in range(2)]
    for rank in everyone:
        for req, adapter in [(0, 2), (1, None), (2, 0), (3, 2)]:
            rank.meta.lora.set_adapter(req, adapter, None if adapter is None else 8)
    idx, qlens = [0, 1, 2, 3], [30, 5, 17, 1]
    fields = ("token_lora", "token_perm", "token_perm_inv", "row_lora", "seg_indptr", "seg_lora", "seg_rank")
    for kind in ("prefill", "decode"):
        steps = []
        for rank in everyone:
            for r, q in zip(idx, qlens, strict=True):
                rank.grow(r, q + (kind == "decode"))
            if kind == "prefill":
                steps.append(rank.meta.prepare_prefill(idx, query_lens=qlens, cache_lens=[0] * 4))
            else:
                steps.append(rank.meta.prepare_decode(idx, qlens))
        for step in steps[1:]:
            for name in fields:
                assert torch.equal(getattr(step.lora, name), getattr(steps[0].lora, name)), (kind, name)
            assert step.lora.num_active == steps[0].lora.num_active == 2


@pytest.mark.gpu
@pytest.mark.parametrize("world_size, interleave, page_size", [(2, 1, 16), (4, 16, 1), (2, 16, 16)])
def test_gpu_decode_graphs_under_context_parallelism(world_size, interleave, page_size):
    """CUDA-graph decode under context parallelism, ranks simulated in one process: each rank's
    captured graph (``store_kv`` and ``cp_partial_attention`` of the sharded group) replayed over
    changing batches, padded to the captured sizes, merged with ``ops.correct_attn_out``, equals
    single-rank FlashInfer and the dense float32 reference; no host sync in preparing and
    replaying; rows holding none of their context on a rank (short ones) included."""
    heads, dtype, dev = (8, 2, 64), torch.bfloat16, "cuda"

    def config(cp):
        cfg = make_config(cp, (page_size, 16), backend=None, device=dev, dtype=dtype, heads=heads)
        return attrs.evolve(cfg, cuda_graph_batch_sizes=(4, NUM_REQS))

    single = Rank(BatchMetadata(config(ContextParallel(1, 0))))
    ranks = [
        Rank(BatchMetadata(config(ContextParallel(world_size, r, interleave=interleave)))) for r in range(world_size)
    ]
    hq, hkv, d = heads
    gen = torch.Generator().manual_seed(world_size * 100 + interleave + page_size)
    keys = torch.randn(NUM_REQS, MAX_LEN, hkv, d, generator=gen).to(dtype)
    values = torch.randn(NUM_REQS, MAX_LEN, hkv, d, generator=gen).to(dtype)
    q_s = torch.zeros(NUM_REQS, hq, d, dtype=dtype, device=dev)
    k_s = torch.zeros(NUM_REQS, hkv, d, dtype=dtype, device=dev)
    v_s = torch.zeros(NUM_REQS, hkv, d, dtype=dtype, device=dev)
    outs = torch.zeros(world_size, NUM_REQS, hq, d, dtype=dtype, device=dev)
    lses = torch.zeros(world_size, NUM_REQS, hq, dtype=torch.float32, device=dev)

    def forward_of(i, rank):
        def forward(step):
            n = step.padded_num_reqs
            ops.store_kv(k_s[:n], v_s[:n], step.slot_mappings[0], *rank.caches[0])
            out, lse = step.cp_partial_attention(q_s[:n], *rank.caches[0], group=0, k=k_s[:n], v=v_s[:n])
            outs[i, :n].copy_(out)
            lses[i, :n].copy_(lse)

        return forward

    for i, rank in enumerate(ranks):
        for bs in (4, NUM_REQS):
            rank.meta.capture_decode_graph(bs, forward_of(i, rank))
        with pytest.raises(ValueError, match=r"^context_parallel: CUDA graphs of speculative verify steps"):
            rank.meta.capture_decode_graph(4, forward_of(i, rank), num_draft_tokens=1)
    # Prompts of 1 to 60 tokens (rows of one token hold nothing cached on most ranks), stored eagerly.
    prompt = {0: 1, 1: 2, 2: 60, 3: 17, 4: 33, 5: 5}
    for rank in [single, *ranks]:
        idx = list(prompt)
        for r in idx:
            rank.grow(r, prompt[r])
        step = rank.meta.prepare_prefill(idx, query_lens=list(prompt.values()), cache_lens=[0] * len(idx))
        k = torch.cat([keys[r, : prompt[r]] for r in idx]).to(dev)
        v = torch.cat([values[r, : prompt[r]] for r in idx]).to(dev)
        ops.store_kv(k, v, step.slot_mappings[0], *rank.caches[0])
    lens = dict(prompt)
    for batch in ([0, 1, 2], [3, 1, 0, 4, 5], [2], [5, 4, 3, 2, 1, 0], [1, 0, 5, 3]):
        b = len(batch)
        clens = [lens[r] for r in batch]
        q = torch.randn(b, hq, d, generator=gen).to(dtype)
        k = torch.stack([keys[r, c] for r, c in zip(batch, clens, strict=True)])
        v = torch.stack([values[r, c] for r, c in zip(batch, clens, strict=True)])
        q_s.zero_(), k_s.zero_(), v_s.zero_()
        q_s[:b], k_s[:b], v_s[:b] = q.to(dev), k.to(dev), v.to(dev)
        for rank in [single, *ranks]:
            for r, c in zip(batch, clens, strict=True):
                rank.grow(r, c + 1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for rank in ranks:
                step = rank.meta.prepare_decode(batch, clens, cuda_graph=True)
                assert step.padded_num_reqs == (4 if b <= 4 else NUM_REQS)
                rank.meta.replay_decode_graph(step)
            n = step.padded_num_reqs
            total = torch.zeros(n, hq, d, dtype=torch.float32, device=dev)
            for i in range(world_size):
                total += ops.correct_attn_out(outs[i, :n].clone(), lses[:, :n].contiguous(), i)[0].float()
            one = single.meta.prepare_decode(batch, clens)
            ops.store_kv(k_s[:b], v_s[:b], one.slot_mappings[0], *single.caches[0])
            want = one.attention(q_s[:b], *single.caches[0], group=0)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        ref = dense_reference(q, keys, values, batch, [1] * b, clens, -1)
        msg = f"batch {batch}"
        torch.testing.assert_close(total[:b], want.float(), atol=2e-2, rtol=2e-2, msg=msg)
        torch.testing.assert_close(total[:b].cpu(), ref, atol=2e-2, rtol=2e-2, msg=msg)
        for r, c in zip(batch, clens, strict=True):
            lens[r] = c + 1
    # Every rank stored each decode token once across the ranks, where its owner keeps it.
    for rank in ranks:
        for r, length in lens.items():
            k, _ = rank.stored(0, r, length)
            held = ~torch.isnan(k[:, 0, 0])
            assert torch.equal(held, owner(torch.arange(length), rank.cp) == rank.cp.rank)
            assert torch.equal(k[held], keys[r, :length].float()[held])


@pytest.mark.parametrize("soft_cap", [0.0, 5.0])
def test_decode_new_token_part_is_attention_over_the_own_key(soft_cap):
    """A decode step's part B without a kernel (each query over its own key alone) equals the
    torch paged attention over one-token pages, lse included (natural log), with GQA and a soft cap."""
    from batchmeta.context_parallel import _own_key_attention

    gen = torch.Generator().manual_seed(3)
    t, hq, hkv, d = 5, 8, 2, 16
    q = torch.randn(t, hq, d, generator=gen)[:, :, :].transpose(0, 1).contiguous().transpose(0, 1)  # strided
    k, v = torch.randn(t + 2, hkv, d, generator=gen), torch.randn(t + 2, hkv, d, generator=gen)
    out, lse = _own_key_attention(q, k, v, 0.3, soft_cap)
    want, want_lse = paged_attention_torch(
        q,
        k[:t].unsqueeze(1),
        v[:t].unsqueeze(1),
        np.arange(t + 1),
        np.arange(t + 1),
        torch.arange(t),
        np.ones(t, np.int32),
        causal=True,
        sm_scale=0.3,
        logits_soft_cap=soft_cap,
        return_lse=True,
    )
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
