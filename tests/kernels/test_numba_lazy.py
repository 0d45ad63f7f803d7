"""numba is imported on first use of the fused loops only: importing the registry (every method,
ops/ and kernels/ module) in a fresh interpreter leaves it out of ``sys.modules``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import sys
import mergekit_like.registry
import mergekit_like.kernels.fused_cpu, mergekit_like.kernels.kth_largest
import mergekit_like.ops.drop, mergekit_like.ops.trim, mergekit_like.ops.task_vectors
loaded = sorted(m for m in sys.modules if m == "numba" or m.startswith("numba."))
assert not loaded, loaded
from mergekit_like.kernels import fused_cpu
if fused_cpu._kernels() is not None:        # the loops load it when first needed
    assert "numba" in sys.modules
print("ok")
"""


def test_importing_the_registry_does_not_import_numba():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MERGEKIT_LIKE_FUSED": "1"}
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
