"""The engine core built from parts with a fake executor (no model), and the output
processor on its own: deltas, stop conditions, forks, aborts, stop strings."""

from __future__ import annotations

import ast
import pathlib

import torch

from tokenmill.config import SchedulerConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.core import EngineCore
from tokenmill.engine.messages import EngineCoreOutput, EngineCoreRequest, SeqDelta
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.validation import EngineLimits
from tokenmill.sampling import Sampler, SamplingParams
from tokenmill.step_types import ModelOutput, SchedulerOutput

VOCAB = 32
EOS = 31


class CountingExecutor:
    """Logits that make token (t + 1) % VOCAB the argmax after token t; records copies."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.copies: list[tuple[int, int]] = []
        self.steps = 0

    def execute(self, out: SchedulerOutput) -> ModelOutput:
        self.copies.extend(out.block_copies)
        rows, logits, start = [], [], 0
        for item in out.seqs:
            rows.append(range(start, start + item.num_logits))
            start += item.num_logits
            for token in item.token_ids[len(item.token_ids) - item.num_logits:]:
                row = torch.zeros(VOCAB)
                row[(token + 1) % VOCAB] = 10.0
                logits.append(row)
        self.steps += 1
        return ModelOutput(torch.stack(logits) if logits else torch.empty(0, VOCAB), rows)


def make_core(num_blocks: int = 32, budget: int = 64) -> tuple[EngineCore, CountingExecutor]:
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=128)
    scheduler = Scheduler(cfg, BlockManager(num_blocks, 4), eos_token_ids=[EOS])
    executor = CountingExecutor()
    limits = EngineLimits(max_model_len=128, vocab_size=VOCAB, num_kv_blocks=num_blocks,
                          block_size=4)
    return EngineCore(scheduler, executor, Sampler(), limits), executor  # type: ignore[arg-type]


def drain(core: EngineCore) -> dict[str, dict[int, list[int]]]:
    """Step until idle; the tokens each sample gained, by request and sample index."""
    tokens: dict[str, dict[int, list[int]]] = {}
    while core.has_unfinished_requests():
        for out in core.step():
            for delta in out.seqs:
                tokens.setdefault(out.request_id, {}).setdefault(delta.index, []).extend(
                    delta.new_token_ids)
    return tokens


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


def test_deltas_carry_only_new_tokens_and_stop_conditions_apply():
    core, _ = make_core()
    core.add_request(EngineCoreRequest("len", [1, 2, 3], greedy(max_tokens=5), 0.0))
    core.add_request(EngineCoreRequest("stopid", [1, 2, 3], greedy(max_tokens=20,
                                                                   stop_token_ids=[7]), 0.0))
    core.add_request(EngineCoreRequest("eos", [28], greedy(max_tokens=20), 0.0))
    first = core.step()  # one prefill step: one token each, the first time
    assert all(o.first_token_time is not None and o.scheduled_time is not None for o in first)
    assert sorted(core.pop_started()) == ["eos", "len", "stopid"]
    tokens = drain(core)
    for out in first:
        tokens[out.request_id][0][:0] = out.seqs[0].new_token_ids
    assert tokens["len"][0] == [4, 5, 6, 7, 8]
    assert tokens["stopid"][0] == [4, 5, 6, 7]
    assert tokens["eos"][0] == [29, 30, EOS]  # EOS ends it (and is in the tokens)
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


def test_n_samples_fork_from_the_prompt_blocks():
    core, executor = make_core()
    core.add_request(EngineCoreRequest("r", [1, 2, 3, 4, 5, 6], greedy(n=3, max_tokens=4), 0.0))
    outs = core.step()
    assert sorted(d.index for d in outs[0].seqs) == [0, 1, 2]
    # The partial last prompt block is copied for each sibling before the next forward.
    tokens = drain(core)
    assert len(executor.copies) == 2
    assert all(len(t) == 3 for t in tokens["r"].values())
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


def test_abort_one_sample_then_the_rest():
    core, _ = make_core()
    core.add_request(EngineCoreRequest("r", [1, 2, 3], greedy(n=2, max_tokens=50), 0.0))
    core.step()
    assert core.abort_request("r", index=1)
    assert core.has_unfinished_requests()
    core.step()
    assert core.abort_request("r")
    assert not core.has_unfinished_requests()
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


def test_fail_all_reports_each_request_and_frees_everything():
    core, _ = make_core()
    for i in range(3):
        core.add_request(EngineCoreRequest(f"r{i}", [1, 2], greedy(max_tokens=9), 0.0))
    core.step()
    outs = core.fail_all("boom")
    assert {o.request_id for o in outs} == {"r0", "r1", "r2"}
    assert all(o.finished and o.error == "boom" for o in outs)
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


# ----- output processor ---------------------------------------------------------------------


def test_output_processor_stop_strings_hold_back_and_abort():
    from fake_engine import byte_tokenizer

    tok = byte_tokenizer()
    proc = OutputProcessor(tok)
    ids = tok.encode("one two STOP three", add_special_tokens=False)
    proc.add_request("r", None, [1], SamplingParams(stop=["STOP"], max_tokens=50), 0.0)
    texts = []
    aborts = []
    consumed = 0
    for token in ids:
        consumed += 1
        result = proc.process([EngineCoreOutput("r", [SeqDelta(0, [token])])])
        aborts += result.aborts
        for out in result.request_outputs:
            texts += [c.text for c in out.outputs]
            if out.finished:
                assert out.outputs[0].finish_reason == "stop"
                assert out.outputs[0].stop_reason == "STOP"
                break
        if "r" not in proc:
            break
    assert "".join(texts) == "one two "
    assert [(a.request_id, a.index) for a in aborts] == [("r", 0)]
    assert consumed == len(tok.encode("one two STOP", add_special_tokens=False))


def test_output_processor_eos_is_not_text_and_length_flushes():
    from fake_engine import byte_tokenizer

    tok = byte_tokenizer()
    proc = OutputProcessor(tok)
    proc.add_request("a", None, [1], SamplingParams(max_tokens=9), 0.0)
    hi = tok.encode("hi", add_special_tokens=False)
    result = proc.process([EngineCoreOutput("a", [SeqDelta(0, hi + [257], None, "stop")],
                                            finished=True)])
    out = result.request_outputs[0]
    assert out.finished and out.outputs[0].text == "hi"
    assert out.outputs[0].token_ids == hi + [257]


# ----- layering -------------------------------------------------------------------------


def test_no_import_cycles_between_subpackages():
    """engine -> runner/model/spec/sampling -> step_types/outputs/config; never back."""
    root = pathlib.Path(__file__).resolve().parents[1] / "tokenmill"
    edges: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        src = parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tokenmill."):
                dst = node.module.split(".")[1]
                if dst != src:
                    edges.setdefault(src, set()).add(dst)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(src for src in edges if reaches(src, src, {src}))
    assert cycles == [], f"import cycles through: {cycles}"
    for leaf in ("step_types", "outputs", "config"):
        assert not edges.get(leaf), f"{leaf} must not import tokenmill: {edges.get(leaf)}"
