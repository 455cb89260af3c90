"""Async scheduling (one step in flight) gives the same tokens as planning one step at a time.

The step after a decode is planned before that decode's token reaches the host:
the scheduler hands it a placeholder that the runner fills on the device. On a
CPU nothing overlaps, but every piece of the pipeline runs, so these tests pin
its bookkeeping: claims, placeholders, stops and aborts while a step is in
flight, preemption of a sequence with a claim, and the switch back to one step
at a time when a request needs it.
"""

from __future__ import annotations

import pytest
import torch
from test_engine_tiny import _prompts, _save_tiny

from tokenmill.config import SchedulerConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Sequence
from tokenmill.llm import LLM
from tokenmill.sampling import SamplingParams
from tokenmill.step_types import PLACEHOLDER_TOKEN, SampledTokens, TokenFill


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny-async"), "llama")[0]


def _params(n: int) -> list[SamplingParams]:
    """Greedy requests that stop at different steps: lengths and stop tokens vary."""
    out = []
    for i in range(n):
        stop = [t for t in range(3, 256) if t % 7 == i % 7][:40] if i % 3 == 0 else []
        out.append(SamplingParams(max_tokens=6 + 5 * (i % 4), temperature=0.0,
                                  ignore_eos=True, stop_token_ids=stop))
    return out


def _generate(path: str, prompts, params, **engine_args):
    llm = LLM(path, **engine_args)
    fills = []
    executor = llm.engine.core.executor
    execute = executor.execute

    def recording(sched, fill=None):
        fills.append(0 if fill is None else len(fill.rows))
        return execute(sched, fill)

    executor.execute = recording
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs], llm, fills


@pytest.mark.parametrize("engine_args", [
    dict(),
    dict(max_num_batched_tokens=7),  # chunked prefill beside decodes in flight
    dict(num_kv_blocks=34, block_size=4),  # preemption of sequences with claims
    dict(max_num_seqs=1),  # one request at a time: each ends with a step in vain
], ids=["batched", "chunked", "preempt", "serial"])
def test_async_equals_one_step_at_a_time(tiny_llama, engine_args):
    prompts = _prompts(10)
    params = _params(10)
    reference, _, ref_fills = _generate(tiny_llama, prompts, params, async_scheduling=False,
                                        **engine_args)
    got, llm, fills = _generate(tiny_llama, prompts, params, async_scheduling=True,
                                **engine_args)
    assert got == reference
    assert any(f == "stop" for _, f in reference) and any(f == "length" for _, f in reference)
    assert llm.engine.core.async_scheduling
    assert sum(ref_fills) == 0
    assert sum(fills) > 0  # decodes really ran from device-side placeholders
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks  # nothing leaked
    if "num_kv_blocks" in engine_args:
        assert stats.num_preemptions > 0


def test_seeded_sampling_is_the_same(tiny_llama):
    prompts = _prompts(6, seed=5)
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=100 + i,
                             ignore_eos=True) for i in range(6)]
    reference, _, _ = _generate(tiny_llama, prompts, params, async_scheduling=False)
    got, _, fills = _generate(tiny_llama, prompts, params, async_scheduling=True)
    assert got == reference
    assert sum(fills) > 0


def test_request_that_needs_host_logits_switches_to_one_step_at_a_time(tiny_llama):
    """A request with logprobs finishes the step in flight; the others stay exact."""
    prompts = _prompts(6, seed=7)
    params = _params(6)
    params[2] = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)
    reference, _, _ = _generate(tiny_llama, prompts, params, async_scheduling=False)
    llm = LLM(tiny_llama, async_scheduling=True)
    engine = llm.engine
    plain = [i for i in range(6) if i != 2]
    for i in plain:
        engine.add_request(str(i), prompts[i], params[i])
    results = {}
    for _ in range(3):  # a few steps with one in flight
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    assert engine.core._in_flight is not None
    engine.add_request("2", prompts[2], params[2])
    logprobs = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
            if out.request_id == "2":
                logprobs.extend(out.outputs[0].logprobs or [])
    assert [results[str(i)] for i in range(6)] == [toks for toks, _ in reference]
    assert len(logprobs) == 10 and all(lp is not None for lp in logprobs)
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_abort_and_id_reuse_while_a_step_is_in_flight(tiny_llama):
    prompts = _prompts(4, seed=11)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    reference, _, _ = _generate(tiny_llama, prompts, [params] * 4, async_scheduling=False)
    llm = LLM(tiny_llama, async_scheduling=True)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    results: dict[str, list[int]] = {}

    def step() -> None:
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)

    for _ in range(4):
        step()
    assert engine.core._in_flight is not None
    engine.abort_request("1")  # its sequence is in the step in flight
    results.pop("1", None)
    engine.add_request("1", prompts[1], params)  # the same id while that step is in flight
    while engine.has_unfinished_requests():
        step()
    assert [results[str(i)] for i in range(4)] == [toks for toks, _ in reference]
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


