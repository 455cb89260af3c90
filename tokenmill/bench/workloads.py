"""Workloads for the serving benchmark: what to send, and how many tokens to ask back.

Two random streams drive every generated workload:

* the *shape* stream (seeded by ``seed`` alone) draws lengths and group choices, so the
  same seed gives the same load shape on every run and on every server;
* the *text* stream (seeded by ``seed`` plus a salt) draws the words. The salt is fresh
  per run unless prompts are fixed, so a server with a prompt cache never sees a prompt it
  already answered in an earlier run, and servers are compared fairly.

Without a tokenizer a prompt of ``n`` tokens is ``n`` common English words (one token
each in most BPE vocabularies, so about right); the server's ``usage`` then gives the
true count. With a tokenizer the text is cut to exactly ``n`` tokens.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenmill.bench.tokens import TokenCounter

# Common words that are a single token (with their leading space) in GPT-2-style,
# Llama and SmolLM vocabularies.
WORDS: tuple[str, ...] = tuple(dict.fromkeys(
    """
    the of and to in is was for on that with as by at from his it an were are which
    this be or has had first one their its new after but who not they have her she two
    been other when there all during into school time may years more most only over city
    some world would where later up such used many can state about national out known
    university united then made county high also than under while part team well film
    house life three both year people government since year early war water south north
    group being great town game area day before each still work through called family
    second music became off city name these river number best back including three name
    line like age club end home road left local just age league place season set member
    around based public general long side played system four following found last way
    must best even next power small light east west party among held church great major
    book story five field order public right king head live court land form good air
    fire black white green blue red gold stone tree sun moon star sea wind rain snow
    road bridge hill lake park garden market bank station street door window table chair
    paper letter song voice dance art color friend child mother father brother sister
    doctor teacher river island valley forest farm village castle tower wall gate ship
    train car plane horse dog cat bird fish apple bread milk salt sugar tea coffee
    morning evening night summer winter spring autumn week month hour minute today
    small large young old fast slow hot cold happy quiet loud strong soft warm bright
    open close begin start stop move turn walk run sleep read write speak listen learn
    teach build grow carry bring hold keep give take make find help show play sing
    """.split()
))


@dataclass
class BenchRequest:
    """One request of a workload.

    ``prompt`` is this request's own text (for a chat turn: the new user message);
    ``messages`` is an explicit chat history from a JSONL file. ``prompt_len`` is the
    planned prompt length in tokens when a tokenizer measured it, else ``None``.
    """

    index: int
    prompt: str
    output_len: int
    prompt_len: int | None = None
    messages: list[dict[str, str]] | None = None
    conversation: int | None = None  # chat workloads: which conversation
    turn: int = 0  # chat workloads: 0-based turn within the conversation


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that decides a workload, as given on the command line."""

    kind: str = "random"  # random | prefix | chat | jsonl | structured
    num_prompts: int = 100
    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0
    prefix_len: int = 256
    suffix_len: int = 32
    num_prefixes: int = 4
    chat_turns: int = 4
    dataset_path: str | None = None

    def describe(self) -> str:
        """A one-line human description for tables."""
        spread = f" ±{self.range_ratio:.0%}" if self.range_ratio else ""
        if self.kind in ("random", "structured"):
            shape = f"in {self.input_len}, out {self.output_len}{spread}"
        elif self.kind in ("prefix", "tenants"):
            shape = (
                f"{self.num_prefixes} prefixes × {self.prefix_len} + suffix {self.suffix_len}, "
                f"out {self.output_len}{spread}"
            )
        elif self.kind == "chat":
            shape = f"{self.chat_turns} turns, user {self.input_len}, out {self.output_len}{spread}"
        else:
            shape = str(self.dataset_path)
        return f"{self.kind} ({shape}), {self.num_prompts} requests"


KINDS = ("random", "prefix", "tenants", "chat", "jsonl", "structured")


