"""A decoder-only transformer over a paged KV cache, shared by every model family.

Llama, Mistral, Qwen2/3, Gemma 3, Phi-3, Mixtral and Qwen3-MoE are one
skeleton (embedding, ``num_hidden_layers`` x (attention, MLP), final norm, LM
head) whose pieces vary in ways a :class:`~tokenmill.config.ModelConfig` or a
few class attributes of the family's class describe:

- attention: Q/K/V biases; per-head RMSNorm on Q and K (Qwen3, Gemma 3); a
  sliding window and its own RoPE base per layer (Gemma 3 interleaves local and
  global layers); partial rotary (Phi-4-mini); the score scale (Gemma's
  ``query_pre_attn_scalar``);
- MLP: SiLU- or GELU(tanh)-gated, dense or a mixture of experts
  (:mod:`tokenmill.model.moe`);
- norms: pre-norm only (Llama) or pre- and post-norms around attention and MLP
  (``sandwich_norms``, Gemma); Gemma's ``(1 + weight)`` norms are folded into
  the weight at load time (``norm_weight_offset``);
- embedding scaled by sqrt(hidden) (Gemma), logit soft-capping.

Projections are fused at load time: Q, K and V share one ``qkv_proj`` matrix
and gate/up share one ``gate_up_proj``, so each dense layer runs four matmuls
instead of seven. ``load_weights`` accepts Hugging Face tensor names and
writes each one into its slice of the fused parameter (a checkpoint that is
already fused, like Phi-3's, goes into the same parameters).

Construction: ``Family(config, attn_backend, dtype=..., device=..., tp=...)``
allocates parameters directly on ``device`` in ``dtype`` without initialising
them; call ``load_weights`` (or the loader's dummy init) before running.

Tensor parallelism (``tp=TPGroup(...)``, see :mod:`tokenmill.model.sharding`):
each rank allocates only its shard and ``load_weights`` copies only its slice
of each checkpoint tensor (lazily sliced from safetensors files); o_proj and
down_proj outputs are all-reduced, and ``compute_logits`` gathers the
vocabulary shards on rank 0 (other ranks get None).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from tokenmill.attention.base import AttentionBackend, AttentionMetadata
from tokenmill.config import ModelConfig
from tokenmill.distributed import TPGroup
from tokenmill.kernels import cpu as cpu_kernels
from tokenmill.model.layers import (
    Linear,
    RMSNorm,
    RotaryEmbedding,
    VocabEmbedding,
    apply_rotary,
    fold_rotary_sign,
    gated_activation,
    rotate_eager,
    use_fused_kernels,
    uses_long_rope_factors,
)
from tokenmill.model.moe import MoEBlock
from tokenmill.model.sharding import ShardPlan, shard_plan

KVCache = tuple[torch.Tensor, torch.Tensor]


class RopeTables(NamedTuple):
    """Rotary tables gathered once per step for the step's positions, read by every layer."""

    cos: torch.Tensor  # [T, 1, rotary_dim]
    sin: torch.Tensor  # [T, 1, rotary_dim]
    # fold_rotary_sign(sin) for the eager path; None when the fused kernels rotate.
    sin_folded: torch.Tensor | None


# Checkpoint entries that carry no weights we need (old Llama checkpoints store the
# rotary inverse frequencies; we recompute them from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightLoadError(ValueError):
    """A checkpoint does not fit the model: unknown, missing or misshapen tensor."""


