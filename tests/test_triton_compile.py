"""The Triton kernels compile for an H100 (sm_90) with Triton's real compiler.

The interpreter tests check the arithmetic; this checks what only the real
compiler sees (types, tl.dot shape rules) and that the tile configurations fit
in shared memory. Triton compiles ahead of time without a GPU, but not in a
process where TRITON_INTERPRET=1 is set, so it runs in a child process.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_hopper():
    ptxas = Path(importlib.util.find_spec("triton").origin).parent / "backends/nvidia/bin/ptxas"
    if not ptxas.exists():
        pytest.skip("this triton build ships no ptxas for ahead-of-time compilation")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a deprecation warning
    only = ("bf16 d128 g4,bf16 d64 g7,prefill fp16 d256,prefill fp32,merge,kv write,kv-,h4096,"
            "silu,rotary")
    proc = subprocess.run(
        [sys.executable, "-m", "tokenmill.kernels.compile_check", "--arch", "90", "--only", only],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "shared" in line]
    assert len(lines) >= 12, proc.stdout
