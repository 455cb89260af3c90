"""The batched sampler: greedy, filters, penalties, min_tokens, seeds, logprobs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from tokenmill.sampling import (
    Sampler,
    SamplingBatch,
    SamplingParams,
    compute_prompt_logprobs,
    make_generator,
)
from tokenmill.sampling.sampler import TOP_P_PREFIX, apply_penalties, filter_cutoffs


def make_batch(
    params: Sequence[SamplingParams],
    *,
    prompts: Sequence[list[int]] | None = None,
    outputs: Sequence[list[int]] | None = None,
    eos: tuple[int, ...] = (),
) -> SamplingBatch:
    """A batch whose generators follow each row's seed (fresh, as the engine makes them)."""
    rows = len(params)
    return SamplingBatch(
        params=list(params),
        prompt_token_ids=list(prompts) if prompts is not None else [[] for _ in range(rows)],
        output_token_ids=list(outputs) if outputs is not None else [[] for _ in range(rows)],
        generators=[None if p.seed is None else make_generator(p.seed) for p in params],
        eos_token_ids=eos,
    )


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def test_greedy_picks_argmax() -> None:
    logits = random_logits(5, 300, seed=0)
    out = Sampler()(logits, make_batch([SamplingParams(temperature=0)] * 5))
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 5


def test_empty_batch() -> None:
    out = Sampler()(torch.empty(0, 10), make_batch([]))
    assert out.token_ids == [] and out.logprobs == []


def test_batch_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError):
        SamplingBatch([SamplingParams()], [[]], [], [None])
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 5), make_batch([SamplingParams()]))


def test_mixed_greedy_and_random_rows() -> None:
    logits = random_logits(4, 50, seed=1)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=0.7, top_k=1),
        SamplingParams(temperature=1.0, min_p=1.0),  # keeps only the best token
    ]
    out = Sampler(torch.Generator().manual_seed(0))(logits, make_batch(params))
    best = logits.argmax(dim=-1).tolist()
    assert out.token_ids[0] == best[0]
    assert out.token_ids[2] == best[2]
    assert out.token_ids[3] == best[3]
    assert 0 <= out.token_ids[1] < 50


def kept_mask(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
) -> torch.Tensor:
    """Which tokens the filters keep, all rows with the same parameters."""
    rows = logits.shape[0]
    cutoffs = filter_cutoffs(
        logits, [temperature] * rows, [top_k] * rows, [top_p] * rows, [min_p] * rows
    )
    assert cutoffs is not None
    return logits >= cutoffs.unsqueeze(1)


def test_top_k_one_on_the_random_path_equals_greedy() -> None:
    logits = random_logits(6, 500, seed=2)
    kept = kept_mask(logits, 0.9, top_k=1, top_p=1.0, min_p=0.0)
    assert kept.sum(dim=-1).tolist() == [1] * 6
    assert kept.float().argmax(dim=-1).tolist() == logits.argmax(dim=-1).tolist()
    # A tiny top_p also leaves only the best token, through the whole sampler.
    params = [SamplingParams(temperature=1.3, top_p=1e-6, seed=i) for i in range(6)]
    out = Sampler()(logits, make_batch(params))
    assert out.token_ids == logits.argmax(dim=-1).tolist()


# ---------------------------------------------------------------------------- seeds


def run_steps(
    rows: Sequence[SamplingParams], steps: int, vocab: int, scale: float
) -> list[list[int]]:
    """Sample ``steps`` tokens for every row, feeding outputs back as the engine would.

    Each row's logits depend only on the step and on the row's own seed (or
    position when unseeded), so a seeded row sees the same logits in any batch.
    """
    generators = [None if p.seed is None else make_generator(p.seed) for p in rows]
    outputs: list[list[int]] = [[] for _ in rows]
    sampler = Sampler(torch.Generator().manual_seed(999))
    for step in range(steps):
        logits = torch.stack(
            [
                random_logits(1, vocab, 1000 * step + (i if p.seed is None else p.seed), scale)[0]
                for i, p in enumerate(rows)
            ]
        )
        batch = SamplingBatch(
            params=list(rows),
            prompt_token_ids=[[1, 2, 3]] * len(rows),
            output_token_ids=[list(o) for o in outputs],
            generators=generators,
            eos_token_ids=(0,),
        )
        for row, token in enumerate(sampler(logits, batch).token_ids):
            outputs[row].append(token)
    return outputs


