"""BatchMetadata: every step field against a naive per-request reference, staged block-table
writes, the active-step ContextVar, and bad input raising before any buffer changes."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import batchmeta
from batchmeta import KVGroup, MetadataConfig
from batchmeta.metadata import BatchMetadata


def make_meta(device, page_sizes=(4, 2), windows=None, max_num_reqs=6, max_model_len=48, **kw):
    # check_step reads the per-batch block tables: built here unless a test says otherwise.
    kw.setdefault("batch_block_tables", True)
    windows = windows or (-1,) * len(page_sizes)
    cfg = MetadataConfig(
        max_num_reqs=max_num_reqs,
        max_num_tokens=kw.pop("max_num_tokens", 96),
        max_model_len=max_model_len,
        kv_groups=tuple(KVGroup(page_size=p, window_left=w) for p, w in zip(page_sizes, windows, strict=True)),
        # On a GPU FlashInfer plans every step: a shape (and dtype) its tests have already compiled.
        num_qo_heads=8,
        num_kv_heads=2,
        head_dim=64,
        q_dtype=kw.pop("q_dtype", torch.float16),
        kv_dtype=kw.pop("kv_dtype", torch.float16),
        device=device,
        **kw,
    )
    return BatchMetadata(cfg)


class Pages:
    """A page allocator and the naive host record of every request's pages, per group."""

    def __init__(self, meta):
        self.meta = meta
        self.next = [1] * len(meta.config.kv_groups)  # page 0 is the padding page
        self.held = {}

    def grow(self, req, seq_len):
        groups = self.meta.config.kv_groups
        rows = self.held.setdefault(req, [[] for _ in groups])
        new = []
        for g, grp in enumerate(groups):
            need = math.ceil(seq_len / grp.page_size) - len(rows[g])
            pages = list(range(self.next[g], self.next[g] + max(need, 0)))
            self.next[g] += max(need, 0)
            rows[g] += pages
            new.append(pages)
        self.meta.block_tables.append(req, new)


