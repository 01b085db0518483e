"""The token history (``MetadataConfig(token_history=True)``) on the CPU, through both step-kernel
backends (Triton under the interpreter, torch) and both host paths: staged prompts and prompt
chunks, tokens written by ``accept_tokens``, drafts written on the device, and every step's
``input_ids`` against a naive per-request model of the history."""

import numpy as np
import pytest
import torch

from batchmeta import BatchMetadata, KVGroup, MetadataConfig
from batchmeta.host_path import COMPILED

R, T, L = 6, 24, 40
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton compiled on a GPU, interpreted on the CPU


@pytest.fixture(
    params=[("triton", "compiled"), ("triton", "numpy"), ("torch", "compiled"), ("torch", "numpy")],
    ids=lambda p: "-".join(p),
)
def make(request):
    backend, host = request.param
    if host == "compiled" and not COMPILED:
        pytest.skip("numba not installed (or BATCHMETA_HOST_PATH=numpy)")

    def make_meta(**kw):
        # Metadata only (plan_attention=False): FlashInfer has no kernels for head_dim 8.
        cfg = dict(
            max_num_reqs=R,
            max_num_tokens=T,
            max_model_len=L,
            kv_groups=(KVGroup(page_size=4), KVGroup(page_size=1)),
            num_qo_heads=4,
            num_kv_heads=2,
            head_dim=8,
            device=DEVICE,
            token_history=True,
            max_draft_tokens=2,
            backend=backend,
            plan_attention=False,
        )
        cfg.update(kw)
        m = BatchMetadata(MetadataConfig(**cfg))
        if host == "numpy":
            m._host_path = None
        return m

    return make_meta


class Model:
    """What the history must hold: request slot -> {position: token}."""

    def __init__(self, meta):
        self.meta, self.hist = meta, {r: {} for r in range(meta.config.max_num_reqs)}
        self.pages = {}
        self.rng = np.random.default_rng(0)

    def grow(self, r, n):
        have = self.pages.setdefault(r, [0, 0])
        new = []
        for g, ps in enumerate((4, 1)):
            need = -(-n // ps) - have[g]
            new.append(list(range(1 + 100 * g + r * 40 + have[g], 1 + 100 * g + r * 40 + have[g] + max(need, 0))))
            have[g] += max(need, 0)
        self.meta.block_tables.append(r, new)

    def stage(self, r, tokens, start):
        self.meta.stage_prompt(r, tokens, start)
        for i, t in enumerate(tokens):
            self.hist[r][start + i] = int(t)

    def step(self, idx, qlens, clens, decode=False, k=0):
        for r, q, c in zip(idx, qlens, clens, strict=True):
            self.grow(r, c + q)
        if decode:
            step = self.meta.prepare_decode(idx, clens, num_draft_tokens=k)
        else:
            step = self.meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens)
        want = [self.hist[r][c + j] for r, q, c in zip(idx, qlens, clens, strict=True) for j in range(q)]
        assert step.input_ids.tolist() == want
        assert (self.meta._buffers.input_ids[len(want) :] == 0).all()  # 0 past the step's tokens
        for r, h in self.hist.items():  # every staged span is in the history now
            row = self.meta.token_ids[r].tolist()
            assert all(row[p] == t for p, t in h.items()), r
        return step

    def accept(self, step, num_accepted, prompt_lens):
        n = int(sum(num_accepted))
        new = self.rng.integers(0, 2**31 - 1, n)
        at, k = 0, step.num_draft_tokens
        for r, c, q, a, p in zip(
            step.idx_mapping_host, step.cache_lens_host, step.query_lens_host, num_accepted, prompt_lens, strict=True
        ):
            for j in range(a):  # the engine's rule: after the row's last non-draft token
                if c + q - k + j >= p:
                    self.hist[int(r)][int(c + q - k + j)] = int(new[at + j])
            at += a
        ids = torch.tensor(new, dtype=torch.int64, device=DEVICE)
        return self.meta.accept_tokens(step, None, ids, num_accepted, prompt_lens)


