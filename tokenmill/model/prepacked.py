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

Where the CPU multiplies bfloat16 in hardware (AVX512_BF16 / AMX-BF16; oneDNN
then runs AMX tiles), a float32 layer can multiply in bfloat16 instead
(``gemm_dtype``; the loader asks
:func:`~tokenmill.model.dequant_matmul.default_dense_dtype`, which says so on
those CPUs): its weight is packed in bfloat16 (half the bytes), the input is
rounded to bfloat16 on the way in, and the output comes back as float32, so
norms, residuals, rotary, attention and the KV cache stay float32 - the choice
PyTorch's "medium" float32 matmul precision makes, and what the quantized
layers' dense path already did. On a 2-core Xeon with AMX, SmolLM2's 30 layers
and head at 1 / 8 / 32 / 128 / 512 rows took 7.2 / 9.9 / 14.8 / 33 / 176 ms
this way against 14.0 / 20.5 / 46.3 / 149 / 613 ms in float32 (perplexity
change +0.0x%, docs/performance.md). A bfloat16 model's layers are packed as
they are. Unlike float32, a bfloat16 product's output row can differ in its
last bits with the number of rows multiplied with it (oneDNN picks another AMX
blocking): batching is exact only up to bfloat16 rounding.

Used only on the CPU, when PyTorch was built with oneDNN.
``TOKENMILL_CPU_GEMM=aten`` keeps ``F.linear`` (A/B measurements).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from tokenmill.kernels.cpu_features import has_native_bf16
from tokenmill.model.layers import Linear

logger = logging.getLogger(__name__)

_GEMMS = ("onednn", "aten")
_PACKED_DTYPES = (torch.float32, torch.bfloat16)


def default_prepack(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether a model of ``dtype`` on ``device`` gets prepacked linear layers:
    float32 on the CPU with oneDNN, and bfloat16 where the CPU has it in hardware,
    unless ``TOKENMILL_CPU_GEMM=aten``."""
    gemm = os.environ.get("TOKENMILL_CPU_GEMM", "onednn")
    if gemm not in _GEMMS:
        raise ValueError(f"TOKENMILL_CPU_GEMM={gemm!r}: choose one of {', '.join(_GEMMS)}")
    return (gemm == "onednn" and torch.device(device).type == "cpu"
            and (dtype == torch.float32 or (dtype == torch.bfloat16 and has_native_bf16()))
            and torch.backends.mkldnn.is_available())


class PrepackedLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` held in oneDNN's blocked layout.

    The packed weight is an opaque oneDNN tensor: it has no strides, cannot be
    pickled or indexed, and is not part of the state dict (the model is
    inference-only once packed).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 gemm_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        # The type the product runs in: the weight's own, or bfloat16 for a float32
        # layer (input rounded to bfloat16 on the way in, output back to float32).
        self.gemm_dtype = weight.dtype if gemm_dtype is None else gemm_dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(
            weight.detach().to(self.gemm_dtype).contiguous())
        # Kept in the layer's dtype: a mixed layer adds it after the product, in float32.
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    @classmethod
    def from_linear(cls, linear: Linear, gemm_dtype: torch.dtype | None = None
                    ) -> PrepackedLinear:
        return cls(linear.weight.data, linear.bias, gemm_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The weight ``[out, in]`` in the plain layout and the layer's dtype: an exact
        copy of what the product uses, unpacked on each access (writing to it changes
        nothing)."""
        return self.packed.to_dense().to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemm_dtype == x.dtype:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.gemm_dtype), self.packed, None,
                                               "none", [], "").to(x.dtype)
        return y if self.bias is None else y.add_(self.bias)

    def extra_repr(self) -> str:
        gemm = "" if self.gemm_dtype == self.dtype else f", gemm={self.gemm_dtype}"
        return (f"in={self.in_features}, out={self.out_features}, "
                f"bias={self.bias is not None}{gemm}")


@torch.no_grad()
def prepack_linears(model: nn.Module, gemm_dtype: torch.dtype | None = None) -> int:
    """Replace the float32 and bfloat16 :class:`Linear` layers of ``model`` in place;
    returns how many (the caller decides whether this CPU should: :func:`default_prepack`).

    ``gemm_dtype`` bfloat16 makes float32 layers multiply in bfloat16 (see
    :func:`default_gemm_dtype`); None keeps each layer's own dtype.

    A model whose LM head is tied to its embedding (and not already replaced by
    a quantized copy) gets a packed copy of the embedding as its head.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear) and child.weight.dtype in _PACKED_DTYPES:
                gemm = gemm_dtype if child.weight.dtype == torch.float32 else None
                setattr(parent, name, PrepackedLinear.from_linear(child, gemm))
                replaced += 1
    set_head = getattr(model, "set_quantized_lm_head", None)
    if (set_head is not None and getattr(model, "lm_head", False) is None
            and getattr(model, "tied_lm_head", None) is None):
        embedding = model.lm_head_weight
        if embedding.dtype in _PACKED_DTYPES:
            gemm = gemm_dtype if embedding.dtype == torch.float32 else None
            set_head(PrepackedLinear(embedding, gemm_dtype=gemm))
            replaced += 1
    logger.info("oneDNN prepacked linear layers: %d", replaced)
    return replaced
