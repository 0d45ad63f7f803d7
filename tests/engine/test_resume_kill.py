"""SIGKILL a real merge process mid-write, resume it, compare with an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.helpers import folder_digest, write_recipe

from mergekit_like.demo import LlamaShape, make_family

SHAPE = LlamaShape(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=6)


def _cmd(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "mergekit_like", "merge", str(recipe), str(out), "-q",
            "--out-shard-size", "600KB"]


def _done_markers(partial: Path) -> int:
    done = partial / ".mergekit_like_state" / "done"
    return len(list(done.glob("*.safetensors.json"))) if done.is_dir() else 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    make_family(root / "fam", SHAPE, n_finetunes=3)
    doc = {"merge_method": "ties", "base_model": str(root / "fam/base"),
           "models": [{"model": str(root / f"fam/ft{k}"), "parameters": {"weight": 1.0, "density": 0.4}}
                      for k in (1, 2, 3)], "out_dtype": "bfloat16"}
    recipe = write_recipe(root / "recipe.yml", doc)
    ref = root / "reference"
    subprocess.run(_cmd(recipe, ref), check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return root, recipe, folder_digest(ref)


@pytest.mark.parametrize("kill_after_markers", [1, 4])
def test_sigkill_then_resume_is_bit_identical(setup, kill_after_markers):
    root, recipe, want = setup
    out = root / f"out{kill_after_markers}"
    partial = root / f".{out.name}.partial"
    proc = subprocess.Popen(_cmd(recipe, out))
    deadline = time.monotonic() + 120
    while _done_markers(partial) < kill_after_markers and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():
        pytest.skip("the merge finished before it could be killed")
    assert partial.is_dir() and not out.exists()
    assert _done_markers(partial) >= kill_after_markers
    lock = root / f".{out.name}.lock"
    assert lock.exists()  # a dead process's lock: stale, taken over by the resume
    result = subprocess.run(_cmd(recipe, out), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "resumed" in result.stderr
    assert folder_digest(out) == want
    assert not partial.exists() and not lock.exists()
