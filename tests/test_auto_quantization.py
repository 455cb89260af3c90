"""``--quantization auto``: a GGUF file's own Q4_0/Q4_1 or Q8_0 codes run on the CPU's
integer kernels; everything else loads float weights."""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from tokenmill.engine.args import CPU_QUANTIZATION_ENV, EngineArgs, auto_quantization
from tokenmill.kernels import cpu
from tokenmill.llm import LLM
from tokenmill.model.gguf_loader import file_quantization, open_gguf
from tokenmill.model.loader import ResolvedModel, default_model_path, resolve_model
from tokenmill.model.quantization import Int4Linear, Int8Linear
from tokenmill.sampling import SamplingParams

CPU = torch.device("cpu")


def _write(path: Path, types: dict[str, Q]) -> str:
    """A GGUF file holding only ``types``' tensors (names as llama.cpp writes them)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    for name, qtype in types.items():
        shape = (64,) if name.endswith("norm.weight") else (32, 64)
        data = rng.standard_normal(shape).astype(np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def _layers(**types: Q) -> dict[str, Q]:
    out = {"token_embd.weight": Q.Q8_0, "blk.0.attn_norm.weight": Q.F32}
    out.update({f"blk.{i}.{part}.weight": qtype for part, qtype in types.items()
                for i in range(2)})
    return out


@pytest.mark.parametrize(("types", "want"), [
    (_layers(attn_q=Q.Q4_0, ffn_up=Q.Q4_1), "int4"),  # norms and the Q8_0 head aside
    (_layers(attn_q=Q.Q8_0, ffn_up=Q.Q8_0), "int8"),
    (_layers(attn_q=Q.Q4_1, ffn_up=Q.Q8_0), None),  # mixed: one method would round
    (_layers(attn_q=Q.Q4_0, ffn_up=Q.F16), None),
    (_layers(attn_q=Q.F32, ffn_up=Q.F32), None),
])
def test_file_quantization_reads_the_decoder_matrices(tmp_path, types, want):
    assert file_quantization(open_gguf(_write(tmp_path / "m.gguf", types))) == want


def test_file_quantization_of_the_bundled_model():
    assert file_quantization(open_gguf(default_model_path())) == "int4"  # Q4_1, Q8_0 head


def test_auto_picks_the_file_quantization_where_the_kernels_run(monkeypatch, tmp_path):
    monkeypatch.delenv(CPU_QUANTIZATION_ENV, raising=False)
    bundled = resolve_model(None)
    want = "int4" if cpu.q4_panels_available() else None
    assert auto_quantization(bundled, CPU) == want
    assert auto_quantization(bundled, CPU, "float32") == want
    assert auto_quantization(bundled, CPU, "bfloat16") is None  # kernels take float32
    assert auto_quantization(bundled, torch.device("cuda")) is None
    assert auto_quantization(ResolvedModel(str(tmp_path), "hf"), CPU) is None
    q8 = _write(tmp_path / "q8.gguf", _layers(attn_q=Q.Q8_0))
    want8 = "int8" if cpu.int8_panels_vnni() else None
    assert auto_quantization(resolve_model(q8), CPU) == want8


def test_auto_follows_the_environment_override(monkeypatch):
    bundled = resolve_model(None)
    for value, want in (("none", None), ("int4", "int4"), ("int8", "int8")):
        monkeypatch.setenv(CPU_QUANTIZATION_ENV, value)
        assert auto_quantization(bundled, CPU) == want
        assert auto_quantization(bundled, torch.device("cuda")) is None
    monkeypatch.setenv(CPU_QUANTIZATION_ENV, "int3")
    with pytest.raises(ValueError, match=CPU_QUANTIZATION_ENV):
        auto_quantization(bundled, CPU)


def test_engine_args_resolve_quantization(monkeypatch):
    monkeypatch.delenv(CPU_QUANTIZATION_ENV, raising=False)
    auto = "int4" if cpu.q4_panels_available() else None
    assert EngineArgs().quantization == "auto"
    assert EngineArgs().resolved_quantization(CPU) == auto
    assert EngineArgs().resolved_for(CPU).quantization == auto
    for given in (None, "none"):
        assert EngineArgs(quantization=given).resolved_quantization(CPU) is None
    assert EngineArgs(quantization="int8").resolved_quantization(CPU) == "int8"
    if auto is not None:  # int4 weights take float32 activations
        assert EngineArgs().resolved_dtype(CPU) == torch.float32
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    for flag, want in (([], auto), (["--quantization", "none"], None),
                       (["--quantization", "int8"], "int8")):
        args = EngineArgs.from_cli(parser.parse_args(flag))
        assert args.resolved_quantization(CPU) == want


@pytest.mark.skipif(not cpu.q4_panels_available(), reason="no int4 panel kernel on this CPU")
def test_bundled_model_runs_its_own_int4_codes_by_default(monkeypatch):
    monkeypatch.delenv(CPU_QUANTIZATION_ENV, raising=False)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    auto = LLM(num_threads=2)
    assert auto.engine.config.quantization == "int4"
    layer = auto.engine.core.runner.model.model.layers[0]
    assert isinstance(layer.self_attn.o_proj, Int4Linear)
    assert isinstance(auto.engine.core.runner.model.tied_lm_head, Int8Linear)
    got = [o.outputs[0].token_ids for o in auto.generate(prompts, greedy, use_tqdm=False)]
    del auto
    named = LLM(num_threads=2, quantization="int4")
    want = [o.outputs[0].token_ids for o in named.generate(prompts, greedy, use_tqdm=False)]
    assert got == want


@pytest.mark.skipif(not cpu.q4_panels_available(), reason="no int4 panel kernel on this CPU")
def test_batch_invariant_bundled_model_alone_equals_batched(monkeypatch):
    """``--batch-invariant`` on the real model with its default int4 weights: each request
    gives the same greedy tokens alone as in a batch of 24. (Without it, on a CPU with
    AMX, a 32-stream batch multiplies on bfloat16 tiles and most outputs differ from the
    same requests alone; docs/server.md.)"""
    monkeypatch.delenv(CPU_QUANTIZATION_ENV, raising=False)
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli(parser.parse_args(["--batch-invariant"])).batch_invariant
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    texts = ["Once upon a time, in a small village by the sea, there lived an old fisherman who",
             "Write a short Python function that returns the n-th Fibonacci number:\n",
             "The three most important rules of writing clean code are",
             "List five countries in South America and their capitals:\n1."]
    llm = LLM(num_threads=2, batch_invariant=True)
    assert llm.engine.config.quantization == "int4"
    prompts = [llm.tokenizer.encode(f"{i}. {texts[i % len(texts)]}") for i in range(24)]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    for ids, want in zip(prompts[:3], batched[:3]):
        assert llm.generate([ids], greedy, use_tqdm=False)[0].outputs[0].token_ids == want
