"""Dense float32 and bfloat16 CPU linear layers on oneDNN, weights prepacked once at load.

``F.linear`` on a float32 CPU tensor runs MKL's sgemm, which is slow for the
row counts of batched decode (2-64 rows): on SmolLM2's layer shapes, two
AVX2 cores, oneDNN's inner product on a weight reordered once into its blocked
layout took 0.56 / 1.00 / 2.57 ms for 1 / 8 / 32 rows against MKL's
0.59 / 1.80 / 4.23 ms (docs/performance.md). vLLM's CPU backend runs its
dense layers the same way. :func:`prepack_linears` swaps every dense
:class:`~tokenmill.model.layers.Linear` of a loaded model (and a tied LM head)
for a :class:`PrepackedLinear`; the plain weight is dropped, so memory does
not grow (except for a tied head, whose embedding stays for lookups).

Numerics: the same products summed in another order, so outputs differ from
``F.linear`` by float32 rounding (about 1e-6 relative). Measured here, an
output row did not depend on how many rows were multiplied with it, where
MKL's sgemm switches kernels below 8 rows; so batching a request with others
changes nothing in its linear layers.

bfloat16 weights (``--dtype auto`` on CPUs with AVX512_BF16 / AMX-BF16) are
packed the same way, and oneDNN then runs AMX tiles: on a 2-core Xeon with AMX,
one SmolLM2 decoder layer's matmuls ran 1.7x / 2.6x / 2.8x / 5.5x faster in
bfloat16 than in packed float32 at 1 / 8 / 32 / 512 rows
(``benchmarks/cpu_gemm.py``). A bfloat16 model on a CPU without bfloat16 in
hardware keeps ``F.linear``. Unlike float32, a bfloat16 output row can differ
in its last bit with the number of rows multiplied with it (oneDNN picks
another AMX blocking): batching is exact only up to bfloat16 rounding.

Where the CPU has AMX-BF16 (and the layer's sizes are multiples of 32), a
bfloat16 layer becomes an :class:`AmxLinear` instead: tokenmill's own AMX kernel
(``kernels/cpu/bf16_matmul.c``) on a weight packed as AMX tiles in the order it
streams them. On a 2-core Sapphire Rapids VM one decoder layer's matmuls ran
1.3-1.8x faster than oneDNN's at 1-32 rows and 10-25% slower from 128 rows (a
whole 1,024-token prefill step was still faster on it), with outputs
bit-identical to oneDNN's up to 32 rows (``benchmarks/cpu_gemm.py``).

Where the CPU has AVX512-BF16 but no AMX (AMD Zen 4/5), a bfloat16 layer becomes a
:class:`Bf16DotLinear`: tokenmill's ``vdpbf16ps`` kernel (``kernels/cpu/bf16_matmul_dot.c``)
on the same packed layout. On a 2-core Zen 4 VM one decoder layer's matmuls ran
1.36x faster than oneDNN's at 1 row, 1.19x at 8 and 32, 1.09x at 128 (the LM head
0.95-1.12x); what it buys most is that bfloat16 models there run the native decoder
stack too (a decode step 1.5x faster at batch 1, 1.2x at 32).

On CPUs with AVX2 but no AVX-512, a float32 layer (output size a multiple of 16)
becomes an :class:`F32PanelLinear`: tokenmill's own FMA kernel
(``kernels/cpu/f32_matmul.c``) on a weight packed in 16-column panels. Against
oneDNN's AVX2 kernels (a Xeon held to AVX2), SmolLM2's layer matmuls ran 1.1-1.4x
faster at 1-64 rows and 0.9-1.0x from 128 (``benchmarks/cpu_gemm.py``); being C, the
float32 layers can join the native decoder stack. Where the CPU has AVX-512, oneDNN's
512-bit kernels win from 16 rows on and keep float32.

Used only on the CPU, when PyTorch was built with oneDNN.
``TOKENMILL_CPU_GEMM``: ``auto`` (the default, as above), ``native`` (tokenmill's
kernels wherever they run, AVX-512 CPUs included), ``onednn`` (no tokenmill kernel)
or ``aten`` (``F.linear``), for A/B measurements and tests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels import cpu as cpu_kernels
from tokenmill.kernels.cpu_features import has_native_bf16
from tokenmill.model.layers import Linear

logger = logging.getLogger(__name__)

_GEMMS = ("auto", "native", "onednn", "aten")
_PACKED_DTYPES = (torch.float32, torch.bfloat16)


def cpu_gemm() -> str:
    """``TOKENMILL_CPU_GEMM`` (default ``auto``), checked."""
    gemm = os.environ.get("TOKENMILL_CPU_GEMM", "auto")
    if gemm not in _GEMMS:
        raise ValueError(f"TOKENMILL_CPU_GEMM={gemm!r}: choose one of {', '.join(_GEMMS)}")
    return gemm


def default_prepack(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether a model of ``dtype`` on ``device`` gets prepacked linear layers:
    float32 on the CPU with oneDNN, and bfloat16 where the CPU has it in hardware,
    unless ``TOKENMILL_CPU_GEMM=aten``."""
    return (cpu_gemm() != "aten" and torch.device(device).type == "cpu"
            and (dtype == torch.float32 or (dtype == torch.bfloat16 and has_native_bf16()))
            and torch.backends.mkldnn.is_available())


class PrepackedLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` held in oneDNN's blocked layout.

    The packed weight is an opaque oneDNN tensor: it has no strides, cannot be
    pickled or indexed, and is not part of the state dict (the model is
    inference-only once packed).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    @classmethod
    def from_linear(cls, linear: Linear) -> PrepackedLinear:
        return cls(linear.weight.data, linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The weight ``[out, in]`` in the plain layout: an exact copy, unpacked on each
        access (writing to it changes nothing)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class NativePackedLinear(nn.Module):
    """``y = x @ W.T + b`` on one of tokenmill's CPU matmul kernels, ``W`` packed once at
    load in the layout that kernel streams. Subclasses name the kernel (``matmul``,
    None when it cannot run the inputs) and its layout (``pack``, ``unpack``); inputs
    the kernel does not take go through ``F.linear`` on the unpacked weight.
    """

    pack: Callable[[torch.Tensor], torch.Tensor]
    unpack: Callable[[torch.Tensor], torch.Tensor]
    matmul: Callable[..., torch.Tensor | None]

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = nn.Parameter(self.pack(weight), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The weight ``[out, in]`` in the plain layout (a copy on each access)."""
        return self.unpack(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = self.matmul(flat, self.packed, self.bias)
        if out is None:
            return F.linear(x, self.weight.to(x.dtype),
                            None if self.bias is None else self.bias.to(x.dtype))
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class AmxLinear(NativePackedLinear):
    """bfloat16 ``y = x @ W.T + b`` on tokenmill's AMX kernel, ``W`` packed as AMX tiles.

    Build it only where :func:`amx_usable` says yes.
    """

    pack = staticmethod(cpu_kernels.pack_bf16_amx)
    unpack = staticmethod(cpu_kernels.unpack_bf16_amx)
    matmul = staticmethod(cpu_kernels.bf16_matmul_amx)


def _bf16_kernel_usable(weight: torch.Tensor, available: Callable[[], bool]) -> bool:
    """bfloat16 on the CPU, sizes the packed layout fits (both bfloat16 kernels share it),
    ``TOKENMILL_CPU_GEMM=auto`` or ``native``, and ``available()``: the kernel runs here."""
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and cpu_kernels.amx_shape_supported(*weight.shape)
            and cpu_gemm() in ("auto", "native") and available())


def amx_usable(weight: torch.Tensor) -> bool:
    """Whether a weight becomes an :class:`AmxLinear`: bfloat16 on the CPU, sizes the
    kernel's blocking fits, an AMX-BF16 CPU, ``TOKENMILL_CPU_GEMM=auto`` or ``native``."""
    return _bf16_kernel_usable(weight, cpu_kernels.amx_bf16_available)


class Bf16DotLinear(NativePackedLinear):
    """bfloat16 ``y = x @ W.T + b`` on tokenmill's AVX512-BF16 kernel (CPUs with bfloat16
    dot products but no AMX), ``W`` packed as for :class:`AmxLinear`.

    Build it only where :func:`bf16_dot_usable` says yes.
    """

    pack = staticmethod(cpu_kernels.pack_bf16_amx)
    unpack = staticmethod(cpu_kernels.unpack_bf16_amx)
    matmul = staticmethod(cpu_kernels.bf16_matmul_dot)


def bf16_dot_usable(weight: torch.Tensor) -> bool:
    """Whether a weight becomes a :class:`Bf16DotLinear`: bfloat16 on the CPU, sizes the
    kernel's blocking fits, the kernel built here, ``TOKENMILL_CPU_GEMM=auto`` or
    ``native`` (AMX, where present, comes first: :func:`amx_usable`)."""
    return _bf16_kernel_usable(weight, cpu_kernels.bf16_dot_available)


class F32PanelLinear(NativePackedLinear):
    """float32 ``y = x @ W.T + b`` on tokenmill's FMA kernel, ``W`` packed in panels of 16
    output columns.

    Build it only where :func:`f32_panel_usable` says yes.
    """

    pack = staticmethod(cpu_kernels.pack_f32_panels)
    unpack = staticmethod(cpu_kernels.unpack_f32_panels)
    matmul = staticmethod(cpu_kernels.f32_matmul_panel)


def f32_panel_usable(weight: torch.Tensor) -> bool:
    """Whether a weight becomes an :class:`F32PanelLinear`: float32 on the CPU, an output
    size that is a multiple of 16, and the kernel built here and preferred
    (``TOKENMILL_CPU_GEMM=auto``: an AVX2 CPU without AVX-512) or asked for (``native``)."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.shape[0] % 16:
        return False
    gemm = cpu_gemm()
    return ((gemm == "auto" and cpu_kernels.f32_panel_preferred())
            or (gemm == "native" and cpu_kernels.f32_panel_available()))


def _packed(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    if amx_usable(weight):
        return AmxLinear(weight, bias)
    if bf16_dot_usable(weight):
        return Bf16DotLinear(weight, bias)
    if f32_panel_usable(weight):
        return F32PanelLinear(weight, bias)
    return PrepackedLinear(weight, bias)


@torch.no_grad()
def prepack_linears(model: nn.Module) -> int:
    """Replace the float32 and bfloat16 :class:`Linear` layers of ``model`` in place;
    returns how many (the caller decides whether this CPU should: :func:`default_prepack`).

    Each becomes a :class:`PrepackedLinear`, or an :class:`AmxLinear` where
    :func:`amx_usable`, a :class:`Bf16DotLinear` where :func:`bf16_dot_usable`, or an
    :class:`F32PanelLinear` where :func:`f32_panel_usable`.
    A model whose LM head is tied to its embedding (and not already replaced by a
    quantized copy) gets a packed copy of the embedding as its head.
    """
    replaced: list[str] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear) and child.weight.dtype in _PACKED_DTYPES:
                layer = _packed(child.weight.data, child.bias)
                setattr(parent, name, layer)
                replaced.append(type(layer).__name__)
    set_head = getattr(model, "set_quantized_lm_head", None)
    if (set_head is not None and getattr(model, "lm_head", False) is None
            and getattr(model, "tied_lm_head", None) is None):
        embedding = model.lm_head_weight
        if embedding.dtype in _PACKED_DTYPES:
            layer = _packed(embedding)
            set_head(layer)
            replaced.append(type(layer).__name__)
    logger.info("prepacked linear layers: %d (%s)", len(replaced),
                ", ".join(f"{replaced.count(k)} {k}" for k in sorted(set(replaced))))
    return len(replaced)
