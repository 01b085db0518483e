"""README.md's code blocks run as written.

Every ``python`` block runs, in order, each in a fresh namespace, in one new interpreter (so a block
that starts a process group or sets globals cannot disturb other tests). A block whose first line
starts with ``# Needs a GPU`` runs only where CUDA and FlashInfer are. ``bash`` blocks may only use
``scripts/dev.sh`` commands that exist.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batchmeta.attention import flashinfer_available

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)
GPU_MARK = "# Needs a GPU"


def blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall((ROOT / "README.md").read_text()) if kind == lang]


def test_readme_has_python_blocks_and_marks_only_gpu_ones():
    py = blocks("python")
    assert len(py) >= 3
    cpu = [b for b in py if not b.startswith(GPU_MARK)]
    assert len(cpu) >= 3, "most README blocks must run on a CPU"
    for b in py:
        if b.startswith(GPU_MARK):
            assert "cuda" in b or "replay" in b, "a block marked as needing a GPU should use one"


def test_readme_python_blocks_run():
    run_gpu = torch.cuda.is_available() and flashinfer_available()
    selected = [b for b in blocks("python") if run_gpu or not b.startswith(GPU_MARK)]
    script = "\n".join(
        [
            "import sys",
            f"blocks = {selected!r}",
            "for i, src in enumerate(blocks):",
            "    try:",
            "        exec(compile(src, f'README.md python block {i}', 'exec'), {'__name__': '__readme__'})",
            "    except BaseException:",
            "        print(f'--- README python block {i} failed:\\n{src}', file=sys.stderr)",
            "        raise",
            "print('ran', len(blocks))",
        ]
    )
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-8000:]
    assert f"ran {len(selected)}" in res.stdout


def test_readme_bash_blocks_use_existing_dev_sh_commands():
    usage = subprocess.run(
        ["bash", str(ROOT / "scripts" / "dev.sh"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "BATCHMETA_PYTHON": "/nonexistent"},
    ).stdout
    known = set(re.findall(r"^  ([\w-]+)\s", usage, re.M))
    used = [m for b in blocks("bash") for m in re.findall(r"scripts/dev\.sh\s+([\w-]+)", b)]
    assert used, "README starts with the dev.sh commands"
    for cmd in used:
        assert cmd in known, f"README uses `dev.sh {cmd}`, which dev.sh does not have"


@pytest.mark.parametrize("name", ["accepted_ids", "step.wrappers[", "query_start_loc", "step_block_tables"])
def test_readme_uses_no_retired_names(name):
    assert name not in (ROOT / "README.md").read_text()
