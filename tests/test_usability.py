"""What a new user trips on (issue 23): messages, help texts and the README's guidance."""

import inspect
import os
import pydoc
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import batchmeta
from batchmeta import BatchMetadata, KVGroup, MetadataConfig, StaleStepError, Step

ROOT = Path(__file__).resolve().parents[1]


def make(**kw):
    cfg = MetadataConfig(
        max_num_reqs=4,
        max_num_tokens=32,
        max_model_len=64,
        kv_groups=KVGroup(page_size=4),
        num_qo_heads=8,
        num_kv_heads=2,
        head_dim=64,
        q_dtype=torch.float16,
        kv_dtype=torch.float16,
        device="cpu",
        **kw,
    )
    meta = BatchMetadata(cfg)
    meta.block_tables.append(0, [1, 2])
    return meta


def test_a_stale_step_cannot_be_entered():
    meta = make()
    old = meta.prepare_decode([0], [3])
    new = meta.prepare_decode([0], [4])
    with pytest.raises(StaleStepError, match=r"step\.__enter__: this decode step's buffers were overwritten"):
        old.__enter__()
    with pytest.raises(RuntimeError, match="no step is active"):
        batchmeta.current_step()  # nothing was made current
    with new:
        assert batchmeta.current_step() is new


@pytest.mark.parametrize(
    "value, kind", [((r for r in [0]), "generator"), (iter([0]), "list_iterator"), ({0}, "set"), ({0: 1}, "dict")]
)
def test_idx_mapping_iterators_are_a_clear_type_error(value, kind):
    meta = make()
    with pytest.raises(TypeError, match=f"idx_mapping: expected a list, numpy array or CPU tensor, got {kind}$"):
        meta.prepare_decode(value, [3])


def test_capture_decode_graph_on_the_cpu_names_the_device():
    meta = make()
    with pytest.raises(
        ValueError,
        match=r"capture_decode_graph: CUDA graphs need a CUDA device; .* on cpu "
        r"\(config\.device\)",
    ):
        meta.capture_decode_graph(1, lambda step: None)


def test_help_of_step_hides_the_constructor_arguments():
    assert list(inspect.signature(Step).parameters) == ["internal"]
    text = pydoc.render_doc(Step, renderer=pydoc.plaintext)
    for internal in ("block_tables:", "clock:", "wrappers: tuple", "num_kv_pages:"):
        assert internal not in text
    assert "not constructed directly" in Step.__doc__


def test_demo_help_names_the_module_invocation():
    res = subprocess.run(
        [sys.executable, "-m", "batchmeta.demo", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python -m batchmeta.demo")


def test_dev_sh_help_says_which_commands_need_a_gpu():
    env = {**os.environ, "BATCHMETA_PYTHON": "/nonexistent/python"}
    usage = subprocess.run(
        ["bash", str(ROOT / "scripts" / "dev.sh"), "--help"], env=env, capture_output=True, text=True, timeout=60
    ).stdout
    lines = {line.split()[0]: line for line in usage.splitlines() if line.startswith("  ")}
    for cmd in ("bench", "bench-steps", "bench-loop", "profile-step"):
        assert "needs a CUDA GPU" in lines[cmd], lines[cmd]
    for cmd in ("demo", "test", "lint"):
        assert "GPU" not in lines[cmd]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU machine's message")
def test_profile_step_on_a_cpu_machine_is_one_line():
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_step.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1 and "needs a CUDA GPU" in res.stderr and "Traceback" not in res.stderr


def test_readme_development_speaks_of_what_a_gpu_user_does():
    readme = (ROOT / "README.md").read_text()
    dev = readme.split("## Development", 1)[1].split("\n## ", 1)[0]
    assert "pytest -q -m gpu" in dev and ".[dev,flashinfer]" in dev
    for outside in ("../", ".gpu/", "pack.sh", "setup.sh"):
        assert outside not in dev, outside


def test_readme_says_reset_and_stage_per_chunk():
    readme = (ROOT / "README.md").read_text()
    assert "without `reset` keeps the old request's" in readme.replace("\n", " ")
    assert "Stage per chunk" in readme


def test_prepare_prefill_takes_its_lengths_by_keyword():
    """Swapped query and cache lengths pass every check: prefill's two lengths are named. By
    position they still work, with a DeprecationWarning, and give the same step."""
    meta, twin = make(), make()
    twin.block_tables.append(1, [3])
    meta.block_tables.append(1, [3])
    step = meta.prepare_prefill([0, 1], query_lens=[3, 1], cache_lens=[4, 2])
    with pytest.warns(DeprecationWarning, match="by keyword"):
        old = twin.prepare_prefill([0, 1], [3, 1], [4, 2])
    assert torch.equal(step.positions[:4], old.positions[:4]) and step.positions[:4].tolist() == [4, 5, 6, 2]
    assert torch.equal(step.seq_lens[:2], old.seq_lens[:2])
    with pytest.raises(TypeError, match="by keyword"):
        meta.prepare_prefill([0], [1], cache_lens=[4])
    with pytest.raises(TypeError, match="by keyword"):
        meta.prepare_prefill([0], [1])
    with pytest.raises(TypeError, match="missing cache_lens="):
        meta.prepare_prefill([0], query_lens=[1])
    with pytest.raises(TypeError, match="missing query_lens="):
        meta.prepare_prefill([0], cache_lens=[1])
    params = inspect.signature(BatchMetadata.prepare_prefill).parameters
    assert params["query_lens"].kind is params["cache_lens"].kind is inspect.Parameter.KEYWORD_ONLY