def test_prompts_chunks_acceptance_and_input_ids(make):
    meta = make()
    m = Model(meta)
    rng = np.random.default_rng(1)
    prompts = {r: rng.integers(0, 50000, n) for r, n in ((0, 13), (1, 5), (2, 20), (3, 9))}
    # Whole prompts for 0 and 1; request 2's prompt in two contiguous stage calls; 3's staged later.
    m.stage(0, prompts[0], 0)
    m.stage(1, prompts[1], 0)
    m.stage(2, prompts[2][:8], 0)
    m.stage(2, prompts[2][8:], 8)
    # Ragged prefill of 0 and 1, and a first chunk of 2 (its span is staged beyond the chunk).
    step = m.step([0, 1, 2], [13, 5, 4], [0, 0, 0])
    cache, _ = m.accept(step, [1, 1, 1], [13, 5, 20])
    assert cache.tolist() == [13, 5, 4]
    # Mixed: decodes of 0 and 1 beside 2's next chunk; 3 staged now, prefilled in the next step.
    m.stage(3, prompts[3], 0)
    step = m.step([0, 1, 2], [1, 1, 16], [13, 5, 4])
    cache, _ = m.accept(step, [1, 1, 1], [13, 5, 20])
    step = m.step([3, 0, 1, 2], [9, 1, 1, 1], [0, 14, 6, 20])
    m.accept(step, [1, 1, 1, 1], [9, 13, 5, 20])
    # Decode steps: each reads the token the last accept wrote.
    clens = [9, 15, 7, 21]
    for _ in range(3):
        step = m.step([3, 0, 1, 2], [1] * 4, clens, decode=True)
        cache, _ = m.accept(step, [1] * 4, [9, 13, 5, 20])
        clens = cache.tolist()
    # Speculative verify: drafts written into the history on the device (as a drafter would).
    for r, c in zip([3, 0], clens[:2], strict=True):
        drafts = rng.integers(0, 50000, 2)
        meta.token_ids[r, c + 1 : c + 3] = torch.tensor(drafts)
        m.hist[r][c + 1], m.hist[r][c + 2] = int(drafts[0]), int(drafts[1])
    m.step([3, 0], [3, 3], clens[:2], decode=True, k=2)


def test_a_prompt_for_a_request_outside_the_batch_is_applied(make):
    meta = make()
    m = Model(meta)
    m.stage(5, [7, 8, 9], 2)
    m.stage(0, [1, 2], 0)
    m.step([0], [2], [0])
    assert meta.token_ids[5, 2:5].tolist() == [7, 8, 9]
    # Staged again after the step: a new span, anywhere.
    m.stage(5, [4, 5], 0)
    m.step([5], [5], [0])


def test_a_rejected_step_keeps_the_staged_prompts(make):
    meta = make()
    m = Model(meta)
    m.stage(0, [3, 1, 4, 1, 5], 0)
    m.grow(0, 5)
    with pytest.raises(ValueError):
        meta.prepare_prefill([0, 0], query_lens=[5, 5], cache_lens=[0, 0])  # a slot twice
    m.step([0], [5], [0])


def test_a_decode_reads_a_token_written_on_the_device(make):
    meta = make()
    m = Model(meta)
    m.stage(1, list(range(10, 20)), 0)
    m.step([1], [10], [0])
    meta.token_ids[1, 10] = 99
    m.hist[1][10] = 99
    step = m.step([1], [1], [10], decode=True)
    assert step.input_ids.tolist() == [99]


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((R, [1]), ValueError, "req_idx: expected a request slot"),
        ((-1, [1]), ValueError, "req_idx: expected a request slot"),
        ((True, [1]), TypeError, "req_idx: expected an int"),
        ((0, [1], 1.0), TypeError, "start: expected an int"),
        ((0, [-1]), ValueError, r"token_ids: expected token ids in \[0, 2\^31\)"),
        ((0, [2**31]), ValueError, r"token_ids: expected token ids in \[0, 2\^31\)"),
        ((0, [1.5]), TypeError, "token_ids"),
        ((0, [1] * 5, L - 4), ValueError, "start: 5 tokens from position 36 do not fit"),
        ((0, [1], -1), ValueError, "start: expected a position >= 0, got -1"),
    ],
)
def test_stage_prompt_rejects(make, args, error, match):
    meta = make()
    with pytest.raises(error, match=match):
        meta.stage_prompt(*args)
    assert meta._prompts == {} and meta._num_prompt_tokens == 0


