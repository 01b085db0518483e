"""Speculative decoding through the library's own API, tested by feeding its values back.

A toy greedy model whose next token is a hash of every token it can see: it reads the tokens of its
context from a paged "KV cache" written at ``step.slot_mappings`` and read back through
``kv_indptr`` / ``kv_indices`` / ``kv_last_page_len`` (causally, as attention does), and its input
tokens are ``step.input_ids``. An engine loop that trusts the library (prepare from the lengths
``accept_tokens`` returned, drafts through ``write_drafts``, acceptance by comparing drafts with the
model's targets, host or device counts) must reproduce plain greedy decoding token for token, and
every step's positions and input ids must match a naive per-request sequence model. Any wrong
length, position, slot or page shows as a wrong token.

Runs through both step-kernel backends (Triton under the interpreter on a CPU, torch) and both host
paths; hypothesis draws the schedule: prefill chunks, mixed steps, decode and verify steps, and
all-rejected, all-accepted and random draft patterns. The GPU tests check that FlashInfer attention
over a step whose lengths are on the device equals the step prepared with the exact lengths.
"""

import contextlib

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from batchmeta import BatchMetadata, KVGroup, MetadataConfig
from batchmeta.host_path import COMPILED

DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
R, T, L, K, V = 4, 40, 64, 3, 50  # request slots, token budget, max_model_len, max drafts, vocabulary
PAGE_SIZES = (4, 1)


def truth(seq) -> int:
    """The toy model's greedy next token after ``seq``."""
    h = 0
    for i, t in enumerate(seq):
        h = (h * 31 + (int(t) + 1) * (i + 7)) % 1_000_003
    return h % V


