"""``tokenmill bench serve``: load-test any OpenAI-compatible endpoint.

Example::

    tokenmill bench serve --base-url http://127.0.0.1:8000 --workload random \\
        --random-input-len 128 --random-output-len 128 --num-prompts 64 \\
        --sweep concurrency=1,8,32 --result-json out.json --plot out.png

    # JSON-schema output vs unconstrained, same prompts, 8 streams; prints TPOT A/B
    # and the grammar compile time:
    tokenmill bench serve --workload structured --max-concurrency 8 --num-prompts 32

See docs/bench.md for the workloads, the load options and how each metric is defined.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import secrets
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import urlparse

import httpx

from tokenmill.bench.client import ENDPOINTS, Target, fetch_model_ids
from tokenmill.bench.metrics import SLO, summarize
from tokenmill.bench.report import (
    RunResult,
    format_comparison,
    format_run,
    format_sweep,
    write_json,
)
from tokenmill.bench.runner import LoadSpec, run_load
from tokenmill.bench.structured import (
    GrammarCounters,
    format_compile_report,
    format_tpot_ratios,
    load_schema,
    structured_targets,
)
from tokenmill.bench.tokens import TokenCounter, load_token_counter
from tokenmill.bench.workloads import KINDS, WorkloadSpec, build_workload

SWEEP_KINDS = {"rate": "rate", "request-rate": "rate", "request_rate": "rate",
               "concurrency": "concurrency", "max-concurrency": "concurrency",
               "max_concurrency": "concurrency"}


def add_cli(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` under ``tokenmill bench``."""
    parser = bench_subparsers.add_parser(
        "serve", help="load-test an OpenAI-compatible server",
        description="Load-test an OpenAI-compatible server with streaming requests and "
                    "report throughput, TTFT, TPOT, ITL, end-to-end latency and goodput.")
    add_arguments(parser)
    parser.set_defaults(func=run_from_args)


