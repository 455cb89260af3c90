"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over a paged KV cache.

One implementation covers the three architectures; they differ only in
details the config already carries:

- Qwen2 has biases on the Q/K/V projections (``attention_bias``) but none on
  the output projection; Llama with ``attention_bias`` has both.
- Mistral's sliding-window attention is ignored: attention always spans the
  whole context. That matches the reference for contexts shorter than the
  window (4096 tokens for Mistral 7B v0.1; later Mistral and Qwen2 checkpoints
  disable the window).

Projections are fused at load time: Q, K and V share one ``qkv_proj`` matrix
and gate/up share one ``gate_up_proj``, so each layer runs four matmuls
instead of seven. ``load_weights`` accepts Hugging Face tensor names and
writes each one into its slice of the fused parameter.

Construction: ``LlamaCausalLM(config, attn_backend, dtype=..., device=...)``
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
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from tokenmill.attention.base import AttentionBackend, AttentionMetadata
from tokenmill.config import ModelConfig
from tokenmill.distributed import TPGroup
from tokenmill.model.layers import (
    Linear,
    RMSNorm,
    RotaryEmbedding,
    VocabEmbedding,
    apply_rotary,
    fold_rotary_sign,
    rotate_eager,
    silu_and_mul,
    use_fused_kernels,
)
from tokenmill.model.sharding import ShardPlan, shard_plan

KVCache = tuple[torch.Tensor, torch.Tensor]


class RopeTables(NamedTuple):
    """Rotary tables gathered once per step for the step's positions, read by every layer."""

    cos: torch.Tensor  # [T, 1, head_dim]
    sin: torch.Tensor  # [T, 1, head_dim]
    # fold_rotary_sign(sin) for the eager path; None when the fused kernels rotate.
    sin_folded: torch.Tensor | None

