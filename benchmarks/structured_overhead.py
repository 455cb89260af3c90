"""The cost of grammar-constrained decoding, in one process: JSON schema vs unconstrained.

The bundled SmolLM2-135M decodes ``--batch`` sequences at once (8 = the issue's "8
concurrent streams") for ``--max-tokens`` tokens with ``ignore_eos``, alternately with a
JSON schema (the ``bench serve --workload structured`` default: longer than the run, so
both generate exactly ``max_tokens`` tokens) and without, ``--rounds`` times. Rounds
alternate which goes first, so drift on a shared machine cancels; the table gives each
round's time per output token (wall clock, and CPU time of the process, which a busy
shared machine inflates less) and the median ratios. It also times the grammar's own
work per step (bitmask fill, mask + bias applied to the logits, matcher advance) and
one cold compile.

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
from tokenmill.sampling import sampler as sampler_module
from tokenmill.sampling.grammar import SequenceGrammar
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

    parts = {"fill": 0.0, "apply": 0.0, "accept": 0.0}
    timing = [False]

    def timed(name, fn):  # noqa: ANN001, ANN202 - wraps a grammar step to time it
        def wrapper(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if timing[0]:
                    parts[name] += time.perf_counter() - start
        return wrapper

    core.structured.sampling_bitmask = timed("fill", core.structured.sampling_bitmask)
    sampler_module.constrained_logits = timed("apply", sampler_module.constrained_logits)
    SequenceGrammar.accept = timed("accept", SequenceGrammar.accept)

    def tpot(params: SamplingParams) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        per_seq = max(1.0, sum(len(o.outputs[0].token_ids) for o in outs) / args.batch)
        return wall / per_seq, cpu / per_seq

    tpot(free)  # warm-up
    tpot(constrained)
    rows = []
    steps = 0
    for r in range(args.rounds):
        order = [("json", constrained), ("free", free)]
        if r % 2:
            order.reverse()
        times = {}
        for name, params in order:
            timing[0] = name == "json"
            steps_before = core.stats().steps_total
            times[name] = tpot(params)
            if name == "json":
                steps += core.stats().steps_total - steps_before
        timing[0] = False
        rows.append((times["json"], times["free"]))

    print(f"\nbatch {args.batch}, {args.max_tokens} tokens per sequence, greedy, "
          f"{args.rounds} rounds (alternating order)")
    print(f"{'round':>5} {'TPOT json':>10} {'TPOT free':>10} {'ratio':>7}"
          f" {'CPU/tok json':>13} {'CPU/tok free':>13} {'ratio':>7}   (ms)")
    for i, ((wa, ca), (wb, cb)) in enumerate(rows):
        print(f"{i:>5} {1000 * wa:>10.1f} {1000 * wb:>10.1f} {wa / wb:>6.3f}x"
              f" {1000 * ca:>13.1f} {1000 * cb:>13.1f} {ca / cb:>6.3f}x")
    wall = [a[0] / b[0] for a, b in rows]
    cpu = [a[1] / b[1] for a, b in rows]
    print(f"median TPOT ratio json/free: wall {statistics.median(wall):.3f}x "
          f"(min {min(wall):.3f}, max {max(wall):.3f}); CPU time "
          f"{statistics.median(cpu):.3f}x (min {min(cpu):.3f}, max {max(cpu):.3f})")
    per_step = {k: 1000 * v / max(1, steps) for k, v in parts.items()}
    step_ms = 1000 * statistics.median(b[0] for _, b in rows)
    print(f"grammar work per constrained step ({args.batch} rows): fill "
          f"{per_step['fill']:.2f} ms, mask+bias on logits {per_step['apply']:.2f} ms, "
          f"matcher advance {per_step['accept']:.2f} ms; total "
          f"{sum(per_step.values()):.2f} ms = {sum(per_step.values()) / step_ms:.1%} of a "
          f"median unconstrained step ({step_ms:.1f} ms)")
    print(f"cold compile of the schema: {compile_ms:.1f} ms")


if __name__ == "__main__":
    main()
