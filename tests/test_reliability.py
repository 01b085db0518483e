"""Regression tests for defects a fuzzing pass found in BatchMetadata, its config and block tables:
bad input raises ValueError/TypeError naming the argument before anything changes, and nothing
staged is lost. ``meta()`` is the fuzzer's CPU BatchMetadata (2 request slots, 16 tokens, page 4)."""

import re

import numpy as np
import pytest
import torch

from batchmeta import BatchMetadata, KVGroup, MetadataConfig, Step
from batchmeta.host_path import COMPILED

_HOST_PATH = ["compiled"]


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def host_path(request):
    """Every test runs through both host paths: the compiled one (numba) and the numpy reference."""
    if request.param == "compiled" and not COMPILED:
        pytest.skip("numba not installed (or BATCHMETA_HOST_PATH=numpy)")
    _HOST_PATH[0] = request.param


def meta(**kw):
    base = dict(
        max_num_reqs=2,
        max_num_tokens=16,
        max_model_len=16,
        kv_groups=(KVGroup(page_size=4),),
        num_qo_heads=4,
        num_kv_heads=2,
        head_dim=8,
        q_dtype=torch.float16,
        kv_dtype=torch.float16,
        device="cpu",
    )
    base.update(kw)
    m = BatchMetadata(MetadataConfig(**base))
    if _HOST_PATH[0] == "numpy":
        m._host_path = None
    return m


def state(m: BatchMetadata) -> list:
    """Everything a rejected call must leave as it was: device buffers, both pinned host buffers,
    the block tables' host mirror and staged writes, the ring's memo, the step counter, the
    speculative state (device lengths, which request slots have them, their bounds)."""
    bt, ring, spec = m.block_tables, m._staging, m._spec
    tensors = [
        m._staging.dev,
        spec._staging.dev,
        m._buffers.out32,
        m._buffers.out64,
        bt.flat,
        *ring.host,
        *spec._staging.host,
        spec.lens,
    ]
    return [
        *(t.clone().cpu() for t in tensors),
        *(t.copy() for t in bt._host_tables),
        bt._host_num_blocks.copy(),
        dict(bt._staged),
        bt.num_resets,
        list(ring.memo),
        ring.current,
        spec._staging.current,
        spec._on_device.copy(),
        spec._bound.copy(),
        m._clock[0],
    ]


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        elif isinstance(x, np.ndarray):
            assert np.array_equal(x, y)
        else:
            assert x == y


def rejects(m, exc, match, call):
    before = state(m)
    with pytest.raises(exc, match=match):
        call()
    assert_same(before, state(m))


# 1. A rejected step must not lose the staged block-table writes.
@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.prepare_decode([0], [2**63 - 1]),
        lambda m: m.prepare_prefill([0, 1], query_lens=[2**63 - 1] * 2, cache_lens=[0, 0]),
        lambda m: m.prepare_prefill([0], query_lens=[2**62], cache_lens=[2**62]),
        lambda m: m.prepare_decode([0], [17]),
    ],
)
def test_rejected_step_keeps_staged_writes(call):
    m = meta()
    m.block_tables.append(0, [7, 8])
    m.block_tables.append(1, [3])
    rejects(m, ValueError, r"^(cache_lens|query_lens): ", lambda: call(m))
    step = m.prepare_decode([0], [5])
    assert step.slot_mappings[0].tolist() == [33]
    assert step.kv_indices[0].tolist() == [7, 8]


# 2. A step owns copies of its host arrays, whatever the caller passed.
class _Sub(np.ndarray):
    """A numpy subclass: np.asarray returns a view of it, not a copy."""


WRAPS = {
    "numpy": lambda a: np.array(a, np.int64),
    "tensor": lambda a: torch.tensor(a, dtype=torch.int64),
    "subclass": lambda a: np.array(a, np.int64).view(_Sub),
}


@pytest.mark.parametrize("kind", list(WRAPS))
def test_step_host_arrays_do_not_alias_the_callers(kind):
    m = meta()
    m.block_tables.append(0, [1, 2])
    m.block_tables.append(1, [3, 4])
    wrap = WRAPS[kind]
    idx, clens, qlens = wrap([0, 1]), wrap([3, 1]), wrap([2, 4])
    step = m.prepare_prefill(idx, query_lens=qlens, cache_lens=clens)
    idx[:] = wrap([1, 0])
    clens[:] = wrap([0, 0])
    qlens[:] = wrap([1, 1])
    assert step.idx_mapping_host.tolist() == [0, 1]
    assert step.cache_lens_host.tolist() == [3, 1]
    assert step.query_lens_host.tolist() == [2, 4]
    dstep = m.prepare_decode(idx, clens)
    idx[:] = wrap([0, 1])
    assert dstep.idx_mapping_host.tolist() == [1, 0]
    history = torch.zeros(2, 16, dtype=torch.int64)
    m.accept_tokens(step, history, torch.tensor([5, 6]), [1, 1], [0, 0])
    assert history[0, 5].item() == 5 and history[1, 5].item() == 6  # rows of the step, not the caller's reuse


