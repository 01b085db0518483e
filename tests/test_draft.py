"""Draft loops (``batchmeta.draft``): every field of every draft step, and a drafter fed back through them.

1. For random ragged batches, draft step ``j`` of ``prepare_draft(idx, c, num_steps=k)``, read
   while the round runs it (its device metadata is advanced from step 0 on the device, after step
   ``j - 1``'s drafted token), equals ``prepare_decode(idx, c + j)`` of a twin ``BatchMetadata``
   whose history holds the same drafts, in every field (device and host), with the draft buffers
   filled with sentinels first, block-table writes staged just before the round, and lengths on
   the device (``accept_tokens`` with device counts) resolved exactly.
2. A toy greedy model whose drafter (its "first layers", with KV caches of their own: tensors over
   the target's pages, or a KV-cache group of its own) drafts through the loop, verified with
   ``prepare_decode(..., num_draft_tokens=k)`` and accepted with host or device counts, reproduces
   plain greedy decoding token for token.

Both step-kernel backends (Triton under the interpreter on a CPU, torch) and both host paths. The
GPU tests (CUDA and FlashInfer) replay a round as one CUDA graph: tokens equal the eager round,
attention equals a dense float32 reference, no host sync, no address moves.
"""

import contextlib

import attrs
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import Phase, given, settings

from batchmeta import BatchMetadata, KVGroup, MetadataConfig, StaleStepError
from batchmeta.draft import DraftRound, plan_headroom
from batchmeta.host_path import COMPILED

DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
R, T, L, K, V = 6, 320, 64, 4, 50  # request slots, token budget, max_model_len, max drafts, vocabulary
# Under the interpreter shrinking a failure takes many minutes: the failing draw is reported as drawn.
_NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


@pytest.fixture(
    params=[("triton", "compiled"), ("triton", "numpy"), ("torch", "compiled"), ("torch", "numpy")],
    ids=lambda p: "-".join(p),
)
def path(request):
    if request.param[1] == "compiled" and not COMPILED:
        pytest.skip("numba not installed (or BATCHMETA_HOST_PATH=numpy)")
    return request.param


def _meta(backend: str, host: str, page_sizes=(4, 1), batch_block_tables: bool = True) -> BatchMetadata:
    cfg = MetadataConfig(
        max_num_reqs=R,
        max_num_tokens=T,
        max_model_len=L,
        kv_groups=tuple(KVGroup(page_size=p) for p in page_sizes),
        num_qo_heads=4,
        num_kv_heads=2,
        head_dim=8,
        device=DEVICE,
        token_history=True,
        max_draft_tokens=K,
        backend=backend,
        plan_attention=False,
        batch_block_tables=batch_block_tables,
    )
    meta = BatchMetadata(cfg)
    if host == "numpy":
        meta._host_path = None
    return meta


def _fields(step) -> dict:
    """Every field of a step, device and host, by name (the device ones as host lists)."""
    b = step.num_reqs
    out = {
        "idx_mapping": step.idx_mapping,
        "qo_indptr": step.qo_indptr,
        "seq_lens": step.seq_lens,
        "positions": step.positions,
        "input_ids": step.input_ids,
        "logits_indices": step.logits_indices,
        "slot_mappings": step.slot_mappings,
        "kv_indptr": step.kv_indptr,
        "kv_indices": step.kv_indices,
        "kv_last_page_len": step.kv_last_page_len,
        "batch_block_tables": step.batch_block_tables,
    }
    out = {k: [t.tolist() for t in v] if isinstance(v, tuple) else v.tolist() for k, v in out.items()}
    out.update(
        kind=step.kind,
        sizes=(b, step.padded_num_reqs, step.num_tokens, step.query_len),
        rows_on_device=step.rows_on_device.tolist(),
    )
    return out


def _host_fields(step) -> dict:
    return {
        "qo_indptr_host": step.qo_indptr_host.tolist(),
        "kv_indptr_host": [a.tolist() for a in step.kv_indptr_host],
        "kv_last_page_len_host": [a.tolist() for a in step.kv_last_page_len_host],
        "kv_indices_host": [a.tolist() for a in step.kv_indices_host],
        "cache_lens_host": step.cache_lens_host.tolist(),
        "idx_mapping_host": step.idx_mapping_host.tolist(),
    }


def _pages(r: int, g: int, ps: int) -> list[int]:
    """Request slot ``r``'s pages in group ``g`` (distinct per slot and group, shuffled)."""
    per = L // ps + 2
    pages = list(range(1 + r * per, 1 + (r + 1) * per))
    np.random.default_rng(r + 10 * g).shuffle(pages)
    return pages


def _sentinel(meta: BatchMetadata) -> None:
    """Fills every draft step's outputs and device mirror with a value no step writes."""
    for slot in meta._draft._slots:
        slot.buffers.out32.fill_(-7)
        slot.buffers.out64.fill_(-7)
        slot.ring.dev.fill_(-7)


