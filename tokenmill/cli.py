"""``tokenmill`` command line: serve | generate | chat | bench | eval | plan."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tokenmill.engine.args import EngineArgs


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--sample-seed", type=int, default=None,
                   help="per-request sampling seed (reproducible output)")


def _params(args: argparse.Namespace) -> SamplingParams:  # noqa: F821
    from tokenmill.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.sample_seed,
    )


def _stream(engine: LLMEngine, request_id: str, prompt: list[int], params) -> str:  # noqa: F821
    """Run one request to completion, printing text as it is produced."""
    engine.add_request(request_id, prompt, params)
    text = []
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                delta = out.outputs[0].text if out.outputs else ""
                if delta:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
                    text.append(delta)
    except KeyboardInterrupt:
        engine.abort_request(request_id)
        raise
    sys.stdout.write("\n")
    return "".join(text)


def cmd_generate(args: argparse.Namespace) -> int:
    from tokenmill.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineArgs.from_cli(args))
    tok = engine.tokenizer
    if args.raw:
        prompt = tok.encode(args.prompt)
    else:
        chat = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
        prompt = tok.encode(chat, add_special_tokens=False)
    _stream(engine, "generate-0", prompt, _params(args))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tokenmill.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineArgs.from_cli(args))
    tok = engine.tokenizer
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("tokenmill chat — empty line or Ctrl-D to quit, /reset to start over")
    turn = 0
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            return 0
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        prompt = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
        sys.stdout.write("assistant> ")
        try:
            reply = _stream(engine, f"chat-{turn}", prompt, _params(args))
        except KeyboardInterrupt:
            print()
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})
        turn += 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenmill", description="LLM inference and serving engine"
    )
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="complete one prompt, streaming to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true",
                     help="send the prompt as is (default: wrap it in the chat template)")
    EngineArgs.add_cli_args(gen)
    _sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat in the terminal")
    chat.add_argument("--system", default=None, help="system prompt")
    EngineArgs.add_cli_args(chat)
    _sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench", help="benchmarks: offline throughput, serving load")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    from tokenmill.bench import offline

    offline.add_cli(bench_sub)
    _add_subcommands("tokenmill.bench.serve", bench_sub)
    ev = sub.add_parser("eval", help="quality evaluations through the engine: perplexity")
    _add_subcommands("tokenmill.eval.ppl", ev.add_subparsers(dest="eval_command", metavar="EVAL"))
    _add_subcommands("tokenmill.server.cli", sub)
    _add_subcommands("tokenmill.cluster", sub)
    _add_subcommands("tokenmill.plan", sub)
    return parser


def _add_subcommands(module: str, subparsers: argparse._SubParsersAction) -> None:
    """Let ``module`` register its subcommand(s) through its ``add_cli``."""
    import importlib

    importlib.import_module(module).add_cli(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        if getattr(args, "accepts_extra", False):
            return int(func(args, extra) or 0)  # tokenmill cluster: the rest is for serve
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
