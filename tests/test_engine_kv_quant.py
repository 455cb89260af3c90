"""Engine invariance with a quantized or 16-bit KV cache (--kv-cache-dtype int8|fp8|
float16|bfloat16, the last two in a float32 model: a cache of another dtype than it).

With such a cache the greedy tokens may differ from model-dtype KV (that is what
the perplexity benchmark measures), but never with how a request was run:
alone or batched, chunked or not, prefix-cache hit or miss, preempted or not,
speculated or not, forked or not must all give the same tokens.
"""

from __future__ import annotations

import pytest
import torch
from test_engine_tiny import _prompts, _save_tiny

from tokenmill.llm import LLM
from tokenmill.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("kvq"), "llama")[0]


@pytest.fixture(scope="module", params=["int8", "fp8", "float16", "bfloat16"])
def reference(request, tiny):
    fmt = request.param
    prompts = _prompts(8, seed=1)
    llm = LLM(tiny, kv_cache_dtype=fmt, num_threads=1)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    return fmt, prompts, outs


def _run(path, prompts, params=GREEDY, **kw):
    llm = LLM(path, num_threads=1, **kw)
    outs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks  # nothing leaked
    return [o.outputs[0].token_ids for o in outs], llm


STORAGE = {"int8": torch.int8, "fp8": torch.uint8, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


def test_cache_storage(tiny, reference):
    fmt, _, _ = reference
    llm = LLM(tiny, kv_cache_dtype=fmt, num_threads=1)
    kv = llm.engine.core.executor.runner.kv_cache
    assert kv.dtype == STORAGE[fmt]
    # head_dim 16 codes + a float32 scale, or 16 values
    assert kv.shape[-1] == (16 + 4 if fmt in ("int8", "fp8") else 16)


@pytest.mark.parametrize("engine_args", [
    dict(max_num_batched_tokens=7),  # chunked prefill with an odd budget
    dict(enable_prefix_caching=False),
    dict(num_kv_blocks=34, block_size=4),  # forces preemption
    dict(max_num_seqs=1),  # one request at a time
    dict(speculative_method="ngram", num_speculative_tokens=3),
], ids=["chunked", "no-prefix-cache", "preempt", "serial", "ngram"])
def test_invariance(tiny, reference, engine_args):
    fmt, prompts, want = reference
    got, llm = _run(tiny, prompts, kv_cache_dtype=fmt, **engine_args)
    assert got == want
    if "num_kv_blocks" in engine_args:
        assert llm.engine.stats().num_preemptions > 0


def test_draft_model_speculation(tiny, reference):
    """The draft's cache is quantized too and mirrors the target's blocks."""
    fmt, prompts, want = reference
    got, llm = _run(tiny, prompts, kv_cache_dtype=fmt, speculative_method="draft",
                    speculative_model=tiny, num_speculative_tokens=3)
    assert got == want
    draft_kv = llm.engine.core.executor.draft_runner.kv_cache
    assert draft_kv.dtype == llm.engine.core.executor.runner.kv_cache.dtype


def test_prefix_cache_hits(tiny, reference):
    fmt, prompts, want = reference
    llm = LLM(tiny, kv_cache_dtype=fmt, num_threads=1, block_size=4)
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert first == want
    assert [o.outputs[0].token_ids for o in outs] == want
    assert all(o.num_cached_tokens >= (len(p) - 1) // 4 * 4 for o, p in zip(outs, prompts))


def test_forked_siblings_share_quantized_blocks(tiny, reference):
    """n > 1: siblings fork from the prompt (block copy of the partial block, scales
    included); greedy siblings all equal the single-sample output."""
    fmt, prompts, want = reference
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, n=3)
    llm = LLM(tiny, kv_cache_dtype=fmt, num_threads=1, block_size=4)
    outs = llm.generate(prompts[:3], params, use_tqdm=False)
    for out, expected in zip(outs, want[:3]):
        assert [c.token_ids for c in out.outputs] == [expected] * 3


def test_quantized_tokens_track_model_dtype(tiny, reference):
    """8- or 16-bit KV changes logits slightly: most greedy tokens still agree with float32 KV
    (a loose sanity check; the perplexity benchmark measures quality)."""
    fmt, prompts, want = reference
    plain, _ = _run(tiny, prompts)
    first_agree = sum(a[:4] == b[:4] for a, b in zip(plain, want))
    assert first_agree >= len(prompts) // 2


def test_float_cache_of_another_dtype_than_the_model(tiny):
    """--kv-cache-dtype float32 under a bfloat16 model (and float16 under float32): the
    cache has that dtype, PyTorch's attention reads it in float32, batching and chunking
    still do not change the tokens."""
    prompts = _prompts(4, seed=5)
    for fmt, dtype, storage in [("float32", "bfloat16", torch.float32),
                                ("float16", "float32", torch.float16)]:
        want, llm = _run(tiny, prompts, dtype=dtype, kv_cache_dtype=fmt)
        assert llm.engine.core.executor.runner.kv_cache.dtype == storage
        got, _ = _run(tiny, prompts, dtype=dtype, kv_cache_dtype=fmt, max_num_batched_tokens=7,
                      max_num_seqs=2)
        assert got == want


def test_bad_kv_cache_dtype(tiny):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(tiny, kv_cache_dtype="int4", num_threads=1)


def test_capacity_gauge_counts_quantized_tokens(tiny):
    """Same --kv-cache-memory: 8-bit KV holds >= 3.1x the tokens of float32 KV, 16-bit 2x
    (the stats behind tokenmill_kv_cache_capacity_tokens)."""
    caps = {}
    for fmt in ("auto", "int8", "fp8", "float16"):
        llm = LLM(tiny, kv_cache_dtype=fmt, kv_cache_memory="4MiB", num_threads=1)
        stats = llm.engine.stats()
        assert stats.kv_cache_capacity_tokens == stats.num_total_blocks * 16
        caps[fmt] = stats.kv_cache_capacity_tokens
    # head_dim 16: 64 B float32 rows vs 16 + 4 B quantized rows (3.2x); at head_dim 64
    # (SmolLM2) the ratio is 256 / 68 = 3.76x.
    assert caps["int8"] == caps["fp8"] >= 3.1 * caps["auto"]
    assert 1.95 * caps["auto"] <= caps["float16"] <= 2 * caps["auto"]


def test_bfloat16_model_with_int8_kv_is_invariant(tiny):
    """bf16 activations + int8 KV (the native kernel's bf16-query path): chunking and
    batching do not change greedy tokens."""
    prompts = _prompts(6, seed=4)
    want, _ = _run(tiny, prompts, dtype="bfloat16", kv_cache_dtype="int8")
    got, _ = _run(tiny, prompts, dtype="bfloat16", kv_cache_dtype="int8",
                  max_num_batched_tokens=7)
    assert got == want
    alone, _ = _run(tiny, prompts, dtype="bfloat16", kv_cache_dtype="int8", max_num_seqs=1)
    assert alone == want
