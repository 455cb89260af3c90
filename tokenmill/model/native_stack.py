"""The decoder layers of a quantized or bfloat16 llama-style model as one native call per
step.

At batch 1 on a CPU a small model's decode step is short (SmolLM2 int4: tens of
milliseconds for 30 layers), and about a quarter of it went to Python and
PyTorch dispatch: some fifteen calls per layer, each with its checks, views and
allocations. :class:`NativeDecoderStack` hands all layers to
``decoder_stack_f32`` (``tokenmill/kernels/cpu/decoder_stack.c``) at once,
which runs the very kernels the per-layer path calls (RMSNorm, the Q4_1/Q8_0
matmuls, the fused rotary + K/V write, paged attention, SiLU-and-multiply) in
the same order. :meth:`NativeDecoderStack.build` also switches the layers' norms
and SiLU-and-multiply to the stack's C kernels for the steps it does not take
(PyTorch's own ops round differently in the last bit), so hidden states are
bit-identical either way: a request decodes the same whether its step went
through the stack or, batched with a long prefill chunk, through the layers.

A bfloat16 model whose projections all run tokenmill's AMX kernel
(:class:`~tokenmill.model.prepacked.AmxLinear`, CPUs with AMX-BF16) or its
AVX512-BF16 kernel (:class:`~tokenmill.model.prepacked.Bf16DotLinear`, CPUs with
bfloat16 dot products but no AMX) gets the same treatment from ``decoder_stack_bf16``
(``decoder_stack_bf16.c``), on the bfloat16 kernels: a batch-8 decode step of SmolLM2
spent 8-10 ms of ~30 in dispatch.

A float32 model whose dense projections all run tokenmill's panel kernel
(:class:`~tokenmill.model.prepacked.F32PanelLinear`, AVX2 CPUs without AVX-512)
runs on ``decoder_stack_f32`` too.

It covers what those kernels cover: float32 activations and a float32, float16 or
bfloat16 KV cache on the
CPU with every projection quantized with the native int4 or int8 kernel or on
float32 panels, or bfloat16 activations and KV cache with every projection on
AMX or AVX512-BF16; RMSNorm pre-norm layers with a SwiGLU MLP, full-width rotary
from one table, no QK-norm, no sandwich norms, no mixture of experts, no tensor
parallelism. A step takes it when its row count stays below the quantized layers'
dense-GEMM threshold and - for the bfloat16 stack, or where the prefill-attention
kernel is missing - each sequence has at most ``SHORT_QUERY_LEN`` new tokens; any
other step runs the per-layer path. ``TOKENMILL_CPU_NATIVE_STACK=0`` turns it off
(A/B measurements).
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import TYPE_CHECKING

import torch

from tokenmill.attention.torch_backend import SHORT_QUERY_LEN
from tokenmill.kernels import cpu as cpu_kernels
from tokenmill.model.layers import RMSNorm, silu_and_mul
from tokenmill.model.prepacked import AmxLinear, Bf16DotLinear, F32PanelLinear
from tokenmill.model.quantization import Int4Linear, Int8Linear

if TYPE_CHECKING:
    from tokenmill.attention.base import AttentionMetadata

logger = logging.getLogger(__name__)

_i32, _f32, _ptr = ctypes.c_int32, ctypes.c_float, ctypes.c_void_p


class _QLinear(ctypes.Structure):
    _fields_ = [("kind", _i32), ("n", _i32), ("k", _i32), ("amx_min_rows", _i32),
                ("w0", _ptr), ("w1", _ptr), ("w2", _ptr), ("bias", _ptr)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _QLinear), ("o", _QLinear), ("gate_up", _QLinear), ("down", _QLinear),
                ("attn_norm", _ptr), ("mlp_norm", _ptr), ("k_cache", _ptr), ("v_cache", _ptr),
                ("window", _i32), ("_pad", _i32)]


class _Dims(ctypes.Structure):
    _fields_ = [("hidden", _i32), ("heads", _i32), ("kv_heads", _i32), ("head_dim", _i32),
                ("inter", _i32), ("block_size", _i32), ("eps", _f32), ("scale", _f32),
                ("kv_kind", _i32), ("_pad", _i32)]


class _Step(ctypes.Structure):
    _fields_ = [("tokens", _i32), ("num_seqs", _i32), ("max_blocks", _i32), ("max_q_len", _i32),
                ("cos", _ptr), ("sin_folded", _ptr), ("slot_mapping", _ptr),
                ("query_start", _ptr), ("seq_lens", _ptr), ("block_tables", _ptr)]


# Projection kinds (tm_qlinear.kind) each stack takes, by activation dtype.
_KINDS = {torch.float32: (0, 1, 3, 5, 6), torch.bfloat16: (2, 4)}
# The kinds of tokenmill's packed-weight layers.
_PACKED_KINDS = {AmxLinear: 2, F32PanelLinear: 3, Bf16DotLinear: 4}


def _qlinear(module: torch.nn.Module) -> _QLinear | None:
    """The kernel arguments of a projection, or None if it is not one the native
    kernels run: kind 0 int4, 1 int8, 5 and 6 int4 and int8 on 16-column panels,
    3 float32 panels (float32 bias), 2 AMX bfloat16, 4 AVX512-BF16 bfloat16 (bfloat16
    bias)."""
    bias = getattr(module, "bias", None)
    bias_ptr = None if bias is None else bias.data_ptr()
    kind = _PACKED_KINDS.get(type(module))
    if kind is not None:  # one packed weight; the bias in the weight's dtype
        if not _contiguous(module.packed.dtype, bias):
            return None
        return _QLinear(kind, module.out_features, module.in_features, 0,
                        module.packed.data_ptr(), None, None, bias_ptr)
    if not _contiguous(torch.float32, bias):
        return None
    if isinstance(module, Int4Linear) and module.kernel == "panels":
        return _QLinear(5, module.out_features, module.in_features, module.amx_min_rows,
                        module.packed.data_ptr(), None, None, bias_ptr)
    if isinstance(module, Int4Linear) and module.kernel == "native":
        return _QLinear(0, module.out_features, module.in_features, 0, module.packed.data_ptr(),
                        module.scales.data_ptr(), module.mins.data_ptr(), bias_ptr)
    if isinstance(module, Int8Linear) and module.kernel == "panels":
        return _QLinear(6, module.out_features, module.in_features, module.amx_min_rows,
                        module.packed.data_ptr(), None, None, bias_ptr)
    if isinstance(module, Int8Linear):
        return _QLinear(1, module.out_features, module.in_features, 0, module.codes.data_ptr(),
                        module.scales.data_ptr(), None, bias_ptr)
    return None


def _contiguous(dtype: torch.dtype, *tensors: torch.Tensor | None) -> bool:
    return all(t is None or (t.dtype == dtype and t.is_contiguous()) for t in tensors)


def use_native_elementwise(model: torch.nn.Module, activation: bool = True) -> int:
    """Run the RMSNorms of ``model``'s (a DecoderModel) layers and its final norm, and
    with ``activation`` the layers' SiLU-mul, on the C kernels of
    :mod:`tokenmill.kernels.cpu` (inputs they cannot take fall back to PyTorch per
    call). Returns how many modules were switched.

    Two users: the stacks below (so their per-layer steps round as they do) and
    bfloat16 CPU models without a stack, where one C call replaces the seven PyTorch
    ops of a norm (about 27 -> 9 us per call at one token); those keep PyTorch's
    SiLU-mul (``activation=False``), which as a separate call is as fast as the C one.
    """
    switched = 0
    for layer in model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.native_cpu = True
            switched += 1
        if activation and getattr(layer.mlp, "act", None) is silu_and_mul:
            layer.mlp.native_cpu_act = True
            switched += 1
    # The final norm too: with one row PyTorch's own costs ~0.2 ms per decode step (an
    # OpenMP region right after the stack's), the C kernel a few microseconds.
    if isinstance(getattr(model, "norm", None), RMSNorm):
        model.norm.native_cpu = True
        switched += 1
    return switched


class NativeDecoderStack:
    """All decoder layers of a :class:`~tokenmill.model.decoder.DecoderModel` in one call.

    Build it with :meth:`build` once the model is loaded and quantized; it keeps
    pointers into the model's weights, so the model must stay as it is.
    """

    def __init__(self, model: torch.nn.Module, layers: list[_Layer], dims: _Dims,
                 max_rows: int, dtype: torch.dtype = torch.float32,
                 short_query_len: int = SHORT_QUERY_LEN) -> None:
        self._model = model  # keeps the weights the pointers point into alive
        self._layers = (_Layer * len(layers))(*layers)
        self._dims = dims
        self.max_rows = max_rows
        # of the activations and the KV cache (the float32 stack also reads 16-bit caches)
        self.dtype = dtype
        # the attention backend's: queries up to it take the per-query kernel
        self.short_query_len = short_query_len
        # Prompt chunks longer than that: the float32 stack attends them with
        # prefill_attention_f32 where this build has it; the bfloat16 one leaves them to
        # the per-layer path (SDPA).
        self.long_chunks = (dtype == torch.float32
                            and cpu_kernels.prefill_attention_supported(dims.head_dim))
        self._caches: list | None = None

    @classmethod
    def build(cls, model: torch.nn.Module) -> NativeDecoderStack | None:
        """The stack for ``model`` (a DecoderModel), or None when some layer needs the
        per-layer path (see the module docstring) or the native kernels are missing."""
        if os.environ.get("TOKENMILL_CPU_NATIVE_STACK", "1") == "0":
            return None
        if cpu_kernels.cpu_kernels() is None or len(model.rotaries) != 1:
            return None
        if model.scales_embeddings:
            return None  # Gemma-style models also carry sandwich norms and GeGLU
        layers: list[_Layer] = []
        dims = None
        max_rows = 1 << 30
        dtype = model.layers[0].input_layernorm.weight.dtype if len(model.layers) else None
        if dtype not in _KINDS:
            return None
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if (layer.sandwich_norms or attn.q_norm is not None or attn.tp.sharded
                    or not hasattr(mlp, "gate_up_proj") or mlp.act is not silu_and_mul
                    or not hasattr(attn.attn_backend, "forward_cached")):
                return None
            projections = [_qlinear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                                 mlp.down_proj)]
            if any(p is None or p.kind not in _KINDS[dtype] for p in projections):
                return None
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if not _contiguous(dtype, *(n.weight for n in norms)) or norms[0].eps != norms[1].eps:
                return None
            for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                if getattr(m, "dense_min_rows", 0) > 0:
                    max_rows = min(max_rows, m.dense_min_rows - 1)
            here = _Dims(norms[0].weight.shape[0], attn.num_heads, attn.num_kv_heads,
                         attn.head_dim, mlp.down_proj.in_features, 0, norms[0].eps, attn.scale)
            if dims is None:
                dims = here
            elif bytes(dims) != bytes(here):
                return None
            if model.rotary.cos_cache.shape[-1] != attn.head_dim:
                return None  # partial rotary: rope_kv_write rotates whole heads
            layers.append(_Layer(*projections, norms[0].weight.data_ptr(),
                                 norms[1].weight.data_ptr(), None, None,
                                 attn.sliding_window or 0, 0))
        if dims is None:
            return None
        use_native_elementwise(model)  # steps the stack does not take round as it does
        logger.info("native %s decoder stack: %d layers, steps of up to %d rows", dtype,
                    len(layers), max_rows)
        short = getattr(model.layers[0].self_attn.attn_backend, "short_query_len", SHORT_QUERY_LEN)
        return cls(model, layers, dims, max_rows, dtype, short)

    def _bind_caches(self, kv_caches: list) -> bool:
        """Point the layers at this step's KV caches (contiguous; the stack's dtype, or
        for the float32 stack also bfloat16 or float16, the same in every layer)."""
        if self._caches is not None and len(kv_caches) == len(self._caches) and all(
                a is b for a, b in zip(kv_caches, self._caches, strict=True)):
            return True
        block_size = None
        cache_dtype = kv_caches[0][0].dtype if kv_caches else self.dtype
        if cache_dtype != self.dtype and not (self.dtype == torch.float32
                                              and cache_dtype in cpu_kernels.KV_KINDS):
            return False
        for entry, (k_cache, v_cache) in zip(self._layers, kv_caches, strict=True):
            if (k_cache.dim() != 4 or not _contiguous(cache_dtype, k_cache, v_cache)
                    or k_cache.device.type != "cpu"):
                return False
            entry.k_cache, entry.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
            if block_size not in (None, k_cache.shape[1]):
                return False
            block_size = k_cache.shape[1]
        self._dims.block_size = block_size or 0
        self._dims.kv_kind = cpu_kernels.KV_KINDS[cache_dtype] if self.dtype == torch.float32 else 0
        self._caches = list(kv_caches)
        return True

    def run(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin_folded: torch.Tensor | None,
        kv_caches: list, meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(hidden, residual)`` after the last layer, as the per-layer loop returns
        them, or None (nothing done) when this step needs the per-layer path."""
        tokens = hidden.shape[0]
        if (tokens == 0 or tokens > self.max_rows
                or (meta.max_query_len > self.short_query_len and not self.long_chunks)
                or meta.has_padding_slots is not False or sin_folded is None
                or hidden.device.type != "cpu"
                or not _contiguous(self.dtype, hidden, cos, sin_folded)
                or cos.shape != (tokens, 1, self._dims.head_dim)
                or sin_folded.shape != cos.shape
                or meta.slot_mapping.dtype != torch.int64 or not meta.slot_mapping.is_contiguous()
                or not (meta.query_start_loc.dtype == meta.seq_lens.dtype
                        == meta.block_tables.dtype == torch.int32)
                or not (meta.query_start_loc.is_contiguous() and meta.seq_lens.is_contiguous()
                        and meta.block_tables.is_contiguous())
                or not self._bind_caches(kv_caches)):
            return None
        hidden = hidden.clone()  # written in place; the caller's tensor stays as it was
        residual = torch.empty_like(hidden)
        tables = meta.block_tables
        step = _Step(tokens, meta.seq_lens.shape[0], tables.shape[1] if tables.dim() == 2 else 0,
                     self.short_query_len, cos.data_ptr(), sin_folded.data_ptr(),
                     meta.slot_mapping.data_ptr(), meta.query_start_loc.data_ptr(),
                     meta.seq_lens.data_ptr(), tables.data_ptr())
        name = "decoder_stack_bf16" if self.dtype == torch.bfloat16 else "decoder_stack_f32"
        status = getattr(cpu_kernels.cpu_kernels(), name)(
            ctypes.byref(self._dims), self._layers, len(self._layers), ctypes.byref(step),
            hidden.data_ptr(), residual.data_ptr())
        if status != 0:
            raise MemoryError(f"{name}: out of memory for its scratch buffers")
        return hidden, residual
