"""The added model families through the engine, on tiny random models, against HF transformers.

For each family (Qwen3, Gemma 3, Phi-3, Mistral with a sliding window, Mixtral,
Qwen3-MoE) a tiny model is built with transformers (fixed seed), saved with
``save_pretrained`` and run through the engine: greedy output of prompts batched
together equals HF ``generate`` on each prompt alone, with prompts and outputs
longer than the sliding window where the family has one, and stays the same
under chunked prefill (chunks crossing the window edge), prefix-cache hits,
preemption and one-at-a-time scheduling. Models whose every layer slides
release the blocks behind the window while they run.
"""

from __future__ import annotations

import random

import pytest
import torch
from family_models import WINDOW, save_family

from tokenmill.engine.block_manager import NULL_BLOCK
from tokenmill.llm import LLM
from tokenmill.sampling import SamplingParams

FAMILIES = ["qwen3", "gemma3", "phi3", "mistral-window", "mixtral", "qwen3-moe"]
WINDOWED = {"gemma3", "phi3", "mistral-window", "mixtral"}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    path, model = save_family(tmp_path_factory.mktemp("fam"), request.param)
    return request.param, path, model


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    base = [rng.randrange(3, 256) for _ in range(40)]  # shared prefix for some prompts
    out = []
    for _ in range(n):
        own = [rng.randrange(3, 256) for _ in range(rng.randint(1, 40))]
        out.append(base[: rng.choice([0, 20, 40])] + own)
    return out


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


def _run(path: str, prompts, **engine_args) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, **engine_args)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.fixture(scope="module")
def reference(family):
    _, path, _ = family
    return _run(path, _prompts(8))[0]


def test_batched_engine_equals_hf_alone(family, reference):
    name, _, hf = family
    prompts = _prompts(8)
    if name in WINDOWED:
        assert max(len(p) for p in prompts) > 4 * WINDOW
    for p, toks in zip(prompts, reference, strict=True):
        assert toks == _hf_greedy(hf, p, GREEDY.max_tokens), name


@pytest.mark.parametrize("engine_args", [
    dict(max_num_batched_tokens=5, block_size=4),  # chunks cross the window edge
    dict(enable_prefix_caching=False),
    # Forces preemption (the longest request needs 19 blocks); chunked prompts make
    # running sequences grow while others hold their windows.
    dict(num_kv_blocks=20, block_size=4, max_num_batched_tokens=16),
    dict(block_size=32, max_num_seqs=1),  # one request at a time
], ids=["chunked", "no-prefix-cache", "preempt", "serial"])
def test_invariance(family, reference, engine_args):
    _, path, _ = family
    got, llm = _run(path, _prompts(8), **engine_args)
    assert got == reference
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks  # nothing leaked
    if "num_kv_blocks" in engine_args:
        assert stats.num_preemptions > 0


def test_prefix_cache_hits_do_not_change_output(family, reference):
    _, path, _ = family
    prompts = _prompts(8)
    llm = LLM(path, block_size=4)
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == first == reference
    assert all(o.num_cached_tokens >= (len(p) - 1) // 4 * 4 for o, p in zip(outs, prompts))


def test_windowed_blocks_are_released_while_running(tmp_path):
    """Every Mistral layer slides (window 8): a sequence keeps at most the blocks its window
    spans plus the block being written, however long it grows, and its output is unchanged."""
    path, hf = save_family(tmp_path, "mistral-window")
    prompt = _prompts(20, seed=5)[0] + list(range(3, 43))
    llm = LLM(path, block_size=4, max_num_batched_tokens=6)
    engine = llm.engine
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    engine.add_request("r", prompt, params)
    bm = engine.core.block_manager
    most_held, released = 0, 0
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
        seq_ids = [s for s in bm._seqs]
        for seq_id in seq_ids:
            table = bm.block_table(seq_id)
            most_held = max(most_held, sum(b != NULL_BLOCK for b in table))
            released = max(released, table.count(NULL_BLOCK))
    # Keys from the step's first token - 7 on: up to 3 blocks, plus the chunk's (6 tokens)
    # up to 2 more and the next step's block.
    assert most_held <= 6
    assert released > 10
    tokens = [t for o in outputs for c in o.outputs for t in c.token_ids]
    assert tokens == _hf_greedy(hf, prompt, 30)
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants()


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_speculative_decoding_on_a_windowed_model(tmp_path, method):
    """A draft model (here the windowed Mistral itself) runs a catch-up pass over each
    step's tokens after Scheduler.update: the blocks those queries see must not have
    been released. Greedy output stays equal to the plain engine."""
    path, _ = save_family(tmp_path, "mistral-window")
    prompts = _prompts(6, seed=2)
    plain, _ = _run(path, prompts, block_size=4)
    extra = dict(speculative_model=path) if method == "draft" else {}
    got, llm = _run(path, prompts, block_size=4, max_num_batched_tokens=12,
                    speculative_method=method, num_speculative_tokens=3, **extra)
    assert got == plain
    assert llm.engine.core.scheduler.sliding_window == WINDOW
    stats = llm.engine.stats()
    assert stats.spec_draft_tokens_total > 0
    if method == "draft":
        # The draft is the target: with intact KV it proposes exactly what the target picks.
        assert stats.spec_accepted_tokens_total == stats.spec_draft_tokens_total
    assert stats.num_free_blocks == stats.num_total_blocks


def test_mixed_models_keep_blocks(tmp_path):
    """Gemma 3 has global layers: no block is ever outside every layer's window."""
    path, _ = save_family(tmp_path, "gemma3")
    llm = LLM(path, block_size=4)
    assert llm.engine.core.scheduler.sliding_window is None
    path, _ = save_family(tmp_path, "phi3")
    assert LLM(path, block_size=4).engine.core.scheduler.sliding_window == WINDOW