# A small vocabulary, and a wide flat one whose top-p nucleus exceeds the
# partial top-k prefix (exercising the full-sort fallback).
@pytest.mark.parametrize(("vocab", "scale"), [(200, 3.0), (3 * TOP_P_PREFIX, 0.3)])
def test_seeded_row_is_independent_of_batch_composition_and_order(
    vocab: int, scale: float
) -> None:
    target = SamplingParams(temperature=0.9, top_p=0.95, presence_penalty=0.5, seed=7)
    alone = run_steps([target], 4, vocab, scale)[0]
    others = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5, top_k=20, seed=11),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.5, min_p=0.05, repetition_penalty=1.2),
        SamplingParams(temperature=1.1, top_k=TOP_P_PREFIX + 500, top_p=0.99, seed=3),
    ]
    for rows in (
        others + [target],
        [target] + others,
        others[:2] + [target] + others[2:],
        list(reversed(others)) + [target],
    ):
        assert run_steps(rows, 4, vocab, scale)[rows.index(target)] == alone


def test_different_seeds_give_different_samples() -> None:
    flat = torch.zeros(1, 1000)
    tokens = {}
    for seed in (1, 2):
        generator = make_generator(seed)
        batch = SamplingBatch([SamplingParams(seed=seed)], [[]], [[]], [generator])
        tokens[seed] = [Sampler()(flat, batch).token_ids[0] for _ in range(20)]
    assert tokens[1] != tokens[2]


def test_seeded_generator_advances_one_draw_per_token() -> None:
    vocab = 64
    used = make_generator(5)
    batch = SamplingBatch([SamplingParams(seed=5)], [[]], [[]], [used])
    Sampler()(random_logits(1, vocab, seed=0), batch)
    expected = make_generator(5)
    torch.empty(vocab).uniform_(generator=expected)
    assert torch.equal(used.get_state(), expected.get_state())


def test_make_generator_accepts_any_int() -> None:
    for seed in (-1, 0, 2**70):
        make_generator(seed)


# ---------------------------------------------------------------------- distribution


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_matches_softmax(temperature: float) -> None:
    row = torch.tensor([0.0, 0.5, 1.0, -1.0, 2.0, -0.3])
    draws = 20000
    logits = row.expand(draws, -1).contiguous()
    params = [SamplingParams(temperature=temperature)] * draws
    out = Sampler(torch.Generator().manual_seed(1234))(logits, make_batch(params))
    observed = torch.bincount(torch.tensor(out.token_ids), minlength=6).double()
    expected = torch.softmax(row.double() / temperature, dim=0) * draws
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    # 5 degrees of freedom: the 99.9% quantile is 20.5.
    assert chi_square < 25.0, (observed, expected)


# --------------------------------------------------------------------------- filters


