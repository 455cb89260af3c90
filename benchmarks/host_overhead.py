"""The engine's host-side work per decode step, with the model replaced by a stand-in.

On a GPU the forward pass of a decode step takes milliseconds; everything the
engine does in Python around it (schedule, build the step's inputs, prepare
sampling, update the scheduler, build the outputs) is host time that the GPU
waits for unless it overlaps. This benchmark measures that host time alone: the
real scheduler, block manager, model runner, sampler and engine core, around a
stand-in model whose forward pass costs next to nothing (an embedding lookup and
a 64 x 256 projection; logits depend on the input token so outputs vary).

For each batch size, that many requests are prefilled, then ``--steps`` pure
decode steps are timed (median ms per step, and its split across the parts).
Both step modes are measured: one step at a time ("sync": every part of the
host's work is serial with the device's step) and async scheduling ("async":
the step is launched, then the previous step's tokens are waited for, updated
and turned into outputs; on a GPU everything but "schedule" and "runner" runs
while the device computes the step just launched, and those two overlap the
previous step's tail). On a CPU the stand-in forward is synchronous, so both
rows are host time alone; the split says what a GPU would overlap.

    python benchmarks/host_overhead.py                          # batches 1, 64, 256
    python benchmarks/host_overhead.py --save before.json       # record a baseline
    python benchmarks/host_overhead.py --baseline before.json   # print before -> after

Numbers are CPU- and load-dependent: compare runs from one sitting on one machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from tokenmill.config import SchedulerConfig  # noqa: E402
from tokenmill.engine.block_manager import BlockManager  # noqa: E402
from tokenmill.engine.core import EngineCore  # noqa: E402
from tokenmill.engine.executor import Executor  # noqa: E402
from tokenmill.engine.messages import EngineCoreRequest  # noqa: E402
from tokenmill.engine.output_processor import OutputProcessor  # noqa: E402
from tokenmill.engine.scheduler import Scheduler  # noqa: E402
from tokenmill.engine.validation import EngineLimits  # noqa: E402
from tokenmill.runner.model_runner import ModelRunner  # noqa: E402
from tokenmill.sampling import Sampler, SamplingParams  # noqa: E402

VOCAB = 256
HIDDEN = 64
BLOCK_SIZE = 16
PARTS = ("schedule", "runner", "sample", "update", "outputs")


class StandInModel(torch.nn.Module):
    """The model runner's interface at almost no compute: hidden = embedding(ids)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=g))
        self.head = torch.nn.Parameter(torch.randn(HIDDEN, VOCAB, generator=g))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: Any,
                meta: Any) -> torch.Tensor:
        return self.embed[input_ids]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.head


def build_core(max_num_seqs: int, max_model_len: int,
               async_scheduling: bool = False) -> EngineCore:
    """A real engine core (scheduler, runner, sampler) around the stand-in model."""
    num_blocks = max_num_seqs * (-(-max_model_len // BLOCK_SIZE)) + 1
    kv = torch.zeros(1, 2, num_blocks, BLOCK_SIZE, 1, 1)  # never read by the stand-in
    runner = ModelRunner(StandInModel().eval(), kv, BLOCK_SIZE)
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=max(2048, max_num_seqs), max_num_seqs=max_num_seqs,
                        max_model_len=max_model_len),
        BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=True), eos_token_ids=(2,))
    limits = EngineLimits(max_model_len, VOCAB, num_blocks, BLOCK_SIZE)
    return EngineCore(sched, Executor(runner), Sampler(torch.Generator().manual_seed(0)), limits,
                      async_scheduling=async_scheduling)


def timed(owner: Any, name: str, sink: list[float]) -> None:
    """Wrap ``owner.name`` so each call's duration is appended to ``sink``."""
    inner: Callable = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - t0)

    setattr(owner, name, wrapper)


