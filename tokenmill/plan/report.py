"""A complete plan (memory + roofline points) and its text and JSON renderings."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenmill.plan.inputs import PlanInputs
from tokenmill.plan.memory import MemoryPlan, plan_memory, window_limited_kv_bytes
from tokenmill.plan.roofline import RooflinePoint, roofline_decode, roofline_prefill
from tokenmill.plan.weights import KV_DTYPE_BYTES, KV_SCALE_BYTES, ParamCounts, count_parameters


@dataclass(frozen=True)
class Plan:
    """Everything ``tokenmill plan`` reports for one deployment."""

    inputs: PlanInputs
    origin: str  # where the model's hyper-parameters came from
    params: ParamCounts
    memory: MemoryPlan
    concurrency: tuple[tuple[int, int], ...]  # (context tokens, max concurrent sequences)
    prefill: tuple[RooflinePoint, ...]
    decode: tuple[RooflinePoint, ...]
    warnings: tuple[str, ...]

    @property
    def points(self) -> tuple[RooflinePoint, ...]:
        return self.prefill + self.decode


def make_plan(inputs: PlanInputs, prompt_lens: Sequence[int], prefill_batches: Sequence[int],
              decode_batches: Sequence[int], contexts: Sequence[int],
              origin: str = "") -> Plan:
    """Compute the memory plan and a roofline point for every requested shape."""
    memory = plan_memory(inputs)
    prefill = tuple(roofline_prefill(inputs, length, batch)
                    for length in prompt_lens for batch in prefill_batches)
    decode = tuple(roofline_decode(inputs, batch, context)
                   for context in contexts for batch in decode_batches)
    concurrency = tuple((c, memory.max_concurrent_sequences(c))
                        for c in dict.fromkeys([inputs.max_model_len, *contexts]))
    return Plan(inputs, origin, count_parameters(inputs.config), memory, concurrency,
                prefill, decode, tuple(_warnings(inputs, memory)))


def _warnings(inputs: PlanInputs, memory: MemoryPlan) -> list[str]:
    notes = []
    if not memory.weights_fit:
        notes.append(
            f"weights ({fmt_bytes(memory.weight_bytes_per_gpu)} per GPU) and the reserve "
            f"({fmt_bytes(memory.reserve_bytes)}) do not fit in "
            f"{fmt_bytes(memory.usable_bytes)}: raise --tp, use a smaller --dtype or a "
            "larger GPU")
    elif not memory.full_sequence_fits:
        notes.append(
            f"one {memory.max_model_len}-token sequence needs "
            f"{fmt_bytes(memory.kv_bytes_per_sequence)} of KV cache but only "
            f"{memory.kv_tokens} tokens fit: lower --max-model-len to {memory.kv_tokens} or less")
    if inputs.max_model_len > inputs.config.max_position_embeddings:
        notes.append(f"--max-model-len {inputs.max_model_len} exceeds the model's "
                     f"max_position_embeddings ({inputs.config.max_position_embeddings})")
    return notes


# ---------------------------------------------------------------- JSON


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """A JSON-serialisable dictionary of the plan (numbers in bytes, FLOPs, seconds)."""
    inputs, gpu = plan.inputs, plan.inputs.gpu
    return {
        "model": {
            "name": inputs.model_name,
            "origin": plan.origin,
            "parameters": plan.params.total,
            "parameter_counts": dataclasses.asdict(plan.params),
            "config": inputs.config.to_hf_dict(),
        },
        "gpu": {**dataclasses.asdict(gpu), "memory_bytes": gpu.memory_bytes,
                "bandwidth_bytes_per_s": gpu.bandwidth, "peak_flops": gpu.peak_flops,
                "ridge_point": gpu.ridge_point},
        "settings": {
            "weights": inputs.weights.label,
            "kv_dtype": inputs.kv_dtype,
            "tp": inputs.tp,
            "max_model_len": inputs.max_model_len,
            "gpu_memory_utilization": inputs.gpu_memory_utilization,
            "reserve_bytes": inputs.reserve_bytes,
            "block_size": inputs.block_size,
        },
        "memory": {**dataclasses.asdict(plan.memory),
                   "weights_fit": plan.memory.weights_fit,
                   "full_sequence_fits": plan.memory.full_sequence_fits,
                   "kv_heads_per_gpu": inputs.kv_heads_per_gpu,
                   "window_limited_kv_bytes_per_sequence": window_limited_kv_bytes(
                       inputs.config, inputs.kv_dtype_bytes, inputs.max_model_len, inputs.tp)},
        "concurrency": [{"context": c, "max_sequences": n} for c, n in plan.concurrency],
        "roofline": {"prefill": [dataclasses.asdict(p) for p in plan.prefill],
                     "decode": [dataclasses.asdict(p) for p in plan.decode]},
        "warnings": list(plan.warnings),
    }


# ---------------------------------------------------------------- text


def fmt_bytes(n: float) -> str:
    """Bytes in binary units: ``12.55 GiB``, ``512.0 KiB``."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit in ("TiB", "GiB") else f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _si(n: float, unit: str) -> str:
    for prefix, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}"


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def _fmt_count(n: int) -> str:
    for word, size in (("billion", 1e9), ("million", 1e6), ("thousand", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {word} ({n:,})"
    return f"{n:,}"


def _fmt_rate(n: float) -> str:
    return f"{n:,.0f}" if n >= 100 else f"{n:.3g}"


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None,
                 align: str | None = None, indent: str = "  ") -> str:
    """Align columns; ``align`` has one "l" or "r" per column (default: "l" then all "r")."""
    all_rows = [header, *rows] if header is not None else list(rows)
    columns = len(all_rows[0])
    align = align or "l" + "r" * (columns - 1)
    widths = [max(len(str(row[i])) for row in all_rows) for i in range(columns)]

    def line(row: Sequence[str]) -> str:
        cells = [str(cell).ljust(w) if a == "l" else str(cell).rjust(w)
                 for cell, w, a in zip(row, widths, align, strict=True)]
        return (indent + "  ".join(cells)).rstrip()

    return "\n".join(line(row) for row in all_rows)


def _window_rows(inputs: PlanInputs, memory: MemoryPlan) -> list[tuple[str, str]]:
    """For models mixing sliding and global layers: what per-layer pools would hold."""
    if not memory.sliding_layers or memory.kv_window is not None:
        return []
    limited = window_limited_kv_bytes(inputs.config, inputs.kv_dtype_bytes,
                                      inputs.max_model_len, inputs.tp)
    return [("window-limited KV", f"{fmt_bytes(limited)} per sequence if each sliding layer "
                                  "kept only its window; tokenmill keeps one pool for all "
                                  "layers and releases a block only outside every window")]


def format_plan(plan: Plan) -> str:
    """The human-readable report ``tokenmill plan`` prints."""
    inputs, memory, cfg, gpu = plan.inputs, plan.memory, plan.inputs.config, plan.inputs.gpu
    gpus = f"{inputs.tp} x {gpu.name}"
    out = [f"tokenmill plan: {inputs.model_name} on {gpus}"]
    if plan.origin:
        out.append(f"  model from {plan.origin}")
    out.append(f"  weights {inputs.weights.label}, KV cache {inputs.kv_dtype}, "
               f"tensor parallel {inputs.tp}, max-model-len {inputs.max_model_len}")
    out.append("")

    out.append("Model")
    model_rows = [
        ("parameters", _fmt_count(plan.params.total)),
        ("shape", f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                  f"{cfg.num_attention_heads} heads, {cfg.num_key_value_heads} KV heads "
                  f"x {cfg.head_dim}, vocab {cfg.vocab_size}"),
        ("weight bytes", f"{fmt_bytes(memory.weight_bytes_total)} total, "
                         f"{fmt_bytes(memory.weight_bytes_per_gpu)} per GPU"),
    ]
    if cfg.is_moe:
        active = plan.params.total - plan.params.experts + plan.params.experts_active
        model_rows.append(("experts", f"{cfg.num_experts} per MoE layer, "
                                      f"{cfg.num_experts_per_tok} per token: "
                                      f"{_fmt_count(active)} parameters active per token"))
    if memory.sliding_layers:
        model_rows.append(("sliding window", f"{memory.sliding_layers} of "
                                             f"{cfg.num_hidden_layers} layers attend to the "
                                             f"last {memory.sliding_window:,} tokens"))
    out.append(format_table(model_rows, align="ll"))
    out.append("")

    row = f"{cfg.head_dim} x {KV_DTYPE_BYTES[inputs.kv_dtype]:g} B"
    if inputs.kv_dtype in KV_SCALE_BYTES:
        row = f"({row} + {KV_SCALE_BYTES[inputs.kv_dtype]} B scale)"
    kv_formula = (f"2 x {cfg.num_hidden_layers} layers x {inputs.kv_heads_per_gpu} KV heads "
                  f"x {row}")
    seqs = ", ".join(f"{n:,} at {c:,} tokens" for c, n in plan.concurrency)
    out.append(f"Memory per GPU ({gpu.name}, utilization {inputs.gpu_memory_utilization:g})")
    out.append(format_table([
        ("usable memory", f"{fmt_bytes(memory.usable_bytes)} of "
                          f"{fmt_bytes(memory.gpu_memory_bytes)}"),
        ("- weights", fmt_bytes(memory.weight_bytes_per_gpu)),
        ("- reserve", f"{fmt_bytes(memory.reserve_bytes)} (activations, CUDA context)"),
        ("= KV-cache budget", fmt_bytes(memory.kv_budget_bytes)),
        ("KV bytes per token", f"{fmt_bytes(memory.kv_bytes_per_token)} "
                               f"({memory.kv_bytes_per_token:,.0f} B = {kv_formula})"),
        ("KV per sequence", f"{fmt_bytes(memory.kv_bytes_per_sequence)} at "
                            f"{memory.max_model_len:,} tokens" + (
                                f" (every layer slides: blocks behind the "
                                f"{memory.kv_window:,}-token window are released)"
                                if memory.kv_window is not None else "")),
        *_window_rows(inputs, memory),
        ("KV tokens that fit", f"{memory.kv_tokens:,} ({memory.kv_blocks:,} blocks of "
                               f"{memory.block_size})"),
        ("max concurrent seqs", seqs),
    ], align="ll"))
    out.append("")

    out.append(f"Roofline per GPU: {gpu.tflops:g} TFLOP/s, {gpu.bandwidth_tbs:g} TB/s, "
               f"ridge point {gpu.ridge_point:.1f} FLOP/byte (lower-bound step times)")
    header = ("step", "tokens", "FLOPs", "bytes", "FLOP/B", "bound", "compute", "memory",
              "step time", "tokens/s", "fits")
    rows = [(p.label, f"{p.tokens:,}", _si(p.flops, "").strip(), fmt_bytes(p.bytes),
             f"{p.intensity:.1f}", p.bound, fmt_time(p.compute_time_s),
             fmt_time(p.memory_time_s), fmt_time(p.step_time_s), _fmt_rate(p.tokens_per_s),
             "yes" if p.fits else "no")
            for p in plan.points]
    out.append(format_table(rows, header))
    if plan.warnings:
        out.append("")
        out.extend(f"warning: {w}" for w in plan.warnings)
    return "\n".join(out)

