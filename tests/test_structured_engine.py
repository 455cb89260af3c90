"""Structured outputs and logit_bias in the engine, on a tiny random model with a real
vocabulary (tests/structured_utils.py).

A random model under a grammar must still produce valid output: property-style tests
check every finished output against its schema / regex / choices over many seeds, and
that constrained decoding composes with batching, chunked prefill, preemption, n > 1
and speculative decoding.
"""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch
from structured_utils import build_tiny_chat_model

from tokenmill.engine.errors import RequestRejected
from tokenmill.engine.messages import EngineCoreRequest, decode, encode
from tokenmill.llm import LLM
from tokenmill.sampling import InvalidParameterError, SamplingParams
from tokenmill.sampling.grammar import (
    GrammarCompiler,
    ReasoningMarkers,
    SequenceGrammar,
    allocate_bitmask,
    allowed_token_ids,
    check_structured_outputs,
    tokenizer_info,
)
from tokenmill.sampling.params import StructuredOutputsParams as SO

SCHEMAS = [
    {"type": "object",
     "properties": {"name": {"type": "string", "maxLength": 12},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "ok": {"type": "boolean"},
                    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                             "maxItems": 3}},
     "required": ["name", "age", "ok"]},
    {"type": "object",
     "properties": {"point": {"$ref": "#/$defs/P"},
                    "kind": {"anyOf": [{"type": "null"}, {"const": "x"}, {"type": "number"}]}},
     "required": ["point", "kind"],
     "$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer"},
                                                       "y": {"type": "integer"}},
                     "required": ["x", "y"], "additionalProperties": False}}},
    {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]},
     "minItems": 1, "maxItems": 4},
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_tiny_chat_model(tmp_path_factory.mktemp("tinychat") / "m")


@pytest.fixture(scope="module")
def llm(model_path):
    return LLM(model_path, max_model_len=1024)