def measure(batch: int, steps: int, prompt_len: int,
            async_scheduling: bool = False) -> dict[str, float]:
    """Median milliseconds per decode step at ``batch``, in total and per part."""
    core = build_core(batch, prompt_len + batch * prompt_len // 2048 + steps + 64,
                      async_scheduling)
    prefill_steps = -(-batch * prompt_len // core.scheduler.config.max_num_batched_tokens)
    # Nobody may finish before the timed steps end: the first requests decode while
    # the last ones are still prefilling.
    params = SamplingParams(max_tokens=prefill_steps + steps + 16, temperature=0.0,
                            ignore_eos=True)
    processor = OutputProcessor(None)  # the front end's side (token ids only: no text)
    for i in range(batch):
        prompt = [(7 * i + j) % (VOCAB - 3) + 3 for j in range(prompt_len)]
        now = time.time()
        core.add_request(EngineCoreRequest(f"r{i}", prompt, params, now))
        processor.add_request(f"r{i}", None, prompt, params, now)

    def step() -> list[Any]:  # what LLMEngine.step does
        return processor.process(core.step()).request_outputs

    while core.scheduler.waiting or any(
            s.num_computed_tokens < s.num_prompt_tokens for s in core.scheduler.running):
        step()
    for _ in range(3):  # warm-up decode steps
        step()
    parts: dict[str, list[float]] = defaultdict(list)
    timed(core.scheduler, "schedule", parts["schedule"])
    timed(core.executor, "execute", parts["runner"])
    timed(core, "_launch_sampling" if async_scheduling else "_sample_and_verify",
          parts["sample"])
    timed(core.scheduler, "update", parts["update"])
    timed(processor, "process", parts["outputs"])
    totals = []
    for _ in range(steps):
        t0 = time.perf_counter()
        outs = step()
        totals.append(time.perf_counter() - t0)
        assert len(outs) == batch and all(len(o.outputs[0].token_ids) == 1 for o in outs)
    result = {"total": 1000 * statistics.median(totals)}
    for part in PARTS:
        result[part] = 1000 * statistics.median(parts[part])
    result["other"] = max(0.0, result["total"] - sum(result[p] for p in PARTS))
    return result


def main(argv: list[str] | None = None) -> int:
    """Measure each batch size and print the table (before -> after with --baseline)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--steps", type=int, default=50, help="timed decode steps per batch")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="torch threads (host work is serial)")
    p.add_argument("--modes", default="sync,async",
                   help="step modes: sync (one step at a time), async (async scheduling)")
    p.add_argument("--save", default=None, help="write the results to this JSON file")
    p.add_argument("--baseline", default=None, help="earlier --save output: print before -> after")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else {}
    results = {}
    modes = [m for m in args.modes.split(",") if m]
    for mode in modes:
        if mode not in ("sync", "async"):
            p.error(f"unknown mode {mode!r}")
        for batch in [int(b) for b in args.batches.split(",") if b]:
            key = str(batch) if mode == "sync" else f"async:{batch}"
            results[key] = measure(batch, args.steps, args.prompt_len, mode == "async")
    columns = ("total",) + PARTS + ("other",)
    print(f"host time per decode step, ms (median of {args.steps} steps; prompt "
          f"{args.prompt_len} tokens; stand-in model)")
    print(f"{'mode':>6}{'batch':>6}" + "".join(f"{c:>16}" for c in columns) + f"{'us/seq':>10}")
    for key, row in results.items():
        mode, _, batch = key.rpartition(":")
        before = baseline.get(key)
        cells = []
        for c in columns:
            if before and c in before:
                cells.append(f"{before[c]:6.2f}->{row[c]:5.2f}".rjust(16))
            else:
                cells.append(f"{row[c]:16.2f}")
        print(f"{mode or 'sync':>6}{batch:>6}" + "".join(cells)
              + f"{1000 * row['total'] / int(batch):>10.1f}")
    if args.save:
        Path(args.save).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
