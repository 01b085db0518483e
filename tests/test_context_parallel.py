"""Context parallelism (issue 21, part 1): the config, the position maps, and each rank's step metadata
against a naive per-request loop; across the ranks every token is stored exactly once."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import batchmeta
from batchmeta import MLA, ContextParallel, KVGroup, MetadataConfig
from batchmeta.context_parallel import local_len, local_position, owner
from batchmeta.host_path import COMPILED
from batchmeta.metadata import BatchMetadata

MAX_LEN = 160  # > 4 ranks x interleave 16 x 2: several rounds of every layout
WINDOW = 24


def naive_owner(p, n, i):
    return (p // i) % n  # the definition, token by token


def naive_local_len(length, rank, n, i):
    return sum(1 for p in range(length) if naive_owner(p, n, i) == rank)


def naive_local_position(p, n, i):
    """Where ``p`` lies in its owner's share: how many positions before it the owner holds."""
    return naive_local_len(p, naive_owner(p, n, i), n, i)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"world_size": 0, "rank": 0}, "world_size"),
        ({"world_size": 2, "rank": 2}, "rank"),
        ({"world_size": 2, "rank": -1}, "rank"),
        ({"world_size": 2, "rank": 0, "interleave": 0}, "interleave"),
    ],
)
def test_context_parallel_rejects_values_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        ContextParallel(**kwargs)


def test_context_parallel_rejects_non_ints_and_is_frozen():
    for kwargs, name in (({"world_size": True, "rank": 0}, "world_size"), ({"world_size": 2, "rank": 1.0}, "rank")):
        with pytest.raises(TypeError, match=f"^{name}: "):
            ContextParallel(**kwargs)
    with pytest.raises(TypeError, match=r"^interleave: "):
        ContextParallel(2, 0, interleave="16")
    cp = ContextParallel(4, 3, interleave=16)
    assert (cp.world_size, cp.rank, cp.interleave) == (4, 3, 16)
    assert ContextParallel(2, 1).interleave == 1
    with pytest.raises(AttributeError):
        cp.rank = 0  # type: ignore[misc]
    assert batchmeta.ContextParallel is ContextParallel


def config(cp, page_sizes=(16, 1), **kw):
    full, window = page_sizes
    return MetadataConfig(
        max_num_reqs=kw.pop("max_num_reqs", 6),
        max_num_tokens=kw.pop("max_num_tokens", 256),
        max_model_len=MAX_LEN,
        kv_groups=kw.pop("kv_groups", (KVGroup(page_size=full), KVGroup(page_size=window, window_left=WINDOW))),
        num_qo_heads=4,
        num_kv_heads=2,
        head_dim=16,
        q_dtype=torch.float32,
        kv_dtype=torch.float32,
        device="cpu",
        batch_block_tables=True,
        max_draft_tokens=kw.pop("max_draft_tokens", 3),
        context_parallel=cp,
        **kw,
    )


def test_metadata_config_context_parallel_field():
    assert config(None).context_parallel is None
    assert not config(ContextParallel(1, 0)).sharded(0)
    cfg = config(ContextParallel(2, 1))
    assert cfg.sharded(0) and not cfg.sharded(1)  # the sliding-window group is not sharded
    with pytest.raises(TypeError, match=r"^context_parallel: "):
        config((2, 1))


def test_mla_with_sharding_is_rejected():
    mla = {"kv_groups": (KVGroup(page_size=1, sm_scale=0.1, mla=MLA(num_heads=4, head_dim_ckv=64, head_dim_kpe=16)),)}
    with pytest.raises(ValueError, match=r"^context_parallel: world_size 2 shards groups \[0\].*MLA"):
        config(ContextParallel(2, 0), **mla)
    config(ContextParallel(1, 0), **mla)  # without sharding: today's feature


