"""Grammar-constrained decoding with xgrammar: check, compile, match, mask.

Three parts, used from two sides of the process boundary:

- **Checks** (front end, no tokenizer needed): :func:`check_structured_outputs`
  turns a :class:`~tokenmill.sampling.params.StructuredOutputsParams` into an
  xgrammar grammar once, so an invalid schema, regex or EBNF, or a JSON-schema
  keyword xgrammar would silently not enforce, is refused with an error that
  names the field before the request is queued.
- **Compilation** (engine core, rank 0): :class:`GrammarCompiler` compiles
  grammars against the model's vocabulary in a background thread (xgrammar
  releases the GIL, so the engine keeps stepping meanwhile) and keeps the
  results in an LRU cache keyed by the constraint.
- **Matching**: :class:`SequenceGrammar` is one sequence's matcher. It fills
  that sequence's row of a packed token bitmask (1 bit per token, int32 words)
  before sampling and accepts each token the scheduler appends. With a
  reasoning parser, the grammar waits until the model closes its reasoning
  block (``</think>``) and constrains only the answer.

xgrammar is imported lazily: an engine that never sees a constrained request
never loads it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from tokenmill.sampling.params import InvalidParameterError, StructuredOutputsParams

logger = logging.getLogger(__name__)

# Whitespace characters the model may put between JSON tokens (per gap) unless the
# request asks for compact JSON: enough for pretty-printed nesting, and a weak model
# cannot loop on whitespace forever.
MAX_JSON_WHITESPACE = 24
DEFAULT_CACHE_SIZE = 256  # compiled grammars kept (LRU)

# JSON-schema keywords xgrammar parses but does not enforce (checked with xgrammar 0.2):
# a schema using them is refused instead of being silently half-applied.
UNSUPPORTED_SCHEMA_KEYWORDS = frozenset({
    "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
    "uniqueItems", "minContains", "maxContains", "patternProperties", "propertyNames",
    "unevaluatedItems", "contentSchema",
})
# Keywords whose value is one subschema / a list of them / a map of them.
_SUBSCHEMA = ("items", "additionalProperties", "contains", "unevaluatedProperties",
              "additionalItems")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")


def xgrammar_available() -> bool:
    """Whether the xgrammar package can be imported."""
    try:
        _xgr()
    except ImportError:
        return False
    return True


def _xgr() -> Any:
    try:
        import xgrammar
    except ImportError as exc:  # pragma: no cover - xgrammar is a dependency
        raise ImportError("structured outputs need the xgrammar package "
                          "(pip install xgrammar)") from exc
    return xgrammar


# ------------------------------------------------------------------- checks


def unsupported_schema_features(schema: Any, path: str = "") -> list[tuple[str, str]]:
    """``(path, keyword)`` for every keyword in ``schema`` the grammar cannot enforce.

    Walks subschemas only (a property *named* "not" is fine). ``path`` is a
    dotted location such as ``properties.tags.items``.
    """
    found: list[tuple[str, str]] = []
    if not isinstance(schema, dict):
        return found
    where = path or "(root)"
    for keyword in sorted(UNSUPPORTED_SCHEMA_KEYWORDS & schema.keys()):
        value = schema[keyword]
        if keyword == "uniqueItems" and value is not True:
            continue
        found.append((where, keyword))
    all_of = schema.get("allOf")
    if isinstance(all_of, list) and len(all_of) > 1:
        found.append((where, "allOf"))  # a single entry is fine; merging several is not done
    if "multipleOf" in schema and schema.get("type") != "integer":
        found.append((where, "multipleOf"))  # enforced for integers only
    ref = schema.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        found.append((where, "$ref"))  # only local references are resolved
    prefix = f"{path}." if path else ""
    for keyword in _SUBSCHEMA:
        if isinstance(schema.get(keyword), dict):
            found += unsupported_schema_features(schema[keyword], f"{prefix}{keyword}")
    for keyword in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(keyword), list):
            for i, sub in enumerate(schema[keyword]):
                found += unsupported_schema_features(sub, f"{prefix}{keyword}[{i}]")
    for keyword in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(keyword), dict):
            for name, sub in schema[keyword].items():
                found += unsupported_schema_features(sub, f"{prefix}{keyword}.{name}")
    return found


def choice_ebnf(choices: Iterable[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices``."""
    # JSON string escapes are the escapes xgrammar's EBNF literals understand.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=True) for c in choices)


