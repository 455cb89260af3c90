"""Scheduler with draft tokens: budget, blocks, rollback of rejected positions, no leaks."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from test_scheduler import add_random_requests, make_scheduler, make_seq, plan

from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Sequence
from tokenmill.step_types import SampledTokens, SchedulerOutput


def prefill(sched: Scheduler, *seqs: Sequence) -> None:
    """Compute every prompt in one step, then give each sequence one sampled token."""
    for seq in seqs:
        sched.add(seq)
    out = sched.schedule()
    assert [s.seq_id for s in out.seqs] == [s.seq_id for s in seqs]
    sched.update(out, {seq.seq_id: SampledTokens([50]) for seq in seqs})
    assert all(seq.num_computed_tokens == seq.num_tokens - 1 for seq in seqs)


def verify(sched: Scheduler, out: SchedulerOutput, accept: dict[str, int]) -> None:
    """Play the verifier: keep ``accept[id]`` drafts then token 60; the scheduler rolls
    the rest back. Like the speculator, it consumes each scheduled sequence's drafts."""
    sampled = {}
    for item in out.seqs:
        seq = sched.get(item.seq_id)
        seq.spec_token_ids = []
        if item.start_pos + len(item.token_ids) - item.num_draft_tokens < seq.num_tokens:
            continue  # a mid-prompt chunk
        a = min(accept.get(seq.seq_id, 0), item.num_draft_tokens)
        drafts = item.token_ids[len(item.token_ids) - item.num_draft_tokens:]
        sampled[seq.seq_id] = SampledTokens(drafts[:a] + [60], num_accepted=a)
    sched.update(out, sampled)


def test_drafts_are_scheduled_after_the_last_token_with_logits_at_each():
    sched = make_scheduler(num_blocks=16, block_size=4, budget=16)
    a = make_seq("a", 6, 0.0)
    prefill(sched, a)  # 7 tokens, 6 computed, blocks [0, 1]
    a.spec_token_ids = [11, 12, 13]
    out = sched.schedule()
    item = out.seqs[0]
    assert (item.start_pos, item.token_ids) == (6, [50, 11, 12, 13])
    assert item.num_draft_tokens == 3 and item.num_logits == 4
    assert out.num_batched_tokens == 4
    assert item.block_table == [0, 1, 2]  # positions 6..9 need a third block
    # Two drafts accepted: 6 + 1 + 2 computed, the third draft position rolls back.
    verify(sched, out, {"a": 2})
    assert a.token_ids[-4:] == [50, 11, 12, 60]
    assert a.num_computed_tokens == 9 and a.num_tokens == 10
    out = sched.schedule()
    assert plan(out) == [("a", 9, 1)]  # only the new token; the rejected slot is rewritten
    assert out.seqs[0].num_draft_tokens == 0
    sched.finish(a)
    assert sched.block_manager.num_free_blocks == 16
    sched.block_manager.check_invariants()


def test_drafts_only_use_leftover_budget():
    sched = make_scheduler(num_blocks=32, block_size=4, budget=6)
    a, b = make_seq("a", 3, 0.0), make_seq("b", 3, 1.0)
    prefill(sched, a, b)
    a.spec_token_ids, b.spec_token_ids = [1, 2, 3, 4], [5, 6, 7, 8]
    out = sched.schedule()
    # Real tokens first (1 each), then drafts by priority: a takes 4, b gets none.
    assert [(s.seq_id, s.num_draft_tokens) for s in out.seqs] == [("a", 4), ("b", 0)]
    assert out.num_batched_tokens == 6
    assert [s.num_logits for s in out.seqs] == [5, 1]


def test_drafts_wait_for_a_chunked_prompt_and_never_delay_real_tokens():
    sched = make_scheduler(num_blocks=32, block_size=4, budget=4)
    a = make_seq("a", 10, 0.0)
    sched.add(a)
    a.spec_token_ids = [1, 2]  # (a stale proposal) cannot follow an unfinished prompt
    out = sched.schedule()
    assert plan(out) == [("a", 0, 4)] and out.seqs[0].num_draft_tokens == 0


def test_drafts_shrink_to_free_blocks_instead_of_preempting():
    sched = make_scheduler(num_blocks=3, block_size=4, budget=32)
    a, b = make_seq("a", 4, 0.0), make_seq("b", 3, 1.0)
    prefill(sched, a, b)  # a: 5 tokens in blocks [0, 1]; b: 4 tokens in block [2]
    a.spec_token_ids = [1, 2, 3, 4, 5]
    out = sched.schedule()
    # a's table [0, 1] holds positions up to 7: three drafts fit, the rest would
    # need a block that only preempting b could free.
    assert [(s.seq_id, s.num_draft_tokens) for s in out.seqs] == [("a", 3), ("b", 0)]
    assert not out.preempted_ids and sched.num_preemptions == 0
    sched.block_manager.check_invariants()


def test_preemption_drops_drafts_and_frees_their_blocks():
    sched = make_scheduler(num_blocks=4, block_size=4, budget=32)
    a, b = make_seq("a", 4, 0.0), make_seq("b", 4, 1.0)
    prefill(sched, a, b)
    b.spec_token_ids = [1, 2, 3]
    out = sched.schedule()
    assert [(s.seq_id, s.num_draft_tokens) for s in out.seqs] == [("a", 0), ("b", 3)]
    verify(sched, out, {"b": 0})
    a.token_ids.extend([1] * 4)  # a grows and needs b's blocks
    b.spec_token_ids = [9]
    out = sched.schedule()
    assert out.preempted_ids == ["b"]
    assert b.spec_token_ids == [] and not sched.block_manager.has_seq("b")
    sched.block_manager.check_invariants()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(1, 12)), min_size=1, max_size=6),
       st.integers(2, 16), st.integers(6, 20), st.integers(0, 10**6))
def test_random_drafts_and_acceptances_finish_everything_without_leaks(
    reqs, budget, num_blocks, seed
):
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=num_blocks, block_size=4, budget=budget, max_seqs=4)
    seqs, want = add_random_requests(sched, reqs, num_blocks)
    for _ in range(3000):
        if not sched.has_work():
            break
        out = sched.schedule()
        assert out.num_batched_tokens <= budget
        for item in out.seqs:
            assert item.num_logits >= 1 + item.num_draft_tokens or item.num_logits == 0
        verify(sched, out, {n: rng.randint(0, 4) for n in seqs})
        for s in list(sched.running):
            if s.num_computed_tokens == s.num_tokens - 1:
                # Propose up to 3 drafts, capped like the engine so as not to overshoot.
                k = min(3, want[s.seq_id] - s.num_output_tokens - 1)
                s.spec_token_ids = [rng.randrange(3, 97) for _ in range(max(0, k))]
        sched.block_manager.check_invariants()
    assert not sched.has_work()
    assert all(s.num_output_tokens >= want[n] for n, s in seqs.items())
    assert sched.block_manager.num_free_blocks == num_blocks
