"""benchmarks/gpu.py on the CPU: device resolution and the bounded HF phase.

The benchmark itself needs a GPU; these check the parts that broke (or could
overrun) there without one. Timings are never asserted: the HF test gives
``generate`` a time cap far below one batch's work and checks that the batch
was cut and its tokens counted consistently.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_gpu_bench():
    spec = importlib.util.spec_from_file_location("tokenmill_bench_gpu", ROOT / "benchmarks"
                                                  / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpu = load_gpu_bench()


def test_default_cuda_device_gets_an_index(monkeypatch):
    # torch.cuda.set_device(torch.device("cuda")) raises ValueError: the benchmark
    # must hand it an indexed device.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert gpu.resolve_device("cuda") == torch.device("cuda", 3)
    assert gpu.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert gpu.resolve_device("cpu") == torch.device("cpu")
    assert gpu.parse_args([]).device == "cuda"  # the default that used to crash


def tiny_hf_model():
    pytest.importorskip("transformers")
    return gpu.load_hf_random(gpu.TINY_CONFIG, torch.float32, torch.device("cpu"), seed=0)


def test_hf_static_batch_stops_at_its_time_cap():
    model = tiny_hf_model()
    prompts = [[100 + i, 200, 300 + i] for i in range(6)]
    wanted = [400, 300, 200, 400, 100, 50]
    result = gpu.run_hf_static(model, "tiny", prompts, wanted, batch=4,
                               device=torch.device("cpu"), seconds_cap=1e-4)
    assert result is not None
    # The first batch (400 tokens at most) was stopped after a few steps and the
    # phase ended there: fewer tokens than asked, none of the second batch's.
    steps = result.output_tokens // 4
    assert 1 <= steps < 50 and result.output_tokens == 4 * steps
    assert result.requests == 0 and result.input_tokens == 12
    assert "cut by the time cap" in result.note


def test_hf_static_counts_only_requested_tokens_when_not_cut():
    model = tiny_hf_model()
    prompts = [[100, 101], [102, 103, 104], [105]]
    wanted = [3, 5, 2]
    result = gpu.run_hf_static(model, "tiny", prompts, wanted, batch=2,
                               device=torch.device("cpu"), seconds_cap=600)
    assert result is not None and result.note == ""
    assert (result.requests, result.output_tokens, result.input_tokens) == (3, 10, 6)