def check_structured_outputs(spec: StructuredOutputsParams) -> None:
    """Refuse a constraint the engine cannot enforce, naming its field.

    Raises :class:`InvalidParameterError` with ``param`` one of ``json``,
    ``regex``, ``choice``, ``grammar`` (the caller maps it to the request's
    field). Results are cached per constraint, so a repeated schema costs a
    dictionary lookup. Blocking for big schemas: call it off an event loop.
    """
    error = _check_cached(spec.key)
    if error is not None:
        raise InvalidParameterError(*error)


@lru_cache(maxsize=1024)
def _check_cached(key: tuple[Any, ...]) -> tuple[str, str] | None:
    kind, value, compact = key
    try:
        _grammar_for(kind, value, compact)
    except InvalidParameterError as exc:
        return exc.param, exc.message
    return None


def _grammar_for(kind: str, value: Any, compact: bool) -> Any:
    """The xgrammar ``Grammar`` of a constraint (vocabulary-independent)."""
    xgr = _xgr()
    if kind == "json_object":
        return _json_grammar(xgr, '{"type": "object"}', compact)
    if kind == "json":
        schema = json.loads(value)
        _check_schema(schema)
        return _json_grammar(xgr, value, compact)
    try:
        if kind == "regex":
            return xgr.Grammar.from_regex(value)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(choice_ebnf(value))
        if kind == "grammar":
            return xgr.Grammar.from_ebnf(value)
    except RuntimeError as exc:
        raise InvalidParameterError(kind, f"is invalid: {_xgr_message(exc)}") from None
    raise ValueError(f"unknown constraint kind {kind!r}")


def _check_schema(schema: Any) -> None:
    if not isinstance(schema, dict):
        raise InvalidParameterError("json", "must be a JSON schema object")
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - jsonschema is a dependency
        jsonschema = None
    if jsonschema is not None:
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = ".".join(str(p) for p in exc.path)
            raise InvalidParameterError(
                "json", f"is not a valid JSON schema{f' (at {where})' if where else ''}: "
                        f"{exc.message}") from None
    unsupported = unsupported_schema_features(schema)
    if unsupported:
        listed = ", ".join(f"'{kw}' at {where}" for where, kw in unsupported[:5])
        raise InvalidParameterError(
            "json", f"uses JSON-schema features that structured output cannot enforce: "
                    f"{listed}")


# xgrammar (0.2.x) spells the characters of a length-bounded string (minLength /
# maxLength) as this class, which admits raw control characters (a tab, U+000B) and so
# makes invalid JSON; the fix excludes U+0000-U+001F as its unbounded strings do.
_BOUNDED_STRING_CHAR = '[^\\"\\\\\\r\\n]'
_JSON_STRING_CHAR = '[^\\0-\\x1f\\"\\\\]'


def _fix_bounded_strings(xgr: Any, grammar: Any, schema_text: str, compact: bool,
                         strict: bool) -> Any:
    """``grammar`` with valid JSON characters in its length-bounded strings."""
    text = str(grammar)
    if _BOUNDED_STRING_CHAR not in text:
        return grammar
    try:
        return xgr.Grammar.from_ebnf(text.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR))
    except RuntimeError:
        # The printed grammar did not parse back: express the bounds as patterns
        # instead (correct too, but about ten times slower to compile).
        schema = json.loads(schema_text)
        _bound_string_lengths(schema)
        return xgr.Grammar.from_json_schema(json.dumps(schema, ensure_ascii=False),
                                            strict_mode=strict, **_json_format_kwargs(compact))


def _bound_string_lengths(schema: Any) -> bool:
    """Rewrite length-bounded strings as patterns, in place; True if anything changed.

    Such strings then hold characters other than controls, quote and backslash
    (no escapes, as xgrammar's own bounded strings).
    """
    changed = False
    if not isinstance(schema, dict):
        return False
    types = schema.get("type")
    is_string = types == "string" or (isinstance(types, list) and "string" in types)
    if (is_string and ("minLength" in schema or "maxLength" in schema)
            and not {"pattern", "format", "enum", "const"} & schema.keys()):
        low = int(schema.pop("minLength", 0) or 0)
        high = schema.pop("maxLength", None)
        upper = "" if high is None else str(int(high))
        schema["pattern"] = f'^[^\\x00-\\x1f"\\\\]{{{low},{upper}}}$'
        changed = True
    for keyword in _SUBSCHEMA:
        changed |= _bound_string_lengths(schema.get(keyword))
    for keyword in _SUBSCHEMA_LISTS:
        subs = schema.get(keyword)
        for sub in subs if isinstance(subs, list) else []:
            changed |= _bound_string_lengths(sub)
    for keyword in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(keyword), dict):
            for sub in schema[keyword].values():
                changed |= _bound_string_lengths(sub)
    return changed


