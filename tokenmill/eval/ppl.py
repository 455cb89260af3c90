"""``tokenmill eval ppl``: perplexity of the engine on a fixed text.

Faster numerics (bfloat16 activations, quantized weights, other kernels) trade
some quality for speed; perplexity on a fixed text measures how much. The score
is computed *through the engine* — scheduler, paged KV cache, attention
backend, model runner and prompt-logprob path — so every numeric path the
engine serves with is the one being measured.

The text is tokenized and cut into windows of ``context_len`` tokens. Each
window runs as one request with ``prompt_logprobs=0`` and ``max_tokens=1``; the
log-probability of every scored prompt token given the tokens before it in its
window is summed. With ``stride < context_len`` windows overlap and each one
scores only the tokens the previous windows did not, so every token but the
first is scored with at least ``context_len - stride`` tokens of context.
With the default ``stride = context_len`` windows do not overlap and the first
token of each window (which has no context in it) is not scored.

``--compare "dtype=bfloat16"`` runs the same windows on further engines, one
at a time, each built from the baseline's engine arguments with the given
overrides, and prints how the perplexity moves.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tokenmill.engine.args import EngineArgs

BUNDLED_TEXT = "us_founding_documents.txt"
DEFAULT_CONTEXT_LEN = 512


# ------------------------------------------------------------------- the text

def bundled_text_path() -> Path:
    """Path of the public-domain text shipped with tokenmill (see its header)."""
    return Path(str(resources.files("tokenmill.eval") / "data" / BUNDLED_TEXT))


def load_text(path: str | Path | None = None) -> str:
    """The text to score: ``path`` as it is, or the bundled text without its header.

    The bundled file starts with ``#`` lines naming its source; they are not part
    of the evaluated text.
    """
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    lines = bundled_text_path().read_text(encoding="utf-8").splitlines(keepends=True)
    start = 0
    while start < len(lines) and lines[start].startswith("#"):
        start += 1
    return "".join(lines[start:])


# ---------------------------------------------------------------- the windows

@dataclass(frozen=True)
class Window:
    """Tokens ``[start, end)`` go to the model; tokens ``[score_from, end)`` are scored.

    ``score_from > start`` always: the first token of a window has no context in it.
    """

    start: int
    end: int
    score_from: int

    @property
    def num_scored(self) -> int:
        return self.end - self.score_from


def make_windows(num_tokens: int, context_len: int, stride: int | None = None) -> list[Window]:
    """Cut ``num_tokens`` tokens into windows of at most ``context_len`` tokens.

    Window *i* starts at ``i * stride`` (default ``stride = context_len``: no
    overlap) and scores the tokens no earlier window scored. Every token is
    scored at most once and in text order; the windows stop at the last token.
    """
    if context_len < 2:
        raise ValueError(f"context_len must be at least 2, got {context_len}")
    stride = context_len if stride is None else stride
    if not 1 <= stride <= context_len:
        raise ValueError(f"stride must be in [1, context_len={context_len}], got {stride}")
    if num_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score anything, got {num_tokens}")
    windows: list[Window] = []
    scored_until = 0  # tokens before this position are scored (or are token 0)
    start = 0
    while True:
        end = min(start + context_len, num_tokens)
        score_from = max(scored_until, start + 1)
        if end > score_from:
            windows.append(Window(start, end, score_from))
        scored_until = max(scored_until, end)
        if end == num_tokens:
            return windows
        start += stride


# ------------------------------------------------------------------- scoring

def score_windows(
    llm: Any, token_ids: Sequence[int], windows: Sequence[Window], use_tqdm: bool = False,
) -> list[float]:
    """Log-probability (natural log) of every scored token, in text order.

    All windows go to the engine together (continuous batching); each is a request
    for one greedy token with ``prompt_logprobs=0``, so the engine returns the
    log-probability of each prompt token given the tokens before it in its window.
    ``llm`` is a :class:`tokenmill.llm.LLM`.
    """
    from tokenmill.sampling import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    prompts = [list(token_ids[w.start:w.end]) for w in windows]
    outputs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    logprobs: list[float] = []
    for w, out in zip(windows, outputs, strict=True):
        entries = out.prompt_logprobs
        if entries is None or len(entries) != w.end - w.start:
            raise RuntimeError(
                f"request {out.request_id}: expected {w.end - w.start} prompt logprobs, "
                f"got {None if entries is None else len(entries)}"
            )
        for pos in range(w.score_from, w.end):
            entry = entries[pos - w.start]
            if entry is None or entry.token_id != token_ids[pos]:
                raise RuntimeError(f"prompt logprob for token {pos} is missing or misaligned")
            logprobs.append(entry.logprob)
    return logprobs


@dataclass
class PerplexityResult:
    """Scored tokens, their summed negative log-likelihood and the time it took."""

    label: str
    num_tokens: int  # tokens scored
    nll_sum: float  # sum of -log p(token), natural log
    seconds: float  # scoring time, without loading the model
    overrides: dict[str, Any] = field(default_factory=dict)
    load_seconds: float = 0.0
    num_windows: int = 0
    engine: dict[str, Any] = field(default_factory=dict)  # resolved dtype, device, backend

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.num_tokens if self.num_tokens else math.nan

    @property
    def perplexity(self) -> float:
        """exp(mean NLL); inf if the mean NLL overflows."""
        try:
            return math.exp(self.mean_nll)
        except OverflowError:
            return math.inf

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"mean_nll": self.mean_nll,
                                           "perplexity": self.perplexity}


def nll_from_logprobs(logprobs: Iterable[float]) -> tuple[int, float]:
    """(number of tokens, summed negative log-likelihood) of per-token logprobs."""
    values = list(logprobs)
    return len(values), -math.fsum(values)


def perplexity(
    llm: Any, token_ids: Sequence[int], context_len: int = DEFAULT_CONTEXT_LEN,
    stride: int | None = None, label: str = "tokenmill", use_tqdm: bool = False,
) -> PerplexityResult:
    """Perplexity of the engine behind ``llm`` on ``token_ids`` (see :func:`make_windows`)."""
    windows = make_windows(len(token_ids), context_len, stride)
    limit = llm.engine.max_model_len
    if context_len + 1 > limit:  # + 1: the request also asks for one generated token
        raise ValueError(
            f"context_len {context_len} does not fit the engine's max_model_len {limit} "
            f"(a window needs context_len + 1 tokens); lower --context-len"
        )
    t0 = time.perf_counter()
    logprobs = score_windows(llm, token_ids, windows, use_tqdm=use_tqdm)
    seconds = time.perf_counter() - t0
    n, nll = nll_from_logprobs(logprobs)
    return PerplexityResult(label=label, num_tokens=n, nll_sum=nll, seconds=seconds,
                            num_windows=len(windows))


# ------------------------------------------------------- engine-arg overrides

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"none", "null"}


def _coerce(name: str, raw: str, annotation: Any) -> Any:
    """Turn ``raw`` into the type the EngineArgs field ``name`` declares.

    Annotations are strings here (``from __future__ import annotations``), e.g.
    ``"int | str | None"``; any type other than int/float/bool/None takes the string.
    """
    kinds = {part.strip() for part in str(annotation).split("|")}
    low = raw.strip().lower()
    if "None" in kinds and low in _NONE:
        return None
    if "bool" in kinds:
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        if kinds <= {"bool", "None"}:
            raise ValueError(f"{name}={raw!r}: expected true or false")
    if "int" in kinds:
        try:
            return int(raw)
        except ValueError:
            pass
    if "float" in kinds:
        try:
            return float(raw)
        except ValueError:
            pass
    if kinds <= {"int", "float", "bool", "None"}:
        raise ValueError(f"{name}={raw!r}: expected {annotation}")
    return raw


def parse_overrides(spec: str) -> dict[str, Any]:
    """``"dtype=bfloat16,max_num_seqs=8"`` -> ``{"dtype": "bfloat16", "max_num_seqs": 8}``.

    Keys are :class:`EngineArgs` field names (``-`` may stand for ``_``); values are
    converted to the field's type. Unknown fields raise ValueError listing the valid ones.
    """
    fields = {f.name: f.type for f in dataclasses.fields(EngineArgs)}
    overrides: dict[str, Any] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"bad override {item!r} in {spec!r}: use field=value")
        if key not in fields:
            raise ValueError(
                f"unknown engine argument {key!r} in {spec!r}; valid fields: "
                f"{', '.join(sorted(fields))}"
            )
        overrides[key] = _coerce(key, value.strip(), fields[key])
    if not overrides:
        raise ValueError(f"empty override {spec!r}: use field=value[,field=value...]")
    return overrides


# ---------------------------------------------------------------- comparison

def evaluate_configs(
    base: EngineArgs, variants: Sequence[tuple[str, dict[str, Any]]], text: str,
    context_len: int = DEFAULT_CONTEXT_LEN, stride: int | None = None,
    num_tokens: int | None = None, use_tqdm: bool = False,
    on_result: Any = None,
) -> list[PerplexityResult]:
    """Score ``text`` on the baseline engine and then on each ``(label, overrides)``.

    Engines are built one at a time and freed before the next one loads, so two
    models never share the memory. ``num_tokens`` keeps only the first tokens of
    the text. ``on_result(result)`` is called as each configuration finishes.
    """
    import torch

    from tokenmill.llm import LLM

    configs = [("baseline", {})] + list(variants)
    results: list[PerplexityResult] = []
    for label, overrides in configs:
        args = dataclasses.replace(base, **overrides)
        t0 = time.perf_counter()
        llm = LLM(**vars(args))
        load_s = time.perf_counter() - t0
        try:
            tok = llm.tokenizer
            if tok is None:
                raise ValueError(
                    "the model has no tokenizer; pass --tokenizer (a .gguf file or an HF "
                    "directory with tokenizer.json)"
                )
            # Tokenized by each engine's own tokenizer (an override may change it).
            ids = tok.encode(text, add_special_tokens=False)
            if num_tokens is not None:
                ids = ids[:num_tokens]
            result = perplexity(llm, ids, context_len, stride, label=label, use_tqdm=use_tqdm)
            cfg = llm.engine.config
            result.overrides = dict(overrides)
            result.load_seconds = load_s
            result.engine = {
                "dtype": str(cfg.dtype).replace("torch.", ""), "device": cfg.device,
                "attention_backend": cfg.attention_backend, "load_format": cfg.load_format,
                "quantization": getattr(cfg, "quantization", None),
            }
        finally:
            del llm  # free this engine before the next one loads
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def format_table(results: Sequence[PerplexityResult]) -> str:
    """One row per configuration; deltas are against the first (baseline) row."""
    base = results[0]
    width = max(16, *(len(r.label) + 2 for r in results))
    lines = [f"{'config':<{width}}{'dtype':>10}{'weights':>8}{'tokens':>8}{'NLL':>9}"
             f"{'PPL':>10}{'dPPL':>9}{'dPPL %':>9}{'time s':>9}"]
    for r in results:
        d = r.perplexity - base.perplexity
        pct = 100.0 * d / base.perplexity if base.perplexity else math.nan
        weights = r.engine.get("quantization") or "float"  # the resolved --quantization
        lines.append(
            f"{r.label:<{width}}{r.engine.get('dtype', '?'):>10}{weights:>8}{r.num_tokens:>8}"
            f"{r.mean_nll:>9.4f}{r.perplexity:>10.3f}{d:>+9.3f}{pct:>+8.2f}%{r.seconds:>9.1f}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------- CLI

def cmd_ppl(args: argparse.Namespace) -> int:
    """``tokenmill eval ppl``: print the table, optionally write JSON."""
    variants = [(spec, parse_overrides(spec)) for spec in args.compare]  # fail before loading
    make_windows(max(args.context_len, 2), args.context_len, args.stride)  # validate early
    if args.num_tokens is not None and args.num_tokens < 2:
        raise ValueError(f"--num-tokens must be at least 2, got {args.num_tokens}")
    base = EngineArgs.from_cli(args)
    text = load_text(args.text)
    source = args.text or f"bundled {BUNDLED_TEXT}"

    def report(r: PerplexityResult) -> None:
        print(f"{r.label}: {r.num_tokens} tokens in {r.num_windows} windows, "
              f"PPL {r.perplexity:.3f} ({r.seconds:.1f}s, load {r.load_seconds:.1f}s)",
              flush=True)

    results = evaluate_configs(base, variants, text, args.context_len, args.stride,
                               args.num_tokens, use_tqdm=args.progress, on_result=report)
    print()
    stride = args.stride or args.context_len
    print(f"text: {source}; context {args.context_len}, stride {stride}"
          + (f", first {args.num_tokens} tokens" if args.num_tokens else ""))
    print(format_table(results))
    if args.result_json:
        payload = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": platform.platform(),
            "text": source,
            "context_len": args.context_len,
            "stride": stride,
            "num_tokens_limit": args.num_tokens,
            "engine_args": dataclasses.asdict(base),
            "results": [r.to_dict() for r in results],
        }
        with open(args.result_json, "w") as f:
            json.dump(payload, f, indent=2, default=str)
    return 0


def add_cli(eval_subparsers: argparse._SubParsersAction) -> None:
    """Register ``ppl`` under ``tokenmill eval``."""
    p = eval_subparsers.add_parser(
        "ppl", help="perplexity through the engine on a bundled public-domain text",
        description="Perplexity of the engine on a fixed text; --compare runs engine "
                    "variants (e.g. dtype=bfloat16) one after another and prints the deltas.",
    )
    p.add_argument("--text", default=None,
                   help=f"UTF-8 text file to score (default: the bundled {BUNDLED_TEXT})")
    p.add_argument("--context-len", type=int, default=DEFAULT_CONTEXT_LEN,
                   help="tokens per window (default %(default)s)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: context-len, no overlap); "
                        "smaller strides score each token with more context")
    p.add_argument("--num-tokens", type=int, default=None,
                   help="use only the first N tokens of the text (quick runs)")
    p.add_argument("--compare", action="append", default=[], metavar="FIELD=VALUE[,...]",
                   help="an engine variant: EngineArgs overrides of the baseline, e.g. "
                        "'dtype=bfloat16'; repeat for more variants")
    p.add_argument("--progress", action="store_true", help="show a progress bar per engine")
    p.add_argument("--result-json", default=None, help="write settings and results here")
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=cmd_ppl)