def test_decode_graphs_are_accepted_and_verify_graphs_rejected_with_sharding():
    """Plain CUDA-graph decode works under context parallelism (a GPU test replays it); speculative
    verify graphs are rejected before anything changes."""
    meta = BatchMetadata(config(ContextParallel(2, 0), cuda_graph_batch_sizes=(1, 2)))
    meta.block_tables.append(0, [[1], [1]])
    with pytest.raises(ValueError, match=r"^context_parallel: CUDA graphs of speculative verify steps"):
        meta.prepare_decode([0], [3], num_draft_tokens=1, cuda_graph=True)
    assert meta.block_tables.num_staged()  # nothing applied
    # Without sharding the same configuration gets as far as the device (a CUDA graph needs one).
    plain = BatchMetadata(config(ContextParallel(1, 0), cuda_graph_batch_sizes=(1, 2)))
    plain.block_tables.append(0, [[1], [1]])
    with pytest.raises(ValueError, match=r"^cuda_graph: CUDA graphs need a CUDA device"):
        plain.prepare_decode([0], [3], num_draft_tokens=1, cuda_graph=True)


# --------------------------------------------------------------------------------------------------
# Position maps
# --------------------------------------------------------------------------------------------------
@given(
    n=st.integers(1, 4),
    i=st.sampled_from([1, 16, 3]),
    data=st.data(),
)
def test_local_len_and_position_maps_match_a_naive_loop(n, i, data):
    rank = data.draw(st.integers(0, n - 1), label="rank")
    cp = ContextParallel(n, rank, interleave=i)
    lens = np.array(data.draw(st.lists(st.integers(0, 300), min_size=1, max_size=8), label="lens"), np.int64)
    want = [naive_local_len(int(length), rank, n, i) for length in lens]
    assert local_len(lens, cp).tolist() == want
    assert local_len(torch.from_numpy(lens), cp).tolist() == want
    assert [local_len(int(length), cp) for length in lens] == want
    # The #47181 trap: the local count of G - k tokens, computed again, never local(G) - k.
    k = data.draw(st.integers(0, 8), label="k")
    g_minus_k = np.maximum(lens - k, 0)
    assert local_len(g_minus_k, cp).tolist() == [naive_local_len(int(x), rank, n, i) for x in g_minus_k]
    pos = np.arange(0, 300, dtype=np.int64)
    assert owner(pos, cp).tolist() == [naive_owner(int(p), n, i) for p in pos]
    assert local_position(pos, cp).tolist() == [naive_local_position(int(p), n, i) for p in pos]
    t = torch.from_numpy(pos)
    assert torch.equal(owner(t, cp), torch.from_numpy(owner(pos, cp)))
    assert torch.equal(local_position(t, cp), torch.from_numpy(local_position(pos, cp)))


def test_local_count_of_g_minus_k_is_not_local_count_of_g_minus_k():
    """vLLM #47181: rank 0 of 2 holds 3 of 5 tokens, and 1 of 2 (not 3 - 3 = 0)."""
    cp = ContextParallel(2, 0)
    assert local_len(5, cp) == 3 and local_len(5 - 3, cp) == 1 != local_len(5, cp) - 3


# --------------------------------------------------------------------------------------------------
# Each rank's step
# --------------------------------------------------------------------------------------------------
class RankPages:
    """One rank's page allocator and the naive record of its pages: local lengths in sharded groups."""

    def __init__(self, meta, first_page):
        self.meta = meta
        self.cp = meta.config.context_parallel
        self.next = [first_page] * len(meta.config.kv_groups)
        self.held = {}

    def tokens(self, g, seq_len):
        if self.cp is None or not self.meta.config.sharded(g):
            return seq_len
        return naive_local_len(seq_len, self.cp.rank, self.cp.world_size, self.cp.interleave)

    def grow(self, req, seq_len):
        groups = self.meta.config.kv_groups
        rows = self.held.setdefault(req, [[] for _ in groups])
        new = []
        for g, grp in enumerate(groups):
            need = max(math.ceil(self.tokens(g, seq_len) / grp.page_size) - len(rows[g]), 0)
            pages = list(range(self.next[g], self.next[g] + need))
            self.next[g] += need
            rows[g] += pages
            new.append(pages)
        self.meta.block_tables.append(req, new)


