"""The cost of grammar-constrained decoding, in one process: JSON schema vs unconstrained.

The bundled SmolLM2-135M decodes ``--batch`` sequences at once (8 = the issue's "8
concurrent streams") for ``--max-tokens`` tokens with ``ignore_eos``, alternately with a
JSON schema (the ``bench serve --workload structured`` default: longer than the run, so
both generate exactly ``max_tokens`` tokens) and without, ``--rounds`` times. Rounds
alternate which goes first, so drift on a shared machine cancels; the table gives each
round's time per output token and the median ratio. It also times the grammar's own
work per step (bitmask fill + apply + matcher advance) and one cold compile.

    python benchmarks/structured_overhead.py                # ~2-4 min on 2 CPU cores
    python benchmarks/structured_overhead.py --rounds 3 --max-tokens 32

The serving-side equivalent (HTTP, streaming, 8 clients) is
``tokenmill bench serve --workload structured --max-concurrency 8``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from tokenmill.bench.structured import default_schema
from tokenmill.llm import LLM
from tokenmill.sampling import SamplingParams
from tokenmill.sampling.params import StructuredOutputsParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--schema", default=None, help="JSON schema file (default: records)")
    args = parser.parse_args()

    llm = LLM(max_model_len=1024, kv_cache_memory="256MiB")
    schema = default_schema("overhead")
    if args.schema:
        with open(args.schema, encoding="utf-8") as handle:
            schema = json.load(handle)
    prompts = [f"Write record number {i} of the customer table as JSON." for i in
               range(args.batch)]
    constrained = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                                 structured_outputs=StructuredOutputsParams(json=schema))
    free = constrained.clone(structured_outputs=None)

    core = llm.engine.core
    compiler = core.structured.compiler
    compiler.compile(StructuredOutputsParams(regex="warm"))  # builds the vocabulary once
    before = compiler.stats.compile_seconds
    compiler.compile(constrained.structured_outputs)
    compile_ms = 1000 * (compiler.stats.compile_seconds - before)

    grammar_s = 0.0
    original = core.structured.sampling_bitmask

    def timed_bitmask(seqs):  # noqa: ANN001, ANN202 - wraps the manager's method
        nonlocal grammar_s
        start = time.perf_counter()
        result = original(seqs)
        grammar_s += time.perf_counter() - start
        return result

    core.structured.sampling_bitmask = timed_bitmask

    def tpot(params: SamplingParams) -> tuple[float, int]:
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        return elapsed / max(1, tokens / args.batch), tokens

    tpot(free)  # warm-up
    tpot(constrained)
    rows = []
    fill_s_total, steps = 0.0, 0
    for r in range(args.rounds):
        order = [("json", constrained), ("free", free)]
        if r % 2:
            order.reverse()
        times = {}
        for name, params in order:
            grammar_s = 0.0
            steps_before = core.stats().steps_total
            times[name], _ = tpot(params)
            if name == "json":
                fill_s_total += grammar_s
                steps += core.stats().steps_total - steps_before
        rows.append((times["json"], times["free"]))

    print(f"\nbatch {args.batch}, {args.max_tokens} tokens per sequence, greedy, "
          f"{args.rounds} rounds (alternating order)")
    print(f"{'round':>5} {'TPOT json (ms)':>15} {'TPOT free (ms)':>15} {'ratio':>7}")
    for i, (a, b) in enumerate(rows):
        print(f"{i:>5} {1000 * a:>15.1f} {1000 * b:>15.1f} {a / b:>6.3f}x")
    ratios = [a / b for a, b in rows]
    print(f"median TPOT ratio json/free: {statistics.median(ratios):.3f}x "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(f"bitmask fill per constrained step ({args.batch} rows): "
          f"{1000 * fill_s_total / max(1, steps):.2f} ms")
    print(f"cold compile of the schema: {compile_ms:.1f} ms")


if __name__ == "__main__":
    main()
