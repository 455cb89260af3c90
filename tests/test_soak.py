"""The soak benchmark's short run: hostile and well-behaved clients together against a
real server (benchmarks/soak.py); every goal must hold (exit status 0).

Extended (about 2.5 minutes on 2 cores): `pytest -m extended tests/test_soak.py`, or
run the benchmark itself. The default suite covers the same hostile clients one at a
time (tests/test_server_limits.py, test_server_lifecycle.py, test_server_api.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.extended
def test_short_soak_meets_every_goal():
    proc = subprocess.run(
        [sys.executable, "benchmarks/soak.py", "--duration", "30", "--concurrency", "16",
         "--burst-every", "10"],
        cwd=ROOT, capture_output=True, text=True, timeout=1500,
    )
    report = proc.stdout[proc.stdout.find("soak:"):]
    assert proc.returncode == 0, report or proc.stderr[-4000:]
    assert "MISS" not in report
