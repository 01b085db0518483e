"""The compiled host path (``HostPath.stage``) against the numpy one (``BatchChecker.check`` + ``stage_step``).

Valid batches: the same return and the same staging bytes, down to which elements are left alone
(both buffers start filled with a sentinel). Invalid batches: ``None``, not one byte written, and
the numpy checker raises for the same input (the message the caller then shows).
"""

import functools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from batchmeta import BatchMetadata, KVGroup, MetadataConfig, host_path
from batchmeta.batch import BatchChecker
from batchmeta.host_path import COMPILED, HostPath, plan_fits
from batchmeta.staging import stage_step

if not COMPILED:
    pytest.skip("compiled host path off (numba missing or BATCHMETA_HOST_PATH=numpy)", allow_module_level=True)

SENTINEL = -0x5A5A5A5A  # what no staged field holds: an element left alone keeps it
R, T, L, K = 8, 96, 64, 2  # request slots, token budget, max_model_len, max draft tokens
NO_WRITES = np.zeros(0, np.int32)


@functools.cache
def setup(page_sizes: tuple[int, ...], tables: bool = True, r: int = R, t: int = T, ml: int = L):
    """A CPU BatchMetadata (for its real block tables and layout) and a HostPath on them; shared by examples."""
    kw = dict(
        max_num_reqs=r,
        max_num_tokens=t,
        max_model_len=ml,
        kv_groups=[KVGroup(page_size=p) for p in page_sizes],
        num_qo_heads=4,
        num_kv_heads=2,
        head_dim=8,
        q_dtype=torch.float16,
        kv_dtype=torch.float16,
        device="cpu",
        max_draft_tokens=K,
        batch_block_tables=tables,
    )
    m = BatchMetadata(MetadataConfig(**kw))
    return m, HostPath(m.config, m._layout, m.block_tables.host_num_blocks())


def hold(m: BatchMetadata, pages: dict[int, list[int]]) -> None:
    """Slot -> pages held per group, through the block tables' public API (every other slot holds none)."""
    bt = m.block_tables
    for s in range(m.config.max_num_reqs):
        bt.reset(s)
        if s in pages:
            bt.append(s, [list(range(1, n + 1)) for n in pages[s]])
    bt.take_staged()  # staged writes are the caller's business, not this test's


def reference(m: BatchMetadata, h: np.ndarray, idx, qlens, clens, padded: int, graph: bool, num_writes: int = 0):
    """The numpy path into ``h``: check, then stage_step with a fresh memo (so it writes
    everything). Both paths leave the staged block-table writes to the caller; the packed rows
    carry their count, ``num_writes``."""
    checker = BatchChecker(m.config, m.block_tables.host_num_blocks())
    seq, pages, max_seq = checker.check(idx, qlens, clens)
    return stage_step(
        h,
        m._layout,
        [None],
        0,
        m.config,
        checker.rows,
        idx,
        qlens,
        clens,
        seq,
        pages,
        max_seq,
        padded,
        graph,
        num_writes,
    )


