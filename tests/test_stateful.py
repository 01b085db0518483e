"""A stateful property test of BatchMetadata: random sequences of append, reset, prefill, decode,
speculative decode and accept_tokens, valid and invalid, over 1-5 KV-cache groups with odd page
sizes, checked after every call against a naive Python model of every field. A call the model
says is invalid must raise ValueError/TypeError and leave every buffer, host mirror and staged
write byte-identical.

Runs through the torch implementation and through Triton (the interpreter on a CPU, compiled
kernels on a GPU). ``BATCHMETA_STATEFUL_EXAMPLES`` sets the number of sequences per backend
(default 25 on a CPU, 100 with CUDA), each up to ``BATCHMETA_STATEFUL_STEPS`` calls (default 25).
"""

import math
import os

import hypothesis.strategies as st
import numpy as np
import torch
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_metadata import check_step
from test_reliability import assert_same, state

from batchmeta import BatchMetadata, KVGroup, MetadataConfig

DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
R, T, L, K, NUM_PAGES = 4, 24, 24, 2, 512  # request slots, token budget, max_model_len, draft tokens, pages
PAGE_SIZES = [(3,), (1, 5), (3, 2, 7), (5, 1, 3, 2), (3, 5, 1, 7, 2)]
EXAMPLES = int(os.environ.get("BATCHMETA_STATEFUL_EXAMPLES", "100" if torch.cuda.is_available() else "25"))
STEPS = int(os.environ.get("BATCHMETA_STATEFUL_STEPS", "25"))


