"""Quantized engines keep the engine's invariances: the same greedy tokens alone or
batched, with chunked prefill, under preemption and with prefix-cache hits."""

from __future__ import annotations

import random

import pytest
import torch
from test_engine_tiny import _save_tiny

from tokenmill.attention import torch_backend
from tokenmill.kernels import cpu
from tokenmill.llm import LLM
from tokenmill.model import dequant_matmul, quantization
from tokenmill.model.quantization import Int4Linear, Int8Linear
from tokenmill.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return _save_tiny(tmp_path_factory.mktemp("tiny_quant"), "llama")[0]


def _prompts(n: int) -> list[list[int]]:
    rng = random.Random(1)
    shared = [rng.randrange(3, 256) for _ in range(20)]
    return [shared[: rng.choice([0, 20])] + [rng.randrange(3, 256)
                                            for _ in range(rng.randint(2, 25))]
            for _ in range(n)]


def _tokens(path: str, prompts, preempts: bool = False, **engine_args) -> list[list[int]]:
    llm = LLM(path, num_threads=1, **engine_args)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks  # nothing leaked
    assert (stats.num_preemptions > 0) == preempts
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize(("quant", "amx_min_rows"), [
    ("int4", 0), ("int8", 0),
    *[pytest.param(q, 1, marks=pytest.mark.skipif(not cpu.panels_amx_available(),
                                                  reason="no AMX-BF16"))
      for q in ("int4", "int8")]])
def test_quantized_engine_invariance(tiny_llama, quant, amx_min_rows, monkeypatch):
    # The integer kernels give every row the same arithmetic whatever the batch; the
    # dense prefill path (steps of many rows: float GEMM, float activations) does not
    # round activations to 8 bits, so it is checked separately below. Nor do the AMX
    # panel kernels (bfloat16 activations), here either off or taking every call.
    monkeypatch.setattr(dequant_matmul, "DENSE_MIN_ROWS", 0)
    monkeypatch.setattr(dequant_matmul, "PANEL_DENSE_MIN_ROWS", 0)
    monkeypatch.setattr(quantization, "AMX_MIN_ROWS", {4: amx_min_rows, 8: amx_min_rows})
    # Likewise attention: prompts longer than SHORT_QUERY_LEN take PyTorch's prefill path
    # unchunked and the native kernel in chunks, which round differently (~1e-6), and
    # 8-bit activation rounding can blow that up to a flipped token. One kernel for all
    # query lengths leaves only what this test is about: the engine's bookkeeping.
    monkeypatch.setattr(torch_backend, "SHORT_QUERY_LEN", 1 << 20)
    prompts = _prompts(8)
    llm = LLM(tiny_llama, num_threads=1, quantization=quant)
    kind = Int4Linear if quant == "int4" else Int8Linear
    layer = llm.engine.core.runner.model.model.layers[0]
    assert isinstance(layer.mlp.gate_up_proj, kind)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    # prefix-cache hits: the same prompts again on the warm engine
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert again == batched
    alone = [_tokens(tiny_llama, [p], quantization=quant)[0] for p in prompts[:3]]
    assert alone == batched[:3]
    assert _tokens(tiny_llama, prompts, quantization=quant, max_num_batched_tokens=7) == batched
    # Preemption: 30 blocks of 4 tokens cannot hold all eight requests. Compared with
    # the same block size and room to spare, since the block size alone changes the
    # order in which attention adds its blocks, and 8-bit activations can turn that
    # rounding difference into another token.
    roomy = _tokens(tiny_llama, prompts, quantization=quant, block_size=4)
    assert _tokens(tiny_llama, prompts, preempts=True, quantization=quant, num_kv_blocks=30,
                   block_size=4) == roomy