def sample_lengths(rng: np.random.Generator, n: int, mean: int, range_ratio: float,
                   minimum: int = 1) -> list[int]:
    """``n`` integers uniform in ``[mean*(1-r), mean*(1+r)]`` (inclusive), at least ``minimum``."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    low = max(minimum, int(mean * (1.0 - range_ratio)))
    high = max(low, int(mean * (1.0 + range_ratio)))
    return [int(x) for x in rng.integers(low, high + 1, size=n)]


def random_text(rng: random.Random, num_tokens: int,
                tokens: TokenCounter | None = None) -> tuple[str, int | None]:
    """Random words making about ``num_tokens`` tokens (exactly, with a tokenizer).

    Returns the text and its measured length (``None`` without a tokenizer).
    """
    if num_tokens <= 0:
        return "", 0 if tokens is not None else None
    words = [rng.choice(WORDS) for _ in range(num_tokens)]
    text = " ".join(words)
    if tokens is None:
        return text, None
    ids = tokens.encode(text)
    while len(ids) < num_tokens:  # a tokenizer that merges words: add more
        text += " " + " ".join(rng.choice(WORDS) for _ in range(num_tokens - len(ids)))
        ids = tokens.encode(text)
    text = tokens.decode(ids[:num_tokens])
    return text, tokens.count(text)


def text_rng(seed: int, salt: str, purpose: str) -> random.Random:
    """A text stream independent of the shape stream; str seeds hash stably across runs."""
    return random.Random(f"tokenmill-bench:{seed}:{salt}:{purpose}")


def build_workload(spec: WorkloadSpec, seed: int, salt: str = "",
                   tokens: TokenCounter | None = None) -> list[BenchRequest]:
    """Generate the requests of ``spec``; see the module docstring for seeding."""
    if spec.num_prompts <= 0:
        raise ValueError("the number of prompts must be positive")
    if spec.kind in ("random", "structured"):
        # structured: random prompts, sent with and without a JSON schema (bench/structured.py)
        return random_workload(spec, seed, salt, tokens)
    if spec.kind == "prefix":
        return prefix_workload(spec, seed, salt, tokens)
    if spec.kind == "tenants":
        return prefix_workload(spec, seed, salt, tokens, random_tenant=True)
    if spec.kind == "chat":
        return chat_workload(spec, seed, salt, tokens)
    if spec.kind == "jsonl":
        if not spec.dataset_path:
            raise ValueError("the jsonl workload needs --dataset-path")
        return jsonl_workload(spec.dataset_path, spec.num_prompts, spec.output_len, tokens)
    raise ValueError(f"unknown workload {spec.kind!r}; choose from {', '.join(KINDS)}")


def random_workload(spec: WorkloadSpec, seed: int, salt: str = "",
                    tokens: TokenCounter | None = None) -> list[BenchRequest]:
    """Independent prompts of random words, lengths uniform within the range ratio."""
    shape = np.random.default_rng(seed)
    in_lens = sample_lengths(shape, spec.num_prompts, spec.input_len, spec.range_ratio)
    out_lens = sample_lengths(shape, spec.num_prompts, spec.output_len, spec.range_ratio)
    words = text_rng(seed, salt, "random")
    requests = []
    for i, (n_in, n_out) in enumerate(zip(in_lens, out_lens, strict=True)):
        text, measured = random_text(words, n_in, tokens)
        requests.append(BenchRequest(index=i, prompt=text, output_len=n_out, prompt_len=measured))
    return requests


def prefix_workload(spec: WorkloadSpec, seed: int, salt: str = "",
                    tokens: TokenCounter | None = None,
                    random_tenant: bool = False) -> list[BenchRequest]:
    """Requests in ``num_prefixes`` groups; each group shares a ``prefix_len``-token prefix.

    ``prefix``: groups take turns (request ``i`` is in group ``i % num_prefixes``) so that
    every group's prefix is reused throughout the run, as many users of one system prompt
    would. ``tenants`` (``random_tenant``): each request's tenant is drawn at random
    (seeded) - in rotation, round-robin routing over as many replicas as the rotation's
    period divides would keep each tenant on one replica and look cache-aware.
    """
    if spec.num_prefixes <= 0:
        raise ValueError("the number of prefixes must be positive")
    shape = np.random.default_rng(seed)
    suffix_lens = sample_lengths(shape, spec.num_prompts, spec.suffix_len, spec.range_ratio)
    out_lens = sample_lengths(shape, spec.num_prompts, spec.output_len, spec.range_ratio)
    words = text_rng(seed, salt, "prefix")
    prefixes = [random_text(words, spec.prefix_len, tokens)[0] for _ in range(spec.num_prefixes)]
    tenants = (shape.integers(0, spec.num_prefixes, spec.num_prompts) if random_tenant
               else np.arange(spec.num_prompts) % spec.num_prefixes)
    requests = []
    for i, (n_suffix, n_out) in enumerate(zip(suffix_lens, out_lens, strict=True)):
        suffix, _ = random_text(words, n_suffix, tokens)
        text = prefixes[int(tenants[i])] + " " + suffix
        measured = tokens.count(text) if tokens is not None else None
        requests.append(BenchRequest(index=i, prompt=text, output_len=n_out, prompt_len=measured))
    return requests


def chat_workload(spec: WorkloadSpec, seed: int, salt: str = "",
                  tokens: TokenCounter | None = None) -> list[BenchRequest]:
    """Multi-turn conversations that grow: each turn resends the whole history.

    ``num_prompts`` counts turns; there are ``ceil(num_prompts / chat_turns)``
    conversations. Requests are ordered turn by turn across conversations, and the
    runner sends a turn only after the previous turn of its conversation has answered.
    ``prompt_len`` is the new user message alone: the history is only known at run time.
    """
    if spec.chat_turns <= 0:
        raise ValueError("the number of chat turns must be positive")
    shape = np.random.default_rng(seed)
    n = spec.num_prompts
    num_conversations = -(-n // spec.chat_turns)
    user_lens = sample_lengths(shape, n, spec.input_len, spec.range_ratio)
    out_lens = sample_lengths(shape, n, spec.output_len, spec.range_ratio)
    words = text_rng(seed, salt, "chat")
    requests: list[BenchRequest] = []
    for turn in range(spec.chat_turns):
        for conv in range(num_conversations):
            i = len(requests)
            if i >= n:
                break
            text, measured = random_text(words, user_lens[i], tokens)
            requests.append(BenchRequest(index=i, prompt=text, output_len=out_lens[i],
                                         prompt_len=measured, conversation=conv, turn=turn))
    return requests


def read_jsonl(path: str) -> Iterator[dict]:
    """Non-blank lines of a JSONL file, parsed."""
    with Path(path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{line_no}: not JSON: {exc}") from exc


def jsonl_workload(path: str, num_prompts: int, default_output_len: int,
                   tokens: TokenCounter | None = None) -> list[BenchRequest]:
    """The first ``num_prompts`` prompts of a JSONL file, in file order.

    Each line holds ``prompt`` (or ``text``) or an OpenAI-style ``messages`` list, and
    optionally ``output_len`` (or ``max_tokens``). File prompts are sent as they are,
    so they are *not* fresh per run.
    """
    requests: list[BenchRequest] = []
    for row in read_jsonl(path):
        if len(requests) >= num_prompts:
            break
        if not isinstance(row, dict):
            raise ValueError(f"{path}: each line must be a JSON object")
        messages = row.get("messages")
        prompt = row.get("prompt", row.get("text"))
        if messages is None and not isinstance(prompt, str):
            raise ValueError(f"{path}: a line needs 'prompt', 'text' or 'messages'")
        out_len = int(row.get("output_len", row.get("max_tokens", default_output_len)))
        if messages is not None:
            prompt = str(messages[-1].get("content", "")) if messages else ""
            measured = tokens.count_chat(messages) if tokens is not None else None
        else:
            measured = tokens.count(prompt) if tokens is not None else None
        requests.append(BenchRequest(index=len(requests), prompt=prompt, output_len=out_len,
                                     prompt_len=measured, messages=messages))
    if not requests:
        raise ValueError(f"{path}: no prompts")
    return requests
