"""scripts/gpu_check.sh runs on the GPU machine's own Python, which lacks some packages.

That machine has torch, triton, transformers and pytest, but not gguf,
fastapi, uvicorn, redis or openai (nor, we assume, the other serving-side
dependencies), and nothing can be installed there. A child process blocks
those packages (``sys.modules[name] = None``: what Python reports for a missing
package, to ``import`` and to ``importlib.util.find_spec`` alike), then
does what the check does, in small: collects the check's test files, runs
``benchmarks/graph_agreement.py --smoke`` (Triton in its interpreter) and
``benchmarks/gpu.py --smoke``. Any import of a blocked package fails it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
# Absent on the GPU machine (the first five), or not promised there.
BLOCKED = ("gguf", "fastapi", "uvicorn", "redis", "openai", "starlette", "msgpack", "zmq",
           "xgrammar", "hypothesis", "prometheus_client", "httpx", "jsonschema", "kubernetes")

CHILD = r"""
import importlib.util, json, sys

# A None entry in sys.modules is exactly how Python reports a missing package:
# ``import x`` raises ModuleNotFoundError and ``importlib.util.find_spec("x")``
# returns None (torch probes optional packages that way, so a finder that raises
# from find_spec would break imports that work on the real machine).
BLOCKED = json.loads(sys.argv[1])
for name in BLOCKED:
    sys.modules[name] = None
try:
    import fastapi  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("the blocker does not work")
assert importlib.util.find_spec("gguf") is None

import pytest

rc = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *json.loads(sys.argv[2])])
if rc != 0:
    raise SystemExit(f"collecting the GPU check's tests failed (pytest exit {rc})")

import runpy

graphs = runpy.run_path("benchmarks/graph_agreement.py")
if graphs["main"](["--smoke", "--out", sys.argv[3]]) != 0:
    raise SystemExit("graph_agreement.py --smoke failed")
bench = runpy.run_path("benchmarks/gpu.py")
if bench["main"](["--smoke", "--hf-seconds", "5", "--json", sys.argv[3] + "/bench.json"]) != 0:
    raise SystemExit("gpu.py --smoke failed")
print("GPU-CHECK-IMPORTS-OK", sorted(m for m in sys.modules
                                    if m.partition(".")[0] in BLOCKED and sys.modules[m]))
"""


def gpu_check_tests() -> list[str]:
    match = re.search(r'^GPU_TESTS="([^"]+)"', SCRIPT.read_text(), re.MULTILINE)
    assert match, "scripts/gpu_check.sh must list its test files in GPU_TESTS"
    tests = match.group(1).split()
    for test in tests:
        assert (ROOT / test).is_file(), test
    return tests


def test_gpu_check_lists_existing_tests_and_bounds_its_phases():
    text = SCRIPT.read_text()
    assert os.access(SCRIPT, os.X_OK)
    tests = gpu_check_tests()
    assert "tests/test_triton_engine.py" in tests and "tests/test_cuda_graph_replay.py" in tests
    limits = [int(x) for x in re.findall(r"^LIMIT_\w+=\$\{LIMIT_\w+:-(\d+)\}$", text, re.MULTILINE)]
    assert len(limits) == 4 and sum(limits) + 4 * 15 <= 8 * 60  # with each SIGKILL grace
    assert "--hf-seconds" in text and 'OUT=${OUT:-' in text


def test_gpu_check_modules_import_without_serving_dependencies(tmp_path):
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES",)}
    env.update(TRITON_INTERPRET="1", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(BLOCKED), json.dumps(gpu_check_tests()),
         str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    assert "GPU-CHECK-IMPORTS-OK []" in proc.stdout
    result = json.loads((tmp_path / "graph_agreement.json").read_text())
    assert result["passed"] and [r["name"] for r in result["runs"]] == [
        "graph", "graph-sync", "eager-triton", "eager-torch"]
    assert json.loads((tmp_path / "bench.json").read_text())["agreement"][0]["passed"]