@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_batch_invariant_engine(tiny_llama, quant, monkeypatch):
    """``batch_invariant``: the same tokens alone, batched and chunked, with every
    row-count switch of the CPU path armed - quantized layers to AMX tiles (where the CPU
    has them) or to the dense float path from 2 rows, prompt chunks over 16 tokens to the
    tiled attention kernel - and nothing pinned by hand."""
    monkeypatch.setattr(dequant_matmul, "DENSE_MIN_ROWS", 2)
    monkeypatch.setattr(dequant_matmul, "PANEL_DENSE_MIN_ROWS", 2)
    monkeypatch.setattr(quantization, "AMX_MIN_ROWS", {4: 2, 8: 2})
    prompts = _prompts(8)
    assert max(map(len, prompts)) > torch_backend.SHORT_QUERY_LEN
    plain = LLM(tiny_llama, num_threads=1, quantization=quant)
    layer = plain.engine.core.runner.model.model.layers[0].mlp.gate_up_proj
    assert 2 in (layer.amx_min_rows, layer.dense_min_rows)  # armed without the flag
    del plain

    llm = LLM(tiny_llama, num_threads=1, quantization=quant, batch_invariant=True)
    model = llm.engine.core.runner.model
    quantized = [m for m in model.modules() if isinstance(m, (Int4Linear, Int8Linear))]
    assert quantized and all(m.amx_min_rows == m.dense_min_rows == 0 for m in quantized)
    assert model.model.layers[0].self_attn.attn_backend.short_query_len > 1 << 20
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    del llm
    alone = [_tokens(tiny_llama, [p], quantization=quant, batch_invariant=True)[0]
             for p in prompts[:4]]
    assert alone == batched[:4]
    assert _tokens(tiny_llama, prompts, quantization=quant, batch_invariant=True,
                   max_num_batched_tokens=7) == batched


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_dense_prefill_matches_integer_kernels(tiny_llama, quant, monkeypatch):
    """Prompt logprobs with the dense prefill path (float activations) are at least as
    close to the float32 model's as the integer kernels' (8-bit activations)."""
    prompt = _prompts(1)[0] * 4  # one step of >= 64 rows
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=0)

    monkeypatch.setattr(dequant_matmul, "DENSE_DTYPE", torch.float32)
    monkeypatch.setattr(quantization, "AMX_MIN_ROWS", {4: 0, 8: 0})  # panels on AMX: below

    def logprobs(min_rows: int, quantization: str | None = quant) -> list[float]:
        monkeypatch.setattr(dequant_matmul, "DENSE_MIN_ROWS", min_rows)
        monkeypatch.setattr(dequant_matmul, "PANEL_DENSE_MIN_ROWS", min_rows)  # panel layers
        llm = LLM(tiny_llama, num_threads=1, quantization=quantization)
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        return [lp.logprob for lp in out.prompt_logprobs[1:]]

    def mean_error(got: list[float], want: list[float]) -> float:
        return sum(abs(a - b) for a, b in zip(got, want, strict=True)) / len(want)

    assert len(prompt) >= 64
    dense, integer, full = logprobs(1), logprobs(0), logprobs(0, None)
    assert dense != integer  # the dense path did run
    assert mean_error(dense, full) <= 1.1 * mean_error(integer, full)


@pytest.mark.skipif(not cpu.panels_amx_available(), reason="no AMX-BF16")
def test_amx_prefill_matches_integer_kernels(tiny_llama, monkeypatch):
    """Prompt logprobs with int4 layers on AMX tiles (bfloat16 activations and weights)
    are about as close to the float32 model's as the integer kernels' (8-bit activations)."""
    prompt = _prompts(1)[0] * 4
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    monkeypatch.setattr(dequant_matmul, "PANEL_DENSE_MIN_ROWS", 0)

    def logprobs(amx_min_rows: int, quant: str | None = "int4") -> list[float]:
        monkeypatch.setattr(quantization, "AMX_MIN_ROWS", {4: amx_min_rows, 8: 0})
        llm = LLM(tiny_llama, num_threads=1, quantization=quant)
        if quant:
            layer = llm.engine.core.runner.model.model.layers[0].mlp.gate_up_proj
            assert layer.amx_min_rows == amx_min_rows
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        return [lp.logprob for lp in out.prompt_logprobs[1:]]

    def mean_error(got: list[float], want: list[float]) -> float:
        return sum(abs(a - b) for a, b in zip(got, want, strict=True)) / len(want)

    amx, integer, full = logprobs(1), logprobs(0), logprobs(0, None)
    assert amx != integer  # the AMX path did run
    assert mean_error(amx, full) <= 1.5 * mean_error(integer, full)


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_native_decoder_stack_keeps_tokens(tiny_llama, quant, monkeypatch):
    """Decode steps through the native decoder stack give the per-layer path's tokens."""
    prompts = _prompts(6)
    llm = LLM(tiny_llama, num_threads=1, quantization=quant)
    assert llm.engine.core.runner.model.model.native_stack is not None
    monkeypatch.setenv("TOKENMILL_CPU_NATIVE_STACK", "0")
    per_layer = LLM(tiny_llama, num_threads=1, quantization=quant)
    assert per_layer.engine.core.runner.model.model.native_stack is None
    assert ([o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in per_layer.generate(prompts, GREEDY,
                                                                    use_tqdm=False)])