# 3. accept_tokens: prompt lengths (and counts) beyond int32 staging are rejected, nothing written.
@pytest.mark.parametrize(
    "num_accepted, prompt_lens, match",
    [
        ([1], [2**31], "prompt_lens"),
        ([1], [17], "prompt_lens"),
        ([1], [-1], "prompt_lens"),
        ([2**31], [0], "num_accepted"),
        ([-1], [0], "num_accepted"),
        ([1, 1], [0], "num_accepted"),
    ],
)
def test_accept_tokens_range_checks(num_accepted, prompt_lens, match):
    m = meta()
    m.block_tables.append(0, [1, 2])
    step = m.prepare_decode([0], [3])
    history = torch.zeros(2, 16, dtype=torch.int64)
    rejects(
        m,
        ValueError,
        f"^{match}: ",
        lambda: m.accept_tokens(step, history, torch.tensor([9]), num_accepted, prompt_lens),
    )
    assert not history.any()


def test_accept_tokens_errors_name_public_arguments_only():
    m = meta()
    m.block_tables.append(0, [1, 2])
    step = m.prepare_decode([0], [3])
    history = torch.zeros(2, 16, dtype=torch.int64)
    bad = [
        lambda: m.accept_tokens(step, history, torch.tensor([9]), [2], [0]),  # too few next_input_ids
        lambda: m.accept_tokens(step, history, torch.tensor([9.0]), [1], [0]),
        lambda: m.accept_tokens(step, history[:, :4], torch.tensor([9]), [1], [0]),
        lambda: m.accept_tokens(step, history.float(), torch.tensor([9.0]), [1], [0]),
        lambda: m.accept_tokens(step, history[:1], torch.tensor([9]), [1], [0]),
        lambda: m.accept_tokens(step, history, torch.tensor([[[9]]]), [1], [0]),
        lambda: m.accept_tokens(step, history, torch.tensor([[9], [9]]), [1], [0]),  # a row per batch row
        lambda: m.accept_tokens(
            meta().prepare_prefill([], query_lens=[], cache_lens=[]), history, torch.tensor([9]), [], []
        ),
    ]
    for call in bad:
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        msg = str(info.value)
        assert re.match(r"^(step|token_ids|next_input_ids|num_accepted|prompt_lens)\b", msg), msg
        assert "cu_accepted_ids" not in msg and "input_lengths" not in msg


# 4-6. Every value an int32 buffer stores is bounded where it enters.
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(num_kv_pages=2**31 + 1), ValueError, "num_kv_pages"),
        (dict(max_model_len=2**31, kv_groups=(KVGroup(page_size=2**30),)), ValueError, "max_model_len"),
        (dict(padding_page=2**31), ValueError, "padding_page"),
        (dict(max_num_reqs=2**31), ValueError, "max_num_reqs"),
        (dict(max_draft_tokens=16), ValueError, "max_draft_tokens"),
        (dict(kv_groups=5), TypeError, "kv_groups"),
        (dict(kv_groups=None), TypeError, "kv_groups"),
        (dict(kv_groups=(4,)), TypeError, "kv_groups"),
        (dict(cuda_graph_batch_sizes=8), TypeError, "cuda_graph_batch_sizes"),
        (dict(cuda_graph_batch_sizes=(1.5,)), TypeError, "cuda_graph_batch_sizes"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(plan_attention=1), TypeError, "plan_attention"),
    ],
)
def test_config_bounds(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        meta(**kwargs)


def test_kv_group_page_size_bounded():
    with pytest.raises(ValueError, match="page_size"):
        KVGroup(page_size=2**63)
    with pytest.raises(TypeError, match="page_size"):
        KVGroup(page_size=4.0)


def test_page_ids_fit_int32():
    m = meta(num_kv_pages=2**31)
    rejects(m, ValueError, "new_pages", lambda: m.block_tables.append(0, [2**31]))
    m.block_tables.append(0, [2**31 - 1])
    assert m.block_tables.pages(0).tolist() == [2**31 - 1]
    step = m.prepare_decode([0], [2])
    assert step.kv_indices[0].tolist() == [2**31 - 1]
    assert step.slot_mappings[0].tolist() == [(2**31 - 1) * 4 + 2]
    m2 = meta()  # num_kv_pages=0: ids still bounded by int32
    rejects(m2, ValueError, "new_pages", lambda: m2.block_tables.append(0, [2**31]))


# Lower severity: wrong exception type, or no argument named.
@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (torch.tensor([0], dtype=torch.bfloat16), TypeError, "idx_mapping"),
        (torch.tensor([0.0], requires_grad=True), TypeError, "idx_mapping"),
        (torch.tensor([[0, 1]]).to_sparse(), TypeError, "idx_mapping"),
        ([[0], [1, 1]], ValueError, "idx_mapping"),
        ([[0, 1]], ValueError, "idx_mapping"),
        (np.array([2**63], np.uint64), ValueError, "idx_mapping"),
        ([2**70], ValueError, "idx_mapping"),
        ([None], TypeError, "idx_mapping"),
        ("0", TypeError, "idx_mapping"),
        (None, TypeError, "idx_mapping"),
        ([True], TypeError, "idx_mapping"),
    ],
)
def test_batch_inputs_are_checked_and_named(bad, exc, match):
    m = meta()
    m.block_tables.append(0, [1])
    rejects(m, exc, f"^{match}: ", lambda: m.prepare_decode(bad, [0]))
    rejects(m, exc, f"^{match}: ", lambda: m.prepare_prefill(bad, query_lens=[1], cache_lens=[0]))