# Checkpoint entries that carry no weights we need (old Llama checkpoints store the
# rotary inverse frequencies; we recompute them from the config).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightLoadError(ValueError):
    """A checkpoint does not fit the model: unknown, missing or misshapen tensor."""


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with a fused QKV projection."""

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
    ) -> None:
        super().__init__()
        self.num_heads = shard.num_heads
        self.num_kv_heads = shard.num_kv_heads
        self.head_dim = config.head_dim
        self.tp = tp
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, qkv_bias, dtype, device
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, o_bias, dtype, device)
        self.attn_backend = attn_backend

    def forward(
        self,
        rope: RopeTables,
        hidden: torch.Tensor,
        kv_cache: KVCache,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        if rope.sin_folded is not None:
            # Eager path: rotate the Q and K heads together (a third of the ops).
            qk_size = self.q_size + self.kv_size
            qk = qkv[:, :qk_size].view(tokens, self.num_heads + self.num_kv_heads, self.head_dim)
            q, k = rotate_eager(qk, rope.cos, rope.sin_folded).split(
                [self.num_heads, self.num_kv_heads], dim=1)
            v = qkv[:, qk_size:].view(tokens, self.num_kv_heads, self.head_dim)
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(tokens, self.num_heads, self.head_dim)
            k = k.view(tokens, self.num_kv_heads, self.head_dim)
            v = v.reshape(tokens, self.num_kv_heads, self.head_dim).contiguous()
            q, k = apply_rotary(q, k, rope.cos, rope.sin)
        k_cache, v_cache = kv_cache
        out = self.attn_backend.forward(q, k, v, k_cache, v_cache, attn_metadata, self.scale)
        return self.tp.all_reduce(self.o_proj(out.reshape(tokens, self.q_size)))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward with a fused gate/up projection."""

    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str | None,
        shard: ShardPlan, tp: TPGroup,
    ) -> None:
        super().__init__()
        inter = shard.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * inter, False, dtype, device)
        self.down_proj = Linear(inter, config.hidden_size, False, dtype, device)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(silu_and_mul(self.gate_up_proj(x))))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)); residual carried fused."""

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
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, attn_backend, qkv_bias, o_bias, dtype, device,
                                        shard, tp)
        self.mlp = LlamaMLP(config, dtype, device, shard, tp)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype, device)

    def forward(
        self,
        rope: RopeTables,
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
        hidden = self.self_attn(rope, hidden, kv_cache, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
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
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(shard.vocab_padded, config.hidden_size, dtype, device,
                                           shard.vocab_start, tp)
        self.rotary = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling_dict,
            dtype,
            device,
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, attn_backend, qkv_bias, o_bias, dtype, device, shard, tp)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        # Host-side bound: every position in this step is < max_seq_len (no device sync).
        self.rotary.ensure_length(attn_metadata.max_seq_len)
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, hidden.dtype)
        folded = None if use_fused_kernels(hidden) else fold_rotary_sign(sin)
        rope = RopeTables(cos, sin, folded)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(rope, hidden, residual, kv_cache, attn_metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


@dataclass(frozen=True)
class _Slot:
    """Where one checkpoint tensor goes, and which part of it this rank takes.

    Destination: rows ``[start, start + rows)`` of ``param`` (``start`` None: all
    of it). Source: the tensor sliced to ``[src_start, src_start + src_size)``
    along ``src_dim`` (None: the whole tensor), whose full size there must be
    ``src_extent``. ``zero``: this rank holds zeros instead (a row-parallel
    layer's bias is added once, on rank 0).
    """

    param: str
    start: int | None = None
    rows: int = 0
    src_dim: int | None = None
    src_start: int = 0
    src_size: int = 0
    src_extent: int = 0
    zero: bool = False


class LlamaCausalLM(nn.Module):
    """Causal LM for LlamaForCausalLM checkpoints (also the base of Mistral and Qwen2).

    Parameters are created uninitialised in ``dtype`` on ``device``; fill them
    with :meth:`load_weights`. ``forward`` returns final hidden states for the
    flattened tokens of a step; :meth:`compute_logits` turns the rows the
    sampler needs into float32 logits.
    """

    # Bias layout, overridden per architecture: None means "follow config.attention_bias".
    qkv_bias: bool | None = None
    o_bias: bool | None = None

    def __init__(
        self,
        config: ModelConfig,
        attn_backend: AttentionBackend,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.tp = tp or TPGroup()
        self.shard = shard = shard_plan(config, self.tp.rank, self.tp.world_size)
        dtype = dtype or torch.get_default_dtype()
        qkv_bias = config.attention_bias if self.qkv_bias is None else self.qkv_bias
        o_bias = config.attention_bias if self.o_bias is None else self.o_bias
        self.model = LlamaModel(config, attn_backend, qkv_bias, o_bias, dtype, device, shard,
                                self.tp)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, shard.vocab_padded, False, dtype, device)
        # A tied model's head when it must differ from the embedding (a quantized copy).
        self.tied_lm_head: nn.Module | None = None
        self._slots = self._checkpoint_layout(qkv_bias, o_bias)

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
            logits = head(hidden).float()
        else:
            logits = torch.nn.functional.linear(hidden, self.model.embed_tokens.weight).float()
        if not self.tp.sharded:
            return logits
        gathered = self.tp.gather_to_first(logits)
        return None if gathered is None else gathered[:, : self.config.vocab_size]

    # ----------------------------------------------------------------- loading

    def _checkpoint_layout(self, qkv_bias: bool, o_bias: bool) -> dict[str, _Slot]:
        """Map every expected Hugging Face tensor name to its (fused, sharded) destination."""
        cfg, sp = self.config, self.shard
        hd = cfg.head_dim
        q, kv = sp.num_heads * hd, sp.num_kv_heads * hd
        q_src = (sp.q_head_start * hd, q, cfg.num_attention_heads * hd)
        kv_src = (sp.kv_head_start * hd, kv, cfg.num_key_value_heads * hd)
        inter = sp.intermediate_size
        inter_src = (sp.intermediate_start, inter, cfg.intermediate_size)
        vocab_src = (sp.vocab_start, sp.vocab_rows, cfg.vocab_size)

        def rows(param: str, start: int | None, size: int, src: tuple[int, int, int]) -> _Slot:
            return _Slot(param, start, size, 0, *src)

        def cols(param: str, src: tuple[int, int, int]) -> _Slot:
            return _Slot(param, None, 0, 1, *src)

        slots = {
            "model.embed_tokens.weight": rows("model.embed_tokens.weight", 0, sp.vocab_rows,
                                              vocab_src),
            "model.norm.weight": _Slot("model.norm.weight"),
        }
        if self.lm_head is not None:
            slots["lm_head.weight"] = rows("lm_head.weight", 0, sp.vocab_rows, vocab_src)
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            kinds = ("weight", "bias") if qkv_bias else ("weight",)
            for kind in kinds:
                fused = f"{attn}qkv_proj.{kind}"
                slots[f"{attn}q_proj.{kind}"] = rows(fused, 0, q, q_src)
                slots[f"{attn}k_proj.{kind}"] = rows(fused, q, kv, kv_src)
                slots[f"{attn}v_proj.{kind}"] = rows(fused, q + kv, kv, kv_src)
            slots[f"{attn}o_proj.weight"] = cols(f"{attn}o_proj.weight", q_src)
            if o_bias:
                slots[f"{attn}o_proj.bias"] = _Slot(f"{attn}o_proj.bias", zero=sp.rank > 0)
            slots[f"{mlp}gate_proj.weight"] = rows(f"{mlp}gate_up_proj.weight", 0, inter,
                                                   inter_src)
            slots[f"{mlp}up_proj.weight"] = rows(f"{mlp}gate_up_proj.weight", inter, inter,
                                                 inter_src)
            slots[f"{mlp}down_proj.weight"] = cols(f"{mlp}down_proj.weight", inter_src)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                slots[f"{p}{norm}.weight"] = _Slot(f"{p}{norm}.weight")
        return slots

    def expected_weight_names(self) -> list[str]:
        """Hugging Face names of every tensor a checkpoint must provide."""
        return list(self._slots)

    def _is_ignored(self, name: str) -> bool:
        if name.endswith(_IGNORED_SUFFIXES):
            return True
        # Tied checkpoints sometimes still store the (identical) head; the embedding wins.
        return name == "lm_head.weight" and self.lm_head is None

    @torch.no_grad()
    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
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
        for name, tensor in weights:
            if self._is_ignored(name):
                continue
            slot = self._slots.get(name)
            if slot is None:
                raise WeightLoadError(
                    f"{where}unexpected tensor {name!r}: {self.config.architecture} "
                    "has no such weight"
                )
            target = params[slot.param].data
            if slot.start is not None:
                target = target.narrow(0, slot.start, slot.rows)
            if slot.zero:
                target.zero_()
            else:
                target.copy_(_select(tensor, slot, tuple(target.shape), name, where))
            loaded.add(name)
        if require_all:
            self.check_all_loaded(loaded, source)
        return loaded

    def check_all_loaded(self, loaded: set[str], source: str | None = None) -> None:
        """Raise :class:`WeightLoadError` listing expected tensors not in ``loaded``."""
        missing = [name for name in self._slots if name not in loaded]
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
    if slot.src_dim is None:
        expected = target_shape
        ok = shape == expected
    else:
        expected = list(target_shape)
        expected[slot.src_dim] = slot.src_extent
        expected = tuple(expected)
        ok = shape == expected
    if not ok:
        raise WeightLoadError(
            f"{where}tensor {name!r} has shape {shape}, expected {expected} for this config")
    if slot.src_dim is None:
        return tensor if torch.is_tensor(tensor) else tensor[:]
    part = slice(slot.src_start, slot.src_start + slot.src_size)
    return tensor[part] if slot.src_dim == 0 else tensor[:, part]


class MistralCausalLM(LlamaCausalLM):
    """MistralForCausalLM: Llama math, no biases; sliding window ignored (see module doc)."""

    qkv_bias = False
    o_bias = False


class Qwen2CausalLM(LlamaCausalLM):
    """Qwen2ForCausalLM: Llama math with Q/K/V biases and a bias-free output projection."""

    qkv_bias = True
    o_bias = False
