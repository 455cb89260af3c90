"""Padded CUDA-graph replays give the same greedy tokens as eager Triton and eager torch.

GPU only: a graph can only be captured and replayed on CUDA. The comparison
(float32, prompts up to ~1900 tokens so the decode kernel splits the context,
requests finishing at different steps so most replays are padded) lives in
``benchmarks/graph_agreement.py``, which ``scripts/gpu_check.sh`` also runs;
on a CPU its ``--smoke`` mode runs in ``test_gpu_check_imports.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA graphs need a GPU", allow_module_level=True)
pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def load_graph_agreement():
    spec = importlib.util.spec_from_file_location("tokenmill_graph_agreement",
                                                  ROOT / "benchmarks" / "graph_agreement.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_padded_graph_replay_matches_eager_triton_and_torch():
    # Block size 32 and another seed: the gpu_check "graphs" phase runs the defaults (16).
    ga = load_graph_agreement()
    cfg, _ = ga.parse_args(["--block-size", "32", "--seed", "32"])
    result = ga.check(cfg)
    print(ga.format_result(result))
    graph = next(r for r in result["runs"] if r["name"] == "graph")
    assert graph["graphs_captured"] and graph["padded_replays"] > 0
    assert result["passed"], result["problems"]