def test_uint64_lengths_beyond_int64_rejected():
    m = meta()
    m.block_tables.append(0, [1])
    rejects(m, ValueError, "^cache_lens: ", lambda: m.prepare_decode([0], np.array([2**64 - 1], np.uint64)))


def test_block_tables_lookups_name_their_arguments():
    m = meta()
    with pytest.raises(ValueError, match="req_idx"):
        m.block_tables.pages(99)
    with pytest.raises(ValueError, match="req_idx"):
        m.block_tables.num_pages(-1)  # the reserved padding row is not a request slot
    with pytest.raises(ValueError, match="group"):
        m.block_tables.pages(0, group=1)
    with pytest.raises(TypeError, match="req_idx"):
        m.block_tables.num_pages(0.0)


def test_append_none_and_empty_pages():
    m = meta()
    rejects(m, TypeError, "^new_pages: ", lambda: m.block_tables.append(0, None))
    rejects(m, TypeError, "new_pages", lambda: m.block_tables.append(0, [1.5]))
    rejects(m, ValueError, "new_pages", lambda: m.block_tables.append(0, [[1], [2, 3]]))
    # No new pages is the same whichever way it is said.
    m.block_tables.append(0, [])
    m.block_tables.append(0, [[]])
    m.block_tables.append(0, np.zeros(0, np.int64))
    assert m.block_tables.num_pages(0) == 0
    m2 = meta(kv_groups=(KVGroup(page_size=4), KVGroup(page_size=2)))
    rejects(m2, ValueError, "new_pages", lambda: m2.block_tables.append(0, []))
    m2.block_tables.append(0, [[], []])
    assert m2.block_tables.num_pages(0, 1) == 0


def test_accept_tokens_rejects_a_step_of_another_metadata():
    m, other = meta(), meta()
    other.block_tables.append(1, [1])
    step = other.prepare_decode([1], [0])
    assert isinstance(step, Step)
    with pytest.raises(ValueError, match=r"^step: .*another BatchMetadata"):
        m.accept_tokens(step, torch.zeros(2, 16, dtype=torch.int64), torch.tensor([1]), [1], [0])


@pytest.mark.parametrize("layout", ["strided next_input_ids", "transposed token_ids"])
def test_accept_tokens_layout_checked_before_anything_changes(layout):
    m = meta()
    m.block_tables.append(0, [1, 2])
    step = m.prepare_decode([0], [3])
    history = torch.zeros(2, 16, dtype=torch.int64)
    ids = torch.tensor([9, 9, 9, 9])
    if layout == "strided next_input_ids":
        call, name = (lambda: m.accept_tokens(step, history, ids[::2], [1], [0])), "next_input_ids"
    else:
        wide = torch.zeros(16, 2, dtype=torch.int64).t()  # [2, 16] with column stride 2
        call, name = (lambda: m.accept_tokens(step, wide, ids[:1], [1], [0])), "token_ids"
    rejects(m, ValueError, f"^{name}: ", call)


def test_replay_rejects_what_is_not_its_step():
    m = meta()
    with pytest.raises(TypeError, match=r"^step: "):
        m.replay_decode_graph("step")
    other = meta()
    other.block_tables.append(0, [1])
    with pytest.raises(ValueError, match="another BatchMetadata"):
        m.replay_decode_graph(other.prepare_decode([0], [1]))


def test_step_host_arrays_are_read_only():
    m = meta()
    m.block_tables.append(0, [1, 2])
    step = m.prepare_prefill([0], query_lens=[2], cache_lens=[3])
    for arr in (step.idx_mapping_host, step.cache_lens_host, step.query_lens_host):
        with pytest.raises(ValueError, match="read-only"):
            arr += 1
    assert step.seq_lens_host.tolist() == [5]


def test_object_arrays_of_small_ints_are_ints():
    m = meta()
    m.block_tables.append(1, [4])
    step = m.prepare_decode(np.array([1], dtype=object), np.array([np.int32(2)], dtype=object))
    assert step.slot_mappings[0].tolist() == [4 * 4 + 2]