def parse_rate(text: str) -> float:
    """A request rate in requests/s; ``inf`` sends everything at once."""
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r}") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError("the request rate must be positive (or inf)")
    return rate


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """``rate=1,2,inf`` or ``concurrency=1,8,32`` → (kind, values)."""
    name, sep, values = text.partition("=")
    kind = SWEEP_KINDS.get(name.strip().lower())
    if not sep or kind is None or not values.strip():
        raise argparse.ArgumentTypeError(
            f"--sweep wants rate=R1,R2,... or concurrency=C1,C2,..., got {text!r}")
    parsed: list[float] = []
    for v in values.split(","):
        if kind == "rate":
            parsed.append(parse_rate(v.strip()))
        else:
            try:
                c = int(v.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a concurrency: {v!r}") from None
            if c <= 0:
                raise argparse.ArgumentTypeError("concurrencies must be positive")
            parsed.append(c)
    return kind, parsed


def parse_json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """All options of ``bench serve``, grouped as in the docs."""
    t = parser.add_argument_group("target")
    t.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="server root, without /v1 (default: %(default)s)")
    t.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS)
    t.add_argument("--api-key", default=None,
                   help="bearer token (default: $OPENAI_API_KEY if set)")
    t.add_argument("--model", default=None,
                   help="model name to send (default: the first of GET /v1/models)")
    t.add_argument("--label", default=None, help="name of this target in tables and plots")
    t.add_argument("--extra-body", type=parse_json_object, default={},
                   help='JSON merged into every request body, e.g. \'{"min_tokens": 128}\'')
    t.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos=true (outputs may then end early)")
    t.add_argument("--temperature", type=float, default=0.0)
    t.add_argument("--request-timeout", type=float, default=3600.0,
                   help="seconds before a request counts as failed (default: %(default)s)")

    c = parser.add_argument_group("comparison target (optional: same workload, same run)")
    c.add_argument("--compare-base-url", default=None,
                   help="a second server: every load point runs there too, right after the "
                        "first, with the same prompts; a table of ratios A/B follows")
    c.add_argument("--compare-model", default=None, help="default: --model, else discovered")
    c.add_argument("--compare-api-key", default=None, help="default: --api-key")
    c.add_argument("--compare-label", default=None)
    c.add_argument("--compare-extra-body", type=parse_json_object, default=None,
                   help="extra body for the comparison target (default: --extra-body)")

    w = parser.add_argument_group("workload")
    w.add_argument("--workload", choices=KINDS, default="random")
    w.add_argument("--dataset-path", default=None, help="JSONL file for --workload jsonl")
    w.add_argument("--num-prompts", type=int, default=100,
                   help="requests per run (chat: turns in total)")
    w.add_argument("--random-input-len", type=int, default=128,
                   help="prompt tokens (chat: tokens per user turn)")
    w.add_argument("--random-output-len", type=int, default=128, help="max_tokens per request")
    w.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [L*(1-r), L*(1+r)]")
    w.add_argument("--prefix-len", type=int, default=256,
                   help="prefix/tenants workloads: shared tokens per prefix (tenant)")
    w.add_argument("--suffix-len", type=int, default=32,
                   help="prefix/tenants workloads: unique tokens after the prefix")
    w.add_argument("--num-prefixes", "--num-tenants", type=int, default=4,
                   help="prefix/tenants workloads: distinct shared prefixes (tenants; a "
                        "tenants request's tenant is drawn at random, seeded)")
    w.add_argument("--chat-turns", type=int, default=4,
                   help="chat workload: turns per conversation")
    w.add_argument("--tokenizer", default=None,
                   help="GGUF file or HF directory of the target's tokenizer: exact prompt "
                        "lengths and client-side token counts")
    w.add_argument("--count-tokens", choices=("auto", "tokenizer", "usage"), default="auto",
                   help="source of token counts; auto = tokenizer if given, else usage")
    w.add_argument("--structured-schema", default=None,
                   help="structured workload: JSON schema file (default: records longer than "
                        "the output length, so both runs generate max_tokens tokens)")
    w.add_argument("--prompt-salt", default=None,
                   help="salt of the prompt text (default: fresh each run so prompt caches "
                        "cannot hit across runs; give the salt of a past run to replay it)")

    lo = parser.add_argument_group("load")
    lo.add_argument("--request-rate", type=parse_rate, default=math.inf,
                    help="Poisson arrivals per second; inf = all at once (default)")
    lo.add_argument("--burstiness", type=float, default=1.0,
                    help="gamma shape of arrival gaps: 1 = Poisson, <1 burstier, >1 smoother")
    lo.add_argument("--max-concurrency", type=int, default=None,
                    help="most requests in flight at once (default: no cap)")
    lo.add_argument("--seed", type=int, default=0,
                    help="seeds lengths and arrival times (the load shape)")
    lo.add_argument("--sweep", type=parse_sweep, default=None,
                    help="run once per value: rate=1,2,inf or concurrency=1,8,32")
    lo.add_argument("--num-warmups", type=int, default=0,
                    help="untimed requests sent one by one to each target first")

    o = parser.add_argument_group("metrics and output")
    o.add_argument("--slo-ttft-ms", type=float, default=None)
    o.add_argument("--slo-tpot-ms", type=float, default=None)
    o.add_argument("--slo-e2e-ms", type=float, default=None)
    o.add_argument("--result-json", default=None, help="write every run and request here")
    o.add_argument("--plot", default=None, help="write a PNG of the latency distributions")
    o.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def load_points(args: argparse.Namespace) -> list[LoadSpec]:
    """The load points of this invocation: one, or one per sweep value."""
    base = LoadSpec(request_rate=args.request_rate, burstiness=args.burstiness,
                    max_concurrency=args.max_concurrency)
    if args.sweep is None:
        return [base]
    kind, values = args.sweep
    if kind == "rate":
        return [replace(base, request_rate=v) for v in values]
    return [replace(base, max_concurrency=int(v)) for v in values]


def _label(url: str, given: str | None) -> str:
    return given or urlparse(url).netloc or url


def _resolve_model(base_url: str, api_key: str | None, given: str | None) -> str:
    if given:
        return given
    ids = fetch_model_ids(base_url, api_key)
    if not ids:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model")
    return ids[0]


def build_targets(args: argparse.Namespace) -> list[Target]:
    """The main target and, with --compare-base-url, the one to compare it with."""
    api_key = args.api_key if args.api_key is not None else os.environ.get("OPENAI_API_KEY")
    targets = [Target(base_url=args.base_url, endpoint=args.endpoint,
                      model=_resolve_model(args.base_url, api_key, args.model),
                      api_key=api_key, label=_label(args.base_url, args.label),
                      extra_body=args.extra_body, ignore_eos=args.ignore_eos,
                      temperature=args.temperature, timeout_s=args.request_timeout)]
    if args.workload == "structured":
        if args.compare_base_url:
            raise ValueError("the structured workload compares a server with itself (JSON "
                             "schema vs unconstrained); --compare-base-url does not apply")
        schema = load_schema(args.structured_schema, args.prompt_salt or "")
        return structured_targets(targets[0], schema)
    if args.compare_base_url:
        key = args.compare_api_key if args.compare_api_key is not None else api_key
        extra = args.compare_extra_body if args.compare_extra_body is not None \
            else args.extra_body
        label = _label(args.compare_base_url, args.compare_label)
        if label == targets[0].label:
            label += " (B)"
        targets.append(replace(targets[0], base_url=args.compare_base_url,
                               model=_resolve_model(args.compare_base_url, key,
                                                    args.compare_model or args.model),
                               api_key=key, label=label, extra_body=extra))
    return targets


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    return WorkloadSpec(kind=args.workload, num_prompts=args.num_prompts,
                        input_len=args.random_input_len, output_len=args.random_output_len,
                        range_ratio=args.random_range_ratio, prefix_len=args.prefix_len,
                        suffix_len=args.suffix_len, num_prefixes=args.num_prefixes,
                        chat_turns=args.chat_turns, dataset_path=args.dataset_path)