def _hold(meta: BatchMetadata, r: int, tokens: int) -> None:
    """Appends request slot ``r``'s pages for ``tokens`` tokens in every group (staged until the next launch)."""
    news = []
    for g, grp in enumerate(meta.config.kv_groups):
        held = meta.block_tables.num_pages(r, g)
        news.append(_pages(r, g, grp.page_size)[held : max(held, -(-tokens // grp.page_size))])
    if any(len(n) for n in news):
        meta.block_tables.append(r, news)


def _prefill(meta: BatchMetadata, idx, prompts: np.ndarray, history: torch.Tensor):
    """The history set to ``history``, pages for each row's prompt, and the prompts' prefill
    accepted with token 1 each; returns the acceptance."""
    meta.token_ids.copy_(history)
    for r, p in zip(idx, prompts, strict=True):
        _hold(meta, r, int(p))
    b = len(idx)
    step = meta.prepare_prefill(idx, query_lens=prompts, cache_lens=[0] * b)
    return meta.accept_tokens(step, None, torch.ones(b, dtype=torch.int64, device=DEVICE), [1] * b, prompts)


@settings(max_examples=10, deadline=None, phases=_NO_SHRINK)
@given(data=st.data())
def test_every_draft_step_equals_prepare_decode_one_token_further(path, data):
    backend, host = path
    page_sizes = data.draw(st.sampled_from([(4, 1), (3,), (1, 2, 8)]), label="page_sizes")
    draft, twin = (_meta(backend, host, page_sizes) for _ in range(2))
    b = data.draw(st.integers(1, R), label="rows")
    idx = data.draw(st.permutations(range(R)), label="slots")[:b]
    k = data.draw(st.integers(1, K), label="k")
    device_lens = data.draw(st.booleans(), label="device lengths")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    prompts = rng.integers(1, L - 2 * (K + 2), b)
    counts = rng.integers(1, K + 2, b)
    targets = torch.tensor(rng.integers(0, 1000, (b, 1 + K)), device=DEVICE)
    history = torch.tensor(rng.integers(0, 1000, (R, L)), device=DEVICE)
    for meta in (draft, twin):
        acc = _prefill(meta, idx, prompts, history)
        exact = acc.cache_lens
        if device_lens:  # a verify step accepted on the device (draft) or on the host (twin)
            for r, c in zip(idx, exact, strict=True):
                _hold(meta, r, int(c) + 1 + K)
            step = meta.prepare_decode(idx, exact, num_draft_tokens=K)
            num = torch.tensor(counts, device=DEVICE) if meta is draft else counts
            acc = meta.accept_tokens(step, None, targets, num, prompts)
            if meta is draft:
                bounds = acc.cache_lens
            if meta is twin:
                exact = acc.cache_lens
                assert acc.exact.all()
            else:
                assert not acc.exact.any()
    if device_lens:
        draft_bounds = bounds
        assert torch.equal(draft.token_ids, twin.token_ids)
    else:
        draft_bounds = exact
    # Pages for the round (its last step reaches bound + k; a page more in every group), the same in
    # both, staged: the round's first launch applies them.
    for meta in (draft, twin):
        for r, c in zip(idx, draft_bounds, strict=True):
            _hold(meta, r, min(L, int(c) + k + max(page_sizes)))
    assert draft.block_tables.num_staged()
    # The draft buffers exist before the round (made once per step index), filled with sentinels.
    for j in range(k):
        draft._draft_loop()._slot(j)
    _sentinel(draft)
    round_ = draft.prepare_draft(idx, draft_bounds, num_steps=k)
    assert isinstance(round_, DraftRound) and round_.num_steps == k and len(round_.steps) == k
    drafted = torch.tensor(rng.integers(1, 1000, (k, b)), device=DEVICE)
    got, tails = [], []

    def forward(step):
        j = len(got)
        assert step is round_.steps[j]
        got.append((_fields(step), _host_fields(step)))
        buffers = draft._draft._slots[j].buffers
        tails.append(
            (
                buffers.positions[b:].clone(),
                [sm[b:].clone() for sm in buffers.slot_mappings],
                buffers.input_ids[b:].clone(),
            )
        )
        return drafted[j]

    assert round_.run(forward).tolist() == drafted.T.tolist()
    for j in range(k):
        if j:  # the twin's history holds the token step j - 1 drafted at each row's position c + j
            twin.token_ids[torch.tensor(idx), torch.tensor(exact + j)] = drafted[j - 1].to(twin.token_ids.dtype)
        want_step = twin.prepare_decode(idx, exact + j)
        want = _fields(want_step)
        want["rows_on_device"] = [device_lens] * b
        have = got[j][0]
        if device_lens:
            # Sized from the host's bounds: the views may hold more pages (the bound's) than the
            # exact lengths need; the prefix is exact and kv_indptr says where each row ends.
            for name in ("kv_indices",):
                have[name] = [h[: len(w)] for h, w in zip(have[name], want[name], strict=True)]
            have["batch_block_tables"] = [
                [row[: len(w[0])] for row in h] if w else h
                for h, w in zip(have["batch_block_tables"], want["batch_block_tables"], strict=True)
            ]
            assert got[j][1]["cache_lens_host"] == (draft_bounds + j).tolist()  # the host holds bounds, j further
        else:
            assert got[j][1] == _host_fields(want_step), j
        assert have == want, j
        # Tails: positions 0 and slots PAD past the step's tokens, in the whole buffer.
        positions, slot_mappings, input_ids = tails[j]
        assert not positions.any()
        assert all((sm == -1).all() for sm in slot_mappings)
        assert not input_ids.any()
    twin.token_ids[torch.tensor(idx), torch.tensor(exact + k)] = drafted[k - 1].to(twin.token_ids.dtype)
    assert torch.equal(draft.token_ids, twin.token_ids)  # the round wrote its drafts where the twin has them


class _FakeGraph:
    """What ``DraftLoop.capture`` records, run eagerly on a CPU: step 0's launch as the graph has it
    (rows resolved, columns for any row, from host buffer ``buffer``; None: the graph without it),
    then the round through ``forward``."""

    def __init__(self, loop, buffer: int | None):
        self.loop, self.buffer = loop, buffer
        self.round, self.forward, self.replays = None, None, 0

    def replay(self) -> None:
        self.replays += 1
        launcher = self.loop._slots[0].launcher
        if self.buffer is not None:
            assert launcher.ring.current == self.buffer, "replayed the graph of the other host buffer"
            spec = self.round._spec
            launcher.fill_resolving(spec.padded, launcher.columns(self.loop.config.max_model_len, spec.shapes[0][2]))
        self.round.run(self.forward)


@settings(max_examples=8, deadline=None, phases=_NO_SHRINK)
@given(data=st.data())
def test_a_round_for_a_captured_graph_leaves_step_0_to_what_comes_next(path, data):
    """Prepared for a captured graph, a round enqueues no launch; step 0's is enqueued by what comes
    next: the replay (whose first launch resolves the rows, right whether or not their lengths are
    on the device), the first read of ``round.steps``, or the next ``prepare_decode`` (which needs the
    block-table writes it applies); a replay after those runs the graph without step 0, so pages
    given in between stay. Every field of every step, the block tables and the history equal those
    of a twin whose round launched step 0 when prepared."""
    backend, host = path
    deferred, twin = (_meta(backend, host) for _ in range(2))
    b = data.draw(st.integers(1, R), label="rows")
    idx = np.array(data.draw(st.permutations(range(R)), label="slots")[:b], np.int64)
    padded = data.draw(st.integers(b, R), label="padded")
    k = data.draw(st.integers(1, K), label="k")
    then = data.draw(
        st.sampled_from(["replay", "steps", "steps, replay", "prepare_decode", "prepare_decode, replay"]), label="then"
    )
    device_lens = data.draw(st.booleans(), label="device lengths")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    prompts = rng.integers(1, L - 2 * (K + 2), b)
    counts = torch.tensor(rng.integers(1, K + 2, b), device=DEVICE)
    history = torch.tensor(rng.integers(0, 1000, (R, L)), device=DEVICE)
    for meta in (deferred, twin):
        acc = _prefill(meta, idx, prompts, history)
        if device_lens:  # a verify step accepted on the device: the round's rows are resolved there
            for r, c in zip(idx, acc.cache_lens, strict=True):
                _hold(meta, r, int(c) + 1 + K)
            step = meta.prepare_decode(idx, acc.cache_lens, num_draft_tokens=K)
            targets = torch.tensor(np.arange(b * (1 + K)).reshape(b, 1 + K), device=DEVICE)
            acc = meta.accept_tokens(step, None, targets, counts, prompts)
            assert not acc.exact.any()
        clens = acc.cache_lens
        for r, c in zip(idx, clens, strict=True):  # pages for the round and its verify step, staged
            _hold(meta, r, min(L, int(c) + k + 1))
        loop = meta._draft_loop()
        for j in range(k):
            loop._slot(j)
        _sentinel(meta)
    assert deferred.block_tables.num_staged()
    loop = deferred._draft
    launcher = loop._slots[0].launcher
    launches = []
    fill = launcher.fill
    launcher.fill = lambda *a, **kw: (launches.append(a), fill(*a, **kw))[1]
    graphs = (_FakeGraph(loop, 0), _FakeGraph(loop, 1), _FakeGraph(loop, None))
    loop._graphs[(padded, k)] = graphs  # as if capture_draft_graph(padded, k, ...) had run
    rounds = [m._draft.prepare(idx, clens, k, padded=padded, graph=True, staged_prompts=()) for m in (deferred, twin)]
    assert not launches and loop._pending is not None, "a round for a captured graph launched step 0"
    assert twin._draft._pending is None  # nothing captured: launched now
    drafted = torch.tensor(rng.integers(1, 1000, (k, padded)), device=DEVICE)
    seen: dict[int, list] = {0: [], 1: []}

    def forward(m: int):
        def run(step):
            j = len(seen[m])
            seen[m].append(_fields(step))
            return drafted[j]

        return run

    for graph in graphs:
        graph.round, graph.forward = rounds[0], forward(0)
    if then.startswith("steps"):
        assert len(rounds[0].steps) == k  # the first read enqueues step 0's launch
        assert len(launches) == 1 and launches[0][0] == padded and loop._pending is None
    elif then.startswith("prepare_decode"):
        for meta in (deferred, twin):  # newer pages for the verify step, applied by its launch
            _hold(meta, int(idx[0]), min(L, int(clens[0]) + k + 1 + 8))
        verify = deferred.prepare_decode(idx, clens, num_draft_tokens=k)
        assert len(launches) == 1 and loop._pending is None
        assert _fields(verify) == _fields(twin.prepare_decode(idx, clens, num_draft_tokens=k))
    if then.endswith("replay"):
        deferred.replay_draft_graph(rounds[0])
        flushed = then != "replay"
        buffer = rounds[0]._spec.buffer
        assert [g.replays for g in graphs] == ([0, 0, 1] if flushed else [buffer == 0, buffer == 1, 0])
        assert loop._pending is None
        assert len(launches) == flushed  # the graph launched step 0, or flush() did: never both
    elif then == "steps":
        rounds[0].run(forward(0))
    if then != "prepare_decode":
        rounds[1].run(forward(1))
        assert len(seen[0]) == len(seen[1]) == k
        for j in range(k):
            assert seen[0][j] == seen[1][j], j
    assert torch.equal(deferred.block_tables.flat, twin.block_tables.flat)
    assert torch.equal(deferred.token_ids, twin.token_ids)


def test_round_hands_each_draft_on_and_the_verify_step_gathers_them(path):
    backend, host = path
    meta = _meta(backend, host)
    meta.block_tables.append(2, [_pages(2, 0, 4)[:4], _pages(2, 1, 1)[:16]])
    meta.block_tables.append(0, [_pages(0, 0, 4)[:4], _pages(0, 1, 1)[:16]])
    meta.stage_prompt(2, [5, 6, 7])
    meta.stage_prompt(0, [1, 2, 3, 4, 5, 6])
    step = meta.prepare_prefill([2, 0], query_lens=[3, 6], cache_lens=[0, 0])
    acc = meta.accept_tokens(step, None, torch.tensor([40, 41], device=DEVICE), [1, 1], [3, 6])
    round_ = meta.prepare_draft([2, 0], acc.cache_lens, num_steps=3)
    seen = []

    def forward(step):
        seen.append((step.positions.tolist(), step.input_ids.tolist()))
        return (step.input_ids + 100) % 1000

    drafts = round_.run(forward)
    assert seen == [([3, 6], [40, 41]), ([4, 7], [140, 141]), ([5, 8], [240, 241])]
    assert drafts.tolist() == [[140, 240, 340], [141, 241, 341]]
    assert meta.token_ids[2, :7].tolist() == [5, 6, 7, 40, 140, 240, 340]
    assert meta.token_ids[0, :10].tolist() == [1, 2, 3, 4, 5, 6, 41, 141, 241, 341]
    verify = meta.prepare_decode([2, 0], acc.cache_lens, num_draft_tokens=3)
    assert verify.input_ids.tolist() == [40, 140, 240, 340, 41, 141, 241, 341]
    # The verify step left the round intact (its buffers are the round's own) but a new round replaces it.
    assert round_.steps[0].positions.tolist() == [3, 6]
    meta.prepare_draft([2], [3], num_steps=1)
    with pytest.raises(StaleStepError):
        _ = round_.steps[0].positions
    with pytest.raises(StaleStepError):
        round_.advance(0, torch.zeros(2, dtype=torch.int64, device=DEVICE))
    # A step between the first and the last stages its host twins on first read, while its round is
    # the latest: after the next round they are stale, as are the steps of a round never read.
    round_ = meta.prepare_draft([2, 0], acc.cache_lens, num_steps=3)
    middle = round_.steps[1]
    assert not round_.planned  # nothing plans here (plan_attention=False)
    unread = meta.prepare_draft([2, 0], acc.cache_lens, num_steps=3)
    for name in ("kv_indptr_host", "qo_indptr_host", "kv_last_page_len_host", "kv_indices", "kv_indices_host"):
        with pytest.raises(StaleStepError):
            getattr(middle, name)
    meta.prepare_draft([2, 0], acc.cache_lens, num_steps=2)
    with pytest.raises(StaleStepError):
        _ = unread.steps
    # A reset after the round: its later steps' host twins are not staged from other pages.
    round_ = meta.prepare_draft([2, 0], acc.cache_lens, num_steps=3)
    middle = round_.steps[1]
    meta.block_tables.reset(0)
    for _ in range(2):
        with pytest.raises(StaleStepError, match="reset"):
            _ = middle.kv_indptr_host


def test_prepare_draft_rejects_bad_input_before_anything_changes():
    meta = _meta("torch", "compiled" if COMPILED else "numpy")
    meta.block_tables.append(0, [_pages(0, 0, 4)[:2], _pages(0, 1, 1)[:8]])
    meta.stage_prompt(0, [1, 2, 3, 4])
    step = meta.prepare_prefill([0], query_lens=[4], cache_lens=[0])
    meta.accept_tokens(step, None, torch.tensor([9], device=DEVICE), [1], [4])
    meta.block_tables.append(1, [[60], [61]])  # staged: must stay staged when a round is rejected
    staged = meta.block_tables.num_staged()
    before = meta.token_ids.clone()
    bad = [
        (dict(num_steps=0), ValueError, "num_steps: expected 1..4"),
        (dict(num_steps=K + 1), ValueError, "num_steps"),
        (dict(num_steps=2.0), TypeError, "num_steps"),
        (dict(num_steps=2, cuda_graph=1), TypeError, "cuda_graph"),
        (dict(num_steps=2, cuda_graph=True), ValueError, "cuda_graph"),
        (dict(num_steps=5, idx_mapping=[0]), ValueError, "num_steps"),
        (dict(num_steps=4, cache_lens=[5]), ValueError, "cache_lens: request slot 0 needs"),  # pages for 4 + 5
        (dict(num_steps=2, cache_lens=[-1]), ValueError, "cache_lens"),
        (dict(num_steps=2, idx_mapping=[0, 0], cache_lens=[4, 4]), ValueError, "twice"),
        (dict(num_steps=2, idx_mapping=[R], cache_lens=[4]), ValueError, "idx_mapping"),
        (dict(num_steps=2, cache_lens=[4, 4]), ValueError, "cache_lens"),
    ]
    for change, error, match in bad:
        args = dict(idx_mapping=[0], cache_lens=[4], num_steps=2)
        args.update(change)
        with pytest.raises(error, match=match):
            meta.prepare_draft(args.pop("idx_mapping"), args.pop("cache_lens"), **args)
        assert meta.block_tables.num_staged() == staged
    meta.stage_prompt(0, [7], start=8)
    with pytest.raises(ValueError, match="prompt tokens staged"):
        meta.prepare_draft([0], [4], num_steps=2)
    meta.discard_prompt(0)
    assert torch.equal(meta.token_ids, before)
    round_ = meta.prepare_draft([0], [4], num_steps=2)  # and then it works
    with pytest.raises(ValueError, match="j: expected a step"):
        round_.advance(2, torch.zeros(1, dtype=torch.int64, device=DEVICE))
    with pytest.raises(TypeError, match="round"):
        meta.replay_draft_graph(round_.steps[0])
    with pytest.raises(ValueError, match="cuda_graph=True"):
        meta.replay_draft_graph(round_)
    with pytest.raises(ValueError, match="CUDA"):
        meta.capture_draft_graph(4, 2, lambda s: s.input_ids)
    hist = _meta("torch", "numpy")
    no_hist = BatchMetadata(
        MetadataConfig(
            max_num_reqs=2,
            max_num_tokens=8,
            max_model_len=16,
            kv_groups=(KVGroup(page_size=4),),
            num_qo_heads=4,
            num_kv_heads=2,
            head_dim=8,
            device=DEVICE,
            max_draft_tokens=2,
            plan_attention=False,
        )
    )
    with pytest.raises(ValueError, match="token_history=True"):
        no_hist.prepare_draft([0], [1], num_steps=1)
    no_drafts = BatchMetadata(attrs.evolve(hist.config, max_draft_tokens=0))
    with pytest.raises(ValueError, match=r"max_draft_tokens=k\) with k >= num_steps \(it is 0\)"):
        no_drafts.prepare_draft([0], [1], num_steps=1)
    with pytest.raises(ValueError, match="another BatchMetadata"):
        hist.replay_draft_graph(round_)


# --------------------------------------------------------------------------------------------------
# A toy greedy model and its drafter, fed back through the library
# --------------------------------------------------------------------------------------------------
def truth(seq) -> int:
    """The toy model's greedy next token after ``seq``."""
    h = 0
    for i, t in enumerate(seq):
        h = (h * 31 + (int(t) + 1) * (i + 7)) % 1_000_003
    return h % V


class Engine:
    """Target and drafter over batchmeta. The target's KV lives in groups 0 and 1 (page sizes 4, 1);
    the drafter (the model's first layers: the verify forward writes their KV too) has a cache of its
    own, over group 0's pages (``drafter="shared-pages"``) or over a group of its own (page size 2,
    ``drafter="own-group"``). Its guess is the greedy token, or a wrong one where ``wrong(seq)``."""

    def __init__(self, backend: str, host: str, device_counts: bool, k: int, drafter: str, wrong):
        self.page_sizes = (4, 1, 2) if drafter == "own-group" else (4, 1)
        self.meta = _meta(backend, host, self.page_sizes, batch_block_tables=False)
        self.group = 2 if drafter == "own-group" else 0  # the drafter's metadata
        self.device_counts, self.k, self.wrong = device_counts, k, wrong
        self.caches = [torch.full((R * (L // p + 2) + 1, p), -1, dtype=torch.int64, device=DEVICE) for p in (4, 1)]
        ps = self.page_sizes[self.group]
        self.draft_cache = torch.full((R * (L // ps + 2) + 1, ps), -1, dtype=torch.int64, device=DEVICE)
        self.seq: dict[int, list[int]] = {}
        self.prompt_len: dict[int, int] = {}
        self.cache_lens: dict[int, int] = {}
        self.accepted_drafts = self.rejected_drafts = 0

    def hold(self, r: int, tokens: int) -> None:
        """Appends request slot ``r``'s pages for ``tokens`` tokens (staged until the next launch)."""
        news = []
        for g, ps in enumerate(self.page_sizes):
            held = self.meta.block_tables.num_pages(r, g)
            news.append(_pages(r, g, ps)[held : max(held, -(-tokens // ps))])
        if any(news):
            self.meta.block_tables.append(r, news)

    @staticmethod
    def _read(cache, step, g: int, ps: int, b: int) -> list[int]:
        indptr, last = step.kv_indptr[g].tolist(), step.kv_last_page_len[g].tolist()
        pages = step.kv_indices[g].tolist()[indptr[b] : indptr[b + 1]]
        kv_len = (len(pages) - 1) * ps + last[b]
        return [int(cache[pages[p // ps], p % ps]) for p in range(kv_len)]

    def target(self, step) -> torch.Tensor:
        """The verify forward: stores the tokens (target layers and the drafter's), returns each query
        token's greedy successor."""
        ids = step.input_ids
        writes = [(c, step.slot_mappings[g]) for g, c in enumerate(self.caches)]
        writes.append((self.draft_cache, step.slot_mappings[self.group]))
        for cache, slots in writes:
            keep = slots >= 0
            cache.view(-1)[slots[keep]] = ids[: slots.numel()][keep]
        qo, out = step.qo_indptr.tolist(), []
        for b in range(step.num_reqs):
            per_group = [self._read(c, step, g, (4, 1)[g], b) for g, c in enumerate(self.caches)]
            assert per_group[0] == per_group[1], "the groups' metadata disagree"
            q = qo[b + 1] - qo[b]
            out += [truth(per_group[0][: len(per_group[0]) - q + j + 1]) for j in range(q)]
        return torch.tensor(out, dtype=torch.int64, device=DEVICE)

    def drafter(self, step) -> torch.Tensor:
        """One draft step: stores its token in the drafter's cache, guesses the next one."""
        slots = step.slot_mappings[self.group]
        keep = slots >= 0
        self.draft_cache.view(-1)[slots[keep]] = step.input_ids[keep]
        guesses = []
        for b in range(step.num_reqs):
            seq = self._read(self.draft_cache, step, self.group, self.page_sizes[self.group], b)
            t = truth(seq)
            guesses.append((t + 1) % V if self.wrong(seq) else t)
        return torch.tensor(guesses + [0] * (step.padded_num_reqs - step.num_reqs), device=DEVICE)

    def admit(self, rows: list[int], rng) -> None:
        prompts = [rng.integers(0, V, int(rng.integers(3, 12))).tolist() for _ in rows]
        for r, p in zip(rows, prompts, strict=True):
            self.seq[r], self.prompt_len[r] = list(p), len(p)
            self.hold(r, len(p))
            self.meta.stage_prompt(r, p)
        step = self.meta.prepare_prefill(rows, query_lens=[len(p) for p in prompts], cache_lens=[0] * len(rows))
        targets = self.target(step)
        last = torch.tensor(np.cumsum([len(p) for p in prompts]) - 1, device=DEVICE)
        acc = self.meta.accept_tokens(step, None, targets[last], [1] * len(rows), [len(p) for p in prompts])
        for b, r in enumerate(rows):
            self.seq[r].append(int(targets[last[b]]))
            self.cache_lens[r] = int(acc.cache_lens[b])

    def round(self) -> None:
        """A draft round through the loop, then the verify step, acceptance and bookkeeping."""
        rows, k, meta = sorted(self.seq), self.k, self.meta
        clens = [self.cache_lens[r] for r in rows]
        for r, c in zip(rows, clens, strict=True):
            self.hold(r, c + 1 + k)  # the verify step's reach (the round reaches c + k)
        round_ = meta.prepare_draft(rows, clens, num_steps=k)
        exact = [len(self.seq[r]) - 1 for r in rows]
        assert round_.steps[0].positions.tolist() == exact
        assert round_.steps[0].input_ids.tolist() == [self.seq[r][-1] for r in rows]
        drafts = round_.run(self.drafter).tolist()
        for b, r in enumerate(rows):  # the drafter saw the exact sequence, its drafts appended
            seq = list(self.seq[r])
            for j in range(k):
                t = truth(seq)
                assert drafts[b][j] == ((t + 1) % V if self.wrong(seq) else t)
                seq.append(drafts[b][j])
        step = meta.prepare_decode(rows, clens, num_draft_tokens=k)
        assert step.input_ids.tolist() == [t for r, d in zip(rows, drafts, strict=True) for t in (self.seq[r][-1], *d)]
        targets = self.target(step).view(len(rows), 1 + k)
        counts = []
        for b in range(len(rows)):
            a = 1 + int(torch.cumprod((targets[b, :-1] == torch.tensor(drafts[b], device=DEVICE)).long(), 0).sum())
            counts.append(a)
            self.accepted_drafts += a - 1
            self.rejected_drafts += k - (a - 1)
        num = torch.tensor(counts, device=DEVICE) if self.device_counts else counts
        acc = meta.accept_tokens(step, None, targets, num, [self.prompt_len[r] for r in rows])
        for b, r in enumerate(rows):
            for tok in targets[b, : counts[b]].tolist():
                assert tok == truth(self.seq[r])
                self.seq[r].append(tok)
            self.cache_lens[r] = int(acc.cache_lens[b])
            assert acc.exact[b] == (not self.device_counts)


@pytest.mark.parametrize("device_counts", [False, True], ids=["host-counts", "device-counts"])
@pytest.mark.parametrize("drafter", ["shared-pages", "own-group"])
@settings(max_examples=2, deadline=None, phases=_NO_SHRINK)
@given(data=st.data())
def test_drafting_through_the_loop_reproduces_greedy_decoding(path, device_counts, drafter, data):
    backend, host = path
    k = data.draw(st.integers(1, K), label="k")
    mode = data.draw(st.sampled_from(["perfect", "always-wrong", "sometimes-wrong"]), label="drafter")
    wrong = {
        "perfect": lambda seq: False,
        "always-wrong": lambda seq: True,
        "sometimes-wrong": lambda seq: truth(seq) % 3 == 0,
    }[mode]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    engine = Engine(backend, host, device_counts, k, drafter, wrong)
    engine.admit([3, 0], rng)
    for i in range(5):
        if i == 2:
            engine.admit([5], rng)  # a request joins: its first round drafts from its prompt's end
        engine.round()
        if max(len(s) for s in engine.seq.values()) > L - 2 * (K + 2):
            break
    for r, seq in engine.seq.items():
        assert engine.meta.token_ids[r, : len(seq)].tolist() == seq
        greedy = list(seq[: engine.prompt_len[r]])
        while len(greedy) < len(seq):
            greedy.append(truth(greedy))
        assert seq == greedy
    if mode == "perfect":
        assert engine.rejected_drafts == 0
    if mode == "always-wrong":
        assert engine.accepted_drafts == 0


# --------------------------------------------------------------------------------------------------
# GPU: a round replayed as one CUDA graph
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _no_sync():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _gpu_meta(page_size: int, k: int) -> BatchMetadata:
    cfg = MetadataConfig(
        max_num_reqs=8,
        max_num_tokens=1024,  # five prompts of up to 200 tokens in one prefill
        max_model_len=512,
        kv_groups=(KVGroup(page_size=page_size), KVGroup(page_size=page_size, window_left=31)),
        num_qo_heads=8,
        num_kv_heads=2,
        head_dim=64,
        q_dtype=torch.bfloat16,
        kv_dtype=torch.bfloat16,
        num_kv_pages=4096,
        max_draft_tokens=k,
        token_history=True,
        cuda_graph_batch_sizes=(4, 8),
    )
    return BatchMetadata(cfg)


def _step_buffers(step) -> tuple[torch.Tensor, ...]:
    """Every device buffer a draft step's forward (or a captured graph) reads."""
    views = step._views
    fixed = (step.positions, step.input_ids, step.seq_lens, step.idx_mapping, step.qo_indptr)
    return (*fixed, *step.slot_mappings, *step.kv_indptr, *step.kv_last_page_len, *views.kv_indices_full)


class _GpuDrafter:
    """A drafter on the device: q, k, v from embeddings of the input ids, KV stored at the step's slots,
    attention over both groups; the next token an argmax over the outputs (``choose="attention"``) or
    a function of the input ids alone (``"ids"``: the same drafts whichever way FlashInfer splits the
    KV). Records each step's queries and outputs in fixed buffers, for a reference afterwards."""

    def __init__(self, k: int, page_size: int, choose: str = "attention"):
        from batchmeta import ops

        self.ops, self.k, self.choose = ops, k, choose
        gen = torch.Generator(device="cuda").manual_seed(0)
        self.embed = torch.randn(1000, 3, 8, 64, generator=gen, device="cuda").to(torch.bfloat16)
        self.proj = torch.randn(8 * 64, 1000, generator=gen, device="cuda").to(torch.bfloat16)
        self.caches = [
            [torch.randn(4096, page_size, 2, 64, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(2)]
            for _ in range(2)
        ]
        self.calls = 0
        self.q = torch.zeros(k, 8, 8, 64, dtype=torch.bfloat16, device="cuda")
        self.out = torch.zeros(2, k, 8, 8, 64, dtype=torch.bfloat16, device="cuda")
        self.tokens = torch.zeros(8, dtype=torch.int64, device="cuda")

    def __call__(self, step) -> torch.Tensor:
        j = self.calls % self.k  # every round calls the drafter k times, in order
        self.calls += 1
        n = step.padded_num_reqs
        ids = step.input_ids[:n]
        emb = self.embed[ids]  # [n, 3, 8, 64]: q (8 heads), k and v (2 heads each)
        q = emb[:, 0].contiguous()
        self.q[j, :n] = q
        for g in range(2):
            k_new, v_new = emb[:, 1, :2].contiguous(), emb[:, 2, :2].contiguous()
            self.ops.store_kv(k_new, v_new, step.slot_mappings[g][:n], *self.caches[g])
            self.out[g, j, :n] = step.attention(q, *self.caches[g], group=g)
        if self.choose == "attention":
            logits = (self.out[0, j, :n] + self.out[1, j, :n]).reshape(n, -1) @ self.proj
            self.tokens[:n] = logits.argmax(-1)
        else:
            self.tokens[:n] = (ids * 7 + 3) % 1000
        return self.tokens


def _reference(drafter: _GpuDrafter, step, j: int, g: int, b: int) -> torch.Tensor:
    """Dense float32 attention of draft step ``j``'s real rows over group ``g`` (exact device metadata)."""
    from batchmeta.attention.torch_ref import paged_attention_torch

    indptr = step.kv_indptr[g][: b + 1].cpu().numpy()
    return paged_attention_torch(
        drafter.q[j, :b].float(),
        drafter.caches[g][0].float(),
        drafter.caches[g][1].float(),
        np.arange(b + 1),
        indptr,
        step._views.kv_indices_full[g][: int(indptr[b])],
        step.kv_last_page_len[g][:b].cpu().numpy(),
        causal=True,
        window_left=(-1, 31)[g],
        sm_scale=64**-0.5,
    )


def _gpu_hold(meta: BatchMetadata, r: int, tokens: int) -> None:
    """Request slot ``r``'s pages (the same in both groups) for ``tokens`` tokens, staged."""
    ps = meta.config.kv_groups[0].page_size
    held = meta.block_tables.num_pages(r, 0)
    pages = list(range(1 + r * (512 // ps), 1 + (r + 1) * (512 // ps)))[held : max(held, -(-tokens // ps))]
    if pages:
        meta.block_tables.append(r, [pages, pages])


def _admit(meta: BatchMetadata, prompts: list[list[int]], page_size: int, upfront: bool = True):
    """Pages (for the whole model length, or ``upfront=False`` the prompt's) and a prefill of every
    prompt; returns its acceptance."""
    b = len(prompts)
    for r, prompt in enumerate(prompts):
        _gpu_hold(meta, r, 512 if upfront else len(prompt))
        meta.stage_prompt(r, prompt)
    lens = [len(p) for p in prompts]
    step = meta.prepare_prefill(list(range(b)), query_lens=lens, cache_lens=[0] * b)
    return meta.accept_tokens(step, None, torch.arange(b, device="cuda") + 1, [1] * b, lens)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
def test_replayed_round_equals_eager_round_and_dense_attention_without_syncs(page_size):
    """Three rounds replayed as one graph each, against the same rounds run step by step (the same
    graph-planned rounds, so the same kernels and plans): the same drafts, bit for bit; attention
    of every step within bf16 tolerance of dense float32; no host sync; no buffer moves. Pages come
    a round at a time (the replay's first launch applies them), and the rounds alternate between
    the graphs of step 0's two host buffers."""
    k, b = 3, 5
    rng = np.random.default_rng(page_size)
    prompts = [rng.integers(0, 1000, int(n)).tolist() for n in rng.integers(20, 200, b)]
    results = {}
    for mode in ("eager", "graph"):
        meta = _gpu_meta(page_size, k)
        drafter = _GpuDrafter(k, page_size)
        if mode == "graph":
            meta.capture_draft_graph(8, k, drafter)
            drafter.calls = 0
        acc = _admit(meta, prompts, page_size, upfront=False)
        for r in range(b):
            _gpu_hold(meta, r, int(acc.cache_lens[r]) + k)
        # A first round outside the no-sync check: it makes the draft steps' buffers (once per step
        # index) and FlashInfer's first (stock) plans. What it writes the rounds below write again.
        round_ = meta.prepare_draft(list(range(b)), acc.cache_lens, num_steps=k, cuda_graph=True)
        if mode == "graph":
            meta.replay_draft_graph(round_)
        else:
            round_.run(drafter)
        addresses, drafts = None, []
        for i in range(3):  # rounds from lengths one further each time (drafts of the last round accepted)
            for r in range(b):  # a token more than the round needs: page size 1 stages pages every round
                _gpu_hold(meta, r, int(acc.cache_lens[r]) + i + 1 + k)
            assert page_size > 1 or meta.block_tables.num_staged()
            with _no_sync():
                round_ = meta.prepare_draft(list(range(b)), acc.cache_lens + i, num_steps=k, cuda_graph=True)
                if mode == "graph":
                    meta.replay_draft_graph(round_)
                else:
                    round_.run(drafter)
            ptrs = [[t.data_ptr() for t in _step_buffers(s)] for s in round_.steps]
            assert addresses is None or ptrs == addresses, "a draft step's buffer moved"
            addresses = ptrs
            drafts.append(round_.draft_token_ids.clone())
        torch.cuda.synchronize()
        for j, step in enumerate(round_.steps):  # the last round
            assert step.positions[:b].tolist() == (acc.cache_lens + 2 + j).tolist()
            for g in range(2):  # the pages staged just before the round, in every step
                indptr = step.kv_indptr[g][: b + 1].tolist()
                for r in range(b):
                    want = meta.block_tables.pages(r, g)[: -(-int(acc.cache_lens[r] + 3 + j) // page_size)]
                    assert step.kv_indices[g][indptr[r] : indptr[r + 1]].tolist() == want.tolist(), (j, g, r)
            for g in range(2):
                ref = _reference(drafter, step, j, g, b)
                torch.testing.assert_close(drafter.out[g, j, :b].float(), ref, atol=2e-2, rtol=2e-2)
        history = meta.token_ids[:b].clone()
        results[mode] = (drafts, history)
    for x, y in zip(results["eager"][0], results["graph"][0], strict=True):
        assert torch.equal(x, y)
    assert torch.equal(results["eager"][1], results["graph"][1])


@pytest.mark.gpu
def test_a_replay_after_step_0_was_launched_keeps_what_came_between():
    """A round whose step 0 was launched before its replay (here by a verify step prepared in
    between, which then applied newer pages) replays the graph captured without step 0: the newer
    pages stay, and the drafts and the block tables equal those of the same calls with the round
    run step by step."""
    k, b, page_size = 2, 3, 16
    prompts = [list(range(10 + r, 40 + r)) for r in range(b)]
    idx = list(range(b))
    results = {}
    for mode in ("graph", "eager"):
        meta = _gpu_meta(page_size, k)
        drafter = _GpuDrafter(k, page_size, choose="ids")
        if mode == "graph":
            meta.capture_draft_graph(4, k, drafter)
            drafter.calls = 0
        acc = _admit(meta, prompts, page_size, upfront=False)
        for r in idx:
            _gpu_hold(meta, r, int(acc.cache_lens[r]) + k)
        round_ = meta.prepare_draft(idx, acc.cache_lens, num_steps=k, cuda_graph=True)
        for r in idx:  # newer pages, applied by the verify step's launch
            _gpu_hold(meta, r, int(acc.cache_lens[r]) + k + 1 + 2 * page_size)
        assert meta.block_tables.num_staged()
        meta.prepare_decode(idx, acc.cache_lens, num_draft_tokens=k)
        if mode == "graph":
            meta.replay_draft_graph(round_)
        else:
            round_.run(drafter)
        torch.cuda.synchronize()
        results[mode] = (round_.draft_token_ids.clone(), meta.block_tables.flat.clone())
    assert torch.equal(results["graph"][0], results["eager"][0])
    assert torch.equal(results["graph"][1], results["eager"][1])


@pytest.mark.gpu
def test_graph_round_over_device_lengths_matches_exact_lengths():
    """A replayed round after device acceptance (the host plans from bounds) has the metadata of one
    after host acceptance of the same counts, and attention within bf16 tolerance of it."""
    k, b = 2, 3
    prompts = [list(range(10 + r, 40 + r)) for r in range(b)]
    results = {}
    for mode in ("device", "host"):
        meta = _gpu_meta(16, k)
        drafter = _GpuDrafter(k, 16, choose="ids")
        meta.capture_draft_graph(4, k, drafter)
        drafter.calls = 0
        acc = _admit(meta, prompts, 16)
        idx = list(range(b))
        step = meta.prepare_decode(idx, acc.cache_lens, num_draft_tokens=k)
        counts = [1, 2, 3]
        num = torch.tensor(counts, device="cuda") if mode == "device" else counts
        acc = meta.accept_tokens(step, None, torch.full((b, 1 + k), 7, device="cuda"), num, [30] * b)
        assert acc.exact.all() == (mode == "host")
        with _no_sync() if mode == "device" else contextlib.nullcontext():
            round_ = meta.prepare_draft(idx, acc.cache_lens, num_steps=k, cuda_graph=True)
            meta.replay_draft_graph(round_)
        torch.cuda.synchronize()
        fields = []
        for step in round_.steps:
            fields += [step.positions[:b], step.seq_lens[:b], step.input_ids[:b]]
            fields += [x[:b] for x in step.slot_mappings + step.kv_last_page_len]
            fields += [x[: b + 1] for x in step.kv_indptr]
            fields += [step._views.kv_indices_full[g][: int(step.kv_indptr[g][b])] for g in range(2)]
        results[mode] = (round_.draft_token_ids.clone(), [f.clone() for f in fields], drafter.out[:, :, :b].clone())
    assert torch.equal(results["device"][0], results["host"][0])
    for x, y in zip(results["device"][1], results["host"][1], strict=True):
        assert torch.equal(x, y)
    torch.testing.assert_close(results["device"][2].float(), results["host"][2].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_a_plan_is_kept_while_its_lengths_bound_the_rounds(cuda_graph, k):
    """Rounds whose rows grew by what their verify step accepted take the plan an earlier round made
    for ``plan_headroom`` more tokens per row, until a row outgrows it, needs more than twice the
    headroom less, or a round of another ``k`` planned in between (then the round plans again);
    every round's attention stays within bf16 tolerance of dense float32, replayed or run step by
    step, with no host sync."""
    b, page_size = 5, 16
    headroom = plan_headroom(k)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, 1000, int(n)).tolist() for n in rng.integers(120, 200, b)]
    meta = _gpu_meta(page_size, 3)  # rounds of up to 3 steps
    drafter = _GpuDrafter(k, page_size)
    if cuda_graph:
        meta.capture_draft_graph(8, k, drafter)
        drafter.calls = 0
    acc = _admit(meta, prompts, page_size)
    clens, bounds, planned = acc.cache_lens.copy(), None, []
    for i in range(16):
        if i == 12:  # every row far shorter than the plan (as if other requests took the rows)
            clens = clens - 3 * headroom
        if i == 7:  # a round of another k (prepared, not run) plans the shared workspace over
            other = meta.prepare_draft(list(range(b)), clens, num_steps=k % 3 + 1, cuda_graph=cuda_graph)
            assert other.planned
            bounds = None
        need = clens + k  # the last step's lengths
        fits = bounds is not None and (need <= bounds).all() and (bounds - need <= 2 * headroom).all()
        with _no_sync() if i else contextlib.nullcontext():  # the first round makes buffers and stock plans
            round_ = meta.prepare_draft(list(range(b)), clens, num_steps=k, cuda_graph=cuda_graph)
            if cuda_graph:
                meta.replay_draft_graph(round_)
            else:
                round_.run(drafter)
        assert round_.planned == (not fits), i
        if round_.planned:
            # A wrapper's first plan (eager: this test's first round) is for the step's own lengths
            # and not kept: FlashInfer picks its kernels then.
            bounds = need + headroom if i or cuda_graph else None
        planned.append(round_.planned)
        torch.cuda.synchronize()
        for j, step in enumerate(round_.steps):
            assert step.seq_lens[:b].tolist() == (clens + j + 1).tolist()
            for g in range(2):
                ref = _reference(drafter, step, j, g, b)
                torch.testing.assert_close(drafter.out[g, j, :b].float(), ref, atol=2e-2, rtol=2e-2)
        clens = clens + rng.integers(1, k + 2, b)  # the next verify step accepted 0..k drafts, and its token
    assert planned[0] and planned[7] and planned[12] and planned.count(False) >= 7, planned


def test_a_plan_is_shared_only_from_fa2_tensor_core_decode():
    """``DecodePlanner.adopt`` (a draft round's steps taking the last step's plan) refuses a source
    wrapper whose kernels take the planned lengths (FA3, CUDA-core decode) instead of clamping."""
    from batchmeta.attention.decode_planner import DecodePlanner

    class Wrapper:
        def __init__(self, tensor_cores, backend):
            self.use_tensor_cores, self._backend = tensor_cores, backend
            self.is_cuda_graph_enabled = True
            self._batch_size, self._max_kv_len, self._plan_info = 3, 40, [1, 2]

    def planner(wrapper):
        p = DecodePlanner.__new__(DecodePlanner)
        p.wrapper = wrapper
        return p

    dst = planner(Wrapper(True, "fa2"))
    for tensor_cores, backend in ((True, "fa3"), (False, "auto")):
        with pytest.raises(RuntimeError, match="tensor-core FA2"):
            dst.adopt(planner(Wrapper(tensor_cores, backend)), None, None, None)
    src = Wrapper(True, "fa2")
    src._batch_size, src._max_kv_len, src._plan_info = 4, 50, [7]
    dst.adopt(planner(src), None, None, None)
    assert (dst.wrapper._batch_size, dst.wrapper._max_kv_len, dst.wrapper._plan_info) == (4, 50, [7])
