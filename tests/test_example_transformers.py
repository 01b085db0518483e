"""examples/transformers_serving.py: a transformers model served through batchmeta gives the tokens of
the model's own forward pass (teacher-forced, near-ties excepted), through every kind of step."""

import collections
import dataclasses
import functools
import importlib.util
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the example needs the optional extra: pip install -e '.[examples]'")

from batchmeta.attention import flashinfer_available

ROOT = Path(__file__).resolve().parents[1]


def _load_example():
    spec = importlib.util.spec_from_file_location("transformers_serving", ROOT / "examples" / "transformers_serving.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


ts = _load_example()

# Lengths chosen so that, with 3 request slots and a budget of 32 tokens, the steps go: a ragged
# prefill (nothing cached: the first 32 tokens of prompt 0), a chunked prefill (prompt 0 resumes over
# its cache beside prompt 1, no decodes yet), mixed steps (decodes beside prefill chunks, also of
# prompts admitted when a slot frees), then decode-only steps. Every prompt is longer than Gemma 2's
# sliding window (12) except one, and prompt 0 spans pages of both groups.
PROMPT_LENS = (40, 30, 5, 20, 13)
NEW_TOKENS = 12


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _serve(name: str, device: str, dtype: torch.dtype, cuda_graphs: bool):
    model = ts.build_model(name, seed=0, dtype=dtype, device=device)
    prompts = _prompts(model.config.vocab_size)
    runner = ts.Runner(model, max_num_reqs=3, token_budget=32, max_model_len=64, cuda_graphs=cuda_graphs)
    result = runner.serve(prompts, NEW_TOKENS, record_logits=True)
    return model, runner, prompts, result


@functools.cache
def _served_on_cpu(name: str):
    """One float32 CPU serve per model, shared by the tests that only read it (the interpreter is slow)."""
    return _serve(name, "cpu", torch.float32, cuda_graphs=False)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_cpu_greedy_tokens_match_the_models_own_forward(name):
    model, runner, prompts, result = _served_on_cpu(name)
    assert all(result.step_kinds[k] > 0 for k in ("ragged_prefill", "chunked_prefill", "mixed", "decode")), (
        result.step_kinds
    )
    assert [len(t) for t in result.tokens] == [NEW_TOKENS] * len(PROMPT_LENS)
    groups = runner.meta_config.kv_groups
    if name == "gemma2":  # full attention and a sliding window, both with Gemma 2's scale and soft cap
        assert sorted(g.window_left for g in groups) == [-1, model.config.sliding_window - 1]
        assert {g.sm_scale for g in groups} == {model.config.query_pre_attn_scalar**-0.5}
        assert {g.logits_soft_cap for g in groups} == {model.config.attn_logit_softcapping}
    else:
        assert [g.window_left for g in groups] == [-1]
    check = ts.teacher_forced_check(model, prompts, result)
    print(check)
    assert check.checked == NEW_TOKENS * len(PROMPT_LENS)
    assert check.ok, (str(check), check.failures)
    # float32 on both sides: the logits themselves agree far inside the near-tie tolerance.
    assert check.max_logit_diff < check.tolerance / 10, str(check)
    assert model.config._attn_implementation == ts.ATTN_IMPLEMENTATION  # restored after the reference pass


def test_cpu_check_catches_an_off_by_one_window(monkeypatch):
    """A window one key too wide (window_left = sliding_window) must fail the check: the check is
    sensitive to transformers' exact window, not only to gross errors."""
    exact = ts.LayerSpec.kv_group.fget

    def off_by_one(spec):
        group = exact(spec)
        if group.window_left < 0:
            return group
        return ts.KVGroup(
            page_size=group.page_size,
            window_left=group.window_left + 1,
            sm_scale=group.sm_scale,
            logits_soft_cap=group.logits_soft_cap,
        )

    monkeypatch.setattr(ts.LayerSpec, "kv_group", property(off_by_one))
    model, _, prompts, result = _serve("gemma2", "cpu", torch.float32, cuda_graphs=False)
    check = ts.teacher_forced_check(model, prompts, result)
    assert not check.ok and check.failures, str(check)


def test_check_counts_near_ties_and_rejects_a_majority_of_them():
    model, _, prompts, served = _served_on_cpu("llama")
    result = dataclasses.replace(served, tokens=[list(t) for t in served.tokens])  # corrupted below
    # A tolerance above every top-2 gap makes every position a near-tie: allowed mismatches, but no pass.
    check = ts.teacher_forced_check(model, prompts, result, tolerance=1e9)
    assert check.near_ties == check.checked and not check.ok
    # A corrupted served token (not at a near-tie) is a failure naming its prompt and position; later
    # tokens of that prompt may fail too (their reference now sees the corrupted context).
    result.tokens[1][3] = (result.tokens[1][3] + 1) % model.config.vocab_size
    check = ts.teacher_forced_check(model, prompts, result)
    assert not check.ok and check.failures[0][:2] == (1, PROMPT_LENS[1] + 3), check.failures


@pytest.mark.gpu
@pytest.mark.skipif(not flashinfer_available(), reason="CUDA-graph decode needs CUDA and FlashInfer")
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_gpu_bf16_cuda_graphs_match_the_models_own_forward(name):
    model = ts.build_model(name, seed=0, dtype=torch.bfloat16, device="cuda")
    prompts = _prompts(model.config.vocab_size)
    runner = ts.Runner(model, max_num_reqs=3, token_budget=32, max_model_len=64, cuda_graphs=True)
    runner.serve(prompts[:1], 2)  # warm-up: first plans and FlashInfer modules
    # No step waits for the GPU: the one synchronizing operation torch reports is serve()'s final
    # read of the tokens (sync debug mode is a prototype that misses some, so this is a lower bound).
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = runner.serve(prompts, NEW_TOKENS, record_logits=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) == 1 and syncs[0].startswith(ts.__file__), syncs
    assert all(result.step_kinds[k] > 0 for k in ("ragged_prefill", "chunked_prefill", "mixed", "graph_decode")), (
        result.step_kinds
    )
    assert result.step_kinds["decode"] == 0  # every decode-only step replayed a graph
    check = ts.teacher_forced_check(model, prompts, result)
    print(check)
    assert check.ok, (str(check), check.failures)
    # bf16 noise: served logits within 0.22 of the reference's on an H100 (a wrong window, scale or
    # soft cap moves them by 1-6); the bf16 reference itself is up to 0.29 from its float32 pass.
    assert check.max_logit_diff < 0.5, str(check)


# Speculative decoding (--spec K): n-gram drafts on repetitive prompts, verified greedily. Small sizes:
# every step runs its kernels under the Triton interpreter.
SPEC_ARGS = [
    *("--device", "cpu", "--dtype", "float32", "--prompts", "periodic", "--requests", "3", "--max-num-reqs", "3"),
    *("--token-budget", "16", "--prompt-len", "6", "20", "--max-new-tokens", "10"),
]


@pytest.mark.parametrize("accept", ["host", "device"])
@pytest.mark.parametrize("spec", [1, 3])
def test_cpu_speculative_tokens_equal_plain_greedy_decoding(spec, accept, capsys):
    assert ts.main([*SPEC_ARGS, "--spec", str(spec), "--accept", accept]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "greedy check passed: 30/30 tokens equal plain greedy decoding" in out, out
    rate = re.search(rf"{spec} n-gram drafts per verify step, {accept} acceptance: (\d+)/(\d+) drafts accepted", out)
    accepted, proposed = int(rate[1]), int(rate[2])
    print(f"drafts accepted {accepted}, rejected {proposed - accepted}")
    assert 0 < accepted < proposed, out  # some drafts accepted, some rejected
    assert proposed % spec == 0
    steps = re.search(r"3 requests, \d+ steps (\{.*\})", out)[1]
    assert "'verify'" in steps and "'decode'" not in steps and "'mixed'" not in steps, steps


def test_cpu_speculative_check_catches_a_wrong_token():
    """The greedy check compares token for token: one wrong token fails it, naming its position."""
    model = ts.build_model("llama", seed=0)
    prompts = ts.periodic_prompts(2, model.config.vocab_size, (6, 12), 0)
    want, _ = ts.greedy_reference(model, prompts, 4)
    result = ts.ServeResult([list(t) for t in want], None, collections.Counter(), 0, 0, 1.0)
    assert ts.greedy_check(model, prompts, result).ok
    result.tokens[1][2] = (result.tokens[1][2] + 1) % model.config.vocab_size
    check = ts.greedy_check(model, prompts, result)
    assert not check.ok and check.equal == 6 and check.divergences[0][:2] == (1, len(prompts[1]) + 2), check


def test_ngram_drafts_propose_the_continuation_of_the_latest_match():
    hist = torch.zeros(3, 16, dtype=torch.int64)
    hist[0, :7] = torch.tensor([5, 6, 7, 8, 5, 6, 7])  # "5 6 7" seen before: then 8, 5, 6 (period 4)
    hist[1, :5] = torch.tensor([1, 2, 3, 4, 9])  # no match: the last token repeated
    hist[2, :6] = torch.tensor([4, 2, 4, 3, 3, 4])  # 1-gram "4": latest earlier match at 2, then 3, 3, 4
    drafts = ts.ngram_drafts(hist, torch.tensor([0, 1, 2]), torch.tensor([6, 4, 5]), 3)
    assert drafts.tolist() == [[8, 5, 6], [9, 9, 9], [3, 3, 4]]


@pytest.mark.gpu
@pytest.mark.skipif(not flashinfer_available(), reason="CUDA-graph verify needs CUDA and FlashInfer")
@pytest.mark.parametrize("accept", ["host", "device"])
def test_gpu_bf16_speculative_cuda_graphs_match_the_models_own_forward(accept):
    model = ts.build_model("llama", seed=0, dtype=torch.bfloat16, device="cuda")
    prompts = ts.periodic_prompts(5, model.config.vocab_size, (6, 40), 0)
    max_len = 16 * -(-ts.max_len_needed(40, NEW_TOKENS, 3, accept) // 16)
    runner = ts.Runner(model, max_num_reqs=3, token_budget=32, max_model_len=max_len, cuda_graphs=True, spec=3)
    result = runner.serve(prompts, NEW_TOKENS, accept=accept)
    assert result.step_kinds["graph_verify"] > 0 and result.step_kinds["verify"] == 0, result.step_kinds
    check = ts.teacher_forced_check(model, prompts, result)  # bf16: near-ties allowed
    print(check, result.drafts_accepted, result.drafts_proposed)
    assert check.ok, (str(check), check.failures)


# --drafter layers: the model's first layers draft through batchmeta's draft loop (prepare_draft).
@pytest.mark.parametrize(
    "draft_layers, accept", [(2, "host"), (4, "device")], ids=["first-2-layers-host", "whole-model-device"]
)
def test_cpu_draft_loop_tokens_equal_plain_greedy_decoding(draft_layers, accept, capsys):
    """Drafts from the draft loop never change a greedy token; with every layer as the drafter (the
    target itself) every draft is accepted, which fails if any draft step's positions, slots, pages
    or input ids are wrong."""
    args = [*SPEC_ARGS, "--spec", "2", "--accept", accept, "--drafter", "layers", "--draft-layers", str(draft_layers)]
    assert ts.main(args) == 0
    out = capsys.readouterr().out
    print(out)
    assert "greedy check passed: 30/30 tokens equal plain greedy decoding" in out, out
    drafter = re.escape(f"2 draft-loop (first {draft_layers} layers) drafts per verify step, {accept} acceptance: ")
    rate = re.search(drafter + r"(\d+)/(\d+) drafts accepted", out)
    accepted, proposed = int(rate[1]), int(rate[2])
    assert proposed > 0 and proposed % 2 == 0, out
    if draft_layers == 4:
        assert accepted == proposed, out
    else:
        assert 0 < accepted < proposed, out


def test_draft_layers_are_checked():
    model = ts.build_model("llama", seed=0)
    with pytest.raises(ValueError, match=r"draft_layers: expected 1\.\.4"):
        ts.Runner(model, spec=2, drafter="layers", draft_layers=5)
    with pytest.raises(ValueError, match="drafter: expected"):
        ts.Runner(model, spec=2, drafter="eagle")


@pytest.mark.gpu
@pytest.mark.skipif(not flashinfer_available(), reason="CUDA-graph draft rounds need CUDA and FlashInfer")
@pytest.mark.parametrize("accept", ["host", "device"])
def test_gpu_bf16_draft_loop_graphs_match_the_models_own_forward(accept):
    """bf16 on a GPU: verify steps and whole draft rounds (the first 2 layers) replayed as CUDA graphs."""
    model = ts.build_model("llama", seed=0, dtype=torch.bfloat16, device="cuda")
    prompts = ts.periodic_prompts(5, model.config.vocab_size, (6, 40), 0)
    max_len = 16 * -(-ts.max_len_needed(40, NEW_TOKENS, 3, accept) // 16)
    runner = ts.Runner(
        model, max_num_reqs=3, token_budget=32, max_model_len=max_len, cuda_graphs=True, spec=3, drafter="layers"
    )
    result = runner.serve(prompts, NEW_TOKENS, accept=accept)
    assert result.step_kinds["graph_verify"] > 0 and result.step_kinds["verify"] == 0, result.step_kinds
    assert result.drafts_proposed > 0
    check = ts.teacher_forced_check(model, prompts, result)  # bf16: near-ties allowed
    print(check, result.drafts_accepted, result.drafts_proposed)
    assert check.ok, (str(check), check.failures)


@pytest.mark.parametrize(
    ("name", "world", "interleave"), [("llama", 2, 1), ("gemma2", 3, 4)], ids=["llama-2-ranks", "gemma2-3-ranks"]
)
def test_cpu_context_parallel_ranks_give_one_ranks_tokens(name, world, interleave):
    """``--context-parallel N``: N processes over gloo, each rank holding its share of every request's
    KV (Gemma 2's sliding-window group unsharded beside it); every rank serves one rank's tokens
    through ragged, chunked, mixed and decode steps, and they pass the model's own check."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as the README runs it
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    args = ["--model", name, "--context-parallel", str(world), "--interleave", str(interleave), "--requests", "4"]
    args += ["--max-new-tokens", "8", "--prompt-len", "8", "60", "--token-budget", "32", "--max-num-reqs", "3"]
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "transformers_serving.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"ranks with one rank's tokens: {world}/{world}; every rank the same: True" in run.stdout
    kinds = re.search(r"steps (\{.*\})", run.stdout).group(1)
    for kind in ("ragged_prefill", "chunked_prefill", "mixed", "decode"):
        assert f"'{kind}'" in kinds
    assert "teacher-forced check passed" in run.stdout


def test_context_parallel_runner_rejects_graphs_and_drafts():
    model = ts.build_model("llama", seed=0)
    cp = ts.ContextParallel(2, 0)
    with pytest.raises(ValueError, match=r"^context_parallel: "):
        ts.Runner(model, spec=1, context_parallel=cp)