def _warm_up(target: Target, spec: WorkloadSpec, args: argparse.Namespace, salt: str,
             tokens: TokenCounter | None) -> None:
    warm_spec = replace(spec, num_prompts=args.num_warmups)
    requests = build_workload(warm_spec, args.seed + 1, f"{salt}:warmup", tokens)
    run_load(target, requests, LoadSpec(max_concurrency=1), seed=args.seed, tokens=None,
             progress=not args.disable_tqdm, description=f"warm-up {target.name}")


def run_benchmark(args: argparse.Namespace) -> list[RunResult]:
    """Run every (load point × target) and print each run's table as it finishes."""
    tokens = load_token_counter(args.tokenizer) if args.tokenizer else None
    targets = build_targets(args)
    spec = workload_spec(args)
    if args.workload == "structured":
        args.grammar_before = GrammarCounters.scrape(targets[0].base_url, targets[0].api_key)
    slo = SLO(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms, e2e_ms=args.slo_e2e_ms)
    if args.num_warmups > 0:
        for target in targets:
            _warm_up(target, spec, args, args.prompt_salt, tokens)
    results: list[RunResult] = []
    for point, load in enumerate(load_points(args)):
        # Fresh text per load point (same lengths): later points get no cache hits from
        # earlier ones. Targets at the same point see the same prompts.
        requests = build_workload(spec, args.seed, f"{args.prompt_salt}:{point}", tokens)
        order = targets
        if args.workload == "structured" and point % 2:
            order = targets[::-1]  # alternate who goes first: drift on a busy machine cancels
        for target in order:
            outcome = run_load(target, requests, load, seed=args.seed, tokens=tokens,
                               count_tokens=args.count_tokens, progress=not args.disable_tqdm,
                               description=f"{target.name} {load.describe()}")
            summary = summarize(outcome.records, outcome.duration_s, slo)
            result = RunResult(target=target, load=load, workload=spec.describe(),
                               summary=summary, records=outcome.records, point=point)
            results.append(result)
            print(format_run(result), flush=True)
    return results


def comparison_pairs(results: Sequence[RunResult]) -> list[tuple[RunResult, RunResult]]:
    """(first target, second target) at each load point, when there are two targets."""
    names = list(dict.fromkeys(r.target.name for r in results))
    if len(names) < 2:
        return []
    by_point: dict[int, dict[str, RunResult]] = {}
    for r in results:
        by_point.setdefault(r.point, {})[r.target.name] = r
    return [(runs[names[0]], runs[names[1]]) for _, runs in sorted(by_point.items())
            if names[0] in runs and names[1] in runs]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def run_metadata(args: argparse.Namespace) -> dict[str, Any]:
    settings = {k: v for k, v in vars(args).items()
                if k not in ("func", "grammar_before") and "api_key" not in k}
    return {
        "tool": "tokenmill bench serve",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"host": platform.node(), "platform": platform.platform(),
                    "processor": platform.processor(), "cpus": os.cpu_count()},
        "args": _json_safe(settings),
    }


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point for the CLI: run, report, write files. Returns the exit status."""
    if args.prompt_salt is None:
        args.prompt_salt = secrets.token_hex(8)
    if args.max_concurrency is not None and args.max_concurrency <= 0:
        print("tokenmill bench serve: error: --max-concurrency must be positive", file=sys.stderr)
        return 2
    try:
        results = run_benchmark(args)
    except (RuntimeError, ValueError, OSError, httpx.HTTPError) as exc:
        print(f"tokenmill bench serve: error: {exc}", file=sys.stderr)
        return 2
    pairs = comparison_pairs(results)
    if len(results) > 1:
        print(format_sweep(results))
    for a, b in pairs:
        print(format_comparison(a, b))
    if args.workload == "structured" and results:
        target = results[0].target
        after = GrammarCounters.scrape(target.base_url, target.api_key)
        print(format_tpot_ratios(pairs))
        print(format_compile_report(args.grammar_before, after))
    if args.result_json:
        write_json(args.result_json, results, run_metadata(args), pairs)
        print(f"results written to {args.result_json}")
    if args.plot:
        from tokenmill.bench.plots import plot_results

        plot_results(results, args.plot, title=results[0].workload if results else "")
        print(f"plot written to {args.plot}")
    # Non-zero when some run got nothing through, so scripts notice a dead server.
    return 1 if any(r.summary.completed == 0 for r in results) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill bench serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bench serve`` with ``argv`` (the options after ``serve``)."""
    args = build_parser().parse_args(argv)
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
