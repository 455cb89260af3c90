"""Speculative decoding on the bundled SmolLM2-135M: off vs n-gram vs draft (self).

Two workloads, both greedy, built with the model's chat template:

- extractive: ask the model to repeat a given passage (most of the answer
  is in the prompt: the n-gram proposer's best case);
- free: open questions (little to copy).

Each runs with speculation off, ``ngram`` and ``draft`` (the model drafting
for itself: every draft is right, so it shows the cost of the extra passes
more than a real small-draft gain). Greedy output is identical in every mode;
the table says whether it was. All engines live in one process and run the
same prompts back to back, so the ratio column compares like with like on a
noisy machine.

    python benchmarks/spec_decode.py                 # ~3-5 min on 2 CPU cores
    python benchmarks/spec_decode.py --num-prompts 2 --max-tokens 32
    python benchmarks/spec_decode.py --write-jsonl extractive.jsonl --num-prompts 8

``--write-jsonl`` only writes the extractive prompts as chat messages for
``tokenmill bench serve --workload jsonl`` (``benchmarks/side_by_side.sh`` serves
them with and without speculation, beside the peers).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

from tokenmill.llm import LLM
from tokenmill.model.loader import default_model_path
from tokenmill.sampling import SamplingParams

PASSAGES = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the "
    "wick, polished the great lens, and watched the ships pass safely beyond the rocks. In "
    "winter the storms were fierce, but the light never once went out.",
    "The train left the station at seven o'clock. It crossed the river, passed the old mill "
    "and the quiet farms, and reached the city just before noon. The passengers stepped out "
    "into the bright, noisy square.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon "
    "dioxide to make glucose and oxygen. It takes place mainly in the leaves, inside small "
    "structures called chloroplasts.",
    "Every morning the baker rose before the sun. She mixed flour, water and salt, kneaded "
    "the dough until it was smooth, and left it to rise while the oven warmed.",
]
INSTRUCTIONS = [
    "Repeat this text exactly:\n\n{}",
    "Repeat the following passage word for word:\n\n{}",
]
QUESTIONS = [
    "Write a short story about a robot who learns to paint.",
    "Give me three tips for staying focused while studying.",
    "Explain why the sky is blue to a ten-year-old.",
    "What are the benefits of regular exercise?",
]
MODES = ("off", "ngram", "draft")


def chat_prompts(llm: LLM, texts: list[str]) -> list[list[int]]:
    tok = llm.tokenizer
    return [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": t}]),
                   add_special_tokens=False)
        for t in texts
    ]


def extractive_texts(n: int) -> list[str]:
    """Requests whose answer is mostly in the prompt: repeat a given passage."""
    return [INSTRUCTIONS[i % len(INSTRUCTIONS)].format(PASSAGES[i % len(PASSAGES)])
            for i in range(n)]


def write_jsonl(path: str, n: int, max_tokens: int) -> None:
    """Extractive requests as chat messages, one JSON object per line; the first
    ``len(PASSAGES) * len(INSTRUCTIONS)`` are all different (no prefix-cache hits)."""
    texts = [INSTRUCTIONS[(i // len(PASSAGES)) % len(INSTRUCTIONS)].format(
        PASSAGES[i % len(PASSAGES)]) for i in range(n)]
    lines = [json.dumps({"messages": [{"role": "user", "content": text}],
                         "max_tokens": max_tokens})
             for text in texts]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def workloads(llm: LLM, n: int) -> dict[str, list[list[int]]]:
    extractive = extractive_texts(n)
    free = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    return {"extractive": chat_prompts(llm, extractive), "free": chat_prompts(llm, free)}


def make_llm(mode: str, args: argparse.Namespace) -> LLM:
    spec = {}
    if mode == "ngram":
        spec = dict(speculative_method="ngram")
    elif mode == "draft":
        spec = dict(speculative_method="draft", speculative_model=default_model_path(),
                    speculative_quantization=args.draft_quantization)
    if mode != "off":
        spec["num_speculative_tokens"] = args.num_speculative_tokens
    return LLM(max_model_len=1024, kv_cache_memory="128MiB", num_threads=args.num_threads,
               max_num_seqs=args.max_num_seqs, quantization=args.quantization, **spec)


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams, repeats: int = 1) -> dict:
    """Generate ``repeats`` times; the fastest run's time counts (the least disturbed)."""
    before = llm.engine.stats()
    elapsed = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = min(elapsed, time.perf_counter() - t0)
    after = llm.engine.stats()
    drafts = after.spec_draft_tokens_total - before.spec_draft_tokens_total
    accepted = after.spec_accepted_tokens_total - before.spec_accepted_tokens_total
    verifications = after.spec_verifications_total - before.spec_verifications_total
    tokens = [o.outputs[0].token_ids for o in outs]
    return {
        "tokens": tokens,
        "tok_s": sum(map(len, tokens)) / elapsed,
        "acceptance": accepted / drafts if drafts else None,
        "per_step": accepted / verifications if verifications else None,
        "steps": (after.steps_total - before.steps_total) // repeats,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=3, help="prompts per workload")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per prompt")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--max-num-seqs", type=int, default=1,
                   help="batch size (default 1: the latency case speculation is for)")
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--quantization", default=None, choices=["int4", "int8"],
                   help="the target's weight quantization (default: float32)")
    p.add_argument("--draft-quantization", default=None, choices=["int4", "int8"],
                   help="the self-draft's weight quantization, e.g. int4 under a float32 "
                        "target (default: same weights as the target: float32)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per cell; the fastest counts (prefix-cache hits after the first "
                        "only skip prefill, which this table does not time separately)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of "
                   + ", ".join(MODES))
    p.add_argument("--write-jsonl", default=None, metavar="PATH",
                   help="only write the extractive prompts (chat messages, --num-prompts of "
                        "them, --max-tokens each) to PATH for `tokenmill bench serve`")
    args = p.parse_args()
    if args.write_jsonl:
        write_jsonl(args.write_jsonl, args.num_prompts, args.max_tokens)
        return
    modes = [m for m in args.modes.split(",") if m]
    if "off" not in modes:
        modes.insert(0, "off")  # the reference for speed-up and identity
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)

    results: dict[tuple[str, str], dict] = {}
    prompts = None
    for mode in modes:
        llm = make_llm(mode, args)
        prompts = prompts or workloads(llm, args.num_prompts)
        run(llm, [prompts["free"][0][:16]], SamplingParams(max_tokens=4, temperature=0.0))
        for name, batch in prompts.items():
            results[(name, mode)] = run(llm, batch, params, args.repeats)
        del llm
        gc.collect()

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    print(f"\nSmolLM2-135M, {args.num_prompts} prompts x {args.max_tokens} tokens, greedy, "
          f"k={args.num_speculative_tokens}, batch {args.max_num_seqs}, "
          f"{args.num_threads} threads, best of {args.repeats}, target "
          f"{args.quantization or 'float32'}, draft {args.draft_quantization or 'float32'}")
    header = (f"{'workload':<11} {'mode':<6} {'out tok/s':>9} {'accept':>7} "
              f"{'acc/step':>8} {'steps':>6} {'speed-up':>8} {'same out':>8}")
    print(header)
    print("-" * len(header))
    for name in prompts or {}:
        ref = results[(name, "off")]
        for mode in modes:
            r = results[(name, mode)]
            print(f"{name:<11} {mode:<6} {r['tok_s']:>9.1f} {fmt(r['acceptance'], '.0%'):>7} "
                  f"{fmt(r['per_step'], '.2f'):>8} {r['steps']:>6} "
                  f"{r['tok_s'] / ref['tok_s']:>7.2f}x {str(r['tokens'] == ref['tokens']):>8}")
    print("\naccept = accepted / proposed drafts; acc/step = accepted drafts per verifying "
          "step (each also adds one target token); speed-up = output tok/s vs off.")


if __name__ == "__main__":
    main()