def _texts(outs):
    return [(o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]


def _sampled(n: int, spec: SO, max_tokens: int = 256, **kw) -> list[SamplingParams]:
    return [SamplingParams(temperature=1.0, seed=s, max_tokens=max_tokens,
                           structured_outputs=spec, **kw) for s in range(n)]


@pytest.mark.parametrize("schema_index", range(len(SCHEMAS)))
def test_json_outputs_validate_over_many_seeds(llm, schema_index):
    schema = SCHEMAS[schema_index]
    prompts = [f"Example {i}: " for i in range(32)]
    outs = llm.generate(prompts, _sampled(32, SO(json=schema)), use_tqdm=False)
    stopped = 0
    for text, reason in _texts(outs):
        if reason == "length":
            continue  # cut off by max_tokens: a prefix of a valid value
        stopped += 1
        jsonschema.validate(json.loads(text), schema)  # json.loads is strict JSON
    assert stopped >= 28


def test_json_object_regex_choice_and_grammar(llm):
    prompts = [f"p{i}" for i in range(16)]
    for text, reason in _texts(llm.generate(prompts, _sampled(16, SO(json_object=True)),
                                            use_tqdm=False)):
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
    pattern = r"(\+\d{1,3} )?\d{3}-\d{4}"
    for text, reason in _texts(llm.generate(prompts, _sampled(16, SO(regex=pattern)),
                                            use_tqdm=False)):
        assert reason == "stop" and re.fullmatch(pattern, text), text
    choices = ["yes", "no", "maybe so", "Ünïcode \"quoted\""]
    seen = set()
    for text, reason in _texts(llm.generate(prompts, _sampled(16, SO(choice=choices)),
                                            use_tqdm=False)):
        assert reason == "stop" and text in choices
        seen.add(text)
    assert len(seen) > 1  # sampling still chooses among the allowed strings
    ebnf = 'root ::= "(" num ("," num)* ")"\nnum ::= [0-9] | [1-9] [0-9]'
    for text, reason in _texts(llm.generate(prompts, _sampled(16, SO(grammar=ebnf)),
                                            use_tqdm=False)):
        if reason == "stop":
            assert re.fullmatch(r"\((\d|[1-9]\d)(,(\d|[1-9]\d))*\)", text), text


def test_compact_json_has_no_free_whitespace(llm):
    schema = SCHEMAS[2]
    outs = llm.generate(["a", "b", "c", "d"], _sampled(4, SO(json=schema,
                                                             disable_any_whitespace=True)),
                        use_tqdm=False)
    for text, reason in _texts(outs):
        assert reason == "stop"
        assert text == json.dumps(json.loads(text))  # exactly json.dumps' separators


GREEDY_JSON = SamplingParams(temperature=0.0, max_tokens=80,
                             structured_outputs=SO(json=SCHEMAS[0]))


@pytest.mark.parametrize("engine_args", [
    dict(max_num_batched_tokens=7),  # chunked prefill
    dict(num_kv_blocks=40, block_size=4),  # preemption: matchers stay in step
    dict(max_num_seqs=1),
], ids=["chunked", "preempt", "serial"])
def test_constrained_greedy_is_invariant(model_path, llm, engine_args):
    prompts = [f"Describe person number {i} in detail please" * (1 + i % 3) for i in range(8)]
    reference = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY_JSON,
                                                                 use_tqdm=False)]
    other = LLM(model_path, max_model_len=1024, **engine_args)
    outs = other.generate(prompts, GREEDY_JSON, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference
    stats = other.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    if "num_kv_blocks" in engine_args:
        assert stats.num_preemptions > 0


def test_n_samples_each_follow_the_grammar(llm):
    params = SamplingParams(n=6, temperature=1.0, seed=3, max_tokens=256,
                            structured_outputs=SO(json=SCHEMAS[2]))
    out = llm.generate("Colors:", params, use_tqdm=False)[0]
    assert len(out.outputs) == 6
    values = []
    for sample in out.outputs:
        if sample.finish_reason == "stop":
            value = json.loads(sample.text)
            jsonschema.validate(value, SCHEMAS[2])
            values.append(value)
    assert len(values) >= 5 and len({json.dumps(v) for v in values}) > 1


def test_speculative_decoding_verifies_drafts_against_the_grammar(model_path, llm):
    # Repetitive prompts give the n-gram proposer drafts, many of them invalid JSON.
    prompts = ['{"name": "a", "age": 1, "ok": true} {"name": "b", "age": 2, "ok": false} '
               * (i + 1) for i in range(4)]
    spec = LLM(model_path, max_model_len=1024, speculative_method="ngram",
               num_speculative_tokens=4)
    greedy = spec.generate(prompts, GREEDY_JSON, use_tqdm=False)
    reference = llm.generate(prompts, GREEDY_JSON, use_tqdm=False)
    # Greedy speculation is exact: the same tokens as without it.
    assert [o.outputs[0].token_ids for o in greedy] == \
        [o.outputs[0].token_ids for o in reference]
    sampled = spec.generate(prompts * 4, _sampled(16, SO(json=SCHEMAS[0])), use_tqdm=False)
    for text, reason in _texts(sampled):
        if reason == "stop":
            jsonschema.validate(json.loads(text), SCHEMAS[0])
    stats = spec.engine.stats()
    assert stats.spec_draft_tokens_total > 0


def test_logit_bias(llm):
    tok = llm.tokenizer
    plain = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    base = llm.generate("Hello there", plain, use_tqdm=False)[0].outputs[0].token_ids
    forced = tok.encode(" banana", add_special_tokens=False)[0]
    out = llm.generate("Hello there", plain.clone(logit_bias={forced: 100}),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [forced] * 4
    banned = llm.generate("Hello there", plain.clone(logit_bias={str(base[0]): -100}),
                          use_tqdm=False)[0].outputs[0].token_ids
    assert banned[0] != base[0]
    with pytest.raises(RequestRejected) as err:
        llm.generate("x", plain.clone(logit_bias={10**6: 1}), use_tqdm=False)
    assert err.value.param == "logit_bias"
    for bad in ({"x": 1}, {1: 101}, {1: float("nan")}, {-1: 1}):
        with pytest.raises(InvalidParameterError) as err:
            SamplingParams(logit_bias=bad)
        assert err.value.param == "logit_bias"


def test_logprobs_see_the_constrained_distribution(llm):
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=20,
                            structured_outputs=SO(choice=["alpha", "beta"]))
    out = llm.generate("Pick one:", params, use_tqdm=False)[0].outputs[0]
    assert out.text in ("alpha", "beta")
    tok = llm.tokenizer
    first = out.logprobs[0]
    # Only tokens that can start "alpha" or "beta" are alternatives; their
    # probabilities sum to 1 under the masked distribution.
    for token_id, _ in first.top:
        assert "alpha".startswith(tok.decode([token_id])) or \
            "beta".startswith(tok.decode([token_id]))
    assert sum(torch.tensor([lp for _, lp in first.top]).exp().tolist()) == \
        pytest.approx(1.0, abs=1e-4)


def test_min_tokens_and_ignore_eos_yield_to_the_grammar(llm):
    params = SamplingParams(temperature=0.0, max_tokens=50, min_tokens=40, ignore_eos=True,
                            structured_outputs=SO(choice=["ok"]))
    out = llm.generate("Say ok", params, use_tqdm=False)[0].outputs[0]
    assert (out.text, out.finish_reason) == ("ok", "stop")


def test_invalid_constraints_are_refused_naming_the_field(llm):
    cases = [
        (SO(json={"type": "object", "properties": {"a": {"type": "nope"}}}), "json"),
        (SO(json={"type": "object", "properties": {"a": {"not": {"type": "string"}}}}),
         "json"),
        (SO(regex="(unclosed"), "regex"),
        (SO(grammar="root ::= undefined_rule"), "grammar"),
    ]
    for spec, field in cases:
        with pytest.raises(InvalidParameterError) as err:
            llm.generate("x", SamplingParams(structured_outputs=spec), use_tqdm=False)
        assert err.value.param == field
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(InvalidParameterError):
        SO(json="{not json")
    with pytest.raises(InvalidParameterError):
        SO(regex="a", choice=["b"])  # exactly one constraint
    with pytest.raises(InvalidParameterError):
        SO()


def test_unsupported_schema_keywords_are_named():
    schema = {"type": "object", "properties": {
        "not": {"type": "string"},  # a property called "not" is fine
        "b": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
        "c": {"if": {"type": "string"}, "then": {"minLength": 2}},
    }}
    with pytest.raises(InvalidParameterError) as err:
        check_structured_outputs(SO(json=schema))
    assert "uniqueItems" in err.value.message and "properties.b" in err.value.message
    assert "'if'" in err.value.message
    check_structured_outputs(SO(json={"type": "object",
                                      "properties": {"not": {"type": "string"}}}))


def test_params_cross_the_process_boundary():
    params = SamplingParams(logit_bias={"5": 2.5, 7: -100},
                            structured_outputs=SO(json={"type": "object", "properties": {
                                "z": {"type": "integer"}, "a": {"type": "string"}}}))
    back = decode(encode(EngineCoreRequest("r", [1, 2], params, 0.0))).params
    assert back == params
    assert back.logit_bias == {5: 2.5, 7: -100.0}
    assert list(json.loads(back.structured_outputs.json)["properties"]) == ["z", "a"]
    choice = SamplingParams(structured_outputs=SO(choice=["a", "b"]))
    assert decode(encode(choice)).structured_outputs.choice == ("a", "b")


def test_compile_cache_counts_hits_and_evicts(model_path):
    from tokenmill.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_hf_dir(model_path)
    compiler = GrammarCompiler(lambda: tokenizer_info(tokenizer, tokenizer.vocab_size, [2]),
                               cache_size=2)
    a, b, c = SO(regex="a+"), SO(regex="b+"), SO(regex="c+")
    first = compiler.compile(a)
    assert compiler.compile(SO(regex="a+")) is first
    assert (compiler.stats.compiles, compiler.stats.cache_hits) == (1, 1)
    compiler.compile(b)
    compiler.compile(c)  # evicts a (least recently used)
    compiler.compile(a)
    assert compiler.stats.compiles == 4
    assert compiler.stats.compile_seconds > 0
    with pytest.raises(InvalidParameterError):
        compiler.compile(SO(regex="("))
    assert compiler.stats.errors == 1
    compiler.shutdown()


def test_compilation_does_not_block_other_requests(model_path):
    llm = LLM(model_path, max_model_len=1024)
    core = llm.engine.core
    gate = threading.Event()
    original = core.structured.compiler._info_factory

    def slow_info():
        assert gate.wait(60)
        return original()

    core.structured.compiler._info_factory = slow_info
    engine = llm.engine
    engine.add_request("constrained", "x", SamplingParams(
        temperature=0.0, max_tokens=20, structured_outputs=SO(choice=["done"])))
    engine.add_request("free", "x", SamplingParams(temperature=0.0, max_tokens=5,
                                                   ignore_eos=True))
    finished = {}
    for _ in range(20):  # the unconstrained request runs to the end meanwhile
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if "free" in finished:
            break
    assert "free" in finished and "constrained" not in finished
    assert core.num_awaiting_grammar == 1
    assert engine.stats().num_waiting == 1
    gate.set()
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "constrained":
                text += out.outputs[0].text if out.outputs else ""
    assert text == "done"


def test_abort_while_compiling(model_path):
    llm = LLM(model_path, max_model_len=1024)
    core = llm.engine.core
    gate = threading.Event()
    original = core.structured.compiler._info_factory
    core.structured.compiler._info_factory = lambda: (gate.wait(60), original())[1]
    llm.engine.add_request("r", "x", SamplingParams(structured_outputs=SO(regex="a")))
    assert llm.engine.abort_request("r")
    assert core.num_awaiting_grammar == 0 and not llm.engine.has_unfinished_requests()
    gate.set()


# ----- one sequence's matcher -------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from tokenmill.tokenizer import Tokenizer

    return Tokenizer.from_hf_dir(model_path)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(lambda: tokenizer_info(tokenizer, tokenizer.vocab_size, [2]))


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_reasoning_gate(tokenizer, compiler):
    think, end_think = _ids(tokenizer, "<think>")[0], _ids(tokenizer, "</think>")[0]
    markers = ReasoningMarkers((think,), (end_think,))
    compiled = compiler.compile(SO(choice=["yes", "no"]))
    vocab = tokenizer.vocab_size
    mask = allocate_bitmask(1, vocab)

    # The prompt opened the block: free text until </think>, then the grammar.
    g = SequenceGrammar.create(compiled, [5, think], markers)
    assert not g.fill_bitmask(mask, 0)
    for token in _ids(tokenizer, "let me think") + [end_think]:
        assert g.accept(token)
    assert g.fill_bitmask(mask, 0)
    allowed = allowed_token_ids(mask[0], vocab)
    assert all("yes".startswith(tokenizer.decode([t])) or "no".startswith(tokenizer.decode([t]))
               for t in allowed)

    # Nothing in the prompt: the first token may open a block or start the answer.
    g = SequenceGrammar.create(compiled, [5], markers)
    assert g.fill_bitmask(mask, 0)
    assert think in allowed_token_ids(mask[0], vocab)
    forked = g.fork()
    assert g.accept(think) and not g.is_constrained
    for token in _ids(tokenizer, "no"):
        assert forked.accept(token)  # the fork answered directly
    assert forked.accept(2) and forked.is_terminated

    # The prompt closed the block (thinking disabled): constrained at once.
    g = SequenceGrammar.create(compiled, [think, 7, end_think], markers)
    assert g.fill_bitmask(mask, 0) and think not in allowed_token_ids(mask[0], vocab)
    # DeepSeek-R1 style: reasoning first even without a marker in the prompt.
    g = SequenceGrammar.create(compiled, [5], ReasoningMarkers((think,), (end_think,), True))
    assert not g.fill_bitmask(mask, 0)


def test_draft_bitmasks_stop_at_the_first_refused_draft(tokenizer, compiler):
    compiled = compiler.compile(SO(regex="ab+c"))
    g = SequenceGrammar.create(compiled, [5])
    a, b, c, x = (_ids(tokenizer, ch)[0] for ch in "abcx")
    mask = allocate_bitmask(5, tokenizer.vocab_size)
    valid, constrained = g.fill_draft_bitmasks([a, b, x, b], mask, 0)
    assert valid == 2 and constrained == [True, True, True]
    assert a in allowed_token_ids(mask[0], tokenizer.vocab_size)
    assert all(tokenizer.decode([t]).startswith("a")
               for t in allowed_token_ids(mask[0], tokenizer.vocab_size))  # "a", "ab", "abc"
    assert {b, c} <= set(allowed_token_ids(mask[2], tokenizer.vocab_size))
    # The matcher is back where it started.
    assert g.accept(a) and g.accept(b) and g.accept(c) and g.accept(2) and g.is_terminated


def test_length_bounded_strings_refuse_control_characters(tokenizer, compiler):
    # xgrammar 0.2 lets bounded strings hold raw control characters (invalid JSON);
    # the grammar is patched, and a compiled matcher must refuse them.
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 5}},
              "required": ["s"]}
    compiled = compiler.compile(SO(json=schema))
    for text, ok in [('{"s": "ab', True), ('{"s": "a\tb', False), ('{"s": "a\x0bb', False),
                     ('{"s": "abcdef', False)]:
        g = SequenceGrammar.create(compiled, [5])
        accepted = all(g.accept(t) for t in _ids(tokenizer, text))
        assert accepted == ok, text
