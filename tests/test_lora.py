"""Multi-LoRA batch metadata (batchmeta/lora.py): ``meta.lora.set_adapter`` and ``step.lora`` against a
naive per-token loop, on both backends and both host paths; LoRA applied from the metadata against a
naive per-token loop; bad input raising before anything changes; CUDA-graph replay on the GPU."""

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchmeta import KVGroup, MetadataConfig, StaleStepError
from batchmeta.host_path import COMPILED
from batchmeta.lora import _COMPILED, _stage_lora_kernel, stage_lora
from batchmeta.metadata import BatchMetadata
from batchmeta.ops.lora import LoraLayout, fill_lora_metadata, lora_per_token, lora_segmented

R, L, RANK, T, MML, PS = 6, 3, 16, 24, 32, 4
HOST_PATHS = ["compiled", "numpy"] if COMPILED else ["numpy"]


def make_meta(device, backend=None, host_path="compiled", max_loras=L, **kw):
    fields = {
        "max_num_reqs": R,
        "max_num_tokens": T,
        "max_model_len": MML,
        "kv_groups": KVGroup(page_size=PS),
        "num_qo_heads": 2,
        "num_kv_heads": 2,
        "head_dim": 8,
        "q_dtype": torch.float32,
        "kv_dtype": torch.float32,
        "device": device,
        "backend": backend,
        "plan_attention": False,
        "max_draft_tokens": 1,
        "max_loras": max_loras,
        "max_lora_rank": RANK if max_loras else 0,
    }
    cfg = MetadataConfig(**{**fields, **kw})
    meta = BatchMetadata(cfg)
    if host_path == "numpy":
        meta._host_path = None  # the numpy checks and stage_step (and stage_lora), the reference path
    for r in range(R):
        meta.block_tables.append(r, list(range(1 + 8 * r, 9 + 8 * r)))
    return meta


def naive_lora(rows, qlens, slots, num_loras=L, cap=T):
    """Expected LoRA fields by plain loops. ``rows``: request slot per batch row (None: a padding
    row); ``slots``: {request slot: (adapter, rank)} for every slot using an adapter."""
    tokens = []  # (token, adapter)
    for r, q in zip(rows, qlens, strict=True):
        a = slots[r][0] if r in slots else -1
        tokens += [(len(tokens) + j, a) for j in range(q)]
    n = len(tokens)

    def key(a):
        return a if a >= 0 else num_loras

    order = sorted(tokens, key=lambda ta: (key(ta[1]), ta[0]))
    perm = [t for t, _ in order] + list(range(n, cap))
    inv = [0] * cap
    for i, t in enumerate(perm):
        inv[t] = i
    rank_of = {a: rk for a, rk in slots.values()}
    active = sorted({a for _, a in tokens if a >= 0})
    s = num_loras + 1
    lens = [sum(1 for _, a in tokens if a == x) for x in active] + [sum(1 for _, a in tokens if a < 0)]
    lens += [0] * (s - len(lens))
    indptr = [0]
    for c in lens:
        indptr.append(indptr[-1] + c)
    return {
        "token_lora": [a for _, a in tokens] + [-1] * (cap - n),
        "token_perm": perm,
        "token_perm_inv": inv,
        "row_lora": [slots[r][0] if r in slots else -1 for r in rows],
        "seg_indptr": indptr,
        "seg_lora": active + [-1] * (s - len(active)),
        "seg_rank": [rank_of[a] for a in active] + [0] * (s - len(active)),
        "seg_len": lens,
        "adapter_rank": [rank_of.get(a, 0) for a in range(num_loras)],
    }