def naive_rank_step(meta, pages, idx, qlens, clens):
    """One rank's expected fields, by plain loops over every token."""
    cfg = meta.config
    cp = cfg.context_parallel
    exp = {"positions": [], "qo": [0], "seq": [], "slots": [], "kv_indptr": [], "kv_indices": [], "last": []}
    for q in qlens:
        exp["qo"].append(exp["qo"][-1] + q)
    for c, q in zip(clens, qlens, strict=True):
        exp["positions"] += list(range(c, c + q))
        exp["seq"].append(c + q)
    for g, grp in enumerate(cfg.kv_groups):
        ps, sharded = grp.page_size, cp is not None and cfg.sharded(g)
        slots, indptr, indices, last = [], [0], [], []
        for r, c, q in zip(idx, clens, qlens, strict=True):
            row = pages.held[r][g]
            for p in range(c, c + q):
                if sharded and naive_owner(p, cp.world_size, cp.interleave) != cp.rank:
                    slots.append(-1)
                    continue
                loc = naive_local_position(p, cp.world_size, cp.interleave) if sharded else p
                slots.append(row[loc // ps] * ps + loc % ps)
            kv = pages.tokens(g, c + q)
            n = math.ceil(kv / ps)
            indices += row[:n]
            indptr.append(indptr[-1] + n)
            last.append((kv - 1) % ps + 1 if kv else 0)
        for name, value in (("slots", slots), ("kv_indptr", indptr), ("kv_indices", indices), ("last", last)):
            exp[name].append(value)
    return exp


def check_rank_step(step, meta, pages, idx, qlens, clens):
    exp = naive_rank_step(meta, pages, idx, qlens, clens)
    t = sum(qlens)
    assert step.num_tokens == t and step.idx_mapping.tolist() == list(idx)
    assert step.qo_indptr.tolist() == exp["qo"] == step.qo_indptr_host.tolist()
    assert step.positions.tolist() == exp["positions"]  # global on every rank
    assert step.seq_lens.tolist() == exp["seq"]  # global (the local ones are in kv_indptr / last_page_len)
    assert step.logits_indices.tolist() == [x - 1 for x in exp["qo"][1:]]
    assert (meta.positions[t:] == 0).all()
    for g in range(len(meta.config.kv_groups)):
        assert step.slot_mappings[g].tolist() == exp["slots"][g], g
        assert (meta.slot_mappings[g][t:] == -1).all()
        assert step.kv_indptr[g].tolist() == exp["kv_indptr"][g] == step.kv_indptr_host[g].tolist()
        assert step.kv_indices[g].tolist() == exp["kv_indices"][g]
        assert step.kv_last_page_len[g].tolist() == exp["last"][g] == step.kv_last_page_len_host[g].tolist()
        for b, r in enumerate(idx):  # per-batch tables: the rank's own pages, 0 past those it holds
            row, got = pages.held[r][g], step.batch_block_tables[g][b].tolist()
            assert got[: len(row)] == row[: len(got)] and all(v == 0 for v in got[len(row) :])


def stored_tokens(metas_and_pages, steps, idx, qlens, clens, group):
    """Every (request, position) some rank's slot mapping of ``group`` stores, mapped back through
    that rank's pages and local positions (a list: a token stored twice shows twice)."""
    stored = []
    for (meta, pages), step in zip(metas_and_pages, steps, strict=True):
        cp, ps = meta.config.context_parallel, meta.config.kv_groups[group].page_size
        where = {}  # slot -> (request, local position)
        for r, rows in pages.held.items():
            for k, page in enumerate(rows[group]):
                for o in range(ps):
                    where[page * ps + o] = (r, k * ps + o)
        local_to_global = {
            naive_local_position(p, cp.world_size, cp.interleave): p
            for p in range(MAX_LEN)
            if naive_owner(p, cp.world_size, cp.interleave) == cp.rank
        }
        for slot in step.slot_mappings[group].tolist():
            if slot != -1:
                r, loc = where[slot]
                stored.append((r, local_to_global[loc]))
    return stored


# A step of each kind: (kind, idx, query_lens) with cache_lens the rows' current lengths.
SCENARIO = [
    ("prefill", [0, 1, 2, 3], [37, 5, 70, 1]),  # nothing cached: ragged; a 1-token row most ranks hold none of
    ("prefill", [1, 0, 3, 4], [1, 20, 1, 33]),  # mixed: decodes beside chunks over a cached prefix
    ("decode", [0, 1, 2, 3, 4], 1),
    ("spec", [3, 2, 0], 3),  # speculative verify: 1 + 3 tokens per row
    ("decode", [4, 3], 1),
]


def run_scenario(metas_and_pages, scenario=SCENARIO):
    lens = {}
    for kind, idx, q in scenario:
        clens = [lens.get(r, 0) for r in idx]
        qlens = list(q) if kind == "prefill" else [q] * len(idx)
        steps = []
        for meta, pages in metas_and_pages:
            for r, c, n in zip(idx, clens, qlens, strict=True):
                pages.grow(r, c + n)
            if kind == "prefill":
                step = meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens)
            else:
                step = meta.prepare_decode(idx, clens, num_draft_tokens=q - 1)
            assert step.kind == {"prefill": "prefill" if any(clens) else "ragged_prefill", "decode": "decode"}.get(
                kind, "spec_decode"
            )
            steps.append(step)
        yield steps, idx, qlens, clens
        for r, n in zip(idx, qlens, strict=True):
            lens[r] = lens.get(r, 0) + n


def rank_metas(n, i, page_sizes, backend, numpy_host_path=False):
    out = []
    for rank in range(n):
        meta = BatchMetadata(config(ContextParallel(n, rank, interleave=i), page_sizes, backend=backend))
        if numpy_host_path:
            meta._host_path = None
        out.append((meta, RankPages(meta, first_page=1 + 1000 * rank)))
    return out


@pytest.mark.parametrize("numpy_host_path", [False, True], ids=["compiled", "numpy"])
@pytest.mark.parametrize("page_sizes", [(16, 1), (1, 16)], ids=["full16-win1", "full1-win16"])
@pytest.mark.parametrize("interleave", [1, 16])
@pytest.mark.parametrize("world_size", [2, 4])
def test_each_ranks_step_matches_naive_and_stores_each_token_once(
    world_size, interleave, page_sizes, backend, numpy_host_path
):
    metas = rank_metas(world_size, interleave, page_sizes, backend, numpy_host_path)
    for meta, _ in metas:
        assert (meta._host_path is not None) == (COMPILED and not numpy_host_path)
    for steps, idx, qlens, clens in run_scenario(metas):
        for (meta, pages), step in zip(metas, steps, strict=True):
            check_rank_step(step, meta, pages, idx, qlens, clens)
        tokens = sorted((r, p) for r, c, q in zip(idx, clens, qlens, strict=True) for p in range(c, c + q))
        # The sharded group: every token stored by exactly one rank; the window group: by every rank.
        assert sorted(stored_tokens(metas, steps, idx, qlens, clens, group=0)) == tokens
        assert sorted(stored_tokens_unsharded(metas, steps, group=1)) == sorted(tokens * world_size)


def stored_tokens_unsharded(metas_and_pages, steps, group):
    stored = []
    for (meta, pages), step in zip(metas_and_pages, steps, strict=True):
        ps = meta.config.kv_groups[group].page_size
        where = {
            page * ps + o: (r, k * ps + o)
            for r, rows in pages.held.items()
            for k, page in enumerate(rows[group])
            for o in range(ps)
        }
        stored += [where[s] for s in step.slot_mappings[group].tolist() if s != -1]
    return stored


@given(data=st.data())
def test_random_batches_of_three_ranks_match_naive(data):
    """Random steps (torch twin), 3 ranks (not a power of two), interleave 1 to 5."""
    interleave = data.draw(st.integers(1, 5), label="interleave")
    ps = data.draw(st.sampled_from([(16, 1), (1, 16), (4, 2)]), label="page_sizes")
    metas = rank_metas(3, interleave, ps, "torch")
    lens = {}
    for _ in range(data.draw(st.integers(1, 3), label="steps")):
        n = data.draw(st.integers(1, 6))
        idx = data.draw(st.permutations(range(6)))[:n]
        clens = [lens.get(r, 0) for r in idx]
        qlens = [data.draw(st.integers(1, min(30, MAX_LEN - c))) for c in clens]
        for _, pages in metas:
            for r, c, q in zip(idx, clens, qlens, strict=True):
                pages.grow(r, c + q)
        steps = [meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens) for meta, _ in metas]
        for (meta, pages), step in zip(metas, steps, strict=True):
            check_rank_step(step, meta, pages, idx, qlens, clens)
        tokens = sorted((r, p) for r, c, q in zip(idx, clens, qlens, strict=True) for p in range(c, c + q))
        assert sorted(stored_tokens(metas, steps, idx, qlens, clens, group=0)) == tokens
        for r, q in zip(idx, qlens, strict=True):
            lens[r] = min(lens.get(r, 0) + q, MAX_LEN - 30)  # the next chunk fits max_model_len


