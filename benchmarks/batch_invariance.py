"""What ``--batch-invariant`` buys and costs: the same greedy requests alone and batched,
with the default engine and with ``batch_invariant=True``, side by side.

    python benchmarks/batch_invariance.py [--model PATH] [--streams 32] [--alone 6]

For each setting: prompt throughput (``--streams`` random 128-token prompts, one token
out, best of 3), decode-heavy throughput (``--streams`` requests of 32 prompt tokens and
96 greedy tokens, EOS ignored), and for how many of the first ``--alone`` of those
requests the tokens run alone equal the tokens in the batch. Runs the bundled SmolLM2
model (its own int4 weights on CPUs with the integer kernels) unless --model. Each
setting runs in its own engine, one after the other, in this process.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.llm import LLM  # noqa: E402
from tokenmill.sampling import SamplingParams  # noqa: E402


def measure(args: argparse.Namespace, batch_invariant: bool) -> dict[str, float]:
    llm = LLM(args.model, num_threads=args.num_threads, batch_invariant=batch_invariant)
    rng = random.Random(0)

    def prompts(n: int, length: int) -> list[list[int]]:
        return [[rng.randint(100, 40000) for _ in range(length)] for _ in range(n)]

    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate(prompts(4, 128), one, use_tqdm=False)  # warm-up
    best = float("inf")
    for _ in range(3):
        batch = prompts(args.streams, 128)
        t0 = time.perf_counter()
        llm.generate(batch, one, use_tqdm=False)
        best = min(best, time.perf_counter() - t0)
    greedy = SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True)
    batch = prompts(args.streams, 32)
    t0 = time.perf_counter()
    outs = llm.generate(batch, greedy, use_tqdm=False)
    decode_s = time.perf_counter() - t0
    batched = [o.outputs[0].token_ids for o in outs]
    same = sum(llm.generate([p], greedy, use_tqdm=False)[0].outputs[0].token_ids == want
               for p, want in zip(batch[:args.alone], batched[:args.alone]))
    config = f"{llm.engine.config.quantization or 'float'} weights"
    del llm
    gc.collect()
    return {"prompt": args.streams * 128 / best, "decode": args.streams * 96 / decode_s,
            "same": same, "config": config}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--alone", type=int, default=6)
    parser.add_argument("--num-threads", type=int, default=None)
    args = parser.parse_args()
    rows = {flag: measure(args, flag) for flag in (False, True)}
    print(f"\n{rows[False]['config']}, {args.streams} requests")
    print(f"{'batch_invariant':<16} {'prompt tok/s':>13} {'decode tok/s':>13} "
          f"{'alone == batched':>17}")
    for flag, r in rows.items():
        print(f"{str(flag):<16} {r['prompt']:>13,.0f} {r['decode']:>13,.0f} "
              f"{int(r['same']):>10} of {args.alone}")
    print(f"ratio (on / off) {rows[True]['prompt'] / rows[False]['prompt']:>12.2f}x "
          f"{rows[True]['decode'] / rows[False]['decode']:>12.2f}x")


if __name__ == "__main__":
    main()