def check_step_lora(step, rows, qlens, slots):
    exp = naive_lora(rows, qlens, slots)
    lo = step.lora
    n = sum(qlens)
    for name in ("token_lora", "token_perm", "token_perm_inv"):
        got = getattr(lo, name)
        assert got.dtype == torch.int32 and got.shape == (step.num_tokens,), name
        assert torch.equal(got.cpu(), torch.tensor(exp[name][:n], dtype=torch.int32)), name
    for name in ("row_lora", "seg_indptr", "seg_lora", "seg_rank", "seg_len", "adapter_rank"):
        assert torch.equal(getattr(lo, name).cpu(), torch.tensor(exp[name], dtype=torch.int32)), name
    for name in ("seg_indptr", "seg_lora", "seg_rank", "seg_len"):
        assert getattr(lo, f"{name}_host").tolist() == exp[name], name
    assert lo.num_active == sum(1 for a in exp["seg_lora"] if a >= 0)
    # vLLM's names are the same tensors.
    assert lo.token_indices_sorted_by_lora_ids is lo.token_perm
    assert lo.lora_token_start_loc is lo.seg_indptr and lo.active_lora_ids is lo.seg_lora
    assert lo.num_tokens_per_lora is lo.seg_len and lo.token_lora_mapping is lo.token_lora


def test_a_mixed_prefill_step_by_hand(device):
    """Slots 0 and 3 on adapter 2 (rank 8), slot 1 on adapter 0 (rank 4), slot 2 none: tokens of
    adapter 0 first, then adapter 2's (rows in order), then the tokens without an adapter."""
    meta = make_meta(device)
    meta.lora.set_adapter(0, 2, 8)
    meta.lora.set_adapter(1, 0, 4)
    meta.lora.set_adapter(3, 2, 8)
    step = meta.prepare_prefill([0, 1, 2, 3], query_lens=[3, 2, 1, 2], cache_lens=[0, 0, 5, 0])
    lo = step.lora
    assert lo.token_lora.tolist() == [2, 2, 2, 0, 0, -1, 2, 2]
    assert lo.token_perm.tolist() == [3, 4, 0, 1, 2, 6, 7, 5]
    assert lo.token_perm_inv.tolist() == [2, 3, 4, 0, 1, 7, 5, 6]
    assert lo.seg_indptr.tolist() == [0, 2, 7, 8, 8]
    assert lo.seg_lora.tolist() == [0, 2, -1, -1]
    assert lo.seg_rank.tolist() == [4, 8, 0, 0]
    assert lo.row_lora.tolist() == [2, 0, -1, 2]
    assert lo.adapter_rank.tolist() == [4, 0, 8]
    assert lo.num_active == 2


@pytest.mark.parametrize("host_path", HOST_PATHS)
@settings(max_examples=12)
@given(data=st.data())
def test_steps_match_the_naive_loop(device, backend, host_path, data):
    """Random adapter assignments (ranks per adapter, no-adapter slots, changes and resets between
    steps) over prefill, mixed, decode and verify steps: every LoRA field equals the naive loop,
    and the step's other fields equal those of the same steps without LoRA."""
    meta = make_meta(device, backend, host_path)
    plain = make_meta(device, backend, host_path, max_loras=0)
    ranks = data.draw(st.lists(st.integers(1, RANK), min_size=L, max_size=L), label="rank per adapter")
    slots = {}
    for _ in range(data.draw(st.integers(1, 3), label="steps")):
        for r in data.draw(st.lists(st.integers(0, R - 1), max_size=4), label="slots changed"):
            a = data.draw(st.integers(-1, L - 1), label="adapter")
            if a < 0:
                meta.lora.set_adapter(r, None)
                slots.pop(r, None)
            else:
                meta.lora.set_adapter(r, a, ranks[a])
                slots[r] = (a, ranks[a])
        if data.draw(st.booleans(), label="reset a slot"):
            r = data.draw(st.integers(0, R - 1))
            for m in (meta, plain):
                m.block_tables.reset(r)
                m.block_tables.append(r, list(range(1 + 8 * r, 9 + 8 * r)))
            slots.pop(r, None)  # a reset slot uses no adapter
        rows = data.draw(st.lists(st.integers(0, R - 1), min_size=1, max_size=R, unique=True), label="rows")
        kind = data.draw(st.sampled_from(["prefill", "mixed", "decode", "verify"]), label="kind")
        clens = data.draw(st.lists(st.integers(0, 20), min_size=len(rows), max_size=len(rows)), label="cache")
        if kind in ("prefill", "mixed"):
            qlens = data.draw(st.lists(st.integers(1, 4), min_size=len(rows), max_size=len(rows)), label="q")
            if kind == "mixed":  # decode rows first, then prefill chunks, as engines reorder them
                k = data.draw(st.integers(0, len(rows)), label="decode rows")
                qlens = [1] * k + qlens[k:]
            steps = [m.prepare_prefill(rows, query_lens=qlens, cache_lens=clens) for m in (meta, plain)]
        else:
            k = int(kind == "verify")
            qlens = [1 + k] * len(rows)
            steps = [m.prepare_decode(rows, clens, num_draft_tokens=k) for m in (meta, plain)]
        step, base = steps
        check_step_lora(step, rows, qlens, slots)
        for name in ("positions", "qo_indptr", "seq_lens", "logits_indices"):
            assert torch.equal(getattr(step, name), getattr(base, name)), name
        assert torch.equal(step.slot_mappings[0], base.slot_mappings[0])
        assert torch.equal(step.kv_indices[0], base.kv_indices[0])