def naive_step(pages, page_sizes, idx, qlens, clens):
    """Expected fields of a step, by plain loops."""
    exp = {
        "positions": [],
        "slots": [[] for _ in page_sizes],
        "kv_indptr": [],
        "kv_indices": [],
        "last": [],
        "qo": [0],
        "logits": [],
        "tables": [],
    }
    for g, ps in enumerate(page_sizes):
        indptr, indices, last, table = [0], [], [], []
        for r, c, q in zip(idx, clens, qlens, strict=True):
            seq = c + q
            row = pages[r][g]
            n = math.ceil(seq / ps)
            indices += row[:n]
            indptr.append(indptr[-1] + n)
            last.append((seq - 1) % ps + 1 if seq else 0)
            table.append(row)
            if g == 0:
                exp["positions"] += list(range(c, c + q))
            exp["slots"][g] += [row[p // ps] * ps + p % ps for p in range(c, c + q)]
        exp["kv_indptr"].append(indptr)
        exp["kv_indices"].append(indices)
        exp["last"].append(last)
        exp["tables"].append(table)
    for q in qlens:
        exp["qo"].append(exp["qo"][-1] + q)
        exp["logits"].append(exp["qo"][-1] - 1)
    return exp


def check_step(step, meta, pages, idx, qlens, clens):
    page_sizes = [g.page_size for g in meta.config.kv_groups]
    exp = naive_step(pages, page_sizes, idx, qlens, clens)
    t = sum(qlens)
    assert step.num_reqs == len(idx) and step.num_tokens == t
    assert step.idx_mapping.cpu().tolist() == list(idx)
    assert step.qo_indptr.cpu().tolist() == exp["qo"]
    assert step.qo_indptr_host.tolist() == exp["qo"]
    assert step.positions.cpu().tolist() == exp["positions"]
    assert step.logits_indices.cpu().tolist() == exp["logits"]
    assert step.seq_lens.cpu().tolist() == [c + q for c, q in zip(clens, qlens, strict=True)]
    # Everything past the step's tokens is PAD (slots) / 0 (positions), to the end of the buffers.
    assert (meta.positions[t:] == 0).all()
    for g in range(len(page_sizes)):
        assert step.slot_mappings[g].cpu().tolist() == exp["slots"][g]
        assert (meta.slot_mappings[g][t:] == -1).all()
        assert step.kv_indptr[g].cpu().tolist() == exp["kv_indptr"][g]
        assert step.kv_indptr_host[g].tolist() == exp["kv_indptr"][g]
        assert step.kv_indices[g].cpu().tolist() == exp["kv_indices"][g]
        assert step.kv_last_page_len[g].cpu().tolist() == exp["last"][g]
        assert step.kv_last_page_len_host[g].tolist() == exp["last"][g]
        if not meta.config.batch_block_tables:
            continue
        for b, row in enumerate(exp["tables"][g]):
            got = step.batch_block_tables[g][b].cpu().tolist()
            assert got[: len(row)] == row[: len(got)]
            assert all(v == 0 for v in got[len(row) :])


@st.composite
def batches(draw, max_reqs=6, max_len=48, max_tokens=96):
    n = draw(st.integers(1, max_reqs))
    idx = draw(st.permutations(range(max_reqs)))[:n]
    qlens, clens = [], []
    budget = max_tokens
    for _ in range(n):
        c = draw(st.integers(0, max_len - 1))
        q = draw(st.integers(1, max(1, min(max_len - c, budget - (n - len(qlens) - 1)))))
        budget -= q
        qlens.append(q)
        clens.append(c)
    return list(idx), qlens, clens


@given(data=st.data())
def test_prefill_steps_match_naive(device, data):
    page_sizes = data.draw(st.sampled_from([(4, 2), (1,), (16,), (16, 4)]))
    meta = make_meta(device, page_sizes=page_sizes)
    pages = Pages(meta)
    for _ in range(data.draw(st.integers(1, 3))):  # several steps: buffers reused, tables grow
        idx, qlens, clens = data.draw(batches())
        for r, c, q in zip(idx, clens, qlens, strict=True):
            pages.grow(r, c + q)
        with meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens) as step:
            assert batchmeta.current_step() is step
            assert step.kind == ("ragged_prefill" if not any(clens) else "prefill")
            check_step(step, meta, pages.held, idx, qlens, clens)


@given(data=st.data())
def test_decode_and_spec_decode_match_naive(device, data):
    meta = make_meta(device, page_sizes=(4, 1), max_draft_tokens=3)
    pages = Pages(meta)
    k = data.draw(st.integers(0, 3))
    n = data.draw(st.integers(1, 6))
    idx = data.draw(st.permutations(range(6)))[:n]
    clens = [data.draw(st.integers(0, 48 - 1 - k)) for _ in idx]
    for r, c in zip(idx, clens, strict=True):
        pages.grow(r, c + 1 + k)
    with meta.prepare_decode(idx, clens, num_draft_tokens=k) as step:
        assert step.kind == ("spec_decode" if k else "decode") and step.query_len == 1 + k
        check_step(step, meta, pages.held, list(idx), [1 + k] * n, clens)


@given(data=st.data())
def test_step_sequences_reusing_staging_slots_match_naive(device, data):
    """Decode, speculative decode and prefill steps in any order: each staging slot remembers what
    it last held (the decode fast path skips rewriting unchanged fields), and must never go stale."""
    meta = make_meta(device, page_sizes=(4, 1), max_draft_tokens=2)
    pages = Pages(meta)
    lens = {r: data.draw(st.integers(0, 10)) for r in range(6)}
    for _ in range(data.draw(st.integers(2, 6))):
        idx = data.draw(st.permutations(range(6)))[: data.draw(st.integers(1, 6))]
        clens = [lens[r] for r in idx]
        mode = data.draw(st.sampled_from(["decode", "decode", "spec", "prefill"]))
        if mode == "prefill":
            qlens = [data.draw(st.integers(1, 4)) for _ in idx]
            ctx = lambda: meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens)  # noqa: B023
        else:
            k = 2 if mode == "spec" else 0
            qlens = [1 + k] * len(idx)
            ctx = lambda: meta.prepare_decode(idx, clens, num_draft_tokens=k)  # noqa: B023
        for r, c, q in zip(idx, clens, qlens, strict=True):
            pages.grow(r, c + q)
        with ctx() as step:
            check_step(step, meta, pages.held, list(idx), qlens, clens)
        for r, q in zip(idx, qlens, strict=True):
            lens[r] = min(lens[r] + q, 30)


