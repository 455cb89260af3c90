"""Draft verification: greedy acceptance, and rejection sampling that preserves p.

The statistical tests run many verifications with a fixed seed against a
5-token vocabulary and bound the total-variation distance between what came
out and the target distribution. At the sample sizes used the distance of a
correct rule is about 0.005 (it is deterministic at the fixed seed); the bound
0.02 sits far above that, and each test also shows that plausible wrong rules
land far above the bound.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch

from tokenmill.sampling import Sampler, SamplingBatch, SamplingParams
from tokenmill.sampling.sampler import probability_rows
from tokenmill.spec.verify import accept_greedy, rejection_sample

P = torch.tensor([0.40, 0.25, 0.20, 0.10, 0.05], dtype=torch.float64)
Q = torch.tensor([0.10, 0.50, 0.10, 0.10, 0.20], dtype=torch.float64)
P2 = torch.tensor([0.05, 0.15, 0.30, 0.20, 0.30], dtype=torch.float64)
TRIALS = 20000
TV_BOUND = 0.02

Verifier = Callable[[torch.Tensor, list[int], "torch.Tensor | None", torch.Generator], list[int]]


def tv(counts: Counter, total: int, target: dict) -> float:
    keys = set(counts) | set(target)
    return 0.5 * sum(abs(counts.get(k, 0) / total - target.get(k, 0.0)) for k in keys)


def first_token_tv(verify: Verifier, draft_q: torch.Tensor | None, seed: int = 1234) -> float:
    """TV between p and the first token emitted after one draft (n-gram or sampled)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.stack([P, P2])
    counts: Counter = Counter()
    for _ in range(TRIALS):
        if draft_q is None:
            draft = 1  # a deterministic proposer always proposes the same token here
        else:
            draft = int(torch.multinomial(draft_q, 1, generator=g))
        q = None if draft_q is None else draft_q.unsqueeze(0)
        counts[verify(target, [draft], q, g)[0]] += 1
    return tv(counts, TRIALS, {i: float(p) for i, p in enumerate(P)})


def always_accept(target, drafts, q, g):
    return list(drafts) + [int(torch.multinomial(target[len(drafts)], 1, generator=g))]


def resample_from_p(target, drafts, q, g):
    """Wrong: accepts correctly but draws the replacement from p itself."""
    x = drafts[0]
    qx = 1.0 if q is None else float(q[0, x])
    if float(torch.rand((), generator=g, dtype=torch.float64)) * qx < float(target[0, x]):
        return [x, int(torch.multinomial(target[1], 1, generator=g))]
    return [int(torch.multinomial(target[0], 1, generator=g))]


@pytest.mark.parametrize("proposal", ["ngram", "draft"])
def test_rejection_sampling_preserves_the_target_distribution(proposal):
    q = None if proposal == "ngram" else Q
    assert first_token_tv(rejection_sample, q) < TV_BOUND


@pytest.mark.parametrize("proposal", ["ngram", "draft"])
def test_wrong_rules_fail_the_same_check(proposal):
    q = None if proposal == "ngram" else Q
    # Always accepting gives q (or the one-hot draft); resampling from p after a
    # rejection over-weights the draft token. Both are far outside the bound.
    assert first_token_tv(always_accept, q) > 10 * TV_BOUND
    assert first_token_tv(resample_from_p, q) > 4 * TV_BOUND


def test_two_drafts_and_bonus_give_the_joint_target_distribution():
    """With 2 drafts from q, the first two output tokens follow p0 x p1.

    When verification stops after one token, the second is drawn from p1 as
    the next (non-speculative) step would.
    """
    g = torch.Generator().manual_seed(99)
    target = torch.stack([P, P2, P])
    q = torch.stack([Q, Q])
    counts: Counter = Counter()
    for _ in range(TRIALS):
        drafts = [int(t) for t in torch.multinomial(q, 1, generator=g).squeeze(1)]
        out = rejection_sample(target, drafts, q, g)
        assert 1 <= len(out) <= 3
        if len(out) == 1:
            out.append(int(torch.multinomial(P2, 1, generator=g)))
        counts[(out[0], out[1])] += 1
    joint = {(a, b): float(P[a] * P2[b]) for a in range(5) for b in range(5)}
    assert tv(counts, TRIALS, joint) < 2 * TV_BOUND  # 25 cells: a little more noise


def test_rejection_sample_edge_cases():
    g = torch.Generator().manual_seed(0)
    one_hot = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # A target that is certain of the draft accepts it, then draws the bonus.
    assert rejection_sample(one_hot, [1], None, g) == [1, 2]
    # A draft the target gives probability 0 is always replaced.
    for _ in range(20):
        assert rejection_sample(one_hot, [0], None, g) == [1]
    # No drafts: one token from the only row.
    assert rejection_sample(one_hot[1:], [], None, g) == [2]
    # p == q: acceptance is certain; the residual is never needed.
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert rejection_sample(p, [1], p[:1].clone(), g) == [1, 0]
    with pytest.raises(ValueError):
        rejection_sample(one_hot, [1, 2], None, g)


def test_accept_greedy():
    assert accept_greedy([5, 6, 7], [5, 6]) == [5, 6, 7]  # all accepted + bonus
    assert accept_greedy([5, 9, 7], [5, 6]) == [5, 9]  # first mismatch replaced
    assert accept_greedy([4, 6, 7], [5, 6]) == [4]
    assert accept_greedy([3], []) == [3]
    with pytest.raises(ValueError):
        accept_greedy([1, 2], [1, 2])


def test_probability_rows_match_what_the_sampler_draws():
    """probability_rows is the distribution Sampler samples from, filters included."""
    torch.manual_seed(0)
    logits = torch.randn(1, 6, dtype=torch.float32) * 2
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.9, min_p=0.05, seed=3)
    batch = SamplingBatch(params=[params], prompt_token_ids=[[0]], output_token_ids=[[]],
                          generators=[None])
    probs = probability_rows(logits, batch)[0].double()
    assert probs.sum().item() == pytest.approx(1.0)
    assert (probs > 0).sum() <= 4  # top-k
    g = torch.Generator().manual_seed(5)
    sampler = Sampler(default_generator=g)
    n = 20000
    drawn = sampler(logits.expand(n, 6).contiguous(),
                    SamplingBatch(params=[params] * n, prompt_token_ids=[[0]] * n,
                                  output_token_ids=[[]] * n, generators=[None] * n)).token_ids
    counts = Counter(drawn)
    assert tv(counts, n, {i: float(p) for i, p in enumerate(probs)}) < TV_BOUND
    # Greedy rows are one-hot at the argmax; min_tokens masks EOS like the sampler.
    greedy = SamplingParams(temperature=0.0, min_tokens=2)
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    batch = SamplingBatch(params=[greedy, greedy], prompt_token_ids=[[0], [0]],
                          output_token_ids=[[], [2, 2]], generators=[None, None],
                          eos_token_ids=(1,))
    assert probability_rows(logits, batch).tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
