"""Installing batchmeta: FlashInfer is an optional extra (the CPU path runs without it), a CUDA runner
without it says how to install it, and ``scripts/dev.sh``'s first run says what it installs."""

import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from batchmeta.attention import wrappers

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter with every `import flashinfer` failing, on the CPU.
_NO_FLASHINFER = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class NoFlashInfer(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "flashinfer" or name.startswith("flashinfer."):
                raise ImportError(f"{name} is blocked by this test")
            return None


    sys.meta_path.insert(0, NoFlashInfer())

    import torch

    import batchmeta
    from batchmeta import BatchMetadata, KVGroup, MetadataConfig, ops
    from batchmeta.attention import flashinfer_available

    assert not flashinfer_available()
    cfg = MetadataConfig(max_num_reqs=4, max_num_tokens=32, max_model_len=64, kv_groups=KVGroup(page_size=4),
                         num_qo_heads=4, num_kv_heads=2, head_dim=16, q_dtype=torch.float16,
                         kv_dtype=torch.float16, num_kv_pages=16, device="cpu")
    meta = BatchMetadata(cfg)
    k_cache, v_cache = (torch.zeros(16, 4, 2, 16, dtype=torch.float16) for _ in range(2))
    meta.block_tables.append(0, [[1, 2]])
    meta.block_tables.append(1, [[3]])
    for prepare, args in ((meta.prepare_prefill, ([0, 1], [5, 3], [0, 0])), (meta.prepare_decode, ([0, 1], [5, 3]))):
        with prepare(*args) as step:
            k, v = (torch.randn(step.num_tokens, 2, 16, dtype=torch.float16) for _ in range(2))
            ops.store_kv(k, v, step.slot_mappings[0], k_cache, v_cache)
            q = torch.randn(step.num_tokens, 4, 16, dtype=torch.float16)
            out = batchmeta.current_step().attention(q, k_cache, v_cache, k=k, v=v)
            assert out.shape == q.shape and torch.isfinite(out).all(), out
            assert step.wrappers is None
    assert "flashinfer" not in sys.modules
    print("ok")
    """
)


def test_cpu_path_runs_with_flashinfer_blocked():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-c", _NO_FLASHINFER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-6000:]
    assert res.stdout.strip().endswith("ok")


def test_flashinfer_is_an_optional_extra():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("flashinfer")]
    assert [d for d in project["optional-dependencies"]["flashinfer"] if d.startswith("flashinfer-python")]


@pytest.fixture
def cuda_without_flashinfer(monkeypatch):
    """What a CUDA machine without FlashInfer looks like to ``batchmeta.attention.wrappers``."""
    monkeypatch.setattr(wrappers.torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # `import flashinfer` raises ImportError
    monkeypatch.setattr(wrappers, "_warned_missing", [False])
    for cached in (wrappers.flashinfer_available, wrappers._flashinfer_import_error):
        cached.cache_clear()
    yield
    for cached in (wrappers.flashinfer_available, wrappers._flashinfer_import_error):
        cached.cache_clear()


def test_missing_flashinfer_on_cuda_warns_once_how_to_install(cuda_without_flashinfer, caplog):
    with caplog.at_level(logging.WARNING, logger="batchmeta"):
        assert wrappers.flashinfer_planning_available() is False
        assert wrappers.flashinfer_planning_available() is False
    records = [r for r in caplog.records if r.name == "batchmeta"]
    assert len(records) == 1, records
    assert "pip install 'batchmeta[flashinfer]'" in records[0].getMessage()


def test_wrapper_construction_without_flashinfer_says_how_to_install(cuda_without_flashinfer):
    with pytest.raises(ImportError, match=r"pip install 'batchmeta\[flashinfer\]'"):
        wrappers.new_ragged_prefill_wrapper(torch.zeros(8, dtype=torch.uint8))


def test_no_warning_without_cuda(monkeypatch, caplog):
    monkeypatch.setattr(wrappers.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(wrappers, "_warned_missing", [False])
    wrappers.flashinfer_available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="batchmeta"):
            assert wrappers.flashinfer_planning_available() is False
    finally:
        wrappers.flashinfer_available.cache_clear()
    assert not [r for r in caplog.records if r.name == "batchmeta"]


# A stand-in interpreter for dev.sh: nothing is importable, pip succeeds (except, when asked, from
# PyTorch's CPU index), and every call is logged.
_FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
if [[ $1 == -c ]]; then exit 1; fi
if [[ $1 == -m && $2 == pip && -n ${FAIL_CPU_INDEX:-} && $* == *download.pytorch.org* ]]; then exit 1; fi
exit 0
"""


@pytest.mark.parametrize(
    "gpu, cpu_index_fails", [(False, False), (False, True), (True, False)], ids=["cpu", "cpu-index-fails", "nvidia-smi"]
)
def test_dev_sh_first_run_says_each_install_stage(tmp_path, gpu, cpu_index_fails):
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "dev.sh", tmp_path / "scripts" / "dev.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / "bin"  # only the tools dev.sh uses: no nvidia-smi unless the case has a GPU
    bin_dir.mkdir()
    for tool in ("bash", "sha256sum", "cut", "cat", "mkdir", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    fake = tmp_path / "python"
    fake.write_text(_FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"PATH": str(bin_dir), "BATCHMETA_PYTHON": str(fake), "FAKE_LOG": str(log), "HOME": str(tmp_path)}
    if cpu_index_fails:
        env["FAIL_CPU_INDEX"] = "1"
    res = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "dev.sh"), "lint"], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert all(line.startswith("dev.sh: ") for line in lines), lines
    calls = log.read_text().splitlines()
    installs = [c for c in calls if c.startswith("-m pip install")]
    if gpu:
        assert lines == ["dev.sh: installing torch==2.13.0…", "dev.sh: installing batchmeta[dev,examples,flashinfer]…"]
        assert "download.pytorch.org" not in installs[0]
    else:
        assert lines[0] == "dev.sh: installing torch==2.13.0 (CPU wheel)…"
        assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in installs[0]
        assert lines[-1] == "dev.sh: installing batchmeta[dev,examples]…"
        assert len(lines) == (3 if cpu_index_fails else 2)
        if cpu_index_fails:
            assert installs[1].endswith("torch==2.13.0") and "download.pytorch.org" not in installs[1]
    assert installs[-1].endswith("-e .[dev,examples,flashinfer]" if gpu else "-e .[dev,examples]")
    assert all("-q" in c for c in installs)


