"""Scheduler: token budget, chunked prefill, mixed batches, preemption, priority."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.config import SchedulerConfig
from tokenmill.engine.block_manager import NULL_BLOCK, BlockManager
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Sequence, SequenceStatus
from tokenmill.sampling import SamplingParams
from tokenmill.step_types import SampledTokens, SchedulerOutput

_order = iter(range(10**9))


def make_seq(name: str, prompt_len: int, arrival: float, priority: int = 0,
             salt: int | None = None, max_tokens: int = 100) -> Sequence:
    """A sequence whose tokens depend on ``salt`` (default: the name: no shared prefix)."""
    salt = sum(map(ord, name)) if salt is None else salt
    return Sequence(
        seq_id=name, request_id=name, index=0,
        token_ids=[(i * 13 + salt) % 97 + 3 for i in range(prompt_len)],
        num_prompt_tokens=prompt_len,
        params=SamplingParams(max_tokens=max_tokens), arrival_time=arrival,
        arrival_order=next(_order), priority=priority,
    )


def make_scheduler(num_blocks=64, block_size=4, budget=8, max_seqs=8, policy="fcfs",
                   prefix=True, window=None) -> Scheduler:
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs,
                          max_model_len=1024, policy=policy)
    return Scheduler(cfg, BlockManager(num_blocks, block_size, prefix), sliding_window=window)


def add_random_requests(
    sched: Scheduler, reqs: list[tuple[int, int]], num_blocks: int, block_size: int = 4
) -> tuple[dict[str, Sequence], dict[str, int]]:
    """Queue (prompt length, output length) requests that can fit the pool (as the
    engine would); returns the sequences and their wanted output lengths by id."""
    seqs: dict[str, Sequence] = {}
    want: dict[str, int] = {}
    for i, (plen, olen) in enumerate(reqs):
        if -(-(plen + olen) // block_size) > num_blocks:
            continue  # the engine rejects these up front
        s = make_seq(f"r{i}", plen, float(i), max_tokens=olen)
        seqs[s.seq_id], want[s.seq_id] = s, olen
        sched.add(s)
    return seqs, want


def complete_step(sched: Scheduler, out: SchedulerOutput) -> None:
    """Play the sampler: token 7 for each sequence that reached its end this step."""
    sampled = {}
    for item in out.seqs:
        seq = sched.get(item.seq_id)
        if item.start_pos + len(item.token_ids) == seq.num_tokens:
            sampled[item.seq_id] = SampledTokens([7])
    sched.update(out, sampled)


def plan(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(s.seq_id, s.start_pos, len(s.token_ids)) for s in out.seqs]


def test_chunked_prefill_and_decode_share_a_step():
    sched = make_scheduler(budget=8)
    a, b = make_seq("a", 10, 0.0), make_seq("b", 10, 1.0)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert plan(out) == [("a", 0, 8)]
    assert out.seqs[0].num_logits == 0  # mid-prompt chunk: no sampling
    complete_step(sched, out)
    out = sched.schedule()
    assert plan(out) == [("a", 8, 2), ("b", 0, 6)]
    assert [s.num_logits for s in out.seqs] == [1, 0]
    complete_step(sched, out)
    out = sched.schedule()
    # a decodes one token, b finishes its prompt in the same forward pass.
    assert plan(out) == [("a", 10, 1), ("b", 6, 4)]
    assert out.num_batched_tokens == 5


def test_block_tables_and_slots_are_exact():
    sched = make_scheduler(block_size=4, budget=100)
    a = make_seq("a", 6, 0.0)
    sched.add(a)
    out = sched.schedule()
    assert out.seqs[0].block_table == [0, 1]
    complete_step(sched, out)
    out = sched.schedule()
    assert plan(out) == [("a", 6, 1)]
    assert out.seqs[0].block_table == [0, 1]


def test_prefix_cache_hit_skips_computed_blocks():
    sched = make_scheduler(block_size=4, budget=100)
    a, b = make_seq("a", 10, 0.0, salt=1), make_seq("b", 10, 1.0, salt=1)
    sched.add(a)
    complete_step(sched, sched.schedule())
    sched.add(b)  # same prompt as a
    out = sched.schedule()
    assert ("b", 8, 2) in plan(out)
    assert b.num_cached_tokens == 8
    assert sched.block_manager.block_table("b")[:2] == sched.block_manager.block_table("a")[:2]
    assert sched.block_manager.prefix_hits == 8


def test_max_num_seqs_caps_admission():
    sched = make_scheduler(budget=100, max_seqs=2)
    seqs = {n: make_seq(n, 3, float(i)) for i, n in enumerate("abc")}
    for s in seqs.values():
        sched.add(s)
    out = sched.schedule()
    assert [s.seq_id for s in out.seqs] == ["a", "b"]
    assert [s.seq_id for s in sched.waiting] == ["c"]


def test_preemption_evicts_latest_arrival_and_requeues_it_first():
    # 4 blocks of 4 tokens; two 8-token prompts fill them; decoding needs a 3rd block each.
    sched = make_scheduler(num_blocks=4, block_size=4, budget=100, prefix=False)
    a, b, c = make_seq("a", 8, 0.0), make_seq("b", 8, 1.0), make_seq("c", 3, 2.0)
    for s in (a, b):
        sched.add(s)
    complete_step(sched, sched.schedule())  # both prefilled, 9 tokens each now
    sched.add(c)
    out = sched.schedule()  # each needs a 3rd block to decode: pool is dry
    assert out.preempted_ids == ["b"]
    assert plan(out) == [("a", 8, 1)]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    # b (earlier arrival) waits ahead of c: no starvation.
    assert [s.seq_id for s in sched.waiting] == ["b", "c"]
    assert sched.num_preemptions == 1
    sched.block_manager.check_invariants()


def test_priority_policy_orders_queue_and_picks_victims():
    sched = make_scheduler(num_blocks=4, block_size=4, budget=100, policy="priority",
                           prefix=False)
    low, high = make_seq("low", 8, 0.0, priority=5), make_seq("high", 8, 1.0, priority=0)
    sched.add(low)
    sched.add(high)
    assert [s.seq_id for s in sched.waiting] == ["high", "low"]
    complete_step(sched, sched.schedule())
    out = sched.schedule()
    assert out.preempted_ids == ["low"]
    assert plan(out) == [("high", 8, 1)]


def test_self_preemption_when_alone_and_out_of_blocks():
    sched = make_scheduler(num_blocks=2, block_size=4, budget=100, prefix=False)
    a = make_seq("a", 8, 0.0)
    sched.add(a)
    complete_step(sched, sched.schedule())
    out = sched.schedule()  # needs a 3rd block that does not exist
    assert out.preempted_ids == ["a"] and out.seqs == []


def test_abort_frees_blocks_everywhere():
    sched = make_scheduler(budget=4)
    a, b = make_seq("a", 10, 0.0), make_seq("b", 10, 1.0)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert sched.abort(a) and sched.abort(b)
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    assert not sched.has_work()


def test_sliding_window_releases_blocks_behind_the_step():
    """Window 6, blocks of 4. After a step whose first new token sat at position s, no
    query of it or of later steps (a draft model's catch-up pass included) sees a key
    before s - 5, so blocks wholly before it go back to the pool."""
    sched = make_scheduler(num_blocks=16, block_size=4, budget=8, window=6)
    a = make_seq("a", 30, 0.0)
    sched.add(a)
    complete_step(sched, sched.schedule())  # positions 0..7: s - 5 < 0, nothing
    assert sched.block_manager.block_table("a") == [0, 1]
    complete_step(sched, sched.schedule())  # 8..15: s - 5 = 3, block 0 still holds 3
    assert sched.block_manager.block_table("a") == [0, 1, 2, 3]
    out = sched.schedule()
    assert plan(out) == [("a", 16, 8)]
    assert out.seqs[0].block_table == [0, 1, 2, 3, 4, 5]
    complete_step(sched, out)  # 16..23: s - 5 = 11 -> blocks 0 (0..3) and 1 (4..7)
    assert sched.block_manager.block_table("a") == [NULL_BLOCK, NULL_BLOCK, 2, 3, 4, 5]
    out = sched.schedule()
    assert out.seqs[0].block_table[:2] == [NULL_BLOCK, NULL_BLOCK]  # positions stay put
    complete_step(sched, out)  # 24..29 (+1 sampled): s - 5 = 19 -> blocks 2, 3 too
    assert sched.block_manager.block_table("a")[:4] == [NULL_BLOCK] * 4
    assert sched.block_manager.num_free_blocks == 16 - 4
    sched.block_manager.check_invariants()


def test_prefix_hit_on_released_blocks_after_the_first_request_finished():
    sched = make_scheduler(num_blocks=16, block_size=4, budget=100, window=4)
    a, b = make_seq("a", 14, 0.0, salt=1, max_tokens=1), make_seq("b", 14, 1.0, salt=1)
    sched.add(a)
    complete_step(sched, sched.schedule())  # a finishes; its blocks were released anyway
    sched.add(b)
    out = sched.schedule()
    assert plan(out) == [("b", 12, 2)] and b.num_cached_tokens == 12
    complete_step(sched, out)  # the step started at 12: keys from 9 on -> blocks 0, 1 go
    assert sched.block_manager.block_table("b")[:3] == [NULL_BLOCK, NULL_BLOCK, 2]
    sched.block_manager.check_invariants()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12)), min_size=1, max_size=8),
       st.integers(2, 24), st.integers(6, 20), st.sampled_from([None, 1, 3, 8]))
def test_everything_finishes_and_nothing_leaks(reqs, budget, num_blocks, window):
    """Random prompts/output lengths under a tiny pool: all complete, all blocks return."""
    sched = make_scheduler(num_blocks=num_blocks, block_size=4, budget=budget, max_seqs=4,
                           window=window)
    seqs, want = add_random_requests(sched, reqs, num_blocks)
    for _ in range(2000):
        if not sched.has_work():
            break
        out = sched.schedule()
        assert out.num_batched_tokens <= budget
        complete_step(sched, out)
        sched.block_manager.check_invariants()
    assert not sched.has_work()
    assert all(s.num_output_tokens == want[n] for n, s in seqs.items())
    assert sched.block_manager.num_free_blocks == num_blocks
