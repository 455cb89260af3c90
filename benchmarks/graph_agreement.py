"""Greedy tokens of CUDA-graph replay, eager Triton and eager torch, compared in float32.

The same random-weight model (float32, sharp logits) generates greedily through
four engines that differ only in how a step runs:

- ``graph``:        the Triton backend with decode CUDA graphs and async scheduling
                    (the GPU default: each decode's input token is the previous
                    step's sample, filled in on the device);
- ``graph-sync``:   the same, one step at a time (``async_scheduling=False``);
- ``eager-triton``: the Triton backend with ``enforce_eager`` (no graphs);
- ``eager-torch``:  the torch reference backend.

Prompts have different lengths (long ones included, so the decode kernel splits
the context) and requests ask for different numbers of tokens, so the decode
batch shrinks as they finish and most graph replays are *padded* (fewer
requests than their bucket). Every engine must produce identical tokens; on a
GPU the graph engine must also have replayed padded buckets.

    PYTHONPATH=. python benchmarks/graph_agreement.py --out results/   # on a GPU
    TRITON_INTERPRET=1 python benchmarks/graph_agreement.py --smoke     # on a CPU

On a CPU there are no graphs (the ``graph`` engine runs eagerly) and Triton
needs its interpreter; ``--smoke`` shrinks everything to a tiny model. Exit
status 0 when the tokens agree (and, on a GPU, padded replays happened).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

GPU_CONFIG = {  # small enough to run three times in seconds, shaped like a real model
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 4096,
    "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
SMOKE_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128,
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
ENGINES = {  # name -> (attention backend, enforce_eager, async_scheduling)
    "graph": ("triton", False, True),
    "graph-sync": ("triton", False, False),
    "eager-triton": ("triton", True, False),
    "eager-torch": ("torch", True, False),
}


@dataclass(frozen=True)
class CheckConfig:
    """What one agreement run covers."""

    model: dict
    device: str
    num_prompts: int
    prompt_len: tuple[int, int]
    max_tokens: tuple[int, int]
    max_model_len: int
    max_num_seqs: int
    block_size: int
    kv_cache_memory: int
    weight_std: float
    seed: int
    engines: tuple[str, ...]


@dataclass
class EngineRun:
    """One engine's greedy tokens and how its decode steps ran."""

    name: str
    tokens: list[list[int]]
    seconds: float
    graphs_captured: bool
    replays: int
    padded_replays: int


def workload(cfg: CheckConfig) -> tuple[list[list[int]], list[int]]:
    """Random prompts (lengths spread over ``prompt_len``) and per-request token counts."""
    rng = random.Random(cfg.seed)
    vocab = cfg.model["vocab_size"]
    low, high = cfg.prompt_len
    lengths = [low + (high - low) * i // max(cfg.num_prompts - 1, 1)
               for i in range(cfg.num_prompts)]
    rng.shuffle(lengths)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]
    max_tokens = [rng.randint(*cfg.max_tokens) for _ in prompts]
    return prompts, max_tokens


def run_engine(name: str, model_dir: str, cfg: CheckConfig, prompts: list[list[int]],
               max_tokens: list[int]) -> EngineRun:
    """Greedy generation through one engine variant."""
    from tokenmill.llm import LLM
    from tokenmill.model.loader import init_dummy_weights
    from tokenmill.sampling import SamplingParams

    backend, eager, async_scheduling = ENGINES[name]
    llm = LLM(model_dir, load_format="dummy", dtype="float32", device=cfg.device,
              attention_backend=backend, enforce_eager=eager, block_size=cfg.block_size,
              async_scheduling=async_scheduling,
              max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs,
              max_cudagraph_batch_size=cfg.max_num_seqs, kv_cache_memory=cfg.kv_cache_memory,
              seed=cfg.seed)
    runner = llm.engine.core.runner
    # Sharper logits than the loader's default (no near-ties). In place: a captured
    # graph reads the parameters at their addresses, so it sees these weights too.
    init_dummy_weights(runner.model, std=cfg.weight_std, seed=cfg.seed)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
              for n in max_tokens]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    graphs = runner.graphs
    run = EngineRun(name, [list(o.outputs[0].token_ids) for o in outs], seconds,
                    graphs is not None, graphs.num_replays if graphs else 0,
                    graphs.num_padded_replays if graphs else 0)
    del llm, runner, graphs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return run


