"""Speculative decoding on the real SmolLM2-135M GGUF: identical greedy output.

An extractive chat prompt ("repeat this text") is where n-gram lookup shines:
most of the answer is a copy of the prompt. Both proposers (n-gram, and the
model drafting for itself) must leave the greedy tokens unchanged.
"""

from __future__ import annotations

import gc

import pytest

from tokenmill.llm import LLM
from tokenmill.sampling import SamplingParams

pytestmark = pytest.mark.slow

PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. "
    "He trimmed the wick, polished the great lens, and watched the ships pass "
    "safely beyond the rocks."
)
QUESTION = "What is the boiling point of water at sea level?"
NEW_TOKENS = 32
ENGINE = dict(max_model_len=1024, kv_cache_memory="64MiB")


def _chat_ids(llm: LLM, text: str) -> list[int]:
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return llm.tokenizer.encode(prompt, add_special_tokens=False)


def _greedy() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cases() -> tuple[list[list[int]], list[list[int]]]:
    """Prompts and the non-speculative greedy reference."""
    llm = LLM(**ENGINE)
    prompts = [_chat_ids(llm, f"Repeat this text exactly:\n\n{PASSAGE}"),
               _chat_ids(llm, QUESTION)]
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, _greedy(), use_tqdm=False)]
    del llm
    gc.collect()
    return prompts, ref


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_speculation_keeps_greedy_output(cases, spec):
    from tokenmill.model.loader import default_model_path

    prompts, ref = cases
    extra = dict(speculative_model=default_model_path()) if spec == "draft" else {}
    llm = LLM(**ENGINE, speculative_method=spec, num_speculative_tokens=4, **extra)
    try:
        outs = llm.generate(prompts, _greedy(), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == ref
        stats = llm.engine.stats()
        assert stats.spec_draft_tokens_total > 0
        assert stats.spec_accepted_tokens_total > 0
        if spec == "ngram":
            # The copy task: most proposals are right.
            assert stats.spec_acceptance_rate > 0.3
        else:
            assert stats.spec_acceptance_rate > 0.9  # the model drafting for itself
        # Again, now hitting the prefix cache (the draft's KV blocks are shared too).
        again = llm.generate(prompts[:1], _greedy(), use_tqdm=False)[0]
        assert again.num_cached_tokens > 0
        assert again.outputs[0].token_ids == ref[0]
        stats = llm.engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks
    finally:
        del llm
        gc.collect()
