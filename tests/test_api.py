"""The public API as a newcomer meets it: one name per thing, a Step that is its own context manager
and refuses to show another step's data, a default device that works, and clear errors."""

import inspect
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_metadata import Pages, check_step, make_meta

import batchmeta
from batchmeta import BatchMetadata, KVGroup, MetadataConfig, StaleStepError, Step
from batchmeta.ops import step as step_op

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()

VIEWS = (
    "idx_mapping",
    "qo_indptr",
    "seq_lens",
    "positions",
    "logits_indices",
    "slot_mappings",
    "kv_indptr",
    "kv_indices",
    "kv_last_page_len",
    "batch_block_tables",
    "qo_indptr_host",
    "kv_indptr_host",
    "kv_last_page_len_host",
    "kv_indices_host",
    "wrappers",
)


def config(**kw):
    base = dict(
        max_num_reqs=4,
        max_num_tokens=32,
        max_model_len=64,
        kv_groups=(KVGroup(page_size=4),),
        num_qo_heads=8,
        num_kv_heads=2,
        head_dim=64,
        q_dtype=torch.float16,
        kv_dtype=torch.float16,
    )
    base.update(kw)
    return MetadataConfig(**base)


# 4. The default device works where it runs; a device this machine lacks is a ValueError naming it.
def test_default_device_is_usable_here():
    cfg = config()
    assert cfg.device.type == ("cuda" if HAS_CUDA else "cpu")
    meta = BatchMetadata(cfg)
    meta.block_tables.append(0, [1])
    with meta.prepare_decode([0], [2]) as step:
        assert step.positions.device.type == cfg.device.type


@pytest.mark.parametrize("device", ["nonsense", "meta", "cuda:99"] + ([] if HAS_CUDA else ["cuda", "cuda:0"]))
def test_unusable_device_is_a_value_error_naming_device(device):
    with pytest.raises(ValueError, match=r"^device: "):
        config(device=device)


def test_device_of_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match=r"^device: "):
        config(device=1.5)


# 5. CUDA graphs on a CPU BatchMetadata: the device is the reason given.
def test_cuda_graph_on_cpu_names_the_device():
    meta = BatchMetadata(config(device="cpu", cuda_graph_batch_sizes=(1, 2)))
    meta.block_tables.append(0, [1])
    with pytest.raises(ValueError, match=r"cuda_graph: CUDA graphs need a CUDA device; .* on cpu"):
        meta.prepare_decode([0], [2], cuda_graph=True)
    with pytest.raises(ValueError, match="CUDA device"):
        meta.capture_decode_graph(1, lambda step: None)


# 6. prepare_* returns the Step itself, usable with or without `with`.
def test_prepare_returns_the_step_without_with(device):
    meta = make_meta(device, page_sizes=(4,))
    meta.block_tables.append(0, [1, 2])
    step = meta.prepare_decode([0], [5])
    assert type(step) is Step
    assert step.positions.cpu().tolist() == [5]
    step2 = meta.prepare_prefill([0], query_lens=[2], cache_lens=[3])
    assert type(step2) is Step and step2.positions.cpu().tolist() == [3, 4]
    assert "Step" in inspect.signature(BatchMetadata.prepare_decode).return_annotation


def test_step_is_its_own_context_manager_and_restores_the_previous(device):
    meta = make_meta(device, page_sizes=(4,))
    meta.block_tables.append(0, [1])
    step = meta.prepare_decode([0], [1])
    with pytest.raises(RuntimeError, match="no step is active"):
        batchmeta.current_step()
    with step as entered:
        assert entered is step and batchmeta.current_step() is step
        with step:  # re-entering is harmless
            assert batchmeta.current_step() is step
        assert batchmeta.current_step() is step
    with pytest.raises(RuntimeError, match="no step is active"):
        batchmeta.current_step()
    with pytest.raises(KeyError), step:
        raise KeyError("boom")
    with pytest.raises(RuntimeError, match="no step is active"):
        batchmeta.current_step()