def ints(values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# Valid batches: same bytes, same return
# --------------------------------------------------------------------------------------------------
@st.composite
def batches(draw, m: BatchMetadata):
    """A valid batch on ``m``'s current holdings: (idx, qlens, clens, padded, graph)."""
    held = m.block_tables.host_num_blocks()
    sizes = [grp.page_size for grp in m.config.kv_groups]
    room = [min(L, *(int(held[g, s]) * p for g, p in enumerate(sizes))) for s in range(R)]  # tokens a slot can have
    decode = draw(st.booleans())
    q = draw(st.integers(1, 1 + K)) if decode else 1  # every row needs room for at least q tokens
    usable = [s for s in range(R) if room[s] >= q]
    b = draw(st.integers(0, len(usable)))
    idx = draw(st.permutations(usable))[:b]
    if decode:
        qlens = q
        clens = [draw(st.integers(0, room[s] - q)) for s in idx]
    else:
        clens = [draw(st.integers(0, room[s] - 1)) for s in idx]
        budget = T // max(b, 1)  # at least 1: b <= R < T
        qlens = ints([draw(st.integers(1, max(1, min(room[s] - c, budget)))) for s, c in zip(idx, clens, strict=True)])
    padded = draw(st.integers(b, R))
    graph = draw(st.booleans())
    return ints(idx), qlens, ints(clens), padded, graph


@st.composite
def holdings(draw, page_sizes: tuple[int, ...]):
    """Pages held per slot and group: every slot used holds at least one page in each group."""
    widths = [-(-L // p) for p in page_sizes]
    out = {}
    for s in range(R):
        if draw(st.integers(0, 4)):  # most slots hold pages
            out[s] = [draw(st.integers(1, w)) for w in widths]
    return out


@given(data=st.data())
def test_same_bytes_and_return_as_numpy_path(data):
    page_sizes = tuple(data.draw(st.lists(st.sampled_from([1, 2, 3, 16]), min_size=1, max_size=3), label="pages"))
    tables = data.draw(st.booleans(), label="tables")
    m, hp = setup(page_sizes, tables)
    hold(m, data.draw(holdings(page_sizes), label="held"))
    h = m._staging.host_np[0]  # a real (pinned on CUDA) staging buffer: the type stage() is given
    h[:] = SENTINEL
    ref = np.full_like(h, SENTINEL)
    # A few steps into the same buffers: fields a shorter step leaves alone keep the longer one's values.
    for _ in range(data.draw(st.integers(1, 3), label="steps")):
        idx, qlens, clens, padded, graph = data.draw(batches(m), label="batch")
        num_writes = data.draw(st.sampled_from([0, 1, 7]), label="num_writes")
        want = reference(m, ref, idx, qlens, clens, padded, graph, num_writes)
        got = hp.stage(h, idx, qlens, clens, padded, graph, num_writes)
        assert got == want
        assert all(type(v) is int for v in (got[0], got[2], *got[1]))
        np.testing.assert_array_equal(h, ref)


@given(data=st.data())
def test_same_verdict_as_numpy_checker(data):
    """Batches at every bound (slots, lengths, tokens, pages held, int64): valid for both paths or for neither."""
    page_sizes = tuple(data.draw(st.lists(st.sampled_from([1, 2, 3, 16]), min_size=1, max_size=3), label="pages"))
    m, hp = setup(page_sizes)
    hold(m, data.draw(holdings(page_sizes), label="held"))
    held = m.block_tables.host_num_blocks()
    sizes = [grp.page_size for grp in m.config.kv_groups]
    b = data.draw(st.integers(0, R + 1), label="b")
    idx = data.draw(st.permutations(range(R)))[:b] + [0] * (b - R)  # a row past max_num_reqs repeats slot 0
    decode = data.draw(st.booleans(), label="decode")
    q = data.draw(st.integers(1, 1 + K), label="q")
    qlens = [q] * b if decode else [data.draw(st.integers(1, T // max(b, 1))) for _ in range(b)]
    # Each row's cache_len at most what the slot's pages (and max_model_len) allow, or by one token beyond.
    room = [min(L, *(int(held[g, s]) * p for g, p in enumerate(sizes))) for s in idx]
    clens = [data.draw(st.integers(0, max(0, cap - ql + 1))) for cap, ql in zip(room, qlens, strict=True)]
    if b:  # then at most one row taken past one bound (or not)
        i = data.draw(st.integers(0, b - 1), label="row")
        bad = data.draw(st.sampled_from(["none", "slot", "cache", "query", "tokens"]), label="bad")
        huge = [2**31, 2**62, 2**63 - 1]
        if bad == "slot":
            idx[i] = data.draw(st.sampled_from([-1, R, -(2**63), 2**62, idx[i - 1]]))  # idx[i - 1]: a duplicate
        elif bad == "cache":
            clens[i] = data.draw(st.one_of(st.sampled_from([-1, -(2**63), *huge]), st.integers(L - 1, L + 1)))
        elif bad == "query" and not decode:
            qlens[i] = data.draw(st.one_of(st.sampled_from(huge), st.integers(T - 1, T + 1)))
        elif bad == "tokens":
            q = T // b + 1 if decode else q
            qlens[i] = T - sum(qlens) + qlens[i] + 1  # one token over the budget (with the other rows)
    idx, clens = ints(idx), ints(clens)
    qlens = q if decode else ints(qlens)
    # ahead: the checks also with every row that many tokens longer (a draft round's last step).
    ahead = data.draw(st.integers(0, 3), label="ahead") if clens.size == 0 or clens.max() < 2**40 else 0
    h = np.full(m._layout.total, SENTINEL, np.int32)
    ref = h.copy()
    try:
        if ahead:
            m._checker.check(idx, qlens, clens + ahead)
        want = reference(m, ref, idx, qlens, clens, len(idx), False)
    except ValueError as e:
        want = None
        event(f"rejected: {str(e)[:24]}")
    else:
        event("valid")
    assert hp.stage(h, idx, qlens, clens, len(idx), False, ahead=ahead) == want
    np.testing.assert_array_equal(h, ref)


@pytest.mark.parametrize("graph", [True, False])
@pytest.mark.parametrize("padded", [0, 1, 5, R])
@pytest.mark.parametrize("qlens", [1, 3, ints([])], ids=["decode", "spec", "prefill"])
def test_empty_batch_and_graph_capture(qlens, padded, graph):
    """b == 0: ``capture_decode_graph`` stages padding rows only (max_seq: one cached token, and a
    speculative step's new ones); nothing is checked."""
    m, hp = setup((16, 1))
    hold(m, {})
    h = np.full(m._layout.total, SENTINEL, np.int32)
    ref = h.copy()
    empty = ints([])
    want = reference(m, ref, empty, qlens, empty, padded, graph)
    assert hp.stage(h, empty, qlens, empty, padded, graph) == want
    pad_q = qlens if isinstance(qlens, int) and qlens > 1 else 0
    assert want[2] == (1 + pad_q if padded else 0)
    np.testing.assert_array_equal(h, ref)


@pytest.mark.parametrize("tables", [True, False])
def test_decode_fields_by_hand(tables):
    """One worked example, independent of stage_step: B=2 padded to 4, q=2 (speculative: padding
    rows hold one cached token and q new ones, on the padding page), page sizes 4 and 1."""
    m, hp = setup((4, 1), tables)
    hold(m, {3: [3, 9], 5: [1, 2]})
    lay = m._layout
    h = np.full(lay.total, SENTINEL, np.int32)
    got = hp.stage(h, ints([3, 5]), 2, ints([7, 0]), 4, False)
    assert got == (4, (3, 9) if tables else (0, 0), 9)  # table widths: the longest row's pages, or none
    assert h[lay.idx : lay.idx + 5].tolist() == [3, 5, R, R, SENTINEL]
    assert h[lay.cache : lay.cache + 5].tolist() == [7, 0, 1, 1, SENTINEL]
    assert h[lay.seq : lay.seq + 5].tolist() == [9, 2, 3, 3, SENTINEL]
    assert h[lay.qo_indptr : lay.qo_indptr + 6].tolist() == [0, 2, 4, 6, 8, SENTINEL]
    assert h[lay.logits : lay.logits + 3].tolist() == [1, 3, SENTINEL]
    assert h[lay.kv_indptr[0] : lay.kv_indptr[0] + 6].tolist() == [0, 3, 4, 5, 6, SENTINEL]
    assert h[lay.last_page_len[0] : lay.last_page_len[0] + 5].tolist() == [1, 2, 3, 3, SENTINEL]
    assert h[lay.kv_indptr[1] : lay.kv_indptr[1] + 6].tolist() == [0, 9, 11, 14, 17, SENTINEL]
    assert h[lay.last_page_len[1] : lay.last_page_len[1] + 5].tolist() == [1, 1, 1, 1, SENTINEL]
    assert [h[w] for w in lay.step_width] == list(got[1])
    assert h[lay.num_writes] == SENTINEL


# --------------------------------------------------------------------------------------------------
# Invalid batches: None, nothing written, and the numpy checker raises
# --------------------------------------------------------------------------------------------------
# max_model_len 15 with pages of 4 and 2 tokens: a slot's full table holds 16 tokens, one past max_model_len.
# Slot 0 holds 2 pages of 4 tokens and 4 of 2 (8 tokens in both groups); slot 1 16 tokens in group 0
# but 4 in group 1; slot 2 nothing; slot 3 one page in each (4 and 2 tokens); slot 4 full tables.
SMALL = dict(r=5, t=16, ml=15)
HELD = {0: [2, 4], 1: [4, 2], 3: [1, 1], 4: [4, 8]}
I64_MAX = 2**63 - 1
BAD = [
    # (idx, qlens (int: decode), clens, message of BatchChecker.check)
    ([0, 1, 3, 4, 0, 1], 1, [0] * 6, "exceed max_num_reqs"),
    ([5], 1, [0], "request slots in"),
    ([-1], 1, [0], "request slots in"),
    ([0, -(2**63)], 1, [0, 0], "request slots in"),
    ([2**62], [1], [0], "request slots in"),
    ([0, 0], 1, [0, 0], "twice"),
    ([0, 1, 0], [1, 1, 1], [0, 0, 0], "twice"),
    ([0], 1, [-1], "cache_lens: expected lengths"),
    ([0, 1], [1, 1], [0, -(2**63)], "cache_lens: expected lengths"),
    ([4], 1, [16], "cache_lens: expected lengths"),
    ([0], [1], [I64_MAX], "cache_lens: expected lengths"),
    ([0], [2**62], [2**62], "cache_lens: expected lengths"),
    ([0, 1], [8, 9], [0, 0], "exceed max_num_tokens"),
    ([1], [17], [0], "exceed max_num_tokens"),
    ([0, 1, 3], 6, [0, 0, 0], "exceed max_num_tokens"),  # decode: 3 rows of 6
    ([0], [I64_MAX], [1], "exceed max_num_tokens"),
    ([0, 1], I64_MAX, [1, 1], "exceed max_num_tokens"),  # decode: B * q and cache_len + q would wrap int64
    # Slot 4 holds the pages for 16 tokens: only max_model_len rejects these.
    ([4], 1, [15], "reaches 16 tokens, more than max_model_len"),
    ([4], [2], [14], "reaches 16 tokens, more than max_model_len"),
    ([4], [16], [0], "reaches 16 tokens, more than max_model_len"),
    # query_lens sums that wrap int64 pass the token bound in numpy; the seq bound rejects them, also
    # where every row's cache_len + query_len wraps to a negative number.
    ([0, 1], [I64_MAX, I64_MAX], [0, 0], "more than max_model_len"),
    ([0, 1], [I64_MAX, I64_MAX], [1, 1], "beyond int64"),
    ([0, 1, 3], [I64_MAX, I64_MAX, 2], [1, 0, 0], "beyond int64"),
    ([0, 1, 3, 2], [2**62] * 4, [0] * 4, "more than max_model_len"),
    ([0], 1, [8], "needs 3 pages in group 0"),
    ([1], 1, [4], "needs 3 pages in group 1"),
    ([3, 1], [2, 1], [1, 4], "needs 2 pages in group 1"),
    ([2], 1, [0], "request slot 2 holds no pages yet"),
    ([0, 2], [1, 1], [0, 0], "request slot 2 holds no pages yet"),
]


@pytest.mark.parametrize("idx, qlens, clens, match", BAD)
def test_invalid_batch_returns_none_and_writes_nothing(idx, qlens, clens, match):
    m, hp = setup((4, 2), **SMALL)
    hold(m, HELD)
    idx, clens = ints(idx), ints(clens)
    qlens = qlens if type(qlens) is int else ints(qlens)
    # Start from a previous step's bytes (some fields not the sentinel) as well as the sentinel.
    h = np.full(m._layout.total, SENTINEL, np.int32)
    assert hp.stage(h, ints([0, 3]), 1, ints([3, 1]), 2, False) is not None
    for fill in (h.copy(), np.full_like(h, SENTINEL)):
        before = fill.copy()
        for padded, graph in ((len(idx), False), (min(len(idx) + 1, SMALL["r"]), True)):
            assert hp.stage(fill, idx, qlens, clens, max(padded, len(idx)), graph) is None
            np.testing.assert_array_equal(fill, before)
    with pytest.raises(ValueError, match=match):
        BatchChecker(m.config, m.block_tables.host_num_blocks()).check(idx, qlens, clens)
    # A rejection leaves no state behind: the next valid step is staged as the numpy path stages it.
    ref = np.full_like(h, SENTINEL)
    got = hp.stage(h := ref.copy(), ints([3, 0]), ints([1, 5]), ints([1, 2]), 2, False)
    assert got == reference(m, ref, ints([3, 0]), ints([1, 5]), ints([1, 2]), 2, False)
    np.testing.assert_array_equal(h, ref)


def test_held_is_read_live():
    """The pages held are read at each call: appends and resets after the HostPath was made count."""
    m, hp = setup((4, 2), **SMALL)
    hold(m, HELD)
    h = np.full(m._layout.total, SENTINEL, np.int32)
    assert hp.stage(h, ints([2]), 1, ints([3]), 1, False) is None  # slot 2 holds nothing
    m.block_tables.append(2, [[5], [6, 7]])
    assert hp.stage(h, ints([2]), 1, ints([3]), 1, False) is not None
    m.block_tables.reset(2)
    before = h.copy()
    assert hp.stage(h, ints([2]), 1, ints([3]), 1, False) is None
    np.testing.assert_array_equal(h, before)
    m.block_tables.take_staged()


@pytest.mark.parametrize(
    "call",
    [
        lambda hp, h: hp.stage(h, ints([0, 3]), 1, ints([0, 0]), 1, False),  # padded < B
        lambda hp, h: hp.stage(h, ints([0]), 1, ints([0]), SMALL["r"] + 1, True),  # padded > max_num_reqs
        lambda hp, h: hp.stage(h[:10], ints([0]), 1, ints([0]), 1, False),  # short staging buffer
        lambda hp, h: hp.stage(h, ints([0, 3]), 1, ints([0]), 2, False),  # cache_lens of another length
        lambda hp, h: hp.stage(h, ints([0, 3]), ints([1]), ints([0, 0]), 2, False),  # query_lens too
        lambda hp, h: hp.stage(h, ints([0]), 1, ints([0]), 1, False, ahead=-1),  # checks behind the batch
    ],
)
def test_caller_bugs_raise_and_write_nothing(call):
    m, hp = setup((4, 2), **SMALL)
    hold(m, HELD)
    h = np.full(m._layout.total, SENTINEL, np.int32)
    with pytest.raises(ValueError, match=r"^HostPath\.stage: "):
        call(hp, h)
    assert (h == SENTINEL).all()


def test_held_must_be_the_int64_mirror():
    m, _ = setup((4, 2), **SMALL)
    with pytest.raises(ValueError, match="held"):
        HostPath(m.config, m._layout, m.block_tables.host_num_blocks().astype(np.int32))


def test_env_var_turns_it_off():
    """``BATCHMETA_HOST_PATH=numpy``: COMPILED is False and stage() raises instead of staging."""
    code = (
        "import numpy as np\n"
        "from batchmeta import BatchMetadata, KVGroup, MetadataConfig\n"
        "from batchmeta.host_path import COMPILED, HostPath\n"
        "assert COMPILED is False\n"
        "m = BatchMetadata(MetadataConfig(max_num_reqs=2, max_num_tokens=8, max_model_len=8, "
        "kv_groups=KVGroup(page_size=4), num_qo_heads=1, num_kv_heads=1, head_dim=8, device='cpu'))\n"
        "hp = HostPath(m.config, m._layout, m.block_tables.host_num_blocks())\n"
        "try:\n"
        "    hp.stage(np.zeros(m._layout.total, np.int32), np.zeros(0, np.int64), 1, np.zeros(0, np.int64), 0, False)\n"
        "except RuntimeError as e:\n"
        "    assert 'BATCHMETA_HOST_PATH' in str(e)\n"
        "else:\n"
        "    raise AssertionError('stage() ran')\n"
    )
    env = {**os.environ, "BATCHMETA_HOST_PATH": "numpy"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


@given(
    seq=st.lists(st.integers(1, 1000), max_size=12),
    data=st.data(),
    ahead=st.integers(0, 5),
    limit=st.integers(0, 30),
)
def test_plan_fits_against_a_naive_loop(seq, data, ahead, limit):
    """``plan_fits`` (a draft round keeping its plan): compiled and numpy, against a loop over rows."""
    n = len(seq)
    bounds = data.draw(st.lists(st.integers(0, 1100), min_size=n, max_size=n))
    b = data.draw(st.integers(0, n))
    want = all(0 <= bounds[i] - seq[i] - (ahead if i < b else 0) <= limit for i in range(n))
    staging = np.array([-1, *seq, -1], np.int32)  # a view into a staging buffer, as the caller passes
    args = (staging[1 : n + 1], np.array(bounds, np.int64), b, ahead, limit)
    for compiled in (True, False) if COMPILED else (False,):
        saved, host_path.COMPILED = host_path.COMPILED, compiled
        try:
            assert plan_fits(*args) == want, compiled
        finally:
            host_path.COMPILED = saved