# ------------------------------------------------------- scheduler bookkeeping


def _seq(name: str, prompt_len: int, order: int) -> Sequence:
    return Sequence(seq_id=name, request_id=name, index=0,
                    token_ids=[10 + i for i in range(prompt_len)], num_prompt_tokens=prompt_len,
                    params=SamplingParams(max_tokens=100), arrival_time=float(order),
                    arrival_order=order)


def _scheduler(num_blocks: int = 16, budget: int = 64) -> Scheduler:
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=256)
    return Scheduler(cfg, BlockManager(num_blocks, 4, True))


def test_planning_ahead_gives_placeholders_and_update_settles_claims():
    sched = _scheduler()
    a = _seq("a", 6, 0)
    sched.add(a)
    first = sched.schedule(ahead=True)  # the prompt, sampling token 6
    assert first.seqs[0].token_ids == a.token_ids and first.seqs[0].samples
    second = sched.schedule(ahead=True)  # planned before the first step's token is known
    item = second.seqs[0]
    assert (item.token_ids, item.start_pos, item.samples) == ([PLACEHOLDER_TOKEN], 6, True)
    assert len(item.block_table) == 2  # position 6 has its slot
    sched.update(first, {"a": SampledTokens([42])})
    assert a.token_ids[-1] == 42 and a.num_computed_tokens == 6
    assert (a.inflight_tokens, a.inflight_samples) == (1, 1)  # the second step's claim
    sched.update(second, {"a": SampledTokens([43])})
    assert a.token_ids[-2:] == [42, 43] and a.num_computed_tokens == 7
    assert (a.inflight_tokens, a.inflight_samples) == (0, 0)


def test_preempted_sequence_keeps_its_token_but_not_its_progress():
    sched = _scheduler(num_blocks=4, budget=64)  # 16 slots
    a, b = _seq("a", 8, 0), _seq("b", 7, 1)
    sched.add(a)
    sched.add(b)
    first = sched.schedule(ahead=True)
    assert [s.seq_id for s in first.seqs] == ["a", "b"]
    # b's placeholder at position 7 fits its second block; a's position 8 needs a fifth
    # block: b (the newest) is preempted while the first step still computes it.
    second = sched.schedule(ahead=True)
    assert second.preempted_ids == ["b"]
    assert [s.seq_id for s in second.seqs] == ["a"]
    update = sched.update(first, {"a": SampledTokens([50]), "b": SampledTokens([51])})
    assert update.num_appended == {"a": 1, "b": 1}
    assert b.token_ids[-1] == 51 and b.num_computed_tokens == 0 and b in sched.waiting
    sched.update(second, {"a": SampledTokens([52])})
    assert a.token_ids[-2:] == [50, 52] and a.num_computed_tokens == 9
    assert (a.inflight_tokens, b.inflight_tokens) == (0, 0)


@pytest.mark.parametrize("rows, source_rows, expected", [
    (range(3), range(3), [10, 11, 12, -1, -1]),  # steady decode: two slices
    (range(3), [2, 0, 1], [12, 10, 11, -1, -1]),
    ([1, 4], range(1, 3), [-1, 11, -1, -1, 12]),  # placeholders after a prompt chunk
    ([4, 0], [0, 2], [12, -1, -1, -1, 10]),
])
def test_token_fill_writes_each_placeholder_row(rows, source_rows, expected):
    def index(r):  # a range stays a slice; a list becomes an index tensor
        return r if isinstance(r, range) else torch.tensor(r)

    input_ids = torch.full((5,), PLACEHOLDER_TOKEN, dtype=torch.long)
    TokenFill(index(rows), torch.tensor([10, 11, 12]), index(source_rows)).apply_to(input_ids)
    assert input_ids.tolist() == expected