class MetadataMachine(RuleBasedStateMachine):
    BACKEND: str | None = None
    NUMPY_HOST_PATH = False  # True: the numpy checks and staging (the reference of the compiled path)

    @initialize(page_sizes=st.sampled_from(PAGE_SIZES), tables=st.booleans(), data=st.data())
    def setup(self, page_sizes, tables=True, data=None):
        self.page_sizes = page_sizes
        cfg = MetadataConfig(
            max_num_reqs=R,
            max_num_tokens=T,
            max_model_len=L,
            kv_groups=tuple(KVGroup(page_size=p) for p in page_sizes),
            num_qo_heads=4,
            num_kv_heads=2,
            head_dim=8,
            q_dtype=torch.float16,
            kv_dtype=torch.float16,
            device=DEVICE,
            num_kv_pages=NUM_PAGES,
            max_draft_tokens=K,
            backend=self.BACKEND,
            plan_attention=False,
            batch_block_tables=tables,
        )
        self.meta = BatchMetadata(cfg)
        if self.NUMPY_HOST_PATH:
            self.meta._host_path = None
        self.widths = [math.ceil(L / p) for p in page_sizes]
        self.held = {r: [[] for _ in page_sizes] for r in range(R)}  # the model: pages per slot and group
        self.history = torch.zeros(R, L, dtype=torch.int64, device=DEVICE)
        self.model_history = [[0] * L for _ in range(R)]
        self.last = None  # (step, idx, qlens, clens) of the latest valid step
        if data is None:
            return
        # Start with pages for a random number of tokens in most request slots, so steps have rows.
        for r in range(R):
            tokens = data.draw(st.integers(0, L))
            new = [
                list(range(100 * r + 10 * g, 100 * r + 10 * g + math.ceil(tokens / p)))
                for g, p in enumerate(page_sizes)
            ]
            if tokens:
                self.meta.block_tables.append(r, new)
                self.held[r] = new

    # -- the model's view of validity -------------------------------------------------------------
    def capacity(self, r: int) -> int:
        """Tokens request slot ``r``'s pages cover in every group."""
        return min(L, *(len(self.held[r][g]) * p for g, p in enumerate(self.page_sizes)))

    def batch_ok(self, idx, qlens, clens) -> bool:
        if len(idx) > R or any(not 0 <= r < R for r in idx) or len(set(idx)) != len(idx):
            return False
        if any(q < 1 for q in qlens) or any(c < 0 for c in clens) or sum(qlens) > T:
            return False
        return all(c + q <= self.capacity(r) for r, q, c in zip(idx, qlens, clens, strict=True))

    def rejected(self, call) -> None:
        before = state(self.meta)
        try:
            call()
        except (ValueError, TypeError):
            pass
        else:
            raise AssertionError("the model says this call is invalid, but it was accepted")
        assert_same(before, state(self.meta))

    # -- block tables -----------------------------------------------------------------------------
    @rule(data=st.data(), req=st.integers(-1, R))
    def append(self, data, req):
        page_id = st.integers(0, NUM_PAGES - 1) | st.sampled_from([-1, NUM_PAGES])  # mostly valid
        new = [data.draw(st.lists(page_id, max_size=4)) for _ in self.page_sizes]
        ok = 0 <= req < R and all(
            len(self.held[req][g]) + len(p) <= self.widths[g] and all(0 <= x < NUM_PAGES for x in p)
            for g, p in enumerate(new)
        )
        pages = new[0] if len(new) == 1 and data.draw(st.booleans()) else new  # flat form for one group
        if not ok:
            self.rejected(lambda: self.meta.block_tables.append(req, pages))
            return
        self.meta.block_tables.append(req, pages)
        for g, p in enumerate(new):
            self.held[req][g] += p

    @rule(req=st.integers(-1, R))
    def reset(self, req):
        if not 0 <= req < R:
            self.rejected(lambda: self.meta.block_tables.reset(req))
            return
        self.meta.block_tables.reset(req)
        self.held[req] = [[] for _ in self.page_sizes]

    # -- steps --------------------------------------------------------------------------------------
    def draw_batch(self, data, query_len=None):
        """A batch that fits the model (most of the time) or an arbitrary one."""
        if data.draw(st.integers(0, 3)):
            slots = [r for r in range(R) if self.capacity(r) >= (query_len or 1)]
            idx = data.draw(st.permutations(slots))[: data.draw(st.integers(0, len(slots)))] if slots else []
            clens, qlens = [], []
            for r in idx:
                q = query_len or data.draw(st.integers(1, self.capacity(r)))
                clens.append(data.draw(st.integers(0, self.capacity(r) - q)))
                qlens.append(q)
        else:
            n = data.draw(st.integers(0, R + 1))
            idx = data.draw(st.lists(st.integers(-1, R), min_size=n, max_size=n))
            clens = data.draw(st.lists(st.integers(-1, L + 1), min_size=n, max_size=n))
            qlens = [query_len or q for q in data.draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))]
        return idx, qlens, clens

    def accepted(self, step, idx, qlens, clens) -> None:
        check_step(step, self.meta, self.held, idx, qlens, clens)
        for g in range(len(self.page_sizes)):
            assert step.kv_indices_host[g].tolist() == step.kv_indices[g].cpu().tolist()
        self.last = (step, idx, qlens, clens)

    @rule(data=st.data())
    def prefill(self, data):
        idx, qlens, clens = self.draw_batch(data)
        if not self.batch_ok(idx, qlens, clens):
            self.rejected(lambda: self.meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens))
            return
        self.accepted(self.meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens), idx, qlens, clens)

    @rule(data=st.data(), k=st.integers(0, K + 1))
    def decode(self, data, k):
        idx, qlens, clens = self.draw_batch(data, query_len=1 + k)
        if k > K or not self.batch_ok(idx, qlens, clens):
            self.rejected(lambda: self.meta.prepare_decode(idx, clens, num_draft_tokens=k))
            return
        step = self.meta.prepare_decode(idx, clens, num_draft_tokens=k)
        assert step.kind == ("spec_decode" if k else "decode")
        self.accepted(step, idx, qlens, clens)

    @precondition(lambda self: self.last is not None)
    @rule(data=st.data())
    def accept_tokens(self, data):
        step, idx, qlens, clens = self.last
        n = len(idx)
        k = step.num_draft_tokens
        num_accepted = data.draw(st.lists(st.integers(-1, K + 2), min_size=n, max_size=n))
        prompts = data.draw(st.lists(st.integers(-1, L + 1), min_size=n, max_size=n))
        short = data.draw(st.integers(0, 5)) == 0  # one token fewer than accepted
        total = max(0, sum(num_accepted) - short)
        tokens = data.draw(st.lists(st.integers(1, 1000), min_size=total, max_size=total))
        next_ids = torch.tensor(tokens, dtype=torch.int64, device=DEVICE)
        # The engine's rule: a row reaching its prompt's end accepts 1..1+k tokens, one inside it 0..1.
        ends = [c + q >= p for c, q, p in zip(clens, qlens, prompts, strict=True)]
        rows = zip(clens, qlens, num_accepted, ends, strict=True)
        nxt = [c + q - k + a - 1 if a >= 1 and e else c + q for c, q, a, e in rows]
        ok = (
            not step._accepted
            and all(0 <= p <= L for p in prompts)
            and all((1 if e else 0) <= a <= (1 + k if e else 1) for a, e in zip(num_accepted, ends, strict=True))
            and sum(num_accepted) <= total
            and all(x < L for x, a, e in zip(nxt, num_accepted, ends, strict=True) if a >= 1 and e)
        )
        call = lambda: self.meta.accept_tokens(step, self.history, next_ids, num_accepted, prompts)
        if not ok:
            self.rejected(call)
            assert self.history.cpu().tolist() == self.model_history
            return
        new_cache, exact = call()
        assert new_cache.tolist() == nxt and exact.all()
        at = 0
        for r, c, q, a, p in zip(idx, clens, qlens, num_accepted, prompts, strict=True):
            for j in range(a):
                if c + q - k + j >= p:
                    self.model_history[r][c + q - k + j] = tokens[at + j]
            at += a
        assert self.history.cpu().tolist() == self.model_history

    @invariant()
    def mirror_matches_model(self):
        if not hasattr(self, "meta"):
            return
        for r in range(R):
            for g in range(len(self.page_sizes)):
                assert self.meta.block_tables.pages(r, g).tolist() == self.held[r][g]


class TorchMachine(MetadataMachine):
    BACKEND = "torch"


class TritonMachine(MetadataMachine):
    BACKEND = None  # Triton: compiled on a GPU, the interpreter on a CPU (conftest sets TRITON_INTERPRET)


class NumpyHostMachine(MetadataMachine):
    BACKEND = None  # the Triton kernel: it reads the packed rows the numpy path writes
    NUMPY_HOST_PATH = True


_settings = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None)
TestStatefulTorch = TorchMachine.TestCase
TestStatefulTorch.settings = _settings
TestStatefulTriton = TritonMachine.TestCase
TestStatefulTriton.settings = _settings


def test_model_rejects_what_it_should():
    """The model itself: a fitting batch is valid, one token beyond the held pages is not."""
    m = TorchMachine()
    m.setup(page_sizes=(3, 2))  # no data: no pages
    m.held[0] = [[1, 2], [3, 4, 5]]  # 6 tokens in both groups
    assert m.batch_ok([0], [2], [4]) and not m.batch_ok([0], [3], [4]) and not m.batch_ok([0, 0], [1, 1], [0, 0])
    assert np.array_equal(m.meta.block_tables.pages(0), np.zeros(0)), "the model was edited, not the object"


TestStatefulNumpyHost = NumpyHostMachine.TestCase
TestStatefulNumpyHost.settings = _settings