def test_mixed_step_prefill_chunk_beside_decodes(device):
    meta = make_meta(device, page_sizes=(4, 2), windows=(-1, 5))
    pages = Pages(meta)
    idx, qlens, clens = [3, 0, 5], [1, 17, 1], [9, 8, 0]  # decode, chunk over a cached prefix, decode
    for r, c, q in zip(idx, clens, qlens, strict=True):
        pages.grow(r, c + q)
    with meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens) as step:
        assert step.kind == "prefill"
        assert step.window_lefts == (-1, 5)
        check_step(step, meta, pages.held, idx, qlens, clens)


def test_staged_block_table_writes_apply_at_next_prepare(device):
    meta = make_meta(device, page_sizes=(4,))
    bt = meta.block_tables
    bt.append(1, [7, 8])
    assert bt.pages(1).tolist() == [7, 8]
    assert (bt.tables[0][1] == 0).all(), "staged, not yet on the device"
    with meta.prepare_decode([1], [5]):
        pass
    assert bt.tables[0][1, :2].cpu().tolist() == [7, 8]
    assert bt.num_blocks[0][1].item() == 2
    bt.reset(1)
    bt.append(1, [9])
    with meta.prepare_decode([1], [2]) as step:
        assert step.kv_indices[0].cpu().tolist() == [9]
    assert bt.num_blocks[0][1].item() == 1
    # The padding row holds the padding page.
    assert bt.tables[0][meta.config.max_num_reqs, 0].item() == meta.config.padding_page


def test_current_step_reset_on_exit_and_error(device):
    meta = make_meta(device, page_sizes=(4,))
    meta.block_tables.append(0, [1])
    with pytest.raises(RuntimeError, match="no step is active"):
        batchmeta.current_step()
    with pytest.raises(KeyError), meta.prepare_decode([0], [0]) as step:
        assert batchmeta.current_step() is step
        raise KeyError("boom")
    with pytest.raises(RuntimeError, match="no step is active"):
        batchmeta.current_step()


