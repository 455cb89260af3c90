"""Mixture-of-experts step time: experts grouped by expert vs run token by token.

Two configs with the shapes of real MoE models, scaled down to fit a CPU run
(dummy weights, float32, vocabulary cut to 32768 so the head does not dominate):

- ``mixtral-8x7b/8``: Mixtral 8x7B's 8 experts, top-2, with hidden 4096 -> 512,
  expert width 14336 -> 1792, 32 -> 4 layers;
- ``qwen3-30b-a3b/4``: Qwen3-30B-A3B's 128 experts, top-8 (renormalised), with
  hidden 2048 -> 512, expert width 768 -> 192, 48 -> 6 layers, 32/4 -> 8/1 heads.

For each, the same engine runs decode steps at batch 1, 8 and 32 (contexts of
``--context`` tokens) and one ``--prefill``-token prefill, first with the
grouped experts (every expert multiplies all the rows routed to it at once;
the default on CPU) and then with the per-token loop (each token runs its k
experts on its own). Median step times; the last column is per-token / grouped.

    python benchmarks/moe_step_time.py [--steps 10] [--context 64] [--prefill 256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tp_step_time import decode_step_ms, prefill_ms  # noqa: E402

from tokenmill.engine.args import EngineArgs  # noqa: E402
from tokenmill.engine.llm_engine import LLMEngine  # noqa: E402
from tokenmill.model.moe import MoEBlock  # noqa: E402

VOCAB = 32768
CONFIGS = {
    "mixtral-8x7b/8": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": VOCAB,
        "hidden_size": 512, "intermediate_size": 1792, "num_local_experts": 8,
        "num_experts_per_tok": 2, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 1e6, "tie_word_embeddings": False,
    },
    "qwen3-30b-a3b/4": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": VOCAB, "hidden_size": 512, "intermediate_size": 1536,
        "moe_intermediate_size": 192, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "num_hidden_layers": 6, "num_attention_heads": 8,
        "num_key_value_heads": 1, "head_dim": 64, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False,
    },
}


def set_impl(engine: LLMEngine, impl: str) -> int:
    blocks = [m for m in engine.core.runner.model.modules() if isinstance(m, MoEBlock)]
    for block in blocks:
        block.impl = impl
    return len(blocks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cpu = os.popen("lscpu | grep 'Model name'").read().split(":")[-1].strip()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"machine: {cpu}, {os.cpu_count()} cores; {when}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in CONFIGS.items():
            path = os.path.join(tmp, name.replace("/", "_"))
            os.makedirs(path)
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump(config, f)
            # No prefix caching: every run computes its whole prompt.
            engine = LLMEngine(EngineArgs(
                model=path, load_format="dummy", dtype="float32", kv_cache_memory="512MiB",
                max_num_batched_tokens=max(args.prefill, 64), max_num_seqs=max(args.batches),
                max_model_len=2048, num_threads=args.num_threads,
                enable_prefix_caching=False))
            decode_step_ms(engine, 2, 8, 2, VOCAB)  # warm-up: kernels, allocator
            results: dict[str, list[float]] = {}
            # Interleaved rounds, best of them: the machine is shared and noisy.
            for _ in range(args.rounds):
                for impl in ("grouped", "per_token"):
                    set_impl(engine, impl)
                    times = [decode_step_ms(engine, b, args.context, args.steps, VOCAB)
                             for b in args.batches]
                    times.append(prefill_ms(engine, args.prefill, VOCAB))
                    best = results.get(impl, times)
                    results[impl] = [min(a, b) for a, b in zip(best, times, strict=True)]
                    print(f"  {name} {impl}: " + ", ".join(f"{t:.1f} ms" for t in times),
                          flush=True)
            labels = [f"decode B={b}" for b in args.batches] + [f"prefill {args.prefill}"]
            for label, grouped, per_token in zip(labels, results["grouped"],
                                                 results["per_token"], strict=True):
                rows.append((name, label, grouped, per_token))
            engine.shutdown()
    print()
    print(f"{'config':<18} {'step':<14} {'grouped ms':>11} {'per-token ms':>13} {'ratio':>6}")
    for name, label, grouped, per_token in rows:
        print(f"{name:<18} {label:<14} {grouped:>11.1f} {per_token:>13.1f} "
              f"{per_token / grouped:>5.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