def allowed_tokens(
    row: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> set[int]:
    """The tokens top-k -> top-p -> min-p keep, computed naively in float64."""
    probs = torch.softmax(row.double() / temperature, dim=0)
    order = torch.argsort(probs, descending=True).tolist()
    if top_k > 0:
        order = order[:top_k]
    kept_probs = probs[order] / probs[order].sum()
    kept: list[int] = []
    mass = 0.0
    for token, p in zip(order, kept_probs.tolist(), strict=True):
        kept.append(token)
        mass += p
        if mass >= top_p:
            break
    best = probs.max().item()
    return {t for t in kept if probs[t].item() >= min_p * best}


FILTER_CASES = [
    dict(temperature=1.3, top_k=5, top_p=1.0, min_p=0.0),
    dict(temperature=0.8, top_k=0, top_p=0.6, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2),
    dict(temperature=1.7, top_k=10, top_p=0.8, min_p=0.0),
    dict(temperature=2.0, top_k=12, top_p=0.9, min_p=0.1),
]


@pytest.mark.parametrize("case", FILTER_CASES)
def test_filters_keep_exactly_the_allowed_tokens(case: dict) -> None:
    logits = random_logits(3, 40, seed=3)
    kept = kept_mask(logits, **case)
    for row in range(3):
        assert set(torch.nonzero(kept[row]).flatten().tolist()) == allowed_tokens(
            logits[row], **case
        )


def test_top_p_with_a_nucleus_wider_than_the_prefix() -> None:
    vocab = 3 * TOP_P_PREFIX
    logits = random_logits(2, vocab, seed=10, scale=0.2)  # nearly flat
    logits[1, :5] += 30.0  # a peaked row in the same batch
    kept = kept_mask(logits, 1.0, top_k=0, top_p=0.7, min_p=0.0)
    for row in range(2):
        expected = allowed_tokens(logits[row], 1.0, 0, 0.7, 0.0)
        assert set(torch.nonzero(kept[row]).flatten().tolist()) == expected
    assert int(kept[0].sum()) > TOP_P_PREFIX


@pytest.mark.parametrize("case", FILTER_CASES)
def test_sampler_never_samples_a_filtered_token(case: dict) -> None:
    row = random_logits(1, 40, seed=4)
    draws = 2000
    params = [SamplingParams(**case)] * draws
    out = Sampler(torch.Generator().manual_seed(5))(
        row.expand(draws, -1).contiguous(), make_batch(params)
    )
    sampled = set(out.token_ids)
    allowed = allowed_tokens(row[0], **case)
    assert sampled <= allowed
    assert len(sampled) > 1 or len(allowed) == 1


def test_filters_with_mixed_rows() -> None:
    logits = random_logits(3, 30, seed=6)
    cutoffs = filter_cutoffs(
        logits, [1.0, 1.0, 0.6], top_k=[0, 3, 0], top_p=[1.0, 1.0, 0.5], min_p=[0.0] * 3
    )
    assert cutoffs is not None
    kept = logits >= cutoffs.unsqueeze(1)
    assert bool(kept[0].all())  # this row asked for nothing
    assert int(kept[1].sum()) == 3
    assert set(torch.nonzero(kept[2]).flatten().tolist()) == allowed_tokens(
        logits[2], 0.6, 0, 0.5, 0.0
    )
    no_filter = filter_cutoffs(logits, [0.5] * 3, top_k=[0, 30, 0], top_p=[1.0] * 3, min_p=[0] * 3)
    assert no_filter is None


# ------------------------------------------------------------------------- penalties


def test_penalties_match_hand_computation() -> None:
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, -0.5, 3.0]])
    result = apply_penalties(
        logits,
        prompt_token_ids=[[1, 2]],
        output_token_ids=[[2, 3, 3]],
        repetition_penalties=[2.0],
        frequency_penalties=[0.5],
        presence_penalties=[0.25],
    )
    # Repetition (prompt + output = {1, 2, 3}): positive / 2, negative * 2.
    #   token 1: 2.0 -> 1.0;  token 2: -1.0 -> -2.0;  token 3: 0.5 -> 0.25
    # Then frequency * count + presence over the output {2: 1, 3: 2}:
    #   token 2: -2.0 - 0.5 - 0.25 = -2.75;  token 3: 0.25 - 1.0 - 0.25 = -1.0
    expected = torch.tensor([[1.0, 1.0, -2.75, -1.0, -0.5, 3.0]])
    assert torch.allclose(result, expected)
    assert torch.equal(logits, torch.tensor([[1.0, 2.0, -1.0, 0.5, -0.5, 3.0]]))


def test_repetition_penalty_below_one_and_prompt_only_tokens() -> None:
    logits = torch.tensor([[1.0, -2.0, 4.0]])
    result = apply_penalties(logits, [[0, 1, 99]], [[]], [0.5], [0.0], [0.0])
    assert torch.allclose(result, torch.tensor([[2.0, -1.0, 4.0]]))  # id 99 is ignored


def test_frequency_and_presence_ignore_prompt_tokens() -> None:
    logits = torch.zeros(1, 4)
    result = apply_penalties(logits, [[0, 0, 1]], [[1, 1, 2]], [1.0], [1.0], [-0.5])
    assert torch.allclose(result, torch.tensor([[0.0, -1.5, -0.5, 0.0]]))


def test_penalties_through_the_sampler_only_touch_their_rows() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9, 1.0]] * 2)
    params = [
        SamplingParams(temperature=0, frequency_penalty=0.2),
        SamplingParams(temperature=0),
    ]
    out = Sampler()(logits, make_batch(params, outputs=[[1], [1]]))
    assert out.token_ids == [2, 1]