def step_fields(step):
    """Every field of a step, as lists."""
    out = {
        name: getattr(step, name).tolist()
        for name in ("idx_mapping", "qo_indptr", "seq_lens", "positions", "logits_indices", "qo_indptr_host")
    }
    for name in ("slot_mappings", "kv_indptr", "kv_indices", "kv_last_page_len", "batch_block_tables"):
        out[name] = [t.tolist() for t in getattr(step, name)]
    for name in ("kv_indptr_host", "kv_last_page_len_host"):
        out[name] = [a.tolist() for a in getattr(step, name)]
    out["sizes"] = (step.kind, step.num_reqs, step.padded_num_reqs, step.num_tokens, step.query_len)
    return out


@pytest.mark.parametrize("numpy_host_path", [False, True], ids=["compiled", "numpy"])
@pytest.mark.parametrize(
    "cp", [ContextParallel(1, 0), ContextParallel(1, 0, interleave=16), ContextParallel(3, 2)], ids=str
)
def test_world_size_one_or_unsharded_groups_equal_no_context_parallel(cp, backend, numpy_host_path):
    """World size 1, or a group of ranks over sliding-window groups only: today's step, field for field,
    on the host path today's config takes."""
    kv_groups = (KVGroup(page_size=4, window_left=WINDOW), KVGroup(page_size=1, window_left=WINDOW))
    groups = {} if cp.world_size == 1 else {"kv_groups": kv_groups}
    metas = []
    for c in (None, cp):
        meta = BatchMetadata(config(c, backend=backend, **groups))
        assert (meta._host_path is not None) == COMPILED  # nothing sharded: the compiled path
        if numpy_host_path:
            meta._host_path = None
        metas.append((meta, RankPages(meta, first_page=1)))
    for (plain, cp_step), idx, qlens, clens in run_scenario(metas):
        assert step_fields(plain) == step_fields(cp_step)
        check_rank_step(cp_step, metas[1][0], metas[1][1], idx, qlens, clens)
    assert torch.equal(metas[0][0].block_tables.flat, metas[1][0].block_tables.flat)


