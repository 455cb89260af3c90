"""Roofline model of one forward step: FLOPs, bytes moved, and which one limits it.

A step takes at least ``max(flops / peak_flops, bytes / bandwidth)``. Its
arithmetic intensity (FLOP per byte) against the GPU's ridge point
(peak FLOP/s / bandwidth) says which term wins. Everything is per GPU.

FLOPs per step (per GPU, tensor-parallel degree ``tp``):
    matmuls:   2 x (layer matmul params / tp) x tokens
             + 2 x (vocab x hidden / tp) x sequences      (logits: one row per sequence)
    attention: 4 x layers x (heads / tp) x head_dim x (query, key) pairs
               (QK^T and PV, 2 FLOPs per multiply-add each); causal prefill of L
               tokens has L(L+1)/2 pairs, a decode token at context C has C + 1.
Bytes per step: every weight once (an untied embedding table is only gathered)
plus the KV cache read and written; activations are assumed to stay on chip.

Sliding-window layers attend to (and read the KV of) at most their window: a
decode token at context C costs min(C + 1, W) pairs in such a layer. Mixture of
experts: matmul FLOPs count the experts each token runs (``num_experts_per_tok``);
a step reads the experts its tokens touch, E x (1 - (1 - k/E)^tokens) of each
MoE layer's E under uniform routing.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.plan.hardware import GPUSpec
from tokenmill.plan.inputs import PlanInputs
from tokenmill.plan.memory import plan_memory
from tokenmill.plan.weights import count_parameters


@dataclass(frozen=True)
class RooflinePoint:
    """One operating point: a prefill step, a decode step or a single layer."""

    label: str
    phase: str  # "prefill", "decode" or "linear"
    batch: int  # sequences (rows) in the step
    seq_len: int  # prompt length for prefill, cached context for decode, 1 for a layer
    tokens: int  # tokens the step computes
    flops: float
    bytes: float
    intensity: float  # FLOP per byte
    ridge_point: float
    bound: str  # "memory" or "compute"
    compute_time_s: float  # flops / peak FLOP/s
    memory_time_s: float  # bytes / bandwidth
    step_time_s: float  # lower bound: the larger of the two
    tokens_per_s: float  # tokens computed per second (prompt tokens or generated tokens)
    fits: bool | None = None  # whether the KV cache holds the step's sequences

    @property
    def attainable_flops(self) -> float:
        """FLOP/s the roofline allows at this intensity."""
        return self.flops / self.step_time_s


def roofline_point(label: str, phase: str, batch: int, seq_len: int, tokens: int,
                   flops: float, bytes_moved: float, gpu: GPUSpec,
                   fits: bool | None = None) -> RooflinePoint:
    """Classify a step with known FLOPs and bytes on ``gpu``."""
    compute_time = flops / gpu.peak_flops
    memory_time = bytes_moved / gpu.bandwidth
    step_time = max(compute_time, memory_time)
    intensity = flops / bytes_moved
    return RooflinePoint(
        label=label, phase=phase, batch=batch, seq_len=seq_len, tokens=tokens,
        flops=flops, bytes=bytes_moved, intensity=intensity, ridge_point=gpu.ridge_point,
        bound="compute" if intensity >= gpu.ridge_point else "memory",
        compute_time_s=compute_time, memory_time_s=memory_time, step_time_s=step_time,
        tokens_per_s=tokens / step_time, fits=fits,
    )


def attention_flops(inputs: PlanInputs, query_key_pairs: float) -> float:
    """FLOPs of QK^T and PV for ``query_key_pairs`` summed over layers, per GPU.

    ``query_key_pairs`` is a layer-sum (see :func:`decode_pairs`, :func:`prefill_pairs`);
    without sliding windows it is ``layers x`` the pairs of one layer.
    """
    cfg = inputs.config
    return 4 * inputs.heads_per_gpu * cfg.head_dim * query_key_pairs


def decode_pairs(inputs: PlanInputs, context: int) -> int:
    """(query, key) pairs of one decode token at ``context``, summed over layers."""
    cfg = inputs.config
    return sum(min(context + 1, cfg.layer_window(i) or context + 1)
               for i in range(cfg.num_hidden_layers))


def prefill_pairs(inputs: PlanInputs, prompt_len: int) -> float:
    """Causal (query, key) pairs of a ``prompt_len`` prefill, summed over layers."""
    cfg = inputs.config
    total = 0.0
    for i in range(cfg.num_hidden_layers):
        w = cfg.layer_window(i)
        if w is None or w >= prompt_len:
            total += prompt_len * (prompt_len + 1) / 2
        else:  # rows 1..w see all their prefix, the rest w keys each
            total += w * (w + 1) / 2 + (prompt_len - w) * w
    return total


def _matmul_flops(inputs: PlanInputs, tokens: int, sequences: int) -> float:
    cfg = inputs.config
    params = count_parameters(cfg)
    vocab_matrix = cfg.vocab_size * cfg.hidden_size
    return 2 * (params.layer_matmul_active * tokens + vocab_matrix * sequences) / inputs.tp


def _weight_bytes_streamed(inputs: PlanInputs, tokens: int) -> float:
    """Weight bytes one step reads: all of them, less the experts no token touched."""
    streamed = inputs.weights.streamed_per_step(inputs.tp)
    cfg = inputs.config
    if cfg.is_moe and inputs.weights.experts:
        touched = 1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** tokens
        streamed -= inputs.weights.experts / inputs.tp * (1 - touched)
    return streamed


def roofline_prefill(inputs: PlanInputs, prompt_len: int, batch: int = 1) -> RooflinePoint:
    """One step that prefills ``batch`` prompts of ``prompt_len`` tokens each."""
    if prompt_len < 1 or batch < 1:
        raise ValueError("prompt length and batch must be positive")
    memory = plan_memory(inputs)
    tokens = batch * prompt_len
    flops = (_matmul_flops(inputs, tokens, batch)
             + attention_flops(inputs, batch * prefill_pairs(inputs, prompt_len)))
    kv_written = tokens * memory.kv_bytes_per_token
    bytes_moved = _weight_bytes_streamed(inputs, tokens) + kv_written
    fits = (prompt_len <= inputs.max_model_len
            and batch * memory.blocks_for(prompt_len) <= memory.kv_blocks)
    return roofline_point(f"prefill L={prompt_len} B={batch}", "prefill", batch, prompt_len,
                          tokens, flops, bytes_moved, inputs.gpu, fits)


def roofline_decode(inputs: PlanInputs, batch: int, context: int) -> RooflinePoint:
    """One decode step: ``batch`` sequences, each with ``context`` tokens already cached.

    Each new token attends to ``context + 1`` positions (at most the window in a
    sliding layer), reads their KV and writes its own.
    """
    if batch < 1 or context < 0:
        raise ValueError("batch must be positive and context non-negative")
    memory = plan_memory(inputs)
    pairs = decode_pairs(inputs, context)
    flops = _matmul_flops(inputs, batch, batch) + attention_flops(inputs, batch * pairs)
    per_layer_token = memory.kv_bytes_per_token / inputs.config.num_hidden_layers
    kv_moved = batch * pairs * per_layer_token
    bytes_moved = _weight_bytes_streamed(inputs, batch) + kv_moved
    fits = (context + 1 <= inputs.max_model_len
            and batch * memory.blocks_for(context + 1) <= memory.kv_blocks)
    return roofline_point(f"decode B={batch} C={context}", "decode", batch, context, batch,
                          flops, bytes_moved, inputs.gpu, fits)


def linear_layer_roofline(in_features: int, out_features: int, batch: int,
                          dtype_bytes: float, gpu: GPUSpec,
                          activation_bytes: float | None = None) -> RooflinePoint:
    """One ``batch x in_features @ in_features x out_features`` matmul.

    FLOPs = 2 x batch x in x out. Bytes = the weight matrix plus the input and
    output activations (``activation_bytes`` each element, default ``dtype_bytes``).
    """
    if min(in_features, out_features, batch) < 1:
        raise ValueError("features and batch must be positive")
    act = dtype_bytes if activation_bytes is None else activation_bytes
    flops = 2.0 * batch * in_features * out_features
    bytes_moved = (dtype_bytes * in_features * out_features
                   + act * batch * (in_features + out_features))
    return roofline_point(f"linear {in_features}x{out_features} B={batch}", "linear", batch, 1,
                          batch, flops, bytes_moved, gpu)
