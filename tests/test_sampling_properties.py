"""Property test: whatever the parameters, the sampler returns a legal token."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.sampling import Sampler, SamplingBatch, SamplingParams, make_generator


@st.composite
def sampling_rows(draw: st.DrawFn, vocab: int) -> tuple[SamplingParams, list[int], list[int]]:
    """One row: its params, prompt ids and output ids (some ids outside the vocabulary)."""
    token = st.integers(0, vocab + 5)
    params = SamplingParams(
        temperature=draw(st.sampled_from([0.0, 1e-5, 0.3, 1.0, 2.5, 50.0])),
        top_k=draw(st.integers(-1, vocab + 3)),
        top_p=draw(st.floats(0.001, 1.0)),
        min_p=draw(st.floats(0.0, 1.0)),
        repetition_penalty=draw(st.floats(0.1, 3.0)),
        frequency_penalty=draw(st.floats(-2.0, 2.0)),
        presence_penalty=draw(st.floats(-2.0, 2.0)),
        min_tokens=draw(st.integers(0, 3)),
        stop_token_ids=draw(st.lists(st.integers(0, vocab + 2), max_size=3)),
        ignore_eos=draw(st.booleans()),
        seed=draw(st.none() | st.integers(-(2**40), 2**40)),
        logprobs=draw(st.none() | st.integers(0, 5)),
    )
    prompt = draw(st.lists(token, max_size=6))
    output = draw(st.lists(token, max_size=4))
    return params, prompt, output


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, SamplingBatch, list[set[int]]]:
    vocab = draw(st.integers(2, 40))
    rows = draw(st.lists(sampling_rows(vocab), min_size=1, max_size=6))
    eos = tuple(draw(st.lists(st.integers(0, vocab - 1), max_size=2)))
    seed = draw(st.integers(0, 2**31))
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(seed)) * 10
    holes = torch.rand(len(rows), vocab, generator=torch.Generator().manual_seed(seed + 1))
    logits[holes < draw(st.floats(0.0, 0.9))] = float("-inf")
    banned_per_row = []
    for row, (params, _, output) in enumerate(rows):
        banned: set[int] = set()
        if len(output) < params.min_tokens:
            banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos))
        allowed = [t for t in range(vocab) if t not in banned]
        if not allowed:  # every token banned: no legal answer exists, leave the row alone
            params.min_tokens = 0
            banned = set()
            allowed = list(range(vocab))
        # Keep at least one finite logit the row may pick.
        keep = draw(st.sampled_from(allowed))
        if not torch.isfinite(logits[row, keep]):
            logits[row, keep] = 0.0
        banned_per_row.append(banned)
    batch = SamplingBatch(
        params=[r[0] for r in rows],
        prompt_token_ids=[r[1] for r in rows],
        output_token_ids=[r[2] for r in rows],
        generators=[None if r[0].seed is None else make_generator(r[0].seed) for r in rows],
        eos_token_ids=eos,
    )
    return logits, batch, banned_per_row


@settings(max_examples=150, deadline=None)
@given(batches())
def test_sampler_returns_a_legal_token(case: tuple[torch.Tensor, SamplingBatch, list]) -> None:
    logits, batch, banned_per_row = case
    raw = logits.clone()
    out = Sampler(torch.Generator().manual_seed(0))(logits, batch)
    vocab = logits.shape[1]
    assert torch.equal(logits, raw)  # the caller's logits are not modified
    assert len(out.token_ids) == len(out.logprobs) == logits.shape[0]
    for row, token in enumerate(out.token_ids):
        assert 0 <= token < vocab
        assert torch.isfinite(raw[row, token])
        assert token not in banned_per_row[row]
        entry = out.logprobs[row]
        if batch.params[row].logprobs is None:
            assert entry is None
        else:
            assert entry is not None and entry.token_id == token and entry.rank >= 1
            # Alternatives are the tokens with a finite logit (masked ones are not).
            finite = int(torch.isfinite(raw[row]).sum())
            assert len(entry.top) == min(batch.params[row].logprobs, finite)
            assert all(value != float("-inf") for _, value in entry.top)