def first_difference(a: list[list[int]], b: list[list[int]]) -> tuple[int, int] | None:
    """(request, position) of the first differing token, or None when equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            pos = next((j for j, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
            return i, pos
    return None


def check(cfg: CheckConfig) -> dict:
    """Run every engine of ``cfg`` and compare; a JSON-ready verdict."""
    prompts, max_tokens = workload(cfg)
    with tempfile.TemporaryDirectory(prefix="tokenmill-graph-check-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg.model))
        runs = [run_engine(name, tmp, cfg, prompts, max_tokens) for name in cfg.engines]
    reference = runs[-1]
    problems = []
    for run in runs[:-1]:
        diff = first_difference(run.tokens, reference.tokens)
        if diff is not None:
            problems.append(f"{run.name} differs from {reference.name} at request {diff[0]}, "
                            f"token {diff[1]}")
    on_gpu = cfg.device.startswith("cuda")
    graph = next((r for r in runs if r.name == "graph"), None)
    if on_gpu and graph is not None:
        if not graph.graphs_captured:
            problems.append("no CUDA graphs were captured on the GPU")
        elif graph.padded_replays == 0:
            problems.append("no padded graph replay happened")
    return {
        "config": asdict(cfg),
        "prompt_lens": [len(p) for p in prompts],
        "max_tokens": max_tokens,
        "runs": [asdict(r) | {"tokens": None} for r in runs],
        "tokens": {r.name: r.tokens for r in runs},
        "problems": problems,
        "passed": not problems,
    }


def format_result(result: dict) -> str:
    """The verdict of :func:`check` as a small table."""
    cfg = result["config"]
    lines = [
        f"CUDA graph vs eager Triton vs eager torch, float32, device {cfg['device']}: "
        f"{cfg['num_prompts']} prompts of {cfg['prompt_len'][0]}-{cfg['prompt_len'][1]} "
        f"tokens, {cfg['max_tokens'][0]}-{cfg['max_tokens'][1]} greedy tokens each",
        f"{'engine':<14}{'seconds':>9}{'graphs':>8}{'replays':>9}{'padded':>8}{'tokens':>8}",
    ]
    for run in result["runs"]:
        count = sum(map(len, result["tokens"][run["name"]]))
        lines.append(f"{run['name']:<14}{run['seconds']:>9.2f}"
                     f"{'yes' if run['graphs_captured'] else 'no':>8}{run['replays']:>9}"
                     f"{run['padded_replays']:>8}{count:>8}")
    lines.append("verdict: " + ("PASS (identical tokens)" if result["passed"]
                                else "FAIL: " + "; ".join(result["problems"])))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[CheckConfig, str | None]:
    """(what to check, the output directory or None) from the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-prompts", type=int, default=13, help="13: buckets 16, 8, 4, 2, 1")
    p.add_argument("--prompt-len", default="1:1900", help="MIN:MAX prompt tokens")
    p.add_argument("--max-tokens", default="4:40", help="MIN:MAX greedy tokens per request")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory", type=int, default=512 << 20, help="bytes")
    p.add_argument("--weight-std", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", default=",".join(ENGINES),
                   help="comma-separated; the last one is the reference")
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes (CPU check)")
    p.add_argument("--out", default=None, help="directory for graph_agreement.json")
    args = p.parse_args(argv)
    engines = tuple(e for e in args.engines.split(",") if e)
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        p.error(f"unknown engines {unknown}; known: {list(ENGINES)}")
    if args.smoke:
        return CheckConfig(SMOKE_CONFIG, args.device, 3, (2, 13), (2, 5), 64, 4, 4, 1 << 20,
                           0.2, args.seed, engines), args.out
    return CheckConfig(GPU_CONFIG, args.device, args.num_prompts,
                       tuple(int(x) for x in args.prompt_len.split(":")),
                       tuple(int(x) for x in args.max_tokens.split(":")),
                       args.max_model_len, args.max_num_seqs, args.block_size,
                       args.kv_cache_memory, args.weight_std, args.seed, engines), args.out


def main(argv: list[str] | None = None) -> int:
    """Run the check; exit status 0 when it passed (2: Triton cannot run here)."""
    cfg, out = parse_args(argv)
    if "triton" in {ENGINES[e][0] for e in cfg.engines} and not cfg.device.startswith("cuda") \
            and os.environ.get("TRITON_INTERPRET") != "1":
        print("Triton on a CPU needs TRITON_INTERPRET=1 (or pass --engines eager-torch)",
              file=sys.stderr)
        return 2
    result = check(cfg)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "graph_agreement.json").write_text(json.dumps(result, indent=1))
    print(format_result(result), flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
