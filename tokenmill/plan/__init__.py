"""Capacity planner: what fits on a GPU, and whether a step is memory- or compute-bound.

Library use::

    from tokenmill.plan import build_inputs, plan_memory, roofline_decode
    inputs = build_inputs("llama-3.1-8b", "H100-SXM", dtype="bf16")
    plan_memory(inputs).max_concurrent_sequences(4096)
    roofline_decode(inputs, batch=64, context=2048).step_time_s

The ``tokenmill plan`` command (``add_cli``/``main``) prints the same numbers.
"""

from tokenmill.plan.catalog import KNOWN_MODELS
from tokenmill.plan.cli import add_cli, main
from tokenmill.plan.hardware import GPUS, GPUSpec, get_gpu
from tokenmill.plan.inputs import PlanInputs, build_inputs, kv_heads_per_gpu
from tokenmill.plan.memory import MemoryPlan, kv_bytes_per_token, plan_memory
from tokenmill.plan.plot import plot_roofline
from tokenmill.plan.report import Plan, format_plan, make_plan, plan_to_dict
from tokenmill.plan.roofline import (
    RooflinePoint,
    attention_flops,
    linear_layer_roofline,
    roofline_decode,
    roofline_point,
    roofline_prefill,
)
from tokenmill.plan.sources import ModelSource, load_gguf_source, load_model_source
from tokenmill.plan.weights import (
    KV_DTYPE_BYTES,
    WEIGHT_DTYPE_BYTES,
    ParamCounts,
    WeightBytes,
    count_parameters,
    weight_bytes_for_dtype,
)

__all__ = [
    "GPUS", "KNOWN_MODELS", "KV_DTYPE_BYTES", "WEIGHT_DTYPE_BYTES",
    "GPUSpec", "MemoryPlan", "ModelSource", "ParamCounts", "Plan", "PlanInputs",
    "RooflinePoint", "WeightBytes",
    "add_cli", "attention_flops", "build_inputs", "count_parameters", "format_plan",
    "get_gpu", "kv_bytes_per_token", "kv_heads_per_gpu", "linear_layer_roofline",
    "load_gguf_source", "load_model_source", "main", "make_plan", "plan_memory",
    "plan_to_dict", "plot_roofline", "roofline_decode", "roofline_point", "roofline_prefill",
    "weight_bytes_for_dtype",
]
