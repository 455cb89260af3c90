"""The ``tokenmill plan`` subcommand: arguments, and printing a plan as text or JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from tokenmill.plan.catalog import KNOWN_MODELS
from tokenmill.plan.hardware import GIB, GPUS, GPUSpec, get_gpu
from tokenmill.plan.inputs import DEFAULT_BLOCK_SIZE, build_inputs
from tokenmill.plan.plot import plot_roofline
from tokenmill.plan.report import format_plan, format_table, make_plan, plan_to_dict
from tokenmill.plan.sources import load_model_source
from tokenmill.plan.weights import KV_DTYPE_BYTES, WEIGHT_DTYPE_BYTES, normalize_dtype

DEFAULT_GPU = "H100-SXM"
DEFAULT_PROMPT_LENS = (512, 2048)
DEFAULT_DECODE_BATCHES = (1, 8, 32, 128)
DEFAULT_CONTEXT = 2048

_DESCRIPTION = """\
Capacity planner: weight bytes, KV-cache bytes per token, how many tokens and
concurrent sequences fit, and a roofline (memory- or compute-bound, lower-bound
step time) for prefill and decode on a GPU. Numbers are per GPU."""


def _int_list(text: str) -> list[int]:
    """Parse ``"1,8,32"`` (and single values) into positive ints."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _dtype_arg(table: dict[str, float], what: str):  # noqa: ANN202 - an argparse type
    """Accept every spelling `tokenmill serve --dtype` accepts (float16, fp16, half...)."""

    def parse(value: str) -> str:
        try:
            return normalize_dtype(value, table, what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _configure(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model and hardware")
    model.add_argument("--model", help="HF model directory, config.json, GGUF file, or a "
                       f"known name ({', '.join(KNOWN_MODELS)})")
    model.add_argument("--gpu", help=f"GPU name (default {DEFAULT_GPU}; see --list)")
    model.add_argument("--gpu-memory-gb", type=float, help="custom GPU memory in GiB")
    model.add_argument("--gpu-bandwidth-tbs", type=float, help="custom memory bandwidth, TB/s")
    model.add_argument("--gpu-tflops", type=float, help="custom dense 16-bit TFLOP/s")
    model.add_argument("--dtype", type=_dtype_arg(WEIGHT_DTYPE_BYTES, "weight"),
                       help="weight dtype: fp32|float32, bf16|bfloat16, fp16|float16|half, "
                            "int8, int4 (default: bf16; a GGUF's own tensor sizes)")
    model.add_argument("--kv-dtype", type=_dtype_arg(KV_DTYPE_BYTES, "KV"),
                       help="KV-cache dtype: fp32, bf16, fp16, fp8, int8 (any spelling above; "
                            "default: --dtype if it is one of these, else fp16)")
    model.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs (default 1)")

    memory = parser.add_argument_group("memory")
    memory.add_argument("--max-model-len", type=int,
                        help="longest sequence (default: the model's max_position_embeddings)")
    memory.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of GPU memory the engine may use (default 0.9)")
    memory.add_argument("--reserve-gb", type=float, default=1.0,
                        help="GiB per GPU kept for activations and runtime (default 1)")
    memory.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                        help=f"KV-cache block size in tokens (default {DEFAULT_BLOCK_SIZE})")

    shapes = parser.add_argument_group("roofline shapes (lists: 1,8,32 or 1 8 32)")
    shapes.add_argument("--prompt-len", type=_int_list, nargs="+",
                        help=f"prefill prompt lengths (default {_show(DEFAULT_PROMPT_LENS)})")
    shapes.add_argument("--prefill-batch", type=_int_list, nargs="+",
                        help="prompts prefilled together (default 1)")
    shapes.add_argument("--batch", type=_int_list, nargs="+",
                        help=f"decode batch sizes (default {_show(DEFAULT_DECODE_BATCHES)})")
    shapes.add_argument("--context", type=_int_list, nargs="+",
                        help="cached tokens per sequence for decode and concurrency "
                             f"(default min({DEFAULT_CONTEXT}, max-model-len))")

    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print the plan as JSON")
    output.add_argument("--plot", metavar="PNG", help="draw the roofline to this file")
    output.add_argument("--list", action="store_true", help="list known models and GPUs")
    parser.set_defaults(func=run)


def _show(values: Sequence[int]) -> str:
    return ",".join(str(v) for v in values)


def add_cli(subparsers: Any) -> None:
    """Add the ``plan`` subcommand to a ``tokenmill`` argparse subparsers object."""
    parser = subparsers.add_parser(
        "plan", help="capacity planner: memory, max concurrency, roofline",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(parser)


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser for ``python -m tokenmill.plan``."""
    parser = argparse.ArgumentParser(prog="tokenmill plan", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tokenmill plan`` with ``argv`` (without the ``plan`` word)."""
    args = build_parser().parse_args(argv)
    return args.func(args)


def _flatten(lists: list[list[int]] | None, default: Sequence[int]) -> list[int]:
    if not lists:
        return list(default)
    return list(dict.fromkeys(v for values in lists for v in values))


def _resolve_gpu(args: argparse.Namespace) -> GPUSpec:
    custom = {"memory_gib": args.gpu_memory_gb, "bandwidth_tbs": args.gpu_bandwidth_tbs,
              "tflops": args.gpu_tflops}
    overrides = {k: v for k, v in custom.items() if v is not None}
    if args.gpu is None and overrides:
        if len(overrides) < len(custom):
            raise ValueError("a custom GPU needs --gpu-memory-gb, --gpu-bandwidth-tbs and "
                             "--gpu-tflops (or --gpu NAME to start from)")
        return GPUSpec("custom", **overrides)
    spec = get_gpu(args.gpu or DEFAULT_GPU)
    if overrides:  # e.g. a measured bandwidth instead of the datasheet one
        return dataclasses.replace(spec, name=f"{spec.name} (custom)", **overrides)
    return spec


def run(args: argparse.Namespace) -> int:
    """Entry point bound to the ``plan`` subcommand; returns the exit status."""
    if args.list:
        print(_known_tables())
        return 0
    if not args.model:
        print("error: --model is required (a directory, config.json, GGUF file or known name)",
              file=sys.stderr)
        return 2
    try:
        source = load_model_source(args.model)
        inputs = build_inputs(
            source, _resolve_gpu(args), dtype=args.dtype, kv_dtype=args.kv_dtype, tp=args.tp,
            max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization,
            reserve_bytes=int(args.reserve_gb * GIB), block_size=args.block_size)
        contexts = _flatten(args.context, [min(DEFAULT_CONTEXT, inputs.max_model_len)])
        plan = make_plan(inputs, _flatten(args.prompt_len, DEFAULT_PROMPT_LENS),
                         _flatten(args.prefill_batch, [1]),
                         _flatten(args.batch, DEFAULT_DECODE_BATCHES), contexts,
                         origin=source.origin)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan_to_dict(plan), indent=2))
    else:
        print(format_plan(plan))
    if args.plot:
        plot_roofline(plan.points, inputs.gpu, args.plot,
                      title=f"{inputs.model_name} on {inputs.tp} x {inputs.gpu.name}")
        print(f"wrote roofline plot to {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _known_tables() -> str:
    models = [(name, entry["source"]) for name, entry in KNOWN_MODELS.items()]
    gpus = [(g.name, f"{g.memory_gib:g} GiB", f"{g.bandwidth_tbs:g} TB/s",
             f"{g.tflops:g} TFLOP/s", f"{g.ridge_point:.0f} FLOP/B", g.note)
            for g in GPUS.values()]
    return "\n".join([
        "Known models (hyper-parameters from the config.json of):",
        format_table(models, align="ll"),
        "",
        "Known GPUs (dense bf16/fp16 tensor FLOP/s, datasheet bandwidth):",
        format_table(gpus, ("name", "memory", "bandwidth", "compute", "ridge", "note"),
                     align="lrrrrl"),
    ])