class Engine:
    """An engine loop that trusts batchmeta, beside the naive model of each request's sequence."""

    def __init__(self, backend: str, host_path: str, device_counts: bool, k: int):
        cfg = MetadataConfig(
            max_num_reqs=R,
            max_num_tokens=T,
            max_model_len=L,
            kv_groups=tuple(KVGroup(page_size=p) for p in PAGE_SIZES),
            num_qo_heads=4,
            num_kv_heads=2,
            head_dim=8,
            device=DEVICE,
            token_history=True,
            max_draft_tokens=K,
            backend=backend,
            plan_attention=False,
        )
        self.meta = BatchMetadata(cfg)
        if host_path == "numpy":
            self.meta._host_path = None
        self.device_counts, self.k = device_counts, k
        self.caches = [torch.full((R * L // p + 1, p), -1, dtype=torch.int64, device=DEVICE) for p in PAGE_SIZES]
        self.seq: dict[int, list[int]] = {}  # the naive model: every token of the request, in order
        self.prompt_len: dict[int, int] = {}
        self.prefilled: dict[int, int] = {}
        self.cache_lens: dict[int, int] = {}  # what the engine passes next (the library's bound or length)
        self.drafts: dict[int, list[int]] = {}  # drafts written for the next verify step
        self.accepted_drafts = self.rejected_drafts = 0
        for r in range(R):  # every slot holds pages for max_model_len: page management is tested elsewhere
            self.meta.block_tables.append(
                r, [list(range(1 + r * (L // p), 1 + (r + 1) * (L // p))) for p in PAGE_SIZES]
            )

    def admit(self, r: int, prompt: list[int]) -> None:
        self.seq[r], self.prompt_len[r], self.prefilled[r] = list(prompt), len(prompt), 0

    def decoding(self) -> list[int]:
        return [r for r in self.seq if self.prefilled[r] == self.prompt_len[r]]

    # -- the model ---------------------------------------------------------------------------------
    def forward(self, step) -> torch.Tensor:
        """Stores the step's tokens in the caches and returns the target token after each query token."""
        ids = step.input_ids
        for g, cache in enumerate(self.caches):
            slots = step.slot_mappings[g]
            keep = slots >= 0
            cache.view(-1)[slots[keep]] = ids[: slots.numel()][keep]
        targets = []
        qo = step.qo_indptr.tolist()
        for g, ps in enumerate(PAGE_SIZES):
            indptr, last = step.kv_indptr[g].tolist(), step.kv_last_page_len[g].tolist()
            indices = step.kv_indices[g].tolist()
            out = []
            for b in range(step.num_reqs):
                pages = indices[indptr[b] : indptr[b + 1]]
                kv_len = (len(pages) - 1) * ps + last[b]
                tokens = [int(self.caches[g][pages[p // ps], p % ps]) for p in range(kv_len)]
                q = qo[b + 1] - qo[b]
                out += [truth(tokens[: kv_len - q + j + 1]) for j in range(q)]  # causal
            targets.append(out)
        assert targets[0] == targets[1], "the groups' metadata disagree"
        return torch.tensor(targets[0], dtype=torch.int64, device=DEVICE)

    # -- steps -------------------------------------------------------------------------------------
    def check_inputs(self, step, rows, qlens) -> None:
        """Positions and input ids against the naive model (exact lengths, even where the host has bounds)."""
        want_pos, want_ids = [], []
        for r, q in zip(rows, qlens, strict=True):
            if self.prefilled[r] < self.prompt_len[r]:  # a prompt chunk
                c = self.prefilled[r]
                want_ids += self.seq[r][c : c + q]
            else:  # the last accepted token, then the drafts written for this step
                c = len(self.seq[r]) - 1
                want_ids += [self.seq[r][-1], *self.drafts.get(r, [])[: q - 1]]
            want_pos += list(range(c, c + q))
        assert step.positions.tolist() == want_pos
        assert step.input_ids.tolist() == want_ids

    def prefill_step(self, chunks: dict[int, int]) -> None:
        """Prefill chunks beside single-token decode rows (a mixed step when both are present)."""
        rows = [r for r in chunks] + [r for r in self.decoding() if r not in chunks]
        qlens = [chunks.get(r, 1) for r in rows]
        clens = [self.prefilled[r] if r in chunks else self.cache_lens[r] for r in rows]
        for r in rows:
            if r in chunks and self.prefilled[r] == 0:
                self.meta.stage_prompt(r, self.seq[r])
        step = self.meta.prepare_prefill(rows, query_lens=qlens, cache_lens=clens)
        self.check_inputs(step, rows, qlens)
        self.finish(step, rows, qlens, k=0)

    def verify_step(self, k: int) -> None:
        rows = self.decoding()
        step = self.meta.prepare_decode(rows, [self.cache_lens[r] for r in rows], num_draft_tokens=k)
        self.check_inputs(step, rows, [1 + k] * len(rows))
        self.finish(step, rows, [1 + k] * len(rows), k=k)

    def finish(self, step, rows, qlens, k: int) -> None:
        """Verification, acceptance (host or device counts), bookkeeping and the next drafts."""
        targets = self.forward(step)
        qo = np.concatenate([[0], np.cumsum(qlens)])
        ids = step.input_ids
        width = 1 + k
        target_rows = torch.zeros(len(rows), width, dtype=torch.int64, device=DEVICE)
        counts = []
        for b, r in enumerate(rows):
            t = targets[qo[b] : qo[b + 1]]
            if self.prefilled[r] < self.prompt_len[r]:  # a prefill chunk
                self.prefilled[r] += qlens[b]
                counts.append(1)  # inside the prompt the token is dropped; at its end it is the first one
                target_rows[b, 0] = t[-1]
                continue
            drafts = ids[qo[b] + qlens[b] - k : qo[b + 1]]
            a = 1 + int(torch.cumprod((t[:-1] == drafts).long(), 0).sum()) if k else 1
            counts.append(a)
            target_rows[b, :a] = t[:a]
            self.accepted_drafts += a - 1
            self.rejected_drafts += k - (a - 1)
        num = torch.tensor(counts, device=DEVICE) if self.device_counts else counts
        acc = self.meta.accept_tokens(step, None, target_rows, num, [self.prompt_len[r] for r in rows])
        for b, r in enumerate(rows):
            if self.prefilled[r] == self.prompt_len[r]:
                for tok in target_rows[b, : counts[b]].tolist():  # every accepted token is the greedy one
                    assert tok == truth(self.seq[r]), (r, tok, self.seq[r])
                    self.seq[r].append(tok)
            self.cache_lens[r] = int(acc.cache_lens[b])
            exact = len(self.seq[r]) - 1 if self.prefilled[r] == self.prompt_len[r] else self.prefilled[r]
            assert self.cache_lens[r] >= exact and (not acc.exact[b] or self.cache_lens[r] == exact)
        self.write_drafts(step, rows)

    def write_drafts(self, step, rows) -> None:
        """Drafts for the next verify step: a run of right tokens, then wrong ones (the pattern drawn);
        none for a request still inside its prompt (ragged, with host or device counts)."""
        k = self.k
        flat, counts = [], []
        for r in rows:
            if self.prefilled[r] < self.prompt_len[r]:
                counts.append(0)
                continue
            good = self.pattern(r, k)
            seq, drafts = list(self.seq[r]), []
            for j in range(k):
                t = truth(seq)
                drafts.append(t if j < good else (t + 1 + j) % V)
                seq.append(drafts[-1])
            self.drafts[r] = drafts
            flat += drafts
            counts.append(k)
        num = torch.tensor(counts, device=DEVICE) if self.device_counts else counts
        self.meta.write_drafts(step, torch.tensor(flat, dtype=torch.int64, device=DEVICE), num)

    pattern = staticmethod(lambda r, k: k)  # right drafts per row: replaced per test


@pytest.fixture(
    params=[("triton", "compiled"), ("triton", "numpy"), ("torch", "compiled"), ("torch", "numpy")],
    ids=lambda p: "-".join(p),
)
def path(request):
    if request.param[1] == "compiled" and not COMPILED:
        pytest.skip("numba not installed (or BATCHMETA_HOST_PATH=numpy)")
    return request.param


@pytest.mark.parametrize("device_counts", [False, True], ids=["host-counts", "device-counts"])
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_speculative_loop_reproduces_greedy_decoding(path, device_counts, data):
    backend, host = path
    k = data.draw(st.integers(1, K), label="k")
    engine = Engine(backend, host, device_counts, k)
    mode = data.draw(st.sampled_from(["all-rejected", "all-accepted", "random"]), label="drafts")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    engine.pattern = {
        "all-rejected": lambda r, kk: 0,
        "all-accepted": lambda r, kk: kk,
        "random": lambda r, kk: int(rng.integers(0, kk + 1)),
    }[mode]
    prompts = {r: rng.integers(0, V, int(rng.integers(3, 12))).tolist() for r in range(3)}
    engine.admit(0, prompts[0])
    engine.admit(1, prompts[1])
    engine.prefill_step({0: len(prompts[0]), 1: 2})  # request 1 in chunks
    engine.prefill_step({1: len(prompts[1]) - 2})
    engine.admit(2, prompts[2])
    for _ in range(6):
        kind = data.draw(st.sampled_from(["verify", "verify", "decode", "mixed"]), label="step")
        pending = {r: engine.prompt_len[r] - engine.prefilled[r] for r in engine.seq if r not in engine.decoding()}
        if kind == "mixed" and pending:
            r = next(iter(pending))
            engine.prefill_step({r: min(pending[r], data.draw(st.integers(1, pending[r]), label="chunk"))})
        elif kind == "decode":
            engine.verify_step(0)
        else:
            engine.verify_step(k)
        if max(len(s) for s in engine.seq.values()) > L - 2 * (K + 2):
            break
    for r, seq in engine.seq.items():  # the library's history holds exactly the naive sequence
        if not engine.prefilled[r]:
            continue
        assert engine.meta.token_ids[r, : len(seq)].tolist() == seq
        greedy = list(seq[: engine.prompt_len[r]])
        while len(greedy) < len(seq):
            greedy.append(truth(greedy))
        assert seq == greedy
    if mode == "all-rejected":
        assert engine.accepted_drafts == 0
    if mode == "all-accepted":
        assert engine.rejected_drafts == 0


def test_worked_case_both_drafts_rejected(path):
    """SPEC's worked case: c = 5, k = 2, both drafts rejected (a = 1): the bonus token sits at position 6
    and the next cache length is 6; the next decode runs it at position 6."""
    backend, host = path
    for device_counts in (False, True):
        engine = Engine(backend, host, device_counts, 2)
        meta = engine.meta
        meta.stage_prompt(0, [100, 101, 102, 103, 104])
        step = meta.prepare_prefill([0], query_lens=[5], cache_lens=[0])
        acc = meta.accept_tokens(step, None, torch.tensor([7], device=DEVICE), [1], [5])
        assert acc.cache_lens.tolist() == [5] and acc.exact.all()
        meta.write_drafts(step, torch.tensor([[50, 51]], device=DEVICE))
        step = meta.prepare_decode([0], acc.cache_lens, num_draft_tokens=2)  # input_ids [7, d1, d2] at 5..7
        assert step.input_ids.tolist() == [7, 50, 51] and step.positions.tolist() == [5, 6, 7]
        counts = torch.tensor([1], device=DEVICE) if device_counts else [1]
        acc = meta.accept_tokens(step, None, torch.tensor([[9, 0, 0]], device=DEVICE), counts, [5])
        assert meta.token_ids[0, :7].tolist() == [100, 101, 102, 103, 104, 7, 9]
        assert acc.cache_lens.tolist() == ([8] if device_counts else [6])  # the bound c + q, or the length
        assert acc.exact.tolist() == [not device_counts]
        step = meta.prepare_decode([0], acc.cache_lens)
        assert step.input_ids.tolist() == [9] and step.positions.tolist() == [6]
        assert step.seq_lens.tolist() == [7] and step.slot_mappings[1].tolist()[:1] == [1 + 6]
        assert step.rows_on_device.tolist() == [device_counts]
        meta.accept_tokens(step, None, torch.tensor([1], device=DEVICE), [1], [5])
        with pytest.raises(ValueError, match="already accepted"):
            meta.accept_tokens(step, None, torch.tensor([1], device=DEVICE), [1], [5])


@pytest.mark.parametrize(
    "num_accepted, match",
    [
        ([0], r"num_accepted: batch row 0 accepts 1\.\.3"),
        ([4], r"1\.\.3 \(1 \+ num_draft_tokens\)"),
        ([-1], "num_accepted"),
    ],
)
def test_host_counts_out_of_the_rule_are_rejected_before_anything_changes(num_accepted, match):
    engine = Engine("torch", "compiled" if COMPILED else "numpy", False, 2)
    meta = engine.meta
    meta.stage_prompt(0, [1, 2, 3])
    step = meta.prepare_prefill([0], query_lens=[3], cache_lens=[0])
    meta.accept_tokens(step, None, torch.tensor([4], device=DEVICE), [1], [3])
    step = meta.prepare_decode([0], [3], num_draft_tokens=2)
    before = meta.token_ids.clone(), meta._spec.lens.clone()
    with pytest.raises(ValueError, match=match):
        meta.accept_tokens(step, None, torch.tensor([[5, 6, 7]], device=DEVICE), num_accepted, [3])
    assert torch.equal(meta.token_ids, before[0]) and torch.equal(meta._spec.lens, before[1])
    assert not step._accepted


def _slot_0_on_the_device():
    """A prompt of 3 in slot 0, then a verify step of 2 drafts accepted with device counts (2): the
    slot's length is on the device, its bound 6."""
    engine = Engine("torch", "compiled" if COMPILED else "numpy", True, 2)
    meta = engine.meta
    meta.stage_prompt(0, [1, 2, 3])
    step = meta.prepare_prefill([0], query_lens=[3], cache_lens=[0])
    meta.accept_tokens(step, None, torch.tensor([4], device=DEVICE), [1], [3])
    step = meta.prepare_decode([0], [3], num_draft_tokens=2)
    acc = meta.accept_tokens(
        step, None, torch.tensor([[4, 4, 4]], device=DEVICE), torch.tensor([2], device=DEVICE), [3]
    )
    return meta, acc


def test_bounds_must_be_passed_back_and_reset_forgets_them():
    meta, acc = _slot_0_on_the_device()
    assert acc.cache_lens.tolist() == [6] and not acc.exact[0]
    with pytest.raises(ValueError, match=r"cache_lens: request slot 0's length is on the device .* 6, got 4"):
        meta.prepare_decode([0], [4])
    meta.block_tables.reset(0)  # a new request in slot 0 starts from the host's lengths
    meta.block_tables.append(0, [[1, 2], [1, 2, 3]])
    meta.stage_prompt(0, [9, 9])
    step = meta.prepare_prefill([0], query_lens=[2], cache_lens=[0])
    assert step.rows_on_device.tolist() == [False]


def test_two_steps_in_flight_keep_every_increment():
    """Two verify steps prepared from one bound, then accepted in order with host counts: the second's
    length is the device's (the first accept's increment kept, not dropped with the bookkeeping)."""
    meta, acc = _slot_0_on_the_device()
    bound = acc.cache_lens.tolist()
    assert bound == [6] and not acc.exact[0]
    first = meta.prepare_decode([0], bound, num_draft_tokens=2)
    second = meta.prepare_decode([0], bound, num_draft_tokens=2)  # prepared before the first is accepted
    for s, n in ((first, 2), (second, 3)):
        acc = meta.accept_tokens(s, None, torch.tensor([[4, 4, 4]], device=DEVICE), [n], [3])
        device_len = int(meta._spec.lens[0])
        assert acc.cache_lens[0] >= device_len and (not acc.exact[0] or acc.cache_lens[0] == device_len)
    assert device_len == 10 and acc.cache_lens.tolist() == [10] and acc.exact[0]


def test_write_drafts_checks():
    engine = Engine("torch", "compiled" if COMPILED else "numpy", False, 2)
    meta = engine.meta
    meta.stage_prompt(0, [1, 2, 3])
    step = meta.prepare_prefill([0], query_lens=[3], cache_lens=[0])
    with pytest.raises(ValueError, match="accept its tokens first"):
        meta.write_drafts(step, torch.zeros(1, 2, dtype=torch.int64, device=DEVICE))
    meta.accept_tokens(step, None, torch.tensor([4], device=DEVICE), [1], [3])
    bad = [
        (lambda: meta.write_drafts(step, torch.zeros(1, K + 1, dtype=torch.int64, device=DEVICE)), ValueError),
        (lambda: meta.write_drafts(step, torch.zeros(2, 2, dtype=torch.int64, device=DEVICE)), ValueError),
        (lambda: meta.write_drafts(step, torch.zeros(1, 2, dtype=torch.float32, device=DEVICE)), TypeError),
        (lambda: meta.write_drafts(step, torch.zeros(3, dtype=torch.int64, device=DEVICE)), ValueError),
        (lambda: meta.write_drafts(step, torch.zeros(3, dtype=torch.int64, device=DEVICE), [K + 1]), ValueError),
        (lambda: meta.write_drafts(step, torch.zeros(1, dtype=torch.int64, device=DEVICE), [2]), ValueError),
    ]
    before = meta.token_ids.clone()
    for call, error in bad:
        with pytest.raises(error):
            call()
    assert torch.equal(meta.token_ids, before)
    # Ragged drafts with host counts land after the next cache length (3): positions 4 and 5.
    meta.write_drafts(step, torch.tensor([8, 9], device=DEVICE), [2])
    assert meta.token_ids[0, :6].tolist() == [1, 2, 3, 4, 8, 9]


# --------------------------------------------------------------------------------------------------
# GPU: FlashInfer attention over device lengths equals the step prepared with the exact lengths
# --------------------------------------------------------------------------------------------------
def _gpu_meta(page_size: int, graph_sizes=(4, 8), max_num_tokens: int = 64) -> BatchMetadata:
    cfg = MetadataConfig(
        max_num_reqs=8,
        max_num_tokens=max_num_tokens,
        max_model_len=512,
        kv_groups=(KVGroup(page_size=page_size), KVGroup(page_size=page_size, window_left=31)),
        num_qo_heads=8,
        num_kv_heads=2,
        head_dim=64,
        q_dtype=torch.bfloat16,
        kv_dtype=torch.bfloat16,
        num_kv_pages=4096,
        max_draft_tokens=3,
        token_history=True,
        cuda_graph_batch_sizes=graph_sizes,
    )
    return BatchMetadata(cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("next_k", [0, 2], ids=["decode", "verify"])
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_attention_over_device_lengths_equals_exact_lengths(page_size, next_k, graph):
    from batchmeta.attention.torch_ref import paged_attention_torch

    torch.manual_seed(0)
    rng = np.random.default_rng(page_size + 10 * next_k + 100 * graph)
    b = 5
    prompts = rng.integers(20, 300, b)
    counts = rng.integers(1, 5, b)  # accepted of 1 + 3 (a row with every draft rejected, one with all accepted)
    counts[0], counts[1] = 1, 4
    # The first step prefills every prompt at once: up to 5 * 300 tokens.
    metas = {name: _gpu_meta(page_size, max_num_tokens=1536) for name in ("device", "exact")}
    pages_per_req = 512 // page_size
    num_pages = 4096
    caches = [
        [torch.randn(num_pages, page_size, 2, 64, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
        for _ in range(2)
    ]
    static_q = torch.zeros(8 * (1 + next_k), 8, 64, dtype=torch.bfloat16, device="cuda")
    outs = {}
    for name, meta in metas.items():
        static_out = [torch.zeros_like(static_q) for _ in range(2)]

        def forward(step, static_out=static_out):
            n = step.padded_num_reqs * (1 + next_k)
            for g in range(2):
                static_out[g][:n] = step.attention(static_q[:n], *caches[g], group=g)

        if graph:
            for bs in (4, 8):
                meta.capture_decode_graph(bs, forward, num_draft_tokens=next_k)
        idx = list(range(b))
        for r in idx:
            meta.block_tables.append(r, [list(range(1 + r * pages_per_req, 1 + (r + 1) * pages_per_req))] * 2)
            meta.stage_prompt(r, rng.integers(0, 1000, int(prompts[r])).tolist())
        step = meta.prepare_prefill(idx, query_lens=prompts, cache_lens=[0] * b)
        acc = meta.accept_tokens(step, None, torch.arange(b, device="cuda"), [1] * b, prompts)
        meta.write_drafts(step, torch.ones(b, 3, dtype=torch.int64, device="cuda"))
        step = meta.prepare_decode(idx, acc.cache_lens, num_draft_tokens=3)
        targets = torch.full((b, 4), 5, dtype=torch.int64, device="cuda")
        num = torch.tensor(counts, device="cuda") if name == "device" else counts.tolist()
        with _no_sync() if name == "device" else contextlib.nullcontext():
            acc = meta.accept_tokens(step, None, targets, num, prompts)
            meta.write_drafts(step, torch.ones(b, 3, dtype=torch.int64, device="cuda"))
            step = meta.prepare_decode(idx, acc.cache_lens, num_draft_tokens=next_k, cuda_graph=graph)
        assert step.rows_on_device.all() == (name == "device")
        q = torch.randn(b * (1 + next_k), 8, 64, generator=torch.Generator().manual_seed(1))
        static_q[: b * (1 + next_k)] = q.to(device="cuda", dtype=torch.bfloat16)
        if graph:
            meta.replay_decode_graph(step)
        else:
            with step:
                forward(step)
        torch.cuda.synchronize()
        t = b * (1 + next_k)
        outs[name] = [o[:t].clone() for o in static_out]
        fields = [step.positions[:t], step.seq_lens[:b], *(x[:t] for x in step.slot_mappings)]
        fields += [*(x[: b + 1] for x in step.kv_indptr), *(x[:b] for x in step.kv_last_page_len)]
        outs[name + "-fields"] = [f.clone() for f in fields]
        outs[name + "-indices"] = [step.kv_indices[g][: int(step.kv_indptr[g][b])].clone() for g in range(2)]
        outs[name + "-host"] = step
    exact_lens = prompts + counts  # c' = prompt + 1 + a - 1
    assert outs["device-fields"][1].tolist() == (exact_lens + 1 + next_k).tolist()
    for x, y in zip(
        outs["device-fields"] + outs["device-indices"], outs["exact-fields"] + outs["exact-indices"], strict=True
    ):
        assert torch.equal(x, y)
    # Attention: FlashInfer planned from the bounds (device) or the exact lengths. Where neither plan
    # splits a row's KV the kernels compute the same sums in the same order; a split partitions
    # the KV differently (its chunk size comes from the planned lengths) and reorders the float
    # sums of the merge: equal within bf16 rounding, and both within tolerance of a dense float32
    # reference.
    step = outs["exact-host"]
    for g in range(2):
        a, e = outs["device"][g].float(), outs["exact"][g].float()
        torch.testing.assert_close(a, e, atol=2e-2, rtol=2e-2)
        ref = paged_attention_torch(
            static_q[: b * (1 + next_k)].float(),
            caches[g][0].float(),
            caches[g][1].float(),
            np.arange(b + 1) * (1 + next_k),
            outs["exact-fields"][2 + 2 + g].cpu().numpy(),
            outs["exact-indices"][g],
            outs["exact-fields"][2 + 2 + 2 + g].cpu().numpy(),
            causal=True,
            window_left=(-1, 31)[g],
            sm_scale=64**-0.5,
        )
        torch.testing.assert_close(a, ref, atol=2e-2, rtol=2e-2)
    del step


@contextlib.contextmanager
def _no_sync():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
def test_speculative_loop_on_the_gpu_without_host_syncs():
    """The whole device-acceptance loop (prepare, drafts gathered, verify on the device, accept,
    drafts written) under set_sync_debug_mode("error"), eager and under CUDA graphs."""
    meta = _gpu_meta(16)
    b, k = 3, 3
    idx = list(range(b))
    for r in idx:
        meta.block_tables.append(r, [list(range(1 + 32 * r, 33 + 32 * r))] * 2)
        meta.stage_prompt(r, list(range(10 + r, 30 + r)))
    step = meta.prepare_prefill(idx, query_lens=[20] * b, cache_lens=[0] * b)
    acc = meta.accept_tokens(step, None, torch.arange(b, device="cuda"), [1] * b, [20] * b)
    meta.write_drafts(step, torch.ones(b, k, dtype=torch.int64, device="cuda"))
    with _no_sync():
        for i in range(8):
            step = meta.prepare_decode(idx, acc.cache_lens, num_draft_tokens=k, cuda_graph=bool(i % 2))
            ids = step.input_ids[: b * (1 + k)].view(b, 1 + k)
            targets = (ids * 7 + 3) % 11  # a stand-in verifier on the device
            a = 1 + torch.cumprod((targets[:, :-1] == ids[:, 1:]).long(), 1).sum(1)
            acc = meta.accept_tokens(step, None, targets, a, [20] * b)
            meta.write_drafts(step, (targets[:, -k:] + 1) % 11)
    torch.cuda.synchronize()
    assert (acc.cache_lens <= 20 + 8 * (1 + k)).all()


def test_drafts_never_land_inside_a_prompt():
    """A request still prefilling (its whole prompt staged) gets no drafts over its prompt tokens."""
    engine = Engine("torch", "compiled" if COMPILED else "numpy", False, 2)
    meta = engine.meta
    meta.stage_prompt(1, [1, 2, 3, 4, 5, 6])
    step = meta.prepare_prefill(
        [1], query_lens=[3], cache_lens=[0]
    )  # the first chunk; the history holds the whole prompt
    meta.accept_tokens(step, None, torch.tensor([9], device=DEVICE), [0], [6])
    meta.write_drafts(step, torch.tensor([[70, 71]], device=DEVICE))  # positions 4, 5: inside the prompt
    assert meta.token_ids[1, :7].tolist() == [1, 2, 3, 4, 5, 6, 0]