def _json_grammar(xgr: Any, schema_text: str, compact: bool) -> Any:
    # Strict mode (no properties or items beyond those declared) is what makes small
    # models produce the declared shape; it is a subset of the schema's language, so
    # outputs stay valid. A few schemas have no strict reading (minItems with no items):
    # those fall back to the plain one.
    kwargs = _json_format_kwargs(compact)
    strict = True
    try:
        grammar = xgr.Grammar.from_json_schema(schema_text, strict_mode=True, **kwargs)
    except RuntimeError as strict_error:
        strict = False
        try:
            grammar = xgr.Grammar.from_json_schema(schema_text, strict_mode=False, **kwargs)
        except RuntimeError:
            raise InvalidParameterError(
                "json", f"cannot be turned into a grammar: {_xgr_message(strict_error)}"
            ) from None
    return _fix_bounded_strings(xgr, grammar, schema_text, compact, strict)


def _json_format_kwargs(compact: bool) -> dict[str, Any]:
    if compact:
        return {"any_whitespace": False}
    return {"any_whitespace": True, "max_whitespace_cnt": MAX_JSON_WHITESPACE}


def _xgr_message(exc: BaseException) -> str:
    """xgrammar's message without its ``[time] file.cc:line:`` prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
        head, sep, rest = text.partition(": ")
        if sep and (".cc:" in head or ".h:" in head):
            text = rest
    return text


# --------------------------------------------------------------- vocabulary


def tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> Any:
    """xgrammar's view of ``tokenizer`` (a :class:`tokenmill.tokenizer.Tokenizer`).

    ``vocab_size`` is the model's (logit width; may exceed the tokenizer's).
    Special tokens get an empty spelling so the grammar never emits them as
    text; ``stop_token_ids`` are what the grammar allows once it is complete.
    """
    xgr = _xgr()
    backend = tokenizer.backend
    encoded = [""] * vocab_size
    for text, token_id in backend.get_vocab(with_added_tokens=True).items():
        if 0 <= token_id < vocab_size:
            encoded[token_id] = text
    for token_id in tokenizer.all_special_ids:
        if 0 <= token_id < vocab_size:
            encoded[token_id] = ""
    vocab_type, add_prefix_space = _vocab_type(xgr, tokenizer)
    return xgr.TokenizerInfo(encoded, vocab_type, vocab_size=vocab_size,
                             stop_token_ids=list(stop_token_ids),
                             add_prefix_space=add_prefix_space)


def _vocab_type(xgr: Any, tokenizer: Any) -> tuple[Any, bool]:
    """Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM), byte-fallback (SentencePiece
    Llama 2, Mistral) or raw, read from the tokenizer's decoder."""
    spec = json.loads(tokenizer.backend.to_str())
    decoders = _decoder_types(spec.get("decoder"))
    if "ByteLevel" in decoders:
        return xgr.VocabType.BYTE_LEVEL, False
    if "ByteFallback" in decoders:
        first = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))
        return xgr.VocabType.BYTE_FALLBACK, bool(first) and first[0].startswith("\u2581")
    return xgr.VocabType.RAW, False


def _decoder_types(decoder: Any) -> set[str]:
    if not isinstance(decoder, dict):
        return set()
    found = {str(decoder.get("type"))}
    for sub in decoder.get("decoders") or []:
        found |= _decoder_types(sub)
    return found


# -------------------------------------------------------------- compilation


@dataclass
class CompileStats:
    """Counters of a :class:`GrammarCompiler` (exported as metrics)."""

    compiles: int = 0  # grammars compiled (cache misses)
    cache_hits: int = 0
    errors: int = 0
    compile_seconds: float = 0.0  # total time spent compiling