# 7. A step whose buffers a later prepare_* overwrote raises when read, never shows the other's data.
def test_nested_steps_outer_views_raise_after_inner_prepare(device):
    meta = make_meta(device, page_sizes=(4, 2))
    pages = Pages(meta)
    for r in (0, 1):
        pages.grow(r, 12)
    with meta.prepare_decode([0], [4]) as s1:
        assert s1.positions.cpu().tolist() == [4]
        with meta.prepare_decode([1], [9]) as s2:
            assert batchmeta.current_step() is s2
            assert s2.positions.cpu().tolist() == [9]
            assert s1.is_stale and not s2.is_stale
            for name in VIEWS:
                with pytest.raises(StaleStepError, match=rf"step\.{name}: .*overwritten by a later prepare_"):
                    getattr(s1, name)
            with pytest.raises(StaleStepError, match="attention"):
                s1.attention(torch.zeros(1, 8, 64), torch.zeros(4, 4, 2, 64), torch.zeros(4, 4, 2, 64))
        assert batchmeta.current_step() is s1
        with pytest.raises(StaleStepError):
            _ = batchmeta.current_step().positions
        # What the step owns stays readable (accept_tokens uses it).
        assert s1.idx_mapping_host.tolist() == [0] and s1.cache_lens_host.tolist() == [4]
        assert s1.query_lens_host.tolist() == [1] and s1.seq_lens_host.tolist() == [5]
        assert s1.num_tokens == 1 and s1.kind == "decode"


# 8. One name per thing: FlashInfer's names on the Step, each with its host twin.
def test_step_fields_use_flashinfer_names_with_host_twins(device):
    meta = make_meta(device, page_sizes=(4, 2))
    pages = Pages(meta)
    idx, qlens, clens = [2, 0], [3, 1], [5, 0]
    for r, c, q in zip(idx, clens, qlens, strict=True):
        pages.grow(r, c + q)
    with meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens) as step:
        check_step(step, meta, pages.held, idx, qlens, clens)
        assert step.qo_indptr.cpu().tolist() == step.qo_indptr_host.tolist() == [0, 3, 4]
        for g in range(2):
            assert step.kv_indptr[g].cpu().tolist() == step.kv_indptr_host[g].tolist()
            assert step.kv_last_page_len[g].cpu().tolist() == step.kv_last_page_len_host[g].tolist()
            assert step.kv_indices[g].cpu().tolist() == step.kv_indices_host[g].tolist()
            assert step.kv_indices_host[g].dtype == np.int32
            assert step.batch_block_tables[g].shape[0] == 2
    for retired in ("query_start_loc", "block_tables", "step_block_tables"):
        assert not hasattr(step, retired), retired
    assert not hasattr(meta, "step_block_tables")
    assert {"append", "reset", "pages", "num_pages"} <= set(dir(meta.block_tables))


def test_kv_indices_host_refuses_after_a_reset(device):
    meta = make_meta(device, page_sizes=(4,))
    meta.block_tables.append(0, [3, 4])
    meta.block_tables.append(1, [5])
    step = meta.prepare_decode([0], [6])
    meta.block_tables.reset(1)
    with pytest.raises(StaleStepError, match="reset"):
        _ = step.kv_indices_host


def test_accept_tokens_signature_and_next_input_ids_dtype(device):
    params = list(inspect.signature(BatchMetadata.accept_tokens).parameters)
    assert params == ["self", "step", "token_ids", "next_input_ids", "num_accepted", "prompt_lens"]
    assert "int32 or int64, stored as" in BatchMetadata.accept_tokens.__doc__
    meta = make_meta(device, page_sizes=(4,))
    meta.block_tables.append(0, [1, 2])
    history = torch.zeros(6, 16, dtype=torch.int32, device=device)
    with meta.prepare_decode([0], [3]) as step:
        with pytest.raises(TypeError, match="next_input_ids"):
            meta.accept_tokens(step, history, torch.tensor([7.0], device=device), [1], [0])
        # A sampler's int64 tokens go into an int32 history.
        meta.accept_tokens(step, history, torch.tensor([7], dtype=torch.int64, device=device), [1], [0])
        assert history[0, 4].item() == 7  # after the step's token at position 3
        with pytest.raises(TypeError, match=r"^step: "):
            meta.accept_tokens("not a step", history, torch.tensor([7], device=device), [1], [0])