@pytest.mark.parametrize("host_path", HOST_PATHS)
def test_padding_rows_have_no_adapter(device, backend, host_path):
    """Rows padded past the batch (a CUDA-graph step's) read the reserved slot: no adapter, their
    tokens (a verify step's) in the no-adapter segment; everything past the step's tokens is -1 /
    the identity. ``_prepare`` with padding rows runs the graph path's staging on any device."""
    meta = make_meta(device, backend, host_path)
    meta.lora.set_adapter(4, 1, 3)
    meta.lora.set_adapter(2, 0, 5)
    for q in (1, 2):
        idx = np.array([4, 0, 2], np.int64)
        clens = np.array([3, 7, 1], np.int64)
        step = meta._prepare(idx, q, clens, "decode" if q == 1 else "spec_decode", padded=5, graph=False)
        pad_tokens = q if q > 1 else 0  # a verify step's padding rows run tokens too
        exp = naive_lora([4, 0, 2, None, None], [q, q, q, pad_tokens, pad_tokens], {4: (1, 3), 2: (0, 5)})
        out = meta.lora.out.cpu()
        lay = meta.lora.layout
        for name in ("token_lora", "token_perm", "token_perm_inv", "seg_indptr", "seg_lora", "seg_rank", "seg_len"):
            at = getattr(lay, name)
            n = len(exp[name])
            assert out[at : at + n].tolist() == exp[name], (q, name)
        assert out[lay.row_lora : lay.row_lora + R].tolist() == exp["row_lora"] + [-1] * (R - 5)
        del step


@settings(max_examples=60)
@given(data=st.data())
def test_compiled_staging_equals_numpy(data):
    """The counting sort of the compiled host path writes the same staging as the numpy reference
    (padding rows, empty batches and every adapter mix)."""
    if not _COMPILED:
        pytest.skip("compiled host path off")
    padded = data.draw(st.integers(0, R))
    b = data.draw(st.integers(0, padded))
    idx = data.draw(st.lists(st.integers(0, R - 1), min_size=b, max_size=b, unique=True)) + [R] * (padded - b)
    q = data.draw(st.lists(st.integers(0, 4), min_size=padded, max_size=padded))
    adapter_of = np.array([*data.draw(st.lists(st.integers(-1, L - 1), min_size=R, max_size=R)), -1], np.int64)
    rank_of = np.array(data.draw(st.lists(st.integers(0, RANK), min_size=L, max_size=L)), np.int64)
    lay = LoraLayout(max_loras=L, max_rows=R, token_capacity=T, rows=2 * R + 1, segments=2 * R + 1 + 4 * (R + 1))
    hs = [np.full(lay.segments + lay.segment_block, 77, np.int32) for _ in range(2)]
    for h in hs:
        h[:padded] = idx
        h[R : R + padded + 1] = np.concatenate([[0], np.cumsum(q)])
    stage_lora(hs[0], 0, R, lay, padded, adapter_of, rank_of)
    _stage_lora_kernel(hs[1], 0, R, lay.rows, lay.segments, padded, adapter_of, rank_of, np.zeros(L + 1, np.int64))
    assert np.array_equal(hs[0], hs[1])


