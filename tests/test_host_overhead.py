"""The host-overhead benchmark runs, and the core's host-side shortcuts keep results exact.

``benchmarks/host_overhead.py`` builds a real engine core around a stand-in
model (logits depend on the input token only). The same core checks that
sampling builds token histories exactly when some live request needs them
(penalties), that the count of such requests returns to zero, and that a
penalised request next to plain ones samples what it samples alone.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

from tokenmill.engine.messages import EngineCoreRequest
from tokenmill.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("tokenmill_host_overhead",
                                                  ROOT / "benchmarks" / "host_overhead.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def run(core, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    for rid, (prompt, params) in requests.items():
        core.add_request(EngineCoreRequest(rid, prompt, params, time.time()))
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    while core.has_unfinished_requests():
        for out in core.step():
            for delta in out.seqs:
                tokens[out.request_id] += delta.new_token_ids
    return tokens


def test_benchmark_runs_and_prints_each_batch(capsys, tmp_path):
    saved = tmp_path / "before.json"
    assert bench.main(["--batches", "1,4", "--steps", "3", "--prompt-len", "20",
                       "--save", str(saved)]) == 0
    assert bench.main(["--batches", "1,4", "--steps", "3", "--prompt-len", "20",
                       "--baseline", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "->" in out and out.count("  sync     4 ") == 2 and out.count(" async     4 ") == 2


def test_history_is_built_only_while_a_request_needs_it():
    plain = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    penalised = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                               repetition_penalty=50.0)
    prompt = [5, 9, 14, 3]
    alone = run(bench.build_core(4, 128), {"p": (prompt, penalised)})["p"]
    unpenalised = run(bench.build_core(4, 128), {"q": (prompt, plain)})["q"]
    assert alone != unpenalised  # the penalty changes this model's greedy path

    core = bench.build_core(4, 128)
    mixed = run(core, {"a": ([7, 8], plain), "p": (prompt, penalised), "b": ([11], plain)})
    assert mixed["p"] == alone
    assert core._num_history_readers == 0  # finished requests were counted out
    assert core._num_unstarted == 0 and sorted(core.pop_started()) == ["a", "b", "p"]
    assert core._num_not_plain == 0

    core.add_request(EngineCoreRequest("x", prompt, penalised, time.time()))
    assert core._num_history_readers == 1 and core._num_unstarted == 1
    assert core._num_not_plain == 1
    core.step()
    assert core._num_unstarted == 0 and core.pop_started() == ["x"]
    core.abort_request("x")
    core.abort_request("x")  # unknown by now: no double count
    assert core._num_history_readers == 0 and core._num_not_plain == 0

    core.add_request(EngineCoreRequest("y", prompt, plain, time.time()))
    core.abort_request("y")  # before any step scheduled it
    assert core._num_unstarted == 0
    core.add_request(EngineCoreRequest("z", prompt, plain, time.time()))
    core.step()
    assert core.pop_started() == ["z"]  # still reported after an unscheduled abort


def test_plain_greedy_shortcut_equals_the_full_sampler():
    import torch

    from tokenmill.sampling import Sampler, SamplingBatch

    logits = torch.randn(9, 300, generator=torch.Generator().manual_seed(3))
    logits[4, 7] = logits[4, 8] = logits[4].max() + 1  # a tie: the same index either way
    params = [SamplingParams(temperature=0.0)] * 9
    full = Sampler()(logits, SamplingBatch(params, [[]] * 9, [[]] * 9, [None] * 9))
    assert Sampler().greedy(logits) == full.token_ids
    assert full.logprobs == [None] * 9


def test_plain_greedy_core_matches_with_and_without_other_kinds_of_request():
    plain = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=20, temperature=0.8, seed=1, ignore_eos=True)
    with_logprobs = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=2)
    alone = run(bench.build_core(4, 64), {"g": ([9, 4, 1], plain)})["g"]
    core = bench.build_core(4, 64)
    mixed = run(core, {"s": ([3, 3], sampled), "g": ([9, 4, 1], plain),
                       "l": ([9, 4, 1], with_logprobs)})
    assert mixed["g"] == alone == mixed["l"]
    assert core._num_not_plain == 0