@pytest.mark.parametrize("numpy_host_path", [False, True], ids=["compiled", "numpy"])
def test_page_counts_are_checked_against_local_lengths(numpy_host_path):
    """A rank needs pages for its own tokens only (vLLM #48003: never the global count); one short raises."""
    cp = ContextParallel(4, 1, interleave=16)
    meta = BatchMetadata(config(cp, (16, 16)))
    if numpy_host_path:
        meta._host_path = None
    # 100 tokens: rank 1 owns positions 16..31 and 80..95, 32 tokens: 2 pages of 16 (7 globally).
    assert local_len(100, cp) == 32
    meta.block_tables.append(0, [[1], [1, 2, 3, 4, 5, 6, 7]])
    with pytest.raises(
        ValueError, match="needs 2 pages in group 0 for its 32 of 100 tokens on context-parallel rank 1"
    ):
        meta.prepare_prefill([0], query_lens=[100], cache_lens=[0])
    meta.block_tables.append(0, [[2], []])
    step = meta.prepare_prefill([0], query_lens=[100], cache_lens=[0])
    assert step.kv_indptr_host[0].tolist() == [0, 2] and step.kv_last_page_len_host[0].tolist() == [16]
    assert step.kv_indptr_host[1].tolist() == [0, 7] and step.kv_last_page_len_host[1].tolist() == [4]


def test_attention_over_a_sharded_group_without_new_kv_and_device_acceptance_counts_are_rejected():
    """Attention across the ranks is tested in tests/test_cp_attention.py; it needs the new k / v."""
    meta = BatchMetadata(config(ContextParallel(2, 0)))
    pages = RankPages(meta, first_page=1)
    pages.grow(0, 10)
    step = meta.prepare_decode([0], [7], num_draft_tokens=2)
    q = torch.zeros(3, 4, 16)
    cache = torch.zeros(64, 16, 2, 16)
    with pytest.raises(ValueError, match=r"^k, v: KV-cache group 0 is sharded"):
        step.attention(q, cache, cache, group=0)
    history = torch.zeros(6, MAX_LEN, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"^context_parallel: acceptance counts on the device"):
        meta.accept_tokens(step, history, torch.zeros(1, 3, dtype=torch.int64), torch.tensor([1]), [1])