# --------------------------------------------------------------------------------------------------
# LoRA applied from the metadata
# --------------------------------------------------------------------------------------------------
K, N = 32, 40


def lora_weights(device, seed):
    """Small integers and power-of-two scalings: every product and sum is exact in float32, so
    any order of summation gives the same bits and the results compare with torch.equal."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-2, 3, (L, RANK, K), generator=g).float().to(device)
    b = torch.randint(-2, 3, (L, N, RANK), generator=g).float().to(device)
    scalings = torch.tensor([0.5, 0.25, 2.0], device=device)
    return a, b, scalings


def naive_apply(x, base, a, b, scalings, token_adapters, ranks):
    """out[t] = base[t] + s * B[:, :r] @ (A[:r] @ x[t]), token by token."""
    out = base.clone()
    for t, lora in enumerate(token_adapters):
        if lora < 0:
            continue
        r = ranks[lora]
        out[t] = base[t] + scalings[lora] * (b[lora, :, :r] @ (a[lora, :r] @ x[t]))
    return out


@pytest.mark.parametrize("host_path", HOST_PATHS)
@settings(max_examples=10)
@given(data=st.data())
def test_lora_from_the_metadata_equals_the_naive_loop(device, backend, host_path, data):
    """Segmented (SGMV form, Triton and its torch twin) and per-token (BGMV form) LoRA driven by
    ``step.lora`` equal a naive per-token loop, over batches of mixed adapters, ranks (rank beyond
    an adapter's must be ignored: those weights are not zero) and rows without an adapter."""
    meta = make_meta(device, host_path=host_path)
    ranks = data.draw(st.lists(st.integers(1, RANK), min_size=L, max_size=L), label="ranks")
    slots = {}
    for r in range(R):
        a = data.draw(st.integers(-1, L - 1), label=f"adapter of slot {r}")
        if a >= 0:
            meta.lora.set_adapter(r, a, ranks[a])
            slots[r] = a
    rows = data.draw(st.lists(st.integers(0, R - 1), min_size=1, max_size=R, unique=True), label="rows")
    qlens = data.draw(st.lists(st.integers(1, 4), min_size=len(rows), max_size=len(rows)), label="q")
    step = meta.prepare_prefill(rows, query_lens=qlens, cache_lens=[0] * len(rows))
    a, b, scalings = lora_weights(device, data.draw(st.integers(0, 100), label="seed"))
    n = step.num_tokens
    g = torch.Generator().manual_seed(n)
    x = torch.randint(-2, 3, (n, K), generator=g).float().to(device)
    base = torch.randint(-5, 6, (n, N), generator=g).float().to(device)
    token_adapters = [slots.get(r, -1) for r, q in zip(rows, qlens, strict=True) for _ in range(q)]
    expected = naive_apply(x, base, a, b, scalings, token_adapters, ranks)
    lo = step.lora
    out = base.clone()
    lora_segmented(out, x, a, b, scalings, lo.token_perm, lo.seg_indptr, lo.seg_lora, lo.seg_rank, backend=backend)
    assert torch.equal(out, expected)
    out = base.clone()
    lora_per_token(out, x, a, b, scalings, lo.token_lora, lo.adapter_rank)
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------------------------------
# The API: checks, staging semantics, LoRA off
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, err, match",
    [
        ((R, 0, 1), ValueError, "req_idx"),
        ((-1, 0, 1), ValueError, "req_idx"),
        ((True, 0, 1), TypeError, "req_idx"),
        ((0, L, 1), ValueError, "adapter_id"),
        ((0, 1.0, 1), TypeError, "adapter_id"),
        ((0, 1, 0), ValueError, "rank"),
        ((0, 1, RANK + 1), ValueError, "rank"),
        ((0, 1, None), TypeError, "rank"),
        ((0, None, 4), ValueError, "rank"),
        ((1, 0, 5), ValueError, "rank: adapter 0 has rank 4"),  # slot 2 uses adapter 0 with rank 4
    ],
)
def test_bad_set_adapter_raises_before_any_change(args, err, match):
    meta = make_meta("cpu")
    meta.lora.set_adapter(1, 2, 7)
    meta.lora.set_adapter(2, 0, 4)
    before = (meta.lora._adapter.copy(), meta.lora._rank.copy(), meta.lora._users.copy())
    with pytest.raises(err, match=match):
        meta.lora.set_adapter(*args)
    after = (meta.lora._adapter, meta.lora._rank, meta.lora._users)
    assert all(np.array_equal(x, y) for x, y in zip(before, after, strict=True))


