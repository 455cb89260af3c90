"""The families added on the shared decoder: Qwen3, Gemma 3, Phi-3, Mixtral, Qwen3-MoE.

Each is a few class attributes on :class:`~tokenmill.model.decoder.DecoderCausalLM`;
the config (:class:`~tokenmill.config.ModelConfig`) carries the rest (Q/K norms,
per-layer windows, RoPE variants, experts).
"""

from __future__ import annotations

from tokenmill.model.decoder import DecoderCausalLM


class Qwen3CausalLM(DecoderCausalLM):
    """Qwen3ForCausalLM: Llama math with per-head RMSNorm on Q and K, no biases."""

    qkv_bias = False
    o_bias = False


class Gemma3CausalLM(DecoderCausalLM):
    """Gemma3ForCausalLM (text): local sliding-window layers interleaved with global
    layers, each kind with its own RoPE base; Q/K norms; norms before *and* after
    attention and MLP, scaling by ``1 + weight``; GELU(tanh)-gated MLP; embeddings
    times sqrt(hidden); tied head; optional final logit soft-capping."""

    sandwich_norms = True
    scale_embeddings = True
    norm_weight_offset = 1.0


class Phi3CausalLM(DecoderCausalLM):
    """Phi3ForCausalLM (Phi-3, Phi-3.5, Phi-4-mini): the checkpoint stores ``qkv_proj``
    and ``gate_up_proj`` already fused; LongRoPE and partial rotary come from the config."""

    qkv_bias = False
    o_bias = False
    fused_checkpoint = True


class MixtralCausalLM(DecoderCausalLM):
    """MixtralForCausalLM: Mistral attention, a top-k mixture of SwiGLU experts per layer
    (checkpoint names ``block_sparse_moe.gate`` and ``block_sparse_moe.experts.E.w1/w3/w2``)."""

    qkv_bias = False
    o_bias = False
    moe_names = ("block_sparse_moe.gate", "block_sparse_moe.experts", "w1", "w3", "w2")


class Qwen3MoeCausalLM(DecoderCausalLM):
    """Qwen3MoeForCausalLM: Qwen3 attention; experts in every ``decoder_sparse_step``-th
    layer outside ``mlp_only_layers`` (the others keep a dense MLP)."""

    qkv_bias = False
    o_bias = False
