"""End-to-end greedy fidelity and invariance on the real SmolLM2-135M GGUF.

The bar: tokenmill's greedy output for prompts run together through continuous
batching equals HF transformers (float32, same GGUF weights) run on each
prompt alone, token for token; and the output does not change with batching,
chunked prefill, prefix-cache hits or preemption.
"""

from __future__ import annotations

import gc

import pytest
import torch

from tokenmill.llm import LLM
from tokenmill.sampling import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:\n1.",
    "Translate to French: 'Good morning, how are you?'\nFrench:",
    "The quick brown fox",
    "In 1969, Neil Armstrong",
    "Water boils at a temperature of",
    "The most important rule of writing clean code is",
]
NEW_TOKENS = 32
SHARED_PREFIX_CASE: dict[str, list] = {}  # filled by the prefix-cache test, reused later


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=2048)


@pytest.fixture(scope="module")
def prompt_ids(llm: LLM) -> list[list[int]]:
    return [llm.tokenizer.encode(p) for p in PROMPTS]


def greedy(n: int = NEW_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def engine_batched(llm, prompt_ids) -> list[list[int]]:
    return token_ids(llm.generate(prompt_ids, greedy(), use_tqdm=False))


def test_greedy_batched_equals_hf_transformers_alone(llm, prompt_ids, engine_batched,
                                                    smollm2_hf):
    for ids, ours in zip(prompt_ids, engine_batched):
        with torch.inference_mode():
            # eos_token_id=None: like ignore_eos, never stop early.
            out = smollm2_hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                                      do_sample=False, pad_token_id=0, eos_token_id=None)
        ref = out[0, len(ids):].tolist()
        assert ours == ref, f"prompt {ids[:8]}...: engine {ours} != HF {ref}"


def test_alone_equals_batched(llm, prompt_ids, engine_batched):
    for ids, batched in zip(prompt_ids[:3], engine_batched[:3]):
        alone = token_ids(llm.generate([ids], greedy(), use_tqdm=False))[0]
        assert alone == batched
    # A batch of 32 (prompts repeated) gives the same tokens again.
    many = [prompt_ids[i % len(prompt_ids)] for i in range(32)]
    outs = token_ids(llm.generate(many, greedy(), use_tqdm=False))
    for i, toks in enumerate(outs):
        assert toks == engine_batched[i % len(prompt_ids)]


def test_prefix_cache_hit_equals_miss(llm, prompt_ids, engine_batched):
    engine = llm.engine
    system = llm.tokenizer.encode(
        "You are a helpful assistant who answers questions about geography, history and "
        "science in short, precise sentences. Always be polite.\n"
    )
    questions = [llm.tokenizer.encode(q) for q in
                 ["Q: What is the largest ocean?\nA:", "Q: Who wrote Hamlet?\nA:"]]
    prompts = [system + q for q in questions]
    first = llm.generate(prompts[:1], greedy(), use_tqdm=False)[0]
    hits_before = engine.core.block_manager.prefix_hits
    second = llm.generate(prompts, greedy(), use_tqdm=False)
    assert second[0].num_cached_tokens > 0 and second[1].num_cached_tokens > 0
    assert engine.core.block_manager.prefix_hits > hits_before
    assert second[0].outputs[0].token_ids == first.outputs[0].token_ids
    # Same prompt repeated: a cache hit gives the identical continuation.
    again = llm.generate([prompt_ids[0]], greedy(), use_tqdm=False)[0]
    assert again.num_cached_tokens > 0 or len(prompt_ids[0]) <= engine.core.block_manager.block_size
    assert again.outputs[0].token_ids == engine_batched[0]
    SHARED_PREFIX_CASE["prompts"], SHARED_PREFIX_CASE["expected"] = prompts, token_ids(second)


@pytest.fixture(scope="module")
def constrained_llm(llm) -> LLM:
    """Tiny step budget (chunked prefill), no prefix cache, a KV pool that must preempt."""
    llm.engine.shutdown()  # its finalizer has run: nothing left to stop at collection
    del llm.engine.core.executor  # free the first engine's KV cache early
    gc.collect()
    return LLM(max_model_len=2048, max_num_batched_tokens=16, enable_prefix_caching=False,
               num_kv_blocks=14, block_size=16)