def test_adapter_bookkeeping_and_reset():
    meta = make_meta("cpu")
    lo = meta.lora
    lo.set_adapter(0, 1, 4)
    lo.set_adapter(3, 1, 4)
    assert (lo.adapter(0), lo.adapter(3), lo.adapter(2)) == (1, 1, None)
    assert (lo.rank(1), lo.num_users(1)) == (4, 2)
    lo.set_adapter(0, 1, 4)  # the same again: no change
    assert lo.num_users(1) == 2
    meta.block_tables.reset(0)  # a finished request slot uses no adapter
    assert lo.adapter(0) is None and lo.num_users(1) == 1
    lo.set_adapter(3, 1, 8)  # its only user may change the rank
    assert lo.rank(1) == 8
    lo.clear(3)
    assert (lo.num_users(1), lo.rank(1)) == (0, 0)
    assert "adapters_in_use=0" in repr(lo)


def test_changes_reach_only_the_next_step(device):
    """set_adapter between steps is staged: a prepared step keeps its metadata until the next
    prepare_*, which reads the new assignment."""
    meta = make_meta(device)
    meta.lora.set_adapter(0, 1, 2)
    step = meta.prepare_decode([0, 1], [4, 4])
    meta.lora.set_adapter(1, 1, 2)
    assert step.lora.row_lora.tolist() == [1, -1]
    step = meta.prepare_decode([0, 1], [5, 5])
    assert step.lora.row_lora.tolist() == [1, 1]
    meta.prepare_decode([0, 1], [6, 6])
    with pytest.raises(StaleStepError, match="lora"):
        step.lora  # noqa: B018


def test_lora_off(device):
    meta = make_meta(device, max_loras=0)
    assert meta.lora is None
    step = meta.prepare_decode([0], [3])
    with pytest.raises(ValueError, match="max_loras"):
        step.lora  # noqa: B018
    # Off, the staging layout is today's: no LoRA region.
    assert meta._layout.lora == meta._layout.total


def test_a_rejected_step_changes_nothing(device):
    """A batch that fails its checks raises before the LoRA staging: the latest step keeps its
    metadata and stays the latest."""
    meta = make_meta(device)
    meta.lora.set_adapter(0, 1, 2)
    step = meta.prepare_decode([0, 1], [4, 4])
    before = meta.lora.out.clone()
    with pytest.raises(ValueError, match="idx_mapping"):
        meta.prepare_decode([1, 1], [4, 4])  # a request slot twice
    assert torch.equal(meta.lora.out, before)
    assert step.lora.row_lora.tolist() == [1, -1]


