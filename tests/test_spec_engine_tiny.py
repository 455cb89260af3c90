"""Speculative decoding on tiny random models: greedy output never changes.

Greedy n-gram and draft-model speculation must give the non-speculative
engine's tokens exactly, for a batch of different prompts, under chunked
prefill, preemption (a small KV pool) and prefix-cache hits. The draft is
either the target itself (every draft accepted) or the other tiny
architecture (same vocabulary, mostly rejected), so both verification
outcomes and the rollback of rejected positions are exercised.
"""

from __future__ import annotations

import json
import random

import pytest
from test_engine_tiny import _save_tiny

from tokenmill.llm import LLM
from tokenmill.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_spec")
    return {arch: _save_tiny(root, arch)[0] for arch in ("llama", "qwen2")}


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Different prompts, some sharing a prefix, most repeating a phrase (n-gram food)."""
    rng = random.Random(seed)
    base = [rng.randrange(3, 256) for _ in range(24)]
    out = []
    for i in range(n):
        own = [rng.randrange(3, 256) for _ in range(rng.randint(3, 30))]
        prompt = base[: rng.choice([0, 12, 24])] + own
        if i % 3:
            prompt = prompt + prompt[-rng.randint(3, 8):] * 2
        out.append(prompt)
    return out


def _generate(path: str, prompts, params=GREEDY, **engine_args):
    llm = LLM(path, num_threads=1, **engine_args)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.fixture(scope="module")
def reference(tiny_models) -> dict[str, list[list[int]]]:
    prompts = _prompts(8)
    return {arch: _generate(path, prompts)[0] for arch, path in tiny_models.items()}


def _assert_clean(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks  # nothing leaked
    llm.engine.core.block_manager.check_invariants()


SPEC = {
    "ngram": lambda models, arch: dict(speculative_method="ngram", num_speculative_tokens=3),
    "draft-self": lambda models, arch: dict(speculative_method="draft",
                                            speculative_model=models[arch]),
    # A quantized copy of the target as its own draft: cheaper, still well matched.
    "draft-self-int4": lambda models, arch: dict(speculative_method="draft",
                                                 speculative_model=models[arch],
                                                 speculative_quantization="int4"),
    "draft-other": lambda models, arch: dict(
        speculative_method="draft", num_speculative_tokens=3,
        speculative_model=models["qwen2" if arch == "llama" else "llama"]),
}
ENGINE = {
    "default": dict(),
    "chunked": dict(max_num_batched_tokens=7),
    "preempt": dict(num_kv_blocks=34, block_size=4),
    "preempt-chunked": dict(num_kv_blocks=26, block_size=4, max_num_batched_tokens=6,
                            max_num_seqs=4),
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("engine", list(ENGINE))
@pytest.mark.parametrize("spec", list(SPEC))
def test_greedy_speculation_equals_plain_decoding(tiny_models, reference, arch, engine, spec):
    engine_args = {**ENGINE[engine], **SPEC[spec](tiny_models, arch)}
    got, llm = _generate(tiny_models[arch], _prompts(8), **engine_args)
    assert got == reference[arch]
    _assert_clean(llm)
    stats = llm.engine.stats()
    assert stats.spec_draft_tokens_total > 0
    if spec == "draft-self":
        # The target drafting for itself is right about (almost) every token.
        assert stats.spec_acceptance_rate > 0.9
    if "preempt" in engine:
        assert stats.num_preemptions > 0


@pytest.mark.parametrize("spec", ["ngram", "draft-self"])
def test_prefix_cache_hits_with_speculation(tiny_models, reference, spec):
    prompts = _prompts(8)
    llm = LLM(tiny_models["llama"], num_threads=1, block_size=4,
              **SPEC[spec](tiny_models, "llama"))
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    again = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert first == reference["llama"]
    assert [o.outputs[0].token_ids for o in again] == reference["llama"]
    assert all(o.num_cached_tokens >= (len(p) - 1) // 4 * 4 for o, p in zip(again, prompts))
    _assert_clean(llm)


def test_stop_conditions_apply_to_every_accepted_token(tiny_models, reference):
    path = tiny_models["llama"]
    prompts = _prompts(8)
    ref = reference["llama"]
    # Per prompt: stop at an id from the middle of its reference output, or a short max_tokens,
    # with min_tokens keeping early occurrences of the stop id.
    params = []
    for i, toks in enumerate(ref):
        if i % 2:
            params.append(SamplingParams(max_tokens=5 + i, temperature=0.0, ignore_eos=True))
        else:
            params.append(SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                         stop_token_ids=[toks[10]], min_tokens=4))
    plain, _ = _generate(path, prompts, params)
    for spec in SPEC:
        got, llm = _generate(path, prompts, params, **SPEC[spec](tiny_models, "llama"))
        assert got == plain, spec
        _assert_clean(llm)


def test_greedy_logprobs_match_plain_decoding(tiny_models):
    path = tiny_models["qwen2"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    prompts = _prompts(3)
    plain = LLM(path, num_threads=1).generate(prompts, params, use_tqdm=False)
    spec = LLM(path, num_threads=1, speculative_method="draft",
               speculative_model=path).generate(prompts, params, use_tqdm=False)
    for a, b in zip(plain, spec):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.token_id == y.token_id and x.rank == y.rank
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


@pytest.mark.parametrize("spec", ["ngram", "draft-other"])
def test_seeded_sampling_is_reproducible_and_mixed_with_unsupported_requests(
    tiny_models, spec
):
    path = tiny_models["llama"]
    prompts = _prompts(4)
    params = [
        SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=1.0, top_k=20, seed=12, logprobs=1,
                       ignore_eos=True),
        # Not speculated: penalties and n > 1 decode one token per step.
        SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=1.2, ignore_eos=True),
        SamplingParams(n=2, max_tokens=8, temperature=0.8, seed=13, ignore_eos=True),
    ]
    runs = []
    for _ in range(2):
        llm = LLM(path, num_threads=1, block_size=4, **SPEC[spec](tiny_models, "llama"))
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs.append([[c.token_ids for c in o.outputs] for o in outs])
        assert all(len(c.token_ids) == p.max_tokens for o, p in zip(outs, params)
                   for c in o.outputs)
        assert len(outs[1].outputs[0].logprobs) == 16
        _assert_clean(llm)
    assert runs[0] == runs[1]
    # The penalised greedy request is unaffected by speculation being on.
    plain, _ = _generate(path, prompts[2:3], params[2])
    assert runs[0][2][0] == plain[0]


def test_configuration_errors(tiny_models, tmp_path):
    path = tiny_models["llama"]
    with pytest.raises(ValueError, match="speculative model"):
        LLM(path, num_threads=1, speculative_method="draft")
    with pytest.raises(ValueError, match="speculative-method draft"):
        LLM(path, num_threads=1, speculative_model=path)
    with pytest.raises(ValueError, match="speculative method"):
        LLM(path, num_threads=1, speculative_method="eagle")
    with pytest.raises(ValueError, match="ngram_prompt_lookup_min"):
        LLM(path, num_threads=1, speculative_method="ngram", ngram_prompt_lookup_min=5,
            ngram_prompt_lookup_max=2)
    other = tmp_path / "vocab300"
    other.mkdir()
    with open(f"{tiny_models['llama']}/config.json") as f:
        cfg = json.load(f)
    cfg["vocab_size"] = 300
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(path, num_threads=1, load_format="dummy", speculative_method="draft",
            speculative_model=str(other))


def test_cli_flags_reach_engine_args():
    import argparse

    from tokenmill.engine.args import EngineArgs

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = EngineArgs.from_cli(parser.parse_args([
        "--speculative-method", "draft", "--num-speculative-tokens", "3",
        "--ngram-prompt-lookup-max", "5", "--ngram-prompt-lookup-min", "2",
        "--speculative-model", "/m",
    ]))
    cfg = args.speculative_config()
    assert (cfg.method, cfg.num_speculative_tokens, cfg.model) == ("draft", 3, "/m")
    assert (cfg.ngram_prompt_lookup_max, cfg.ngram_prompt_lookup_min) == (5, 2)
    assert EngineArgs.from_cli(parser.parse_args([])).speculative_config() is None