def test_readme_compatibility_table_matches_pyproject_bounds():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    readme = (ROOT / "README.md").read_text()
    rows = {
        line.split("|")[1].strip().split()[0]: line.split("|")[2].strip().strip("`")
        for line in readme.splitlines()
        if line.startswith("| ") and line.count("|") == 5
    }
    assert rows["Python"] == project["requires-python"]
    deps = [*project["dependencies"], *(d for ds in project["optional-dependencies"].values() for d in ds)]
    names = {
        "torch": "torch",
        "triton": "triton",
        "numba": "numba",
        "FlashInfer": "flashinfer-python",
        "transformers": "transformers",
    }
    for row, dist in names.items():
        (spec,) = [d.removeprefix(dist) for d in deps if d.startswith(dist) and d[len(dist)] in "<>=!~"]
        assert rows[row] == spec, (row, rows[row], spec)


def test_changelog_has_unreleased_above_0_1_0():
    text = (ROOT / "CHANGELOG.md").read_text()
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert heads[:2] == ["## Unreleased", "## 0.1.0"]


def test_the_formatter_decides_the_layout():
    """``ruff format`` lays the code out (CI checks it); no statement keeps a hand layout with ruff's skip or
    off comments."""
    marks = tuple("# fmt: " + word for word in ("skip", "off"))  # spelt apart: this file holds no mark either
    held = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("batchmeta", "tests", "benchmarks", "examples")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if any(mark in line for mark in marks)
    ]
    assert held == []