def _op_args(device):
    a, b, scalings = lora_weights(device, 0)
    x = torch.zeros(4, K, device=device)
    out = torch.zeros(4, N, device=device)
    i32 = {"dtype": torch.int32, "device": device}
    segs = (
        torch.arange(4, **i32),
        torch.zeros(L + 2, **i32),
        torch.full((L + 1,), -1, **i32),
        torch.zeros(L + 1, **i32),
    )
    return [out, x, a, b, scalings, *segs]


@pytest.mark.parametrize(
    "at, bad, err, match",
    [
        (1, lambda t: t.double(), TypeError, "x: expected dtype"),
        (0, lambda t: t[:, :-1].contiguous(), ValueError, "out: expected"),
        (2, lambda t: t[:, :, :-1].contiguous(), ValueError, "x: expected"),
        (3, lambda t: t[:, :, :-1].contiguous(), ValueError, "lora_b: expected"),
        (4, lambda t: t[:-1], ValueError, "scalings: expected"),
        (4, lambda t: t.half(), TypeError, "scalings: expected dtype"),
        (5, lambda t: t[:2], ValueError, "token_perm: expected at least"),
        (5, lambda t: t.long(), TypeError, "token_perm: expected dtype"),
        (7, lambda t: t[:-1], ValueError, "seg_lora: expected"),
        (8, lambda t: t.long(), TypeError, "seg_rank: expected dtype"),
        (0, lambda t: [0.0], TypeError, "out: expected a torch.Tensor"),
    ],
)
def test_lora_segmented_checks_its_arguments(device, at, bad, err, match):
    args = _op_args(device)
    args[at] = bad(args[at])
    before = args[0].clone() if isinstance(args[0], torch.Tensor) else None
    with pytest.raises(err, match=match):
        lora_segmented(*args)
    if before is not None:
        assert torch.equal(args[0], before)


def test_fill_lora_metadata_checks_its_buffers(device):
    lay = LoraLayout(max_loras=L, max_rows=R, token_capacity=T, rows=0, segments=4 * (R + 1))
    staging = torch.zeros(LoraLayout.staging_size(R, L), dtype=torch.int32, device=device)
    out = torch.zeros(lay.out_size, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="staging: the layout needs"):
        fill_lora_metadata(lay, staging[:-1], out, 2)
    with pytest.raises(ValueError, match="out: the layout needs"):
        fill_lora_metadata(lay, staging, out[:-1], 2)
    with pytest.raises(TypeError, match="out: expected dtype"):
        fill_lora_metadata(lay, staging, out.long(), 2)
    with pytest.raises(ValueError, match="num_rows"):
        fill_lora_metadata(lay, staging, out, R + 1)
    assert not out.any()


@pytest.mark.parametrize(
    "kw, err, match",
    [
        ({"max_loras": 2, "max_lora_rank": 0}, ValueError, "max_lora_rank"),
        ({"max_loras": 0, "max_lora_rank": 8}, ValueError, "max_lora_rank"),
        ({"max_loras": -1, "max_lora_rank": 8}, ValueError, "max_loras"),
        ({"max_loras": True, "max_lora_rank": 8}, TypeError, "max_loras"),
        ({"max_loras": 2, "max_lora_rank": 2.0}, TypeError, "max_lora_rank"),
    ],
)
def test_config_checks(kw, err, match):
    with pytest.raises(err, match=match):
        MetadataConfig(
            max_num_reqs=4,
            max_num_tokens=8,
            max_model_len=16,
            kv_groups=KVGroup(page_size=4),
            num_qo_heads=2,
            num_kv_heads=2,
            head_dim=8,
            device="cpu",
            **kw,
        )


# --------------------------------------------------------------------------------------------------
# GPU: the segmented LoRA kernel in a captured decode graph, changing adapter mixes, no host sync
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _no_sync():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