def test_stage_prompt_spans_and_capacity(make):
    meta = make()
    meta.stage_prompt(0, [1, 2, 3], 4)
    with pytest.raises(ValueError, match=r"request slot 0 has positions \[4, 7\) staged; continue from 7"):
        meta.stage_prompt(0, [9], 0)
    meta.stage_prompt(0, [4], 7)
    # Restaging from the span's start replaces it; discard_prompt drops it (and frees its room).
    meta.stage_prompt(0, [5, 6], 4)
    assert meta._num_prompt_tokens == 2 and meta._prompts[0][0] == 4
    meta.discard_prompt(0)
    meta.discard_prompt(0)  # nothing staged: nothing to do
    assert meta._prompts == {} and meta._num_prompt_tokens == 0
    meta.stage_prompt(0, [1, 2, 3, 4], 4)
    with pytest.raises(ValueError, match="start: 0 tokens from position 99 do not fit"):
        meta.stage_prompt(0, [], 99)  # checked even when there is nothing to stage
    room = T + L - 4
    for r in range(1, 4):
        meta.stage_prompt(r, [1] * min(L, room), 0)
        room -= min(L, room)
    with pytest.raises(ValueError, match="exceed the 0 that may still be staged"):
        meta.stage_prompt(4, [1], 0)


def test_without_history(make):
    meta = make(token_history=False)
    assert meta.token_ids is None
    with pytest.raises(ValueError, match="token_history=True"):
        meta.stage_prompt(0, [1])
    meta.block_tables.append(0, [[1], [1]])
    step = meta.prepare_prefill([0], query_lens=[1], cache_lens=[0])
    with pytest.raises(ValueError, match=r"input_ids: not built; make the BatchMetadata with MetadataConfig"):
        _ = step.input_ids
    with pytest.raises(ValueError, match="token_ids: None names"):
        meta.accept_tokens(step, None, torch.zeros(1, dtype=torch.int64, device=DEVICE), [1], [1])


def test_restaged_and_discarded_spans_reach_the_history(make):
    meta = make()
    m = Model(meta)
    meta.stage_prompt(2, [9, 9, 9], 0)
    meta.discard_prompt(2)  # an aborted request: its span never lands
    meta.stage_prompt(0, [5, 5, 5, 5], 0)
    m.stage(0, [1, 2], 0)  # a shorter chunk rescheduled: replaces the span
    m.step([0], [2], [0])
    assert meta.token_ids[2, :3].tolist() == [0, 0, 0] and meta.token_ids[0, 2:4].tolist() == [0, 0]


def test_padding_rows_of_a_verify_graph_step(make):
    """Padding rows (as a CUDA-graph verify step stages them; the graph size bypassed on the CPU):
    input ids 0, PAD slots, positions after their one cached token, the padding page."""
    meta = make(max_num_reqs=4)
    m = Model(meta)
    m.stage(1, list(range(100, 108)), 0)
    m.step([1], [5], [0])
    meta.token_ids[1, 5:8] = torch.tensor([7, 8, 9])
    m.grow(1, 8)
    step = meta._prepare(np.array([1]), 3, np.array([5]), "spec_decode", padded=4, graph=True)
    assert step.padded_num_reqs == 4 and step.num_tokens == 3
    assert meta._buffers.input_ids[:12].tolist() == [7, 8, 9] + [0] * 9
    assert meta.positions[:12].tolist() == [5, 6, 7] + [1, 2, 3] * 3
    for g in range(2):
        assert meta.slot_mappings[g][3:12].tolist() == [-1] * 9
    # Padding rows read the padding page (page 0) only: one page of 4 tokens, or 4 of one token.
    assert step.kv_last_page_len_host[0].tolist()[1:] == [4, 4, 4]
    assert step.kv_indices[0].tolist()[-3:] == [0, 0, 0] and step.kv_indices[1].tolist()[-12:] == [0] * 12


@pytest.mark.parametrize(
    "req_idx, error, match",
    [
        (True, TypeError, "req_idx: expected an int, got bool"),
        (1.0, TypeError, "req_idx: expected an int, got float"),
        ("1", TypeError, "req_idx: expected an int, got str"),
        (None, TypeError, "req_idx: expected an int, got NoneType"),
        (-1, ValueError, "req_idx: expected a request slot"),
        (R, ValueError, "req_idx: expected a request slot"),
        (99, ValueError, "req_idx: expected a request slot"),
    ],
)
def test_discard_prompt_rejects(make, req_idx, error, match):
    meta = make()
    meta.stage_prompt(1, [7, 8])
    with pytest.raises(error, match=match):
        meta.discard_prompt(req_idx)
    assert list(meta._prompts) == [1] and meta._num_prompt_tokens == 2  # slot 1's span kept
    meta.discard_prompt(np.int64(1))
    assert meta._prompts == {} and meta._num_prompt_tokens == 0


def test_discard_prompt_without_a_token_history(make):
    meta = make(token_history=False)
    with pytest.raises(ValueError, match="discard_prompt: this BatchMetadata has no token history"):
        meta.discard_prompt(0)
