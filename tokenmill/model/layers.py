"""Building blocks of the decoders: RMSNorm, rotary embedding, SwiGLU/GeGLU, linears.

Every function here works on flattened token batches (``[T, ...]``): the engine
packs the new tokens of all scheduled requests into one dimension, so there is
no batch axis and positions come from an explicit tensor instead of
``arange(seq_len)``.

Numerics follow Hugging Face ``transformers`` on purpose (float32 variance in
RMSNorm, float32 rotary angles cast to the activation dtype) so that logits can
be compared with it at tight tolerances.

On CUDA (with Triton installed) RMSNorm, SiLU-and-multiply and the rotary
rotation run as fused Triton kernels from :mod:`tokenmill.kernels`, which
round exactly where the eager code below does. On the CPU, float32 RMSNorm and
SiLU-and-multiply run as native kernels (:mod:`tokenmill.kernels.cpu`), the
same formulas in one call each and the arithmetic of the native decoder stack
(:mod:`tokenmill.model.native_stack`), so the two agree bit for bit. Everywhere
else the eager code runs unchanged. ``use_triton=True``/``False`` forces a path
(tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill import kernels
from tokenmill.kernels import cpu as cpu_kernels


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, with an optional fused residual add.

    ``forward(x)`` returns the normalised ``x``. ``forward(x, residual)`` first
    forms ``x + residual`` (the new residual stream) and returns
    ``(norm(x + residual), x + residual)``; decoder layers use this to carry the
    residual stream without an extra pass over memory.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(
            torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.use_triton: bool | None = None  # None: fused kernel on CUDA, eager elsewhere
        # The native decoder stack's float32 CPU kernel instead of torch.rms_norm (set by
        # NativeDecoderStack.build: the same arithmetic as the stack).
        self.native_cpu = False

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused op, same float32 formula (7 separate ops cost ~30 us per call).
            return torch.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        return self.weight * (x32 * torch.rsqrt(variance + self.eps)).to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if use_fused_kernels(x, self.use_triton):
            if residual is None:
                return kernels.rms_norm(x, self.weight, self.eps, use_triton=True)
            return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps, use_triton=True)
        if self.native_cpu and (
                native := cpu_kernels.rms_norm(x, self.weight, self.eps, residual)) is not None:
            return native
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def use_fused_kernels(x: torch.Tensor, use_triton: bool | None = None) -> bool:
    """Whether ``x`` goes through the Triton kernels: forced, or on CUDA with Triton."""
    if use_triton is not None:
        return use_triton
    return x.is_cuda and kernels.triton_available()


def rope_inv_freq(
    head_dim: int,
    rope_theta: float,
    rope_scaling: Mapping[str, Any] | None = None,
    long_factors: bool = False,
) -> torch.Tensor:
    """Inverse frequencies (float32, ``[head_dim // 2]``) of the rotary embedding.

    ``head_dim`` is the rotated width (all of a head, or its leading part with a
    partial rotary factor). Supports the default RoPE and these scalings:

    - ``llama3`` (Llama 3.1): long wavelengths divided by ``factor``, short ones
      kept, a smooth blend in between;
    - ``linear``: every frequency divided by ``factor`` (Gemma 3's global layers);
    - ``longrope`` (Phi-3): one factor per frequency, ``short_factor`` or, with
      ``long_factors``, ``long_factor``.

    The arithmetic mirrors ``transformers`` step by step so the float32 values
    are bit-identical.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    kind = None
    if rope_scaling:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind == "longrope":
        key = "long_factor" if long_factors else "short_factor"
        ext = torch.tensor(list(rope_scaling[key]), dtype=torch.float32)
        return 1.0 / (ext * rope_theta**exponents)
    inv_freq = 1.0 / (rope_theta**exponents)
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r} "
                         "(supported: llama3, linear, longrope)")
    factor = rope_scaling["factor"]
    low_freq_factor = rope_scaling["low_freq_factor"]
    high_freq_factor = rope_scaling["high_freq_factor"]
    old_context_len = rope_scaling["original_max_position_embeddings"]

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_attention_factor(rope_scaling: Mapping[str, Any] | None) -> float:
    """Scale applied to the cos/sin tables (LongRoPE's; 1 for the other types)."""
    if rope_scaling and rope_scaling.get("rope_type") == "longrope":
        return float(rope_scaling.get("attention_factor", 1.0))
    return 1.0


def uses_long_rope_factors(rope_scaling: Mapping[str, Any] | None, max_model_len: int) -> bool:
    """LongRoPE: whether an engine serving ``max_model_len`` tokens uses the long factors.

    transformers switches factor sets per forward call once a sequence passes
    ``original_max_position_embeddings``, so K/V cached before the switch were
    rotated with the other set. An engine that caches and shares K/V across
    requests needs one set for its whole life: the long one when it may serve
    sequences past the original length (vLLM makes the same choice). This
    equals transformers whenever no sequence crosses that length mid-way.
    """
    if not rope_scaling or rope_scaling.get("rope_type") != "longrope":
        return False
    return max_model_len > int(rope_scaling["original_max_position_embeddings"])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension (HF / GPT-NeoX layout)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with a precomputed cos/sin table.

    The table holds ``[max_positions, head_dim]`` cos and sin values (angles
    computed in float32, then stored in the module's dtype, which is what
    ``transformers`` does per call). It is indexed by the positions tensor, so
    tokens of different requests at different positions share one gather.
    ``ensure_length`` grows the table when a longer context shows up; it takes
    a host-side integer so the forward pass never syncs with the device.
    """

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        rope_theta: float = 10000.0,
        rope_scaling: Mapping[str, Any] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        long_factors: bool = False,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim  # the rotated width (a head's leading part when partial)
        # A plain attribute, not a buffer: module.to(bfloat16) must not round it.
        self.inv_freq = rope_inv_freq(head_dim, rope_theta, rope_scaling, long_factors)
        self.attention_factor = rope_attention_factor(rope_scaling)
        cos, sin = self._table(max_positions, self.inv_freq.to(device), self.attention_factor)
        dtype = dtype or torch.get_default_dtype()
        # Buffers (not persistent: derived from the config, never in a checkpoint) so
        # that module.to() moves them with the weights.
        self.register_buffer("cos_cache", cos.to(dtype), persistent=False)
        self.register_buffer("sin_cache", sin.to(dtype), persistent=False)

    @staticmethod
    def _table(length: int, inv_freq: torch.Tensor,
               factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(length, device=inv_freq.device).float()
        freqs = positions[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        if factor == 1.0:
            return angles.cos(), angles.sin()
        return angles.cos() * factor, angles.sin() * factor

    @property
    def max_positions(self) -> int:
        return self.cos_cache.shape[0]

    def ensure_length(self, length: int) -> None:
        """Make the table cover positions ``< length`` (doubling to amortise growth)."""
        if length <= self.max_positions:
            return
        new_length = max(length, 2 * self.max_positions)
        cos, sin = self._table(new_length, self.inv_freq.to(self.cos_cache.device),
                               self.attention_factor)
        self.cos_cache = cos.to(self.cos_cache.dtype)
        self.sin_cache = sin.to(self.sin_cache.dtype)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather ``[T, 1, head_dim]`` cos and sin for the positions (once per step)."""
        cos = self.cos_cache[positions].to(dtype).unsqueeze(1)
        sin = self.sin_cache[positions].to(dtype).unsqueeze(1)
        return cos, sin

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` [T, heads, head_dim] and ``k`` [T, kv_heads, head_dim]."""
        return apply_rotary(q, k, *self.cos_sin(positions, q.dtype))


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q``/``k`` ``[T, heads, head_dim]`` by precomputed ``[T, 1, head_dim]`` tables.

    The eager path returns new tensors. The fused path rotates ``q`` and ``k``
    in place (they may be views of the fused QKV output) and returns them.
    Tables narrower than the heads rotate only each head's leading dimensions
    (partial rotary); the rest passes through.
    """
    rot = cos.shape[-1]
    if rot < q.shape[-1]:
        if use_fused_kernels(q, use_triton):
            apply_rotary(q[..., :rot], k[..., :rot], cos, sin, use_triton)  # in place
            return q, k
        q_rot, k_rot = apply_rotary(q[..., :rot], k[..., :rot], cos, sin, use_triton)
        return (torch.cat((q_rot, q[..., rot:]), dim=-1),
                torch.cat((k_rot, k[..., rot:]), dim=-1))
    if use_fused_kernels(q, use_triton):
        # The tables are already gathered per token, so token t reads row t.
        rows = torch.arange(q.shape[0], device=q.device)
        return kernels.apply_rotary(
            q, k, cos.squeeze(1), sin.squeeze(1), rows, use_triton=True
        )
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def fold_rotary_sign(sin: torch.Tensor) -> torch.Tensor:
    """``[-sin_1, sin_2]`` (halves of the last dim), so that ``rotate_half(x) * sin``
    equals ``x.roll(half) * folded`` exactly (negation commutes with rounding)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate_eager(x: torch.Tensor, cos: torch.Tensor, sin_folded: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` ``[T, heads, head_dim]`` in four ops (new tensor).

    Same values as ``x * cos + rotate_half(x) * sin`` with ``sin_folded`` from
    :func:`fold_rotary_sign`; Q and K heads can be rotated in one call. Tables
    narrower than ``head_dim`` rotate the leading dimensions only.
    """
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        part = x[..., :rot]
        rotated = part * cos + part.roll(rot // 2, dims=-1) * sin_folded
        return torch.cat((rotated, x[..., rot:]), dim=-1)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_folded


def silu_and_mul(x: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """SwiGLU on a fused ``[..., 2 * inter]`` gate/up projection: silu(gate) * up."""
    if use_fused_kernels(x, use_triton):
        return kernels.silu_and_mul(x, use_triton=True)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """GeGLU (Gemma) on a fused ``[..., 2 * inter]`` gate/up projection: gelu_tanh(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def gated_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gated activation of a config's ``hidden_act`` (silu or gelu_pytorch_tanh)."""
    return gelu_tanh_and_mul if name == "gelu_pytorch_tanh" else silu_and_mul


class Linear(nn.Module):
    """``y = x @ weight.T + bias`` with uninitialised storage.

    Unlike ``nn.Linear`` nothing is randomly initialised at construction: the
    weights are about to be overwritten by a checkpoint (or dummy init), and
    initialising an 8B model twice would cost seconds to minutes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device),
            requires_grad=False,
        )
        if bias:
            self.bias = nn.Parameter(
                torch.empty(out_features, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class VocabEmbedding(nn.Module):
    """Token-id lookup table ``[vocab, hidden]`` (uninitialised, like ``Linear``).

    Under tensor parallelism (``tp`` sharded) this rank holds rows
    ``[vocab_start, vocab_start + vocab_size)``: ids outside them look up zeros
    and the ranks' partial results are summed.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        vocab_start: int = 0,
        tp: Any = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(vocab_size, hidden_size, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.vocab_start = vocab_start
        self.tp = tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None or not self.tp.sharded:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)