class GrammarCompiler:
    """Compiles constraints against one vocabulary, off the caller's thread, with an LRU.

    :meth:`submit` returns a future at once: a cache hit is already done, a miss
    compiles on a background thread. The vocabulary (``info_factory()``) is
    built on the first miss, so an engine that never sees a constrained
    request never builds it.
    """

    def __init__(self, info_factory: Callable[[], Any], cache_size: int = DEFAULT_CACHE_SIZE,
                 max_threads: int = 1) -> None:
        self._info_factory = info_factory
        self._info: Any = None
        self._compiler: Any = None
        self.cache_size = max(1, cache_size)
        self._cache: OrderedDict[tuple[Any, ...], Future[Any]] = OrderedDict()
        self._lock = threading.Lock()  # the cache and stats are touched by the worker too
        self._pool = ThreadPoolExecutor(max_workers=max(1, max_threads),
                                        thread_name_prefix="tokenmill-grammar")
        self.stats = CompileStats()

    def submit(self, spec: StructuredOutputsParams) -> Future[Any]:
        """A future of the compiled grammar (raises ``InvalidParameterError`` if invalid)."""
        key = spec.key
        with self._lock:
            future = self._cache.get(key)
            if future is not None and not (future.done() and future.exception() is not None):
                self._cache.move_to_end(key)
                self.stats.cache_hits += 1
                return future
            future = Future()
            self._cache[key] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._pool.submit(self._compile, spec, future)
        return future

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """Compile (or fetch) synchronously."""
        return self.submit(spec).result()

    def _compile(self, spec: StructuredOutputsParams, future: Future[Any]) -> None:
        try:
            compiler = self._ensure_compiler()  # once: not counted as compile time
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            with self._lock:
                self.stats.errors += 1
                if self._cache.get(spec.key) is future:
                    del self._cache[spec.key]
            future.set_exception(exc)
            return
        start = time.perf_counter()
        try:
            grammar = _grammar_for(*spec.key)
            compiled = compiler.compile_grammar(grammar)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            with self._lock:
                self.stats.errors += 1
                if self._cache.get(spec.key) is future:
                    del self._cache[spec.key]  # do not cache failures
            future.set_exception(exc)
            return
        elapsed = time.perf_counter() - start
        with self._lock:
            self.stats.compiles += 1
            self.stats.compile_seconds += elapsed
        future.set_result(compiled)

    def _ensure_compiler(self) -> Any:
        if self._compiler is None:
            start = time.perf_counter()
            xgr = _xgr()
            self._info = self._info_factory()
            # Our own LRU sits in front; xgrammar's cache would keep evicted grammars alive.
            self._compiler = xgr.GrammarCompiler(self._info, max_threads=2,
                                                 cache_enabled=False)
            logger.info("structured outputs: vocabulary of %d tokens prepared for grammars "
                        "in %.2fs", self._info.vocab_size, time.perf_counter() - start)
        return self._compiler

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------- matching


@dataclass(frozen=True)
class ReasoningMarkers:
    """Token ids that open and close a reasoning block (``<think>`` / ``</think>``).

    With markers, a sequence's grammar applies to the answer after the block:
    it waits while the model reasons, and at the start of the output it also
    allows the opening marker (when that is one token) so the model may choose
    to reason first.
    """

    start: tuple[int, ...]
    end: tuple[int, ...]
    starts_in_reasoning: bool = False  # the model always reasons first (DeepSeek-R1)


_CONSTRAINED, _REASONING, _UNDECIDED = "constrained", "reasoning", "undecided"