# 3. step.wrappers is None where nothing is planned; step.attention works either way.
def test_wrappers_none_without_flashinfer_and_attention_still_works():
    meta = make_meta("cpu", page_sizes=(4,))
    meta.block_tables.append(0, [1])
    with meta.prepare_decode([0], [2]) as step:
        assert step.wrappers is None
        q, k_cache, v_cache = torch.randn(1, 8, 64), torch.randn(4, 4, 2, 64), torch.randn(4, 4, 2, 64)
        out = step.attention(q.half(), k_cache.half(), v_cache.half())
        assert out.shape == (1, 8, 64) and torch.isfinite(out).all()


# 9. A request slot never given pages is reported as such.
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_unknown_request_slot_says_it_holds_no_pages(device, kind):
    meta = make_meta(device, page_sizes=(4, 2))
    meta.block_tables.append(0, [[1], [2]])
    call = (
        (lambda: meta.prepare_decode([0, 3], [0, 0]))
        if kind == "decode"
        else (lambda: meta.prepare_prefill([3], query_lens=[2], cache_lens=[0]))
    )
    with pytest.raises(ValueError, match=r"request slot 3 holds no pages yet"):
        call()
    meta.block_tables.append(3, [[4], [5]])
    meta.block_tables.reset(3)
    with pytest.raises(ValueError, match=r"request slot 3 holds no pages yet"):
        call()


# 10. Reprs are short and show no private fields or buffer contents.
def test_reprs_are_short_whatever_numpy_prints(device):
    meta = make_meta(device, page_sizes=(4, 2))
    meta.block_tables.append(0, [[1], [2]])
    step = meta.prepare_decode([0], [1])
    old = np.get_printoptions()
    try:
        np.set_printoptions(threshold=sys.maxsize)
        torch.set_printoptions(profile="full")
        for obj in (meta, meta.block_tables, step, meta.config):
            text = repr(obj)
            # A config of two KV groups shows every field (~610 characters); arrays would show thousands.
            assert len(text) < 700, (type(obj).__name__, len(text))
            assert not re.search(r"(^|[(, ])_\w+=", text), text
            assert "tensor(" not in text and "array(" not in text
        assert repr(step).startswith("Step(kind='decode', num_reqs=1")
        assert str(meta) == repr(meta)
    finally:
        np.set_printoptions(**old)
        torch.set_printoptions(profile="default")


# 12. Any number of KV-cache groups: one launch per four.
def test_five_groups_are_correct_and_take_two_launches(device):
    meta = make_meta(device, page_sizes=(4, 2, 1, 3, 16))
    pages = Pages(meta)
    idx, qlens, clens = [1, 4, 0], [5, 1, 2], [0, 11, 7]
    for r, c, q in zip(idx, clens, qlens, strict=True):
        pages.grow(r, c + q)
    with meta.prepare_prefill(idx, query_lens=qlens, cache_lens=clens) as step:
        check_step(step, meta, pages.held, idx, qlens, clens)
    lay = meta._buffers.kernel_layout(meta.config, meta._layout, meta.block_tables)
    args = (meta._staging.dev, meta.block_tables.flat, meta._buffers.out32, meta._buffers.out64)
    assert [n for n, _ in step_op._launch_args(lay, *args)] == [4, 1]
    four = make_meta(device, page_sizes=(4, 2, 1, 3))
    lay4 = four._buffers.kernel_layout(four.config, four._layout, four.block_tables)
    args4 = (four._staging.dev, four.block_tables.flat, four._buffers.out32, four._buffers.out64)
    assert [n for n, _ in step_op._launch_args(lay4, *args4)] == [4]
    readme = (ROOT / "README.md").read_text()
    assert "Any number of KV-cache groups" in readme and "up to four KV-cache groups;" not in readme


# 13. CI lints: .ci/run runs the lint command after the tests (test_tooling runs ruff itself).
def test_ci_runs_tests_and_lint():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip().startswith("bash")]
    assert lines == ["bash scripts/dev.sh test", "bash scripts/dev.sh lint"]
