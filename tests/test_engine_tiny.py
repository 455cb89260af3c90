"""Engine invariance on tiny random models, checked against HF transformers.

Fast companions of the SmolLM2 tests: random-weight Llama and Qwen2 models
saved as safetensors, generated through the engine under different batching,
chunking, caching and memory pressure, always equal to HF ``generate``.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import save_file

from tokenmill.llm import LLM
from tokenmill.sampling import SamplingParams


def _save_tiny(tmp_path, arch: str):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(cfg)
    model = model.float().eval()
    # Larger random weights give sharper, less tie-prone logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    d = tmp_path / arch
    d.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    return str(d), model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny"), request.param)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    base = [rng.randrange(3, 256) for _ in range(40)]  # shared prefix for some prompts
    out = []
    for _ in range(n):
        own = [rng.randrange(3, 256) for _ in range(rng.randint(1, 60))]
        out.append(base[: rng.choice([0, 20, 40])] + own)
    return out


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _run(path: str, prompts, **engine_args) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, **engine_args)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


def test_batched_engine_equals_hf_alone(tiny):
    path, hf = tiny
    prompts = _prompts(10)
    ours, _ = _run(path, prompts)
    for p, toks in zip(prompts, ours):
        assert toks == _hf_greedy(hf, p, 24)


@pytest.mark.parametrize("engine_args", [
    dict(max_num_batched_tokens=7),  # chunked prefill with an odd budget
    dict(enable_prefix_caching=False),
    dict(num_kv_blocks=34, block_size=4),  # forces preemption
    dict(num_kv_blocks=17, block_size=8, max_num_batched_tokens=5, max_num_seqs=3),
    dict(block_size=32, max_num_seqs=1),  # one request at a time
], ids=["chunked", "no-prefix-cache", "preempt", "preempt-chunked", "serial"])
def test_invariance(tiny, engine_args):
    path, _ = tiny
    prompts = _prompts(10)
    reference, _ = _run(path, prompts)
    got, llm = _run(path, prompts, **engine_args)
    assert got == reference
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks  # nothing leaked
    if "num_kv_blocks" in engine_args:
        assert stats.num_preemptions > 0


def test_prefix_cache_hits_do_not_change_output(tiny):
    path, _ = tiny
    prompts = _prompts(6, seed=3)
    llm = LLM(path, block_size=4)
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == first
    assert all(o.num_cached_tokens >= (len(p) - 1) // 4 * 4 for o, p in zip(outs, prompts))


def test_abort_frees_blocks(tiny):
    path, _ = tiny
    llm = LLM(path, block_size=4, max_num_batched_tokens=8)
    engine = llm.engine
    for i, p in enumerate(_prompts(5)):
        engine.add_request(f"r{i}", p, GREEDY)
    engine.step()
    engine.step()
    assert engine.core.block_manager.num_free_blocks < engine.core.block_manager.num_blocks
    for i in range(5):
        engine.abort_request(f"r{i}")
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks
    assert not engine.has_unfinished_requests()
    assert engine.step() == []