def test_attention_torch_path_matches_dense_reference():
    """On the CPU the step's attention is the torch implementation: check it against a dense one."""
    meta = make_meta("cpu", page_sizes=(4,), windows=(6,), q_dtype=torch.float32, kv_dtype=torch.float32)
    pages = Pages(meta)
    idx, qlens, clens = [2, 4], [5, 1], [7, 3]
    for r, c, q in zip(idx, clens, qlens, strict=True):
        pages.grow(r, c + q)
    torch.manual_seed(0)
    kc = torch.randn(32, 4, 2, 64)
    vc = torch.randn(32, 4, 2, 64)
    q = torch.randn(6, 8, 64)
    with meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens) as step:
        out = step.attention(q, kc, vc)
    t = 0
    for r, qn, c in zip(idx, qlens, clens, strict=True):
        seq = c + qn
        rows = pages.held[r][0]
        k = torch.stack([kc[rows[p // 4], p % 4] for p in range(seq)]).repeat_interleave(4, dim=1)
        v = torch.stack([vc[rows[p // 4], p % 4] for p in range(seq)]).repeat_interleave(4, dim=1)
        for i in range(qn):
            pos = c + i
            lo = max(0, pos - 6)
            s = torch.einsum("hd,khd->hk", q[t + i], k[lo : pos + 1]) / math.sqrt(64)
            ref = torch.einsum("hk,khd->hd", torch.softmax(s, -1), v[lo : pos + 1])
            torch.testing.assert_close(out[t + i], ref, rtol=1e-5, atol=1e-5)
        t += qn


# --------------------------------------------------------------------------------------------------
# Bad input raises before anything changes
# --------------------------------------------------------------------------------------------------
def snapshot(meta):
    return [
        t.clone()
        for t in (meta._staging.dev, meta.positions, *meta.slot_mappings, *meta.kv_indices, meta.block_tables.flat)
    ]


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda m: m.prepare_prefill([0] * 7, query_lens=[1] * 7, cache_lens=[0] * 7), ValueError, "max_num_reqs"),
        (lambda m: m.prepare_prefill([0, 0], query_lens=[1, 1], cache_lens=[0, 0]), ValueError, "twice"),
        (lambda m: m.prepare_prefill([6], query_lens=[1], cache_lens=[0]), ValueError, "idx_mapping"),
        (lambda m: m.prepare_prefill([-1], query_lens=[1], cache_lens=[0]), ValueError, "idx_mapping"),
        (lambda m: m.prepare_prefill([0], query_lens=[97], cache_lens=[0]), ValueError, "max_num_tokens"),
        (lambda m: m.prepare_prefill([0], query_lens=[0], cache_lens=[0]), ValueError, "query_lens"),
        (lambda m: m.prepare_prefill([0], query_lens=[1], cache_lens=[-1]), ValueError, "cache_lens"),
        (lambda m: m.prepare_prefill([0], query_lens=[1, 2], cache_lens=[0]), ValueError, "query_lens"),
        (lambda m: m.prepare_prefill([0], query_lens=[1.5], cache_lens=[0]), TypeError, "query_lens"),
        (lambda m: m.prepare_prefill([0], query_lens=[1], cache_lens=[48]), ValueError, "max_model_len"),
        (
            lambda m: m.prepare_prefill([0], query_lens=[1], cache_lens=[8]),
            ValueError,
            "needs 3 pages",
        ),  # lengths beyond pages held
        (
            lambda m: m.prepare_prefill([1], query_lens=[1], cache_lens=[0]),
            ValueError,
            "holds no pages yet",
        ),  # slot 1 holds nothing
        (lambda m: m.prepare_decode([0], [0], num_draft_tokens=1), ValueError, "num_draft_tokens"),
        (lambda m: m.prepare_decode([0], [0], cuda_graph=True), ValueError, "cuda_graph"),
        (lambda m: m.block_tables.append(0, [1] * 12), ValueError, "new_pages"),  # past the table width
        (lambda m: m.block_tables.append(9, [1]), ValueError, "req_idx"),
        (lambda m: m.block_tables.append(0, [[1], [2]]), ValueError, "new_pages"),
        (lambda m: m.block_tables.append(0, [-3]), ValueError, "new_pages"),
        (lambda m: m.block_tables.append(0, ["a"]), TypeError, "new_pages"),
        (lambda m: m.block_tables.reset(True), TypeError, "req_idx"),
        (lambda m: m.block_tables.append(0, [5, 2**31]), ValueError, "new_pages"),  # nothing of it staged
    ],
)
def test_bad_input_raises_before_any_change(device, call, exc, match):
    meta = make_meta(device, page_sizes=(4,))
    meta.block_tables.append(0, [5, 6])
    with meta.prepare_decode([0], [3]):
        pass
    before = snapshot(meta)
    held = meta.block_tables.pages(0).tolist()
    with pytest.raises(exc, match=match):
        call(meta)
    for a, b in zip(before, snapshot(meta), strict=True):
        assert torch.equal(a, b)
    assert meta.block_tables.pages(0).tolist() == held
    assert meta.block_tables.take_staged()[0].size == 0, "a rejected append staged writes"


@pytest.mark.parametrize("pages", [[7], [3, 9, 4], [], [1] * 12, [5, 2**31], [-3], [2**63], [2**63, -1]])
def test_append_of_python_ints_equals_append_of_an_array(pages):
    """A list of Python ints takes append's fast path: the same staged writes, mirror and errors."""
    metas = [make_meta("cpu", page_sizes=(4,)) for _ in range(2)]
    errors = []
    for meta, new in zip(metas, (list(pages), tuple(pages)), strict=True):  # a tuple takes the general path
        meta.block_tables.append(1, [2])
        meta.block_tables.take_staged()  # only the second append's writes are compared
        try:
            meta.block_tables.append(1, new)
            errors.append(None)
        except (ValueError, TypeError) as e:
            errors.append(f"{type(e).__name__}: {e}")
    assert errors[0] == errors[1]
    (off_a, val_a), (off_b, val_b) = (m.block_tables.take_staged() for m in metas)
    assert off_a.tolist() == off_b.tolist() and val_a.tolist() == val_b.tolist()
    a, b = (m.block_tables for m in metas)
    assert np.array_equal(a.host_table(0), b.host_table(0))
    assert np.array_equal(a.host_num_blocks(), b.host_num_blocks())


def test_device_tensors_are_rejected_as_batch_descriptions():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA tensor")
    meta = make_meta("cuda", page_sizes=(4,))
    meta.block_tables.append(0, [1])
    with pytest.raises(ValueError, match="idx_mapping"):
        meta.prepare_decode(torch.zeros(1, dtype=torch.int32, device="cuda"), [0])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(max_num_reqs=0), ValueError, "max_num_reqs"),
        (dict(num_qo_heads=6, num_kv_heads=4), ValueError, "num_kv_heads"),
        (dict(kv_groups=()), ValueError, "kv_groups"),
        (dict(kv_groups=(KVGroup(page_size=16, window_left=64),)), ValueError, "window_left"),
        (dict(q_dtype=torch.float64), TypeError, "q_dtype"),
        (dict(cuda_graph_batch_sizes=(4, 2)), ValueError, "cuda_graph_batch_sizes"),
        (dict(cuda_graph_batch_sizes=(1, 16)), ValueError, "max_num_reqs"),
        (dict(num_kv_pages=4, padding_page=4), ValueError, "padding_page"),
        (dict(head_dim=2.5), TypeError, "head_dim"),
    ],
)
def test_config_rejects_impossible_values(kwargs, exc, match):
    base = dict(
        max_num_reqs=8,
        max_num_tokens=64,
        max_model_len=64,
        kv_groups=(KVGroup(page_size=16),),
        num_qo_heads=4,
        num_kv_heads=2,
        head_dim=8,
        device="cpu",
    )
    base.update(kwargs)
    with pytest.raises(exc, match=match):
        MetadataConfig(**base)


def test_kv_group_rejects_bad_window_and_page_size():
    with pytest.raises(ValueError, match="window_left"):
        KVGroup(page_size=16, window_left=-2)
    with pytest.raises(ValueError, match="page_size"):
        KVGroup(page_size=0)


def test_empty_batch_is_all_padding(device):
    meta = make_meta(device, page_sizes=(4,))
    with meta.prepare_prefill([], query_lens=[], cache_lens=[]) as step:
        assert step.num_tokens == 0
        assert (meta.slot_mappings[0] == -1).all()
        assert step.kv_indices[0].numel() == 0


def test_host_arrays_are_numpy_views_of_the_staging_buffer(device):
    meta = make_meta(device, page_sizes=(4,))
    meta.block_tables.append(0, [1, 2])
    with meta.prepare_decode(np.array([0]), torch.tensor([5])) as step:
        assert isinstance(step.qo_indptr_host, np.ndarray)
        assert step.kv_indptr_host[0].tolist() == [0, 2]


def test_accept_tokens_writes_history_through_idx_mapping_and_advances(device):
    meta = make_meta(device, page_sizes=(4,), max_draft_tokens=2)
    pages = Pages(meta)
    idx, clens = [4, 1], [6, 2]
    for r, c in zip(idx, clens, strict=True):
        pages.grow(r, c + 3)
    history = torch.full((6, 16), -1, dtype=torch.int64, device=device)
    with meta.prepare_decode(idx, clens, num_draft_tokens=2) as step:
        sampled = torch.tensor([11, 12, 21], dtype=torch.int64, device=device)  # row 0 accepts 2, row 1 accepts 1
        with pytest.raises(ValueError, match="num_accepted"):
            meta.accept_tokens(step, history, sampled, [2], [0, 7])
        new_cache, exact = meta.accept_tokens(step, history, sampled, [2, 1], [0, 7])
    expected = torch.full((6, 16), -1, dtype=torch.int64)
    # Slot 4 ran positions 6..8 (its last 2 drafts): the matched draft and the bonus token take 7 and 8,
    # and position 8's token is the next step's input (next cache length 6 + 3 - 2 + 2 - 1 = 8).
    expected[4, 7:9] = torch.tensor([11, 12])
    # Slot 1 ran positions 2..4, still inside its 7-token prompt: kept, next cache length 5.
    assert torch.equal(history.cpu(), expected)
    assert new_cache.tolist() == [8, 5] and exact.tolist() == [True, True]
    with pytest.raises(ValueError, match="already accepted"):
        meta.accept_tokens(step, history, sampled, [2, 1], [0, 7])


def test_accept_tokens_for_a_step_prepared_before_the_last(device):
    """An engine may prepare step n+1 before accepting step n's tokens: the step keeps its own rows."""
    meta = make_meta(device, page_sizes=(4,), max_draft_tokens=1)
    for r in (1, 2):
        meta.block_tables.append(r, [r + 1, r + 5])
    history = torch.zeros(6, 16, dtype=torch.int64, device=device)
    with meta.prepare_decode([1], [3], num_draft_tokens=1) as first:
        pass
    with meta.prepare_decode([2], [4], num_draft_tokens=1):
        pass
    meta.accept_tokens(first, history, torch.tensor([77], device=device), [1], [0])
    assert history[1, 4].item() == 77 and int((history != 0).sum()) == 1  # 3 + 2 - 1: after the cached tokens


def test_staged_writes_beyond_one_transfer_are_all_applied(device):
    meta = make_meta(device, page_sizes=(1,), max_num_tokens=16)  # room for few writes per transfer
    assert meta._layout.max_writes < 6 * 48
    rng = np.random.default_rng(0)
    for r in range(6):
        meta.block_tables.append(r, rng.integers(1, 10_000, 48).tolist())
    with meta.prepare_decode(list(range(6)), [47] * 6) as step:
        for r in range(6):
            assert step.batch_block_tables[0][r].cpu().tolist() == meta.block_tables.pages(r).tolist()
    assert torch.equal(meta.block_tables.tables[0][:6].cpu(), torch.from_numpy(meta.block_tables.host_table(0)[:6]))


def test_pages_as_tensors_and_arrays():
    meta = make_meta("cpu", page_sizes=(4,))
    meta.block_tables.append(0, torch.tensor([3, 4]))
    meta.block_tables.append(0, np.array([5]))
    assert meta.block_tables.pages(0).tolist() == [3, 4, 5]


def test_ragged_step_attention_needs_new_keys_on_every_path():
    meta = make_meta("cpu", page_sizes=(4,))
    meta.block_tables.append(0, [1])
    kc = torch.zeros(4, 4, 2, 64, dtype=torch.float16)
    with meta.prepare_prefill([0], query_lens=[2], cache_lens=[0]) as step, pytest.raises(ValueError, match="k, v"):
        step.attention(torch.zeros(2, 8, 64, dtype=torch.float16), kc, kc)


def test_batch_block_tables_only_when_asked(device):
    """Without config.batch_block_tables the kernel writes no per-batch table, none is allocated, and
    reading it says how to turn it on; kv_indices and the rest are unchanged."""
    on, off = make_meta(device), make_meta(device, batch_block_tables=False)
    assert off._buffers.out32.numel() < on._buffers.out32.numel()
    assert off._buffers.batch_block_tables is None
    for m in (on, off):
        pages = Pages(m)
        for r, n in ((0, 9), (3, 20), (5, 2)):
            pages.grow(r, n)
    before = off._buffers.out32.clone()
    with (
        on.prepare_prefill([3, 0, 5], query_lens=[4, 9, 2], cache_lens=[16, 0, 0]) as a,
        off.prepare_prefill([3, 0, 5], query_lens=[4, 9, 2], cache_lens=[16, 0, 0]) as b,
    ):
        for g in range(2):
            assert torch.equal(a.kv_indices[g], b.kv_indices[g])
            assert torch.equal(a.slot_mappings[g], b.slot_mappings[g])
        assert torch.equal(a.positions, b.positions)
        with pytest.raises(ValueError, match=r"batch_block_tables: not built.*batch_block_tables=True"):
            _ = b.batch_block_tables
        assert a.batch_block_tables[0].shape == (3, 5)
    # Only kv_indices changed in the smaller buffer.
    changed = (off._buffers.out32 != before).nonzero().flatten().tolist()
    ends = [
        o + n
        for o, n in zip(off._buffers.kv_offsets, (len(b.kv_indices_host[0]), len(b.kv_indices_host[1])), strict=True)
    ]
    assert all(any(o <= i < e for o, e in zip(off._buffers.kv_offsets, ends, strict=True)) for i in changed)


def test_rows_split_over_small_column_programs(device, monkeypatch):
    """With 2 columns per program, every row spreads over many programs: the grid BatchMetadata sizes
    from the step's longest row (``max_cols``) must still cover every page of every group."""
    import batchmeta.ops.step as step_ops

    monkeypatch.setattr(step_ops, "_COLS", 2)
    meta = make_meta(device, page_sizes=(1, 4))  # page size 1: the longest rows in columns
    pages = Pages(meta)
    for r, n in ((0, 9), (3, 30), (5, 2)):
        pages.grow(r, n)
    for idx, qlens, clens in (([3, 0, 5], [4, 9, 2], [26, 0, 0]), ([5, 3], [1, 1], [1, 29])):
        with meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens) as step:
            check_step(step, meta, pages.held, idx, qlens, clens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_reads_pinned_staging_after_the_host_moved_on():
    """Zero-copy staging: each step's kernel reads its pinned staging buffer when it runs. With every
    kernel held back behind a sleeping one, the host stages later steps (and reuses the two buffers)
    long before: each step must still see its own batch (a CPU BatchMetadata is the reference)."""
    gpu = make_meta("cuda", plan_attention=False)
    cpu = make_meta("cpu", plan_attention=False)
    held = [Pages(gpu), Pages(cpu)]
    steps = [  # (idx, query_lens, cache_lens, growth before the step)
        ([0, 1], [5, 9], [0, 0], [(0, 5), (1, 9)]),
        ([1, 0], [1, 1], [9, 5], [(0, 6), (1, 10)]),
        ([2, 0, 1], [7, 3, 1], [0, 6, 10], [(2, 7), (0, 9), (1, 11)]),
        ([2], [1], [7], [(2, 8)]),
        ([0, 2, 1], [2, 1, 12], [9, 8, 11], [(0, 11), (2, 9), (1, 23)]),
        ([1], [1], [23], [(1, 24)]),
    ]
    snapshots = []
    for idx, qlens, clens, grow in steps:
        for pages in held:
            for r, n in grow:
                pages.grow(r, n)
        torch.cuda._sleep(20_000_000)  # the step kernel runs long after the host has moved on
        s = gpu.prepare_prefill(idx, query_lens=qlens, cache_lens=clens)
        snapshots.append(
            [
                t.clone()
                for t in (
                    s.qo_indptr,
                    s.seq_lens,
                    s.idx_mapping,
                    s.logits_indices,
                    s.positions,
                    *s.slot_mappings,
                    *s.kv_indptr,
                    *s.kv_indices,
                    *s.kv_last_page_len,
                )
            ]
        )
    torch.cuda.synchronize()
    for (idx, qlens, clens, _), got in zip(steps, snapshots, strict=True):
        s = cpu.prepare_prefill(idx, query_lens=qlens, cache_lens=clens)
        want = (
            s.qo_indptr,
            s.seq_lens,
            s.idx_mapping,
            s.logits_indices,
            s.positions,
            *s.slot_mappings,
            *s.kv_indptr,
            *s.kv_indices,
            *s.kv_last_page_len,
        )
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("numpy_host_path", [False, True], ids=["compiled", "numpy"])
def test_many_staged_writes_are_bucketed_by_row(device, backend, numpy_host_path):
    """More staged writes than BUCKET_MIN_WRITES: sorted by table row with their CSR, each row's program
    applies its own (the step reads its rows after them); rows outside the batch get theirs too."""
    from batchmeta.ops.step import ROW_COUNT
    from batchmeta.staging import BUCKET_MIN_WRITES

    meta = make_meta(device, page_sizes=(1, 4), backend=backend)
    if numpy_host_path:
        meta._host_path = None
    pages = Pages(meta)
    lens = {0: 40, 3: 33, 5: 47, 2: 21}
    for r in (5, 0, 3, 2):  # appended out of slot order: the staged writes are not sorted by row
        pages.grow(r, lens[r])
    assert meta.block_tables.num_staged() > BUCKET_MIN_WRITES
    lay, ring = meta._layout, meta._staging
    idx, qlens = [3, 0, 5], [1, 2, 1]
    clens = [lens[r] - q for r, q in zip(idx, qlens, strict=True)]
    step = meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens)
    h = ring.host_np[ring.current]
    n = int(h[lay.num_writes])
    assert h[lay.rows + ROW_COUNT] == -1 - n  # the packed rows say: bucketed
    csr = h[lay.write_rows : lay.write_rows + lay.num_table_rows + 1]
    rows = meta.block_tables.rows_of(h[lay.pairs : lay.pairs + 2 * n : 2])
    assert (np.diff(rows) >= 0).all() and csr[-1] == n
    assert np.bincount(rows, minlength=lay.num_table_rows).tolist() == np.diff(csr).tolist()
    with step:
        check_step(step, meta, {r: pages.held[r] for r in pages.held}, idx, qlens, clens)
    for g in range(2):  # slot 2, not in the batch: its writes were applied by the tail program
        assert meta.block_tables.tables[g][2].cpu().tolist() == meta.block_tables.host_table(g)[2].tolist()
        assert meta.block_tables.num_blocks[g].cpu().tolist() == meta.block_tables.host_num_blocks()[g].tolist()


@given(data=st.data())
def test_rows_of_names_each_writes_table_row(data):
    """BlockTables.rows_of against the table each staged write's offset falls in."""
    meta = make_meta("cpu", page_sizes=(1, 4, 2))
    bt = meta.block_tables
    bt.take_staged()  # the padding row's writes at construction
    expected = {}
    for r in data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=8), label="slots"):
        before = set(bt._staged)
        new = [data.draw(st.lists(st.integers(1, 99), max_size=4), label="pages") for _ in range(3)]
        try:
            bt.append(r, new)
        except ValueError:  # past max_model_len: nothing staged
            continue
        for off in set(bt._staged) - before:
            expected[off] = r
    offsets, _ = bt.take_staged()
    assert bt.rows_of(offsets).tolist() == [expected[int(o)] for o in offsets]