MIXES = [
    {},  # no adapter at all
    {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 0},  # one adapter
    {0: 0, 1: 1, 2: 2, 4: 1},  # several, some rows without
    {5: 2},
    {0: 2, 1: 2, 2: 1, 3: 1, 4: 0, 5: 0},
]
GPU_RANKS = [16, 4, 9]


def _set_mix(meta, mix):
    for r in range(R):
        meta.lora.set_adapter(r, None)
    for r, a in mix.items():
        meta.lora.set_adapter(r, a, GPU_RANKS[a])


@pytest.mark.gpu
def test_gpu_segmented_lora_replays_in_a_cuda_graph_without_host_syncs():
    """Decode steps of a fixed batch (eager plan, fixed buffers, no FlashInfer needed): the Triton
    segmented LoRA matmul reading ``step.lora``, captured once, replayed for each adapter mix with
    prepare_decode + replay under set_sync_debug_mode("error"); equal to the naive loop."""
    meta = make_meta("cuda")
    rows = list(range(R))
    a, b, scalings = lora_weights("cuda", 0)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-2, 3, (R, K), generator=g).float().cuda()
    base = torch.randint(-5, 6, (R, N), generator=g).float().cuda()
    out = torch.empty_like(base)
    step = meta.prepare_decode(rows, [4] * R)
    lo = step.lora

    def forward():
        out.copy_(base)
        lora_segmented(out, x, a, b, scalings, lo.token_perm, lo.seg_indptr, lo.seg_lora, lo.seg_rank)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward()  # compiles
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    for i, mix in enumerate(MIXES * 2):
        _set_mix(meta, mix)
        with _no_sync():
            step = meta.prepare_decode(rows, [5 + i] * R)
            graph.replay()
        torch.cuda.synchronize()
        expected = naive_apply(x, base, a, b, scalings, [mix.get(r, -1) for r in rows], GPU_RANKS)
        assert torch.equal(out, expected), mix
        assert step.lora.token_perm.data_ptr() == lo.token_perm.data_ptr()  # the graph's buffers


@pytest.mark.gpu
def test_gpu_captured_decode_graph_with_padding_and_changing_mixes():
    """``capture_decode_graph`` (FlashInfer plans the attention): batches of 2..6 rows padded to the
    captured size, the LoRA kernel inside the graph, padding rows untouched (no adapter)."""
    from batchmeta.attention import flashinfer_planning_available

    if not flashinfer_planning_available():
        pytest.skip("CUDA-graph decode needs FlashInfer")
    meta = make_meta(
        "cuda",
        cuda_graph_batch_sizes=(4, 6),
        plan_attention=True,
        head_dim=64,
        q_dtype=torch.float16,
        kv_dtype=torch.float16,
    )
    a, b, scalings = lora_weights("cuda", 3)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-2, 3, (6, K), generator=g).float().cuda()
    base = torch.randint(-5, 6, (6, N), generator=g).float().cuda()
    outs = {bs: torch.empty(bs, N, device="cuda") for bs in (4, 6)}

    def forward(step):
        bs = step.padded_num_reqs
        lo = step.lora
        outs[bs].copy_(base[:bs])
        lora_segmented(outs[bs], x[:bs], a, b, scalings, lo.token_perm, lo.seg_indptr, lo.seg_lora, lo.seg_rank)

    for bs in (4, 6):
        meta.capture_decode_graph(bs, forward)
    for i, mix in enumerate(MIXES * 2):
        _set_mix(meta, mix)
        rows = list(range(2 + i % 5))
        with _no_sync():
            step = meta.prepare_decode(rows, [6 + i] * len(rows), cuda_graph=True)
            meta.replay_decode_graph(step)
        torch.cuda.synchronize()
        bs = step.padded_num_reqs
        adapters = [mix.get(r, -1) for r in rows] + [-1] * (bs - len(rows))
        expected = naive_apply(x[:bs], base[:bs], a, b, scalings, adapters, GPU_RANKS)
        assert torch.equal(outs[bs], expected), (mix, rows)
