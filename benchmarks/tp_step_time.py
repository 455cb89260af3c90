"""Step time by tensor-parallel size: what the collectives cost.

For each ``--tp`` value the same model runs the same workload: a decode step at
batch 1 and at batch ``--batch`` (contexts of ``--context`` tokens) and one
``--prefill``-token prefill step. Per-step times are medians over ``--steps``
steps; the last column is the ratio to TP = 1.

On a CPU the ranks share the machine's cores (each gets cores / tp threads), so
tensor parallelism cannot make a step faster there: the table shows the price
of two all-reduces per layer plus the logits gather over gloo. On GPUs each
rank has its own device and memory bandwidth, which is where TP pays.

    python benchmarks/tp_step_time.py                       # SmolLM2 (9 heads): tp 1, 3
    python benchmarks/tp_step_time.py --model DIR --load-format dummy --tp 1 2 4
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

from tokenmill.engine.args import EngineArgs
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.sampling import SamplingParams


def decode_step_ms(engine: LLMEngine, batch: int, context: int, steps: int,
                   vocab: int) -> float:
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        engine.add_request(rid, [(7 * i + j) % (vocab - 200) + 100 for j in range(context)],
                           params)
    produced = dict.fromkeys(ids, 0)
    while min(produced.values()) < 2:  # everyone past its prefill
        for out in engine.step():
            produced[out.request_id] += sum(len(c.token_ids) for c in out.outputs)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    for rid in ids:
        engine.abort_request(rid)
    return 1000 * statistics.median(times)


def prefill_ms(engine: LLMEngine, tokens: int, vocab: int, reps: int = 3) -> float:
    times = []
    for r in range(reps):
        engine.add_request(f"p{r}", [(13 * j + r) % (vocab - 200) + 100 for j in range(tokens)],
                           SamplingParams(max_tokens=1, temperature=0.0))
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    args, flags = parser.parse_known_args()
    engine_parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(engine_parser)
    base = EngineArgs.from_cli(engine_parser.parse_args(flags))
    cpu = os.popen("lscpu | grep 'Model name'").read().split(":")[-1].strip()
    print(f"machine: {cpu}, {os.cpu_count()} cores; model: {base.model or 'bundled SmolLM2'}",
          flush=True)
    rows = []
    for tp in args.tp:
        engine = LLMEngine(EngineArgs(**{**base.__dict__, "tensor_parallel_size": tp,
                                         "max_model_len": base.max_model_len or 2048}))
        vocab = engine.model_config.vocab_size
        try:
            rows.append((tp, decode_step_ms(engine, 1, args.context, args.steps, vocab),
                         decode_step_ms(engine, args.batch, args.context, args.steps, vocab),
                         prefill_ms(engine, args.prefill, vocab)))
        finally:
            engine.shutdown()
            del engine
            gc.collect()
        print(f"tp {tp} done", flush=True)
    base_row = rows[0]
    print(f"\n{'tp':>3} {'decode b=1 ms':>14} {'decode b=' + str(args.batch) + ' ms':>14} "
          f"{'prefill ' + str(args.prefill) + ' ms':>16} {'vs tp ' + str(base_row[0]):>10}")
    for tp, d1, db, pf in rows:
        print(f"{tp:>3} {d1:14.1f} {db:14.1f} {pf:16.1f} "
              f"{d1 / base_row[1]:9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