def test_chunked_prefill_no_cache_and_preemption_equal_reference(
    constrained_llm, prompt_ids, engine_batched
):
    outs = constrained_llm.generate(prompt_ids, greedy(), use_tqdm=False)
    assert token_ids(outs) == engine_batched
    stats = constrained_llm.engine.stats()
    assert stats.num_preemptions > 0, "the pool was meant to be too small to avoid preemption"
    assert stats.num_free_blocks == stats.num_total_blocks
    prompts, expected = SHARED_PREFIX_CASE["prompts"], SHARED_PREFIX_CASE["expected"]
    assert token_ids(constrained_llm.generate(prompts, greedy(), use_tqdm=False)) == expected


def test_seeded_sampling_reproduces_across_batches(constrained_llm, prompt_ids):
    llm = constrained_llm
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=1234)
    alone = llm.generate([prompt_ids[1]], params, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(max_tokens=12, temperature=1.0)
    mixed = llm.generate([prompt_ids[0], prompt_ids[1], prompt_ids[2]],
                         [others, params, others], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = llm.generate([prompt_ids[1]], params.clone(seed=99), use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone


def test_top_k_1_equals_greedy(constrained_llm, prompt_ids, engine_batched):
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.8, top_k=1, ignore_eos=True)
    outs = constrained_llm.generate(prompt_ids[:4], params, use_tqdm=False)
    assert token_ids(outs) == engine_batched[:4]


def test_stop_strings_and_stop_token_ids(constrained_llm, prompt_ids, engine_batched):
    llm = constrained_llm
    full = llm.generate([prompt_ids[3]], greedy(), use_tqdm=False)[0].outputs[0]
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"unexpected completion {text!r}"
    out = llm.generate([prompt_ids[3]], greedy(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    assert stop not in out.text
    kept = llm.generate([prompt_ids[3]], greedy(stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]
    # Stop on the 5th generated token id.
    stop_id = full.token_ids[4]
    first = full.token_ids.index(stop_id)
    out = llm.generate([prompt_ids[3]], greedy(stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == full.token_ids[: first + 1]
    out = llm.generate([prompt_ids[3]], greedy(n=5), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_n_samples_share_prompt_and_differ(constrained_llm, prompt_ids):
    llm = constrained_llm
    params = SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=7)
    out = llm.generate([prompt_ids[2]], params, use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 10 or o.finish_reason == "stop" for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    again = llm.generate([prompt_ids[2]], params, use_tqdm=False)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]
    greedy_n = llm.generate(
        [prompt_ids[2]], SamplingParams(n=2, max_tokens=8, temperature=0.0, ignore_eos=True),
        use_tqdm=False)[0]
    assert greedy_n.outputs[0].token_ids == greedy_n.outputs[1].token_ids
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_logprobs_and_prompt_logprobs(constrained_llm, prompt_ids):
    llm = constrained_llm
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, prompt_logprobs=2)
    out = llm.generate([prompt_ids[0]], params, use_tqdm=False)[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == len(out.outputs[0].token_ids)
    for tok, lp in zip(out.outputs[0].token_ids, lps):
        assert lp.token_id == tok and lp.rank == 1 and len(lp.top) == 3
        assert lp.top[0][0] == tok and lp.logprob <= 0
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt_ids[0])
    assert [e.token_id for e in out.prompt_logprobs[1:]] == prompt_ids[0][1:]


def test_requests_that_can_never_fit_are_rejected(constrained_llm):
    from tokenmill.engine.errors import RequestRejected

    llm = constrained_llm
    with pytest.raises(RequestRejected, match="maximum context length"):
        llm.generate([[5] * 2000], SamplingParams(max_tokens=100), use_tqdm=False)
    with pytest.raises(RequestRejected, match="KV cache"):
        llm.generate([[5] * 200], SamplingParams(max_tokens=100), use_tqdm=False)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)


def test_chat_applies_template(constrained_llm):
    out = constrained_llm.chat([{"role": "user", "content": "Say hi."}], greedy(8))
    assert out[0].prompt_token_ids[0] == constrained_llm.tokenizer.encode(
        "<|im_start|>", add_special_tokens=False)[0]
    assert len(out[0].outputs[0].token_ids) == 8