class SequenceGrammar:
    """One sequence's grammar matcher (and its reasoning gate).

    The engine core creates it when the request's grammar is compiled; the
    scheduler calls :meth:`accept` for every token it appends; the core calls
    :meth:`fill_bitmask` before sampling.
    """

    def __init__(self, matcher: Any, markers: ReasoningMarkers | None, state: str,
                 recent: tuple[int, ...] = ()) -> None:
        self._matcher = matcher
        self._markers = markers
        self._state = state
        self._recent = recent  # last tokens while reasoning (to spot the end marker)

    @classmethod
    def create(cls, compiled: Any, prompt_token_ids: Sequence[int],
               markers: ReasoningMarkers | None = None) -> SequenceGrammar:
        """A fresh matcher; with ``markers``, the prompt tells whether the output starts
        inside a reasoning block (a template that opens ``<think>`` itself)."""
        matcher = _xgr().GrammarMatcher(compiled)
        return cls(matcher, markers, _initial_state(prompt_token_ids, markers))

    def fork(self) -> SequenceGrammar:
        """An independent copy in the same state (``n > 1`` siblings)."""
        return SequenceGrammar(self._matcher.fork(), self._markers, self._state, self._recent)

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted: the output is done."""
        return self._state == _CONSTRAINED and self._matcher.is_terminated()

    @property
    def is_constrained(self) -> bool:
        """Whether the next token is (at least partly) constrained by the grammar."""
        return self._state != _REASONING

    def accept(self, token: int) -> bool:
        """Advance by one appended token; False if the grammar does not allow it."""
        if self._state == _CONSTRAINED:
            return bool(self._matcher.accept_token(token))
        markers = self._markers
        assert markers is not None
        if self._state == _UNDECIDED:
            if (token,) == markers.start:
                self._state = _REASONING
                return True
            self._state = _CONSTRAINED
            return bool(self._matcher.accept_token(token))
        self._recent = (self._recent + (token,))[-len(markers.end):]
        if self._recent == markers.end:
            self._state, self._recent = _CONSTRAINED, ()
        return True

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the allowed next tokens into ``bitmask[row]``; False when unconstrained."""
        if self._state == _REASONING:
            return False
        if self._matcher.is_terminated():
            bitmask[row].fill_(-1)  # finished: anything (the scheduler stops it)
            return False
        self._matcher.fill_next_token_bitmask(bitmask, row)
        if self._state == _UNDECIDED:
            assert self._markers is not None
            token = self._markers.start[0]
            word = int(bitmask[row, token // 32]) | (1 << (token % 32))
            bitmask[row, token // 32] = word - (1 << 32) if word >= 1 << 31 else word
        return True

    def fill_draft_bitmasks(self, drafts: Sequence[int], bitmask: torch.Tensor,
                            first_row: int) -> tuple[int, list[bool]]:
        """Rows for verifying speculative ``drafts``: row ``j`` (at ``first_row + j``)
        holds the tokens allowed after the first ``j`` drafts.

        Stops at the first draft the grammar refuses (it would be rejected anyway).
        Returns ``(number of valid leading drafts, whether each filled row is
        constrained)``; the matcher ends in the state it started in.
        """
        saved = (self._state, self._recent)
        constrained = [self.fill_bitmask(bitmask, first_row)]
        accepted_by_matcher = 0
        valid = 0
        for token in drafts:
            before = self._state
            if not self.accept(token):
                break
            if before != _REASONING and self._state == _CONSTRAINED:
                accepted_by_matcher += 1
            valid += 1
            constrained.append(self.fill_bitmask(bitmask, first_row + valid))
        if accepted_by_matcher:
            self._matcher.rollback(accepted_by_matcher)
        self._state, self._recent = saved
        return valid, constrained


def _initial_state(prompt: Sequence[int], markers: ReasoningMarkers | None) -> str:
    if markers is None:
        return _CONSTRAINED
    start = _last_index(prompt, markers.start)
    end = _last_index(prompt, markers.end)
    if start > end:
        return _REASONING  # the template opened the block for the model
    if end > start:
        return _CONSTRAINED  # the prompt closed it (e.g. thinking disabled)
    if markers.starts_in_reasoning:
        return _REASONING
    # Nothing in the prompt: the model may open a block with its first token.
    return _UNDECIDED if len(markers.start) == 1 else _CONSTRAINED


def _last_index(tokens: Sequence[int], pattern: tuple[int, ...]) -> int:
    if not pattern:
        return -1
    n = len(pattern)
    for i in range(len(tokens) - n, -1, -1):
        if tuple(tokens[i:i + n]) == pattern:
            return i
    return -1


# ------------------------------------------------------------------ bitmask


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row."""
    return (vocab_size + 31) // 32


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """A CPU bitmask ``[rows, ceil(V / 32)]`` with every token allowed."""
    return torch.full((rows, bitmask_width(vocab_size)), -1, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                  rows: Sequence[int] | None = None) -> None:
    """Set the logits of disallowed tokens to -inf, in place (rows of ``bitmask`` pair
    with rows of ``logits``; ``rows`` limits the work to those indices)."""
    bitmask = bitmask.to(logits.device, non_blocking=True)
    indices = None if rows is None else list(rows)
    try:
        _xgr().apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1],
                                           indices=indices)
    except ImportError:  # pragma: no cover - a mask exists only where xgrammar does
        _apply_bitmask_torch(logits, bitmask, indices)


def _apply_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor,
                         indices: list[int] | None) -> None:
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    rows = bitmask if indices is None else bitmask[indices]
    allowed = ((rows.unsqueeze(-1) >> shifts) & 1).view(rows.shape[0], -1)[:, :vocab].bool()
    if indices is None:
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        index = torch.tensor(indices, device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def allowed_token_ids(bitmask_row: torch.Tensor, vocab_size: int) -> list[int]:
    """The token ids a bitmask row allows (for tests and debugging)."""
    shifts = torch.arange(32, dtype=torch.int32)
    bits = ((bitmask_row.unsqueeze(-1) >> shifts) & 1).reshape(-1)[:vocab_size]
    return bits.nonzero().flatten().tolist()