# ------------------------------------------------------------------------ min_tokens


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    eos, stop_id = 2, 5
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0, 0.0, 8.0, 0.0, 7.0]])
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[stop_id])

    def pick(output: list[int], p: SamplingParams = params) -> int:
        return Sampler()(logits, make_batch([p], outputs=[output], eos=(eos,))).token_ids[0]

    assert pick([4]) == 7
    assert pick([4, 4]) == 7
    assert pick([4, 4, 4]) == eos
    # With ignore_eos the EOS token does not end generation, so it is not masked;
    # stop_token_ids still are.
    ignore = params.clone(ignore_eos=True)
    assert pick([4], ignore) == eos
    no_eos_logits = logits.clone()
    no_eos_logits[0, eos] = 0.0
    batch = make_batch([ignore], outputs=[[4]], eos=(eos,))
    assert Sampler()(no_eos_logits, batch).token_ids[0] == 7


def test_min_tokens_holds_for_random_rows() -> None:
    logits = torch.zeros(500, 4)
    logits[:, 0] = 5.0  # eos is very likely
    params = [SamplingParams(min_tokens=1, seed=i) for i in range(500)]
    out = Sampler()(logits, make_batch(params, eos=(0,)))
    assert 0 not in out.token_ids


# -------------------------------------------------------------------------- logprobs


def test_logprobs_match_log_softmax_of_raw_logits() -> None:
    logits = random_logits(3, 12, seed=8)
    params = [
        SamplingParams(temperature=0, logprobs=3, frequency_penalty=2.0),
        SamplingParams(temperature=0.7, logprobs=12, seed=1),
        SamplingParams(temperature=0, logprobs=0),
    ]
    out = Sampler()(logits, make_batch(params, outputs=[[int(logits[0].argmax())], [], []]))
    expected = torch.log_softmax(logits.double(), dim=-1)
    for row, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        assert entry is not None and entry.token_id == token
        assert math.isclose(entry.logprob, expected[row, token].item(), abs_tol=1e-5)
        order = torch.argsort(expected[row], descending=True).tolist()
        assert entry.rank == order.index(token) + 1
        k = params[row].logprobs
        assert [t for t, _ in entry.top] == order[:k]
        for t, value in entry.top:
            assert math.isclose(value, expected[row, t].item(), abs_tol=1e-5)
    # The penalty moved the greedy choice off the raw argmax; the rank shows it.
    assert out.logprobs[0].rank == 2
    assert out.logprobs[2].top == []


def test_prompt_logprobs() -> None:
    logits = random_logits(4, 9, seed=9)
    targets = [3, 0, 8, 8]
    entries = compute_prompt_logprobs(logits, targets, k=2)
    expected = torch.log_softmax(logits.double(), dim=-1)
    assert [e.token_id for e in entries] == targets
    for row, entry in enumerate(entries):
        assert math.isclose(entry.logprob, expected[row, targets[row]].item(), abs_tol=1e-5)
        order = torch.argsort(expected[row], descending=True).tolist()
        assert entry.rank == order.index(targets[row]) + 1
        assert [t for t, _ in entry.top] == order[:2]
    assert compute_prompt_logprobs(torch.empty(0, 9), [], k=3) == []


def test_non_contiguous_logits_give_the_same_seeded_tokens() -> None:
    padded = random_logits(3, 60, seed=11)
    logits = padded[:, :50]  # e.g. a vocabulary padded past the tokenizer's size
    assert not logits.is_contiguous()
    params = [
        SamplingParams(seed=1, top_p=0.9, repetition_penalty=1.3),
        SamplingParams(seed=2, min_tokens=2, logprobs=2),
        SamplingParams(seed=3, temperature=0.5, top_k=4),
    ]
    kwargs = dict(prompts=[[1, 2]] * 3, outputs=[[3]] * 3, eos=(0,))
    out = Sampler()(logits, make_batch(params, **kwargs))
    reference = Sampler()(logits.contiguous(), make_batch(params, **kwargs))
    assert out.token_ids == reference.token_ids
    assert out.logprobs == reference.logprobs
    assert all(0 <= t < 50 for t in out.token_ids)