class DecoderAttention(nn.Module):
    """Grouped-query self-attention with a fused QKV projection.

    ``layer`` picks the layer's sliding window and RoPE table (index 1, the
    local table, for sliding layers of a model with a separate local base).
    """

    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        attn_backend: AttentionBackend,
        qkv_bias: bool,
        o_bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None,
        shard: ShardPlan,
        tp: TPGroup,
    ) -> None:
        super().__init__()
        self.num_heads = shard.num_heads
        self.num_kv_heads = shard.num_kv_heads
        self.head_dim = config.head_dim
        self.tp = tp
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = config.attention_scale
        self.sliding_window = config.layer_window(layer)
        self.rope_index = int(self.sliding_window is not None
                              and config.rope_local_theta is not None)
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, qkv_bias, dtype, device
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, o_bias, dtype, device)
        if config.qk_norm:
            eps = config.rms_norm_eps
            self.q_norm: RMSNorm | None = RMSNorm(self.head_dim, eps, dtype, device)
            self.k_norm: RMSNorm | None = RMSNorm(self.head_dim, eps, dtype, device)
        else:
            self.q_norm = self.k_norm = None
        self.attn_backend = attn_backend

    def forward(
        self,
        ropes: tuple[RopeTables, ...],
        hidden: torch.Tensor,
        kv_cache: KVCache,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        rope = ropes[self.rope_index]
        tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        qk_size = self.q_size + self.kv_size
        v = qkv[:, qk_size:].view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            # Per-head norms make new tensors anyway: normalise, then rotate each.
            hd = self.head_dim
            q = self.q_norm(qkv[:, : self.q_size].reshape(-1, hd)).view(tokens, -1, hd)
            k = self.k_norm(qkv[:, self.q_size : qk_size].reshape(-1, hd)).view(tokens, -1, hd)
            if rope.sin_folded is not None:
                q = rotate_eager(q, rope.cos, rope.sin_folded)
                k = rotate_eager(k, rope.cos, rope.sin_folded)
            else:
                q, k = apply_rotary(q, k, rope.cos, rope.sin)
        elif (rope.sin_folded is not None and hidden.device.type == "cpu"
              and (out := self._cpu_fused_attention(qkv, rope, kv_cache, attn_metadata))
              is not None):
            return self.tp.all_reduce(self.o_proj(out.reshape(tokens, self.q_size)))
        elif rope.sin_folded is not None:
            # Eager path: rotate the Q and K heads together (a third of the ops).
            qk = qkv[:, :qk_size].view(tokens, self.num_heads + self.num_kv_heads, self.head_dim)
            q, k = rotate_eager(qk, rope.cos, rope.sin_folded).split(
                [self.num_heads, self.num_kv_heads], dim=1)
        else:
            q = qkv[:, : self.q_size].view(tokens, self.num_heads, self.head_dim)
            k = qkv[:, self.q_size : qk_size].view(tokens, self.num_kv_heads, self.head_dim)
            q, k = apply_rotary(q, k, rope.cos, rope.sin)
        v = v.contiguous()
        k_cache, v_cache = kv_cache
        out = self.attn_backend.forward(q, k, v, k_cache, v_cache, attn_metadata, self.scale,
                                        sliding_window=self.sliding_window)
        return self.tp.all_reduce(self.o_proj(out.reshape(tokens, self.q_size)))


    def _cpu_fused_attention(
        self, qkv: torch.Tensor, rope: RopeTables, kv_cache: KVCache,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor | None:
        """CPU, float32 or bfloat16: rotary, K/V write and attention in two native calls
        instead of about ten PyTorch ops (bit-identical); None where the eager path must
        run."""
        forward_cached = getattr(self.attn_backend, "forward_cached", None)
        if forward_cached is None or attn_metadata.has_padding_slots is not False:
            return None
        k_cache, v_cache = kv_cache
        q = cpu_kernels.rope_kv_write(qkv, self.num_heads, self.num_kv_heads, rope.cos,
                                      rope.sin_folded, k_cache, v_cache,
                                      attn_metadata.slot_mapping)
        if q is None:
            return None
        return forward_cached(q, k_cache, v_cache, attn_metadata, self.scale,
                              sliding_window=self.sliding_window)


class GatedMLP(nn.Module):
    """Gated feed-forward (SwiGLU or GeGLU) with a fused gate/up projection."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, hidden_act: str, dtype: torch.dtype,
        device: torch.device | str | None, tp: TPGroup,
    ) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, False, dtype, device)
        self.down_proj = Linear(intermediate_size, hidden_size, False, dtype, device)
        self.act = gated_activation(hidden_act)
        self.tp = tp
        # SiLU-and-multiply on the native decoder stack's C kernel (set by
        # NativeDecoderStack.build, so steps outside the stack round as it does).
        self.native_cpu_act = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        act = cpu_kernels.silu_and_mul(gate_up) if self.native_cpu_act else None
        if act is None:
            act = self.act(gate_up)
        return self.tp.all_reduce(self.down_proj(act))


class DecoderLayer(nn.Module):
    """One block. Pre-norm: x + attn(norm(x)), then + mlp(norm(.)). With
    ``sandwich_norms`` (Gemma) the attention and MLP outputs are normalised too
    before they join the residual stream, which is carried fused with the norms."""

    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        attn_backend: AttentionBackend,
        qkv_bias: bool,
        o_bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None,
        shard: ShardPlan,
        tp: TPGroup,
        sandwich_norms: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(config, layer, attn_backend, qkv_bias, o_bias, dtype,
                                          device, shard, tp)
        if config.is_moe_layer(layer):
            self.mlp: nn.Module = MoEBlock(config, dtype, device, shard, tp)
        else:
            self.mlp = GatedMLP(config.hidden_size, shard.intermediate_size, config.hidden_act,
                                dtype, device, tp)
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = RMSNorm(hidden, eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype, device)
        self.sandwich_norms = sandwich_norms
        if sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(hidden, eps, dtype, device)
            self.post_feedforward_layernorm = RMSNorm(hidden, eps, dtype, device)

    def forward(
        self,
        ropes: tuple[RopeTables, ...],
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: KVCache,
        attn_metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(ropes, hidden, kv_cache, attn_metadata)
        if self.sandwich_norms:
            hidden = self.post_attention_layernorm(hidden)
            hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
            return self.post_feedforward_layernorm(self.mlp(hidden)), residual
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    """Embedding, decoder stack and final norm (no LM head)."""

    def __init__(
        self,
        config: ModelConfig,
        attn_backend: AttentionBackend,
        qkv_bias: bool,
        o_bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None,
        shard: ShardPlan,
        tp: TPGroup,
        sandwich_norms: bool = False,
        embed_scale: float | None = None,
        long_rope_factors: bool = False,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(shard.vocab_padded, config.hidden_size, dtype, device,
                                           shard.vocab_start, tp)
        # The same rounding as transformers: the float32 constant cast to the weights' dtype.
        # A buffer, so it lives on the model's device (no host copy inside a CUDA graph).
        self.scales_embeddings = embed_scale is not None
        self.register_buffer(
            "embed_scale",
            torch.tensor(embed_scale or 1.0).to(dtype=dtype, device=device), persistent=False)
        rotaries = [RotaryEmbedding(
            config.rotary_dim, config.max_position_embeddings, config.rope_theta,
            config.rope_scaling_dict, dtype, device, long_rope_factors)]
        if config.rope_local_theta is not None:
            # Sliding layers with their own base (Gemma 3's local layers), unscaled.
            rotaries.append(RotaryEmbedding(config.rotary_dim, config.max_position_embeddings,
                                            config.rope_local_theta, None, dtype, device))
        self.rotaries = nn.ModuleList(rotaries)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, attn_backend, qkv_bias, o_bias, dtype, device, shard, tp,
                         sandwich_norms)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        # All layers in one native call for small CPU steps of quantized models
        # (tokenmill.model.native_stack); set by the loader once the weights are final.
        self.native_stack: Any = None

    @property
    def rotary(self) -> RotaryEmbedding:
        """The global layers' rotary embedding."""
        return self.rotaries[0]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.scales_embeddings:
            hidden = hidden * self.embed_scale
        fused = use_fused_kernels(hidden)
        ropes = []
        for rotary in self.rotaries:
            # Host-side bound: every position in this step is < max_seq_len (no device sync).
            rotary.ensure_length(attn_metadata.max_seq_len)
            cos, sin = rotary.cos_sin(positions, hidden.dtype)
            ropes.append(RopeTables(cos, sin, None if fused else fold_rotary_sign(sin)))
        tables = tuple(ropes)
        stacked = None
        if self.native_stack is not None:
            stacked = self.native_stack.run(hidden, tables[0].cos, tables[0].sin_folded,
                                            kv_caches, attn_metadata)
        if stacked is not None:
            hidden, residual = stacked
        else:
            residual = None
            for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
                hidden, residual = layer(tables, hidden, residual, kv_cache, attn_metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


@dataclass(frozen=True)
class _Slot:
    """Where one checkpoint tensor (or one part of it) goes, and which part this rank takes.

    Destination: ``param`` (``param[index]`` for one expert of a stacked tensor),
    narrowed to ``[start, start + rows)`` along ``dst_dim`` (``start`` None: all
    of it). Source: the tensor sliced to ``[src_start, src_start + src_size)``
    along ``src_dim`` (None: the whole tensor), whose full size there must be
    ``src_extent``. ``zero``: this rank holds zeros instead (a row-parallel
    layer's bias is added once, on rank 0). ``offset`` is added in float32
    before the copy (Gemma's norms multiply by ``1 + weight``).
    """

    param: str
    start: int | None = None
    rows: int = 0
    src_dim: int | None = None
    src_start: int = 0
    src_size: int = 0
    src_extent: int = 0
    zero: bool = False
    index: int | None = None
    dst_dim: int = 0
    offset: float = 0.0


@dataclass
class _Layout:
    """Expected checkpoint names -> slots, plus alternative names that cover them."""

    slots: dict[str, list[_Slot]] = field(default_factory=dict)
    # Another checkpoint spelling: its slots and the expected names it stands for.
    aliases: dict[str, tuple[list[_Slot], tuple[str, ...]]] = field(default_factory=dict)


class DecoderCausalLM(nn.Module):
    """Causal LM over the shared decoder; each family's class sets the class attributes.

    Parameters are created uninitialised in ``dtype`` on ``device``; fill them
    with :meth:`load_weights`. ``forward`` returns final hidden states for the
    flattened tokens of a step; :meth:`compute_logits` turns the rows the
    sampler needs into float32 logits. ``max_model_len`` (default: the config's
    ``max_position_embeddings``) picks LongRoPE's factor set.
    """

    # Bias layout: None means "follow config.attention_bias".
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    sandwich_norms = False  # Gemma: norms after attention and MLP too
    scale_embeddings = False  # Gemma: embeddings times sqrt(hidden)
    norm_weight_offset = 0.0  # Gemma: norms scale by (1 + weight)
    fused_checkpoint = False  # Phi-3: the checkpoint already has qkv_proj and gate_up_proj

    def __init__(
        self,
        config: ModelConfig,
        attn_backend: AttentionBackend,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        tp: TPGroup | None = None,
        max_model_len: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.tp = tp or TPGroup()
        self.shard = shard = shard_plan(config, self.tp.rank, self.tp.world_size)
        dtype = dtype or torch.get_default_dtype()
        qkv_bias = config.attention_bias if self.qkv_bias is None else self.qkv_bias
        o_bias = config.attention_bias if self.o_bias is None else self.o_bias
        long_factors = uses_long_rope_factors(
            config.rope_scaling_dict, max_model_len or config.max_position_embeddings)
        self.model = DecoderModel(
            config, attn_backend, qkv_bias, o_bias, dtype, device, shard, self.tp,
            sandwich_norms=self.sandwich_norms,
            embed_scale=config.hidden_size**0.5 if self.scale_embeddings else None,
            long_rope_factors=long_factors,
        )
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, shard.vocab_padded, False, dtype, device)
        # A tied model's head when it must differ from the embedding (a quantized copy).
        self.tied_lm_head: nn.Module | None = None
        self._layout = _Layout()
        self._checkpoint_layout(qkv_bias, o_bias)

    # ------------------------------------------------------------------ running

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` for the ``T`` flattened tokens of one step.

        ``kv_caches[i]`` is layer ``i``'s ``(k_cache, v_cache)``, each
        ``[num_blocks, block_size, num_kv_heads, head_dim]``; the attention
        backend writes the new K/V into them at ``attn_metadata.slot_mapping``.
        """
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        return head.weight

    def set_quantized_lm_head(self, head: nn.Module) -> None:
        """Compute logits with ``head`` instead of the tied embedding matrix."""
        self.tied_lm_head = head

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits ``[N, vocab]`` for hidden states ``[N, hidden]``.

        Under tensor parallelism every rank computes its vocabulary shard and
        rank 0 gathers them; the other ranks get None.
        """
        head = self.lm_head if self.lm_head is not None else self.tied_lm_head
        if head is not None:
            logits = head(hidden)
        else:
            logits = torch.nn.functional.linear(hidden, self.model.embed_tokens.weight)
        cap = self.config.final_logit_softcapping
        if cap:
            # In the model's dtype, as transformers does, before the float32 cast.
            logits = torch.tanh(logits / cap) * cap
        logits = logits.float()
        if not self.tp.sharded:
            return logits
        gathered = self.tp.gather_to_first(logits)
        return None if gathered is None else gathered[:, : self.config.vocab_size]

    # ----------------------------------------------------------------- loading

    def _checkpoint_layout(self, qkv_bias: bool, o_bias: bool) -> None:
        """Map every expected Hugging Face tensor name to its (fused, sharded) destination."""
        cfg, sp = self.config, self.shard
        vocab_src = (sp.vocab_start, sp.vocab_rows, cfg.vocab_size)
        self._expect("model.embed_tokens.weight",
                     self._rows("model.embed_tokens.weight", 0, sp.vocab_rows, vocab_src))
        self._expect("model.norm.weight", self._norm("model.norm.weight"))
        if self.lm_head is not None:
            self._expect("lm_head.weight", self._rows("lm_head.weight", 0, sp.vocab_rows,
                                                      vocab_src))
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            self._attention_layout(p + "self_attn.", qkv_bias, o_bias)
            if cfg.is_moe_layer(i):
                self._moe_layout(i, p)
            else:
                self._mlp_layout(p + "mlp.", p + "mlp.")
            norms = ["input_layernorm", "post_attention_layernorm"]
            if self.sandwich_norms:
                norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
            for norm in norms:
                self._expect(f"{p}{norm}.weight", self._norm(f"{p}{norm}.weight"))

    def _attention_layout(self, attn: str, qkv_bias: bool, o_bias: bool) -> None:
        cfg, sp = self.config, self.shard
        hd = cfg.head_dim
        q, kv = sp.num_heads * hd, sp.num_kv_heads * hd
        q_src = (sp.q_head_start * hd, q, cfg.num_attention_heads * hd)
        kv_src = (sp.kv_head_start * hd, kv, cfg.num_key_value_heads * hd)
        kinds = ("weight", "bias") if qkv_bias else ("weight",)
        for kind in kinds:
            fused = f"{attn}qkv_proj.{kind}"
            if self.fused_checkpoint:
                total = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd
                k_base = cfg.num_attention_heads * hd
                v_base = k_base + cfg.num_key_value_heads * hd
                self._expect(fused, [
                    _Slot(fused, 0, q, 0, q_src[0], q, total),
                    _Slot(fused, q, kv, 0, k_base + kv_src[0], kv, total),
                    _Slot(fused, q + kv, kv, 0, v_base + kv_src[0], kv, total),
                ])
            else:
                self._expect(f"{attn}q_proj.{kind}", self._rows(fused, 0, q, q_src))
                self._expect(f"{attn}k_proj.{kind}", self._rows(fused, q, kv, kv_src))
                self._expect(f"{attn}v_proj.{kind}", self._rows(fused, q + kv, kv, kv_src))
        self._expect(f"{attn}o_proj.weight", self._cols(f"{attn}o_proj.weight", q_src))
        if o_bias:
            self._expect(f"{attn}o_proj.bias",
                         [_Slot(f"{attn}o_proj.bias", zero=sp.rank > 0)])
        if cfg.qk_norm:
            for norm in ("q_norm", "k_norm"):
                self._expect(f"{attn}{norm}.weight", self._norm(f"{attn}{norm}.weight"))

    def _mlp_layout(self, name: str, param: str) -> None:
        """A dense gated MLP stored as ``{name}gate_proj/up_proj/down_proj`` (or fused)."""
        cfg, sp = self.config, self.shard
        inter = sp.intermediate_size
        inter_src = (sp.intermediate_start, inter, cfg.intermediate_size)
        fused = f"{param}gate_up_proj.weight"
        if self.fused_checkpoint:
            total = 2 * cfg.intermediate_size
            self._expect(fused, [
                _Slot(fused, 0, inter, 0, sp.intermediate_start, inter, total),
                _Slot(fused, inter, inter, 0, cfg.intermediate_size + sp.intermediate_start,
                      inter, total),
            ])
        else:
            self._expect(f"{name}gate_proj.weight", self._rows(fused, 0, inter, inter_src))
            self._expect(f"{name}up_proj.weight", self._rows(fused, inter, inter, inter_src))
        self._expect(f"{name}down_proj.weight", self._cols(f"{param}down_proj.weight",
                                                           inter_src))

    # Per-expert checkpoint names: (router, expert prefix, gate, up, down) under the layer.
    moe_names = ("mlp.gate", "mlp.experts", "gate_proj", "up_proj", "down_proj")

    def _moe_layout(self, layer: int, p: str) -> None:
        """Router and experts: per-expert tensors (published checkpoints), or stacked
        ``mlp.experts.gate_up_proj`` / ``down_proj`` tensors (transformers 5 in memory),
        or stacked ``gate_proj`` / ``up_proj`` / ``down_proj`` (GGUF)."""
        cfg, sp = self.config, self.shard
        router, experts, gate, up, down = self.moe_names
        inter = sp.moe_intermediate_size
        start, full = sp.moe_intermediate_start, cfg.moe_intermediate_size
        w13, w2 = f"{p}mlp.w13", f"{p}mlp.w2"
        self._expect(f"{p}{router}.weight", [_Slot(f"{p}mlp.router_weight")])
        gate_up_names, down_names = [], []
        for e in range(cfg.num_experts):
            base = f"{p}{experts}.{e}."
            self._expect(f"{base}{gate}.weight", [_Slot(w13, 0, inter, 0, start, inter, full,
                                                        index=e)])
            self._expect(f"{base}{up}.weight", [_Slot(w13, inter, inter, 0, start, inter, full,
                                                      index=e)])
            self._expect(f"{base}{down}.weight", [_Slot(w2, None, 0, 1, start, inter, full,
                                                        index=e)])
            gate_up_names += [f"{base}{gate}.weight", f"{base}{up}.weight"]
            down_names.append(f"{base}{down}.weight")
        self._alias(f"{p}mlp.experts.gate_up_proj", [
            _Slot(w13, 0, inter, 1, start, inter, 2 * full, dst_dim=1),
            _Slot(w13, inter, inter, 1, full + start, inter, 2 * full, dst_dim=1),
        ], gate_up_names)
        self._alias(f"{p}mlp.experts.down_proj", [_Slot(w2, None, 0, 2, start, inter, full)],
                    down_names)
        # Stacked per projection ([E, inter, hidden] each), as GGUF files store them.
        self._alias(f"{p}mlp.experts.gate_proj",
                    [_Slot(w13, 0, inter, 1, start, inter, full, dst_dim=1)], gate_up_names[::2])
        self._alias(f"{p}mlp.experts.up_proj",
                    [_Slot(w13, inter, inter, 1, start, inter, full, dst_dim=1)],
                    gate_up_names[1::2])
        if router != "mlp.gate":
            self._alias(f"{p}mlp.gate.weight", [_Slot(f"{p}mlp.router_weight")],
                        [f"{p}{router}.weight"])

    @staticmethod
    def _rows(param: str, start: int | None, size: int, src: tuple[int, int, int]) -> list[_Slot]:
        return [_Slot(param, start, size, 0, *src)]

    @staticmethod
    def _cols(param: str, src: tuple[int, int, int]) -> list[_Slot]:
        return [_Slot(param, None, 0, 1, *src)]

    def _norm(self, param: str) -> list[_Slot]:
        return [_Slot(param, offset=self.norm_weight_offset)]

    def _expect(self, name: str, slots: list[_Slot]) -> None:
        self._layout.slots[name] = slots

    def _alias(self, name: str, slots: list[_Slot], covers: Iterable[str]) -> None:
        self._layout.aliases[name] = (slots, tuple(covers))

    def expected_weight_names(self) -> list[str]:
        """Hugging Face names of every tensor a checkpoint must provide."""
        return list(self._layout.slots)

    def _is_ignored(self, name: str) -> bool:
        if name.endswith(_IGNORED_SUFFIXES):
            return True
        # Tied checkpoints sometimes still store the (identical) head; the embedding wins.
        return name == "lm_head.weight" and self.lm_head is None

    @torch.no_grad()
    def load_weights(
        self,
        weights: Iterable[tuple[str, Any]],
        source: str | None = None,
        require_all: bool = True,
    ) -> set[str]:
        """Copy ``(hf_name, tensor)`` pairs into the model; returns the names loaded.

        Tensors are converted to the parameter's dtype and device. Raises
        :class:`WeightLoadError` naming ``source`` (a file label) and the tensor
        for an unknown name or a shape mismatch, and, when ``require_all``, for
        any expected tensor that never arrived. Loaders that stream several
        files call this per file with ``require_all=False`` and finish with
        :meth:`check_all_loaded`.
        """
        where = f"{source}: " if source else ""
        params = dict(self.named_parameters())
        if self.shard.vocab_padded > self.shard.vocab_rows:
            # Vocabulary padding rows (last rank): never looked up, their logits trimmed.
            for name in ("model.embed_tokens.weight", "lm_head.weight"):
                if name in params:
                    params[name].data.zero_()
        loaded: set[str] = set()
        layout = self._layout
        for name, tensor in weights:
            if self._is_ignored(name):
                continue
            slots = layout.slots.get(name)
            covers: tuple[str, ...] = (name,)
            if slots is None and name in layout.aliases:
                slots, covers = layout.aliases[name]
            if slots is None:
                raise WeightLoadError(
                    f"{where}unexpected tensor {name!r}: {self.config.architecture} "
                    "has no such weight"
                )
            for slot in slots:
                target = params[slot.param].data
                if slot.index is not None:
                    target = target[slot.index]
                if slot.start is not None:
                    target = target.narrow(slot.dst_dim, slot.start, slot.rows)
                if slot.zero:
                    target.zero_()
                    continue
                value = _select(tensor, slot, tuple(target.shape), name, where)
                if slot.offset:
                    value = value.float() + slot.offset
                target.copy_(value)
            loaded.update(covers)
        if require_all:
            self.check_all_loaded(loaded, source)
        return loaded

    def check_all_loaded(self, loaded: set[str], source: str | None = None) -> None:
        """Raise :class:`WeightLoadError` listing expected tensors not in ``loaded``."""
        missing = [name for name in self._layout.slots if name not in loaded]
        if missing:
            where = f"{source}: " if source else ""
            shown = ", ".join(repr(n) for n in missing[:5])
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise WeightLoadError(f"{where}missing tensor {shown}{more}")


def _select(tensor: Any, slot: _Slot, target_shape: tuple[int, ...], name: str,
            where: str) -> torch.Tensor:
    """This rank's part of a checkpoint tensor (a torch tensor, or a lazy safetensors
    slice, read only in part); WeightLoadError when its shape does not fit the config."""
    shape = tuple(tensor.get_shape()) if hasattr(tensor, "get_shape") else tuple(tensor.shape)
    expected = list(target_shape)
    if slot.src_dim is not None:
        expected[slot.src_dim] = slot.src_extent
    if shape != tuple(expected):
        raise WeightLoadError(
            f"{where}tensor {name!r} has shape {shape}, expected {tuple(expected)} "
            "for this config")
    if slot.src_dim is None:
        return tensor if torch.is_tensor(tensor) else tensor[:]
    part = slice(slot.src_start, slot.src_start + slot.src_size)
    return tensor[(slice(None),) * slot.src_dim + (part,)]
