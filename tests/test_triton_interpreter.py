"""Runs the Triton kernel tests in a child process when they cannot run in this one.

Without a GPU the kernels need Triton's interpreter, chosen when Triton is
first imported. In a full test run another module usually imports Triton
first (``transformers`` model classes do, through torch), so the kernel test
modules skip themselves and this test runs them with TRITON_INTERPRET=1 in a
fresh interpreter. Run alone (or with TRITON_INTERPRET=1 set), they run in
process and this test is skipped.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU and "triton" not in sys.modules:
    # Must precede triton's first import; pointless (so not leaked) once it happened.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tokenmill.kernels.triton_utils import interpreter_active  # noqa: E402

if ON_GPU or interpreter_active():
    pytest.skip("the Triton kernel tests run in this process", allow_module_level=True)

TESTS = Path(__file__).resolve().parent
MODULES = ["test_triton_kernels.py", "test_triton_backend.py", "test_triton_engine.py"]


def test_triton_kernel_tests_pass_in_an_interpreter_child_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = str(TESTS.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-rs", *[str(TESTS / m) for m in MODULES]],
        capture_output=True, text=True, env=env, cwd=root, timeout=1200, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    if " passed" not in proc.stdout:  # e.g. this triton's interpreter is unusable
        pytest.skip("the child process skipped every test:\n" + proc.stdout[-2000:])
