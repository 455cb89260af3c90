"""Weight-only int4 / int8 quantization for CPU decoding.

Single-stream decode on a CPU reads every weight once per token, so it is
bound by weight bytes; 4-bit weights read 8x fewer bytes than float32. After
the weights are loaded, each ``Linear`` of the decoder is replaced:

- ``int4``: an :class:`Int4Linear`, asymmetric group-wise codes (groups of 32
  along the input dimension, like llama.cpp's Q4_0/Q4_1 blocks) run through
  PyTorch's CPU int4 matmul (``aten._weight_int4pack_mm_for_cpu``). The LM
  head gets 8 bits (:class:`Int8Linear`), as llama.cpp's Q4 files keep it:
  4-bit logits cost SmolLM2 about 5% perplexity, 8-bit ones nothing measurable.
- ``int8``: every linear, head included, is an :class:`Int8Linear`:
  symmetric codes with one scale per group of 32 (llama.cpp's Q8_0), computed
  by a native kernel (:mod:`tokenmill.kernels.cpu`; PyTorch's own int8
  weight-only matmul is about 10x slower than float32 on CPUs without
  AVX-512). A Q8_0 tensor's own codes and scales are recovered exactly.

That kernel dequantizes ``w = (q - 8) * scale + zero`` per group. A Q4_1 block
stores ``w = d * q + m`` with ``m`` the group minimum and ``q`` in 0..15, so
quantizing a dequantized Q4_1 weight with the group's min/max recovers the
file's own codes exactly; only ``d`` and ``m`` are rounded (to bfloat16, the
kernel's scale type). Other sources (float checkpoints, Q8_0, Q6_K) are
rounded to 4 bits here, a real quality cost: ``tokenmill eval ppl`` measures it.

Activations stay in the model's dtype everywhere else (norms, attention,
residual stream); only the matmul input is rounded to bfloat16, the one input
type the kernel is fast for on CPUs without AVX-512 (float32 inputs take a
scalar path about 10x slower).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from tokenmill.kernels import cpu
from tokenmill.model import dequant_matmul
from tokenmill.model.layers import Linear

logger = logging.getLogger(__name__)

QUANTIZATION_METHODS = ("int4", "int8")
INT4_GROUP_SIZE = 32
INT8_GROUP_SIZE = 32


def check_quantization(method: str | None, device: torch.device) -> None:
    """Raise ValueError for an unknown method or one this device cannot run."""
    if method is None:
        return
    if method not in QUANTIZATION_METHODS:
        raise ValueError(
            f"unknown quantization {method!r}; choose one of {', '.join(QUANTIZATION_METHODS)}"
        )
    if device.type != "cpu":
        raise ValueError(f"quantization {method!r} is implemented for CPU only, not {device}")


def quantize_int4(
    weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric 4-bit codes of ``weight`` ``[N, K]``.

    Returns ``(codes, scales, zeros)``: int32 codes in 0..15 ``[N, K]`` and
    float32 ``[N, K // group_size]`` scales and zeros such that
    ``weight ~= (codes - 8) * scale + zero`` within each group.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    groups = weight.float().reshape(n, k // group_size, group_size)
    low = groups.amin(dim=-1)
    high = groups.amax(dim=-1)
    scales = (high - low) / 15
    # A constant group has no spread: any positive scale reproduces it exactly.
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp_(0, 15)
    zeros = low + 8 * scales
    return codes.to(torch.int32).reshape(n, k), scales, zeros


def dequantize_int4(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    group_size: int = INT4_GROUP_SIZE,
) -> torch.Tensor:
    """Float32 weight ``[N, K]`` back from :func:`quantize_int4`'s output."""
    n, k = codes.shape
    groups = codes.float().reshape(n, k // group_size, group_size) - 8
    return (groups * scales[..., None] + zeros[..., None]).reshape(n, k)


def q4_1_scales(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_1's per-group ``d`` and ``m`` (``w = d * code + m``) from
    :func:`quantize_int4`'s scales and zeros, in half precision as llama.cpp stores
    them; contiguous, what :func:`tokenmill.kernels.cpu.q4_matmul` takes."""
    return (scales.to(torch.float16).contiguous(),
            (zeros - 8 * scales).to(torch.float16).contiguous())


def dequantize_q4_1(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Float32 weight ``[N, K]`` that the Q4_1 kernels multiply by: ``d * code + m`` per
    group of 32, ``d`` and ``m`` (:func:`q4_1_scales`) widened to float32."""
    n, k = codes.shape
    groups = codes.float().reshape(n, k // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
    return (groups * d.float()[..., None] + m.float()[..., None]).reshape(n, k)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit codes of ``weight`` ``[N, K]``, one scale per group of 32.

    Returns int8 codes ``[N, K]`` and float32 scales ``[N, K // 32]`` with
    ``weight ~= codes * scale`` (llama.cpp's Q8_0: scale = max |w| / 127).
    """
    n, k = weight.shape
    if k % INT8_GROUP_SIZE:
        raise ValueError(f"in_features {k} is not a multiple of the group size {INT8_GROUP_SIZE}")
    groups = weight.float().reshape(n, k // INT8_GROUP_SIZE, INT8_GROUP_SIZE)
    scales = groups.abs().amax(dim=-1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(groups / scales[..., None]).clamp_(-127, 127)
    return codes.to(torch.int8).reshape(n, k), scales


def round_to_q8(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[M, K]`` rounded the way the native kernels round their input.

    Per group of 32: ``dx = max |x| / 127``, ``x ~= dx * round(x / dx)``
    (ties to even). Used where the native kernels are missing, so results do
    not depend on whether a C compiler was found.
    """
    m, k = x.shape
    groups = x.float().reshape(m, k // INT8_GROUP_SIZE, INT8_GROUP_SIZE)
    scale = groups.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(groups * inv) * scale).reshape(m, k)


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Float32 weight ``[N, K]`` back from :func:`quantize_int8`'s output."""
    n, k = codes.shape
    groups = codes.float().reshape(n, k // INT8_GROUP_SIZE, INT8_GROUP_SIZE)
    return (groups * scales[..., None]).reshape(n, k)


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` as int8 codes and float32 group scales.

    Computed by a native CPU kernel (input rounded to 8 bits per group of 32,
    integer dot products): ``panels`` (:func:`tokenmill.kernels.cpu.int8_matmul_panels`,
    CPUs with AVX512-VNNI or AVX2, output size a multiple of 16, the weight packed in panels
    of 16 output columns; on AMX-BF16 CPUs calls of at least :attr:`amx_min_rows` rows run
    on AMX tiles, bfloat16 operands) or ``native`` (:func:`tokenmill.kernels.cpu.int8_matmul`,
    the weight row by row); see :func:`default_quantized_kernel`. Without either (no
    C compiler) the weight is dequantized per call and multiplied with the same
    rounded input: slower, the same numbers up to summation order.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 kernel: str | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.kernel = default_quantized_kernel(self.out_features, 8) if kernel is None else kernel
        if self.kernel not in ("native", "panels"):
            raise ValueError(f"unknown int8 kernel {self.kernel!r}")
        codes, scales = quantize_int8(weight)
        if self.kernel == "panels":  # codes (offset to unsigned) and scales per 16-column panel
            self.register_buffer("packed", cpu.pack_int8_panels(codes, scales))
        else:
            self.register_buffer("codes", codes)
            self.register_buffer("scales", scales.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                           requires_grad=False)
        # Input rows from which the product runs on AMX tiles (then never dense), else a
        # float GEMM on dequantized tiles (prefill). (On AVX2 the int8 panels are not
        # faster than the rows from a few rows on, so prompts keep the rows' dense
        # threshold there.)
        self.amx_min_rows = panel_amx_min_rows(self.out_features, self.kernel, 8)
        self.dense_min_rows = (0 if self.amx_min_rows else
                               dequant_matmul.PANEL_DENSE_MIN_ROWS
                               if self.kernel == "panels" and cpu.int8_panels_vnni()
                               else dequant_matmul.DENSE_MIN_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).float()
        y = None
        if self.amx_min_rows and flat.shape[0] >= self.amx_min_rows:
            y = cpu.int8_matmul_panels_amx(flat, self.packed, self.bias)
        elif dequant_matmul.use_dense(flat.shape[0], self.dense_min_rows):
            y = dequant_matmul.tiled_dense_matmul(flat, self.out_features,
                                                  self._dequantize_rows, self.bias,
                                                  row_multiple=16)
        if y is None and self.kernel == "panels":
            y = cpu.int8_matmul_panels(flat, self.packed, self.bias)
            if y is None:
                raise RuntimeError("the int8 panel kernel is not available on this CPU")
        if y is None:
            y = cpu.int8_matmul(flat, self.codes, self.scales, self.bias)
        if y is None:
            y = torch.nn.functional.linear(
                round_to_q8(flat), dequantize_int8(self.codes, self.scales), self.bias)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _dequantize_rows(self, start: int, stop: int) -> torch.Tensor | None:
        if self.kernel == "panels":
            return cpu.int8_panels_dequantize(self.packed, start, stop)
        return cpu.q8_dequantize(self.codes, self.scales, start, stop)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, group={INT8_GROUP_SIZE}, "
                f"kernel={self.kernel}, bias={self.bias is not None}")


# Input rows from which a panel layer multiplies on AMX tiles (panel_matmul_amx.c: the
# weight dequantized to bfloat16 tiles per call) instead of the VNNI panels, by weight
# bits. On a 2-core Sapphire Rapids (benchmarks/quantized_prefill.py, docs/performance.md):
# 30 x SmolLM2's four int4 layers 0.90x at 16 rows, 1.02x at 20, 1.07x at 24, 1.29x at 32
# and 2.6x at 512 (where it also beats the dense bfloat16 path by 1.6x). 8-bit layers
# below it keep the integer numbers on AMX int8 tiles (panel_matmul_amx_exact.c, from 8
# rows), which the bfloat16 tiles only overtake from 48 rows (benchmarks/panel_tiles.py:
# int8 layers 0.97x at 32 rows, 1.2x at 48; the LM head 0.80x at 32, 1.2x at 48).
# TOKENMILL_AMX_MIN_ROWS overrides both (0: never, the integer numbers at any row count).
_AMX_ROWS_ENV = os.environ.get("TOKENMILL_AMX_MIN_ROWS")
AMX_MIN_ROWS = {4: int(_AMX_ROWS_ENV or 24), 8: int(_AMX_ROWS_ENV or 48)}


def panel_amx_min_rows(out_features: int, kernel: str, bits: int) -> int:
    """The row count from which an :class:`Int4Linear` (``bits`` 4) or :class:`Int8Linear`
    (8) of ``out_features`` outputs on ``kernel`` runs on AMX tiles
    (:func:`tokenmill.kernels.cpu.q4_matmul_panels_amx`, ``int8_matmul_panels_amx``); 0
    where it never does (no AMX-BF16, not on panels, outputs not a multiple of 32)."""
    rows = AMX_MIN_ROWS[bits]
    if kernel != "panels" or rows <= 0 or out_features % 32 or not cpu.panels_amx_available():
        return 0
    return rows


def keep_integer_numbers(model: nn.Module) -> int:
    """Make every int4/int8 layer of ``model`` compute with its integer kernel at any row
    count (never AMX bfloat16 tiles, never the dense float path), so that a row's result
    does not depend on how many rows are multiplied with it: what a batch-invariant
    engine needs (the AMX int8 tiles, used from a few dozen rows, give the integer
    kernels' bits). Returns how many layers it changed. Call it before the native decoder
    stack is built: the stack copies the thresholds."""
    changed = 0
    for module in model.modules():
        if isinstance(module, (Int4Linear, Int8Linear)) and (module.amx_min_rows
                                                             or module.dense_min_rows):
            module.amx_min_rows = module.dense_min_rows = 0
            changed += 1
    logger.info("batch-invariant: %d quantized layers moved to their integer kernels at every "
                "row count", changed)
    return changed


def default_quantized_kernel(out_features: int, bits: int = 4) -> str:
    """The :class:`Int4Linear` (``bits`` 4) or :class:`Int8Linear` (8) kernel for a layer
    of ``out_features`` outputs on this CPU: ``panels`` where the outputs fill 16-column
    panels and the CPU runs the panel kernel (AVX2 or AVX512-VNNI), unless
    ``TOKENMILL_CPU_PANELS=0``; else ``native`` (for int4: ``torch`` without the C
    kernels; int8 then falls back per call)."""
    if cpu.cpu_kernels() is None:
        return "torch" if bits == 4 else "native"
    available = cpu.q4_panels_available if bits == 4 else cpu.int8_panels_available
    if (out_features % 16 == 0 and os.environ.get("TOKENMILL_CPU_PANELS", "1") != "0"
            and available()):
        return "panels"
    return "native"


class Int4Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` in 4-bit groups of 32.

    Three CPU kernels, picked once at construction (:func:`default_quantized_kernel`):

    - ``native`` (:func:`tokenmill.kernels.cpu.q4_matmul`, when a C compiler is
      available): Q4_1-layout weights (scale and minimum per group in half
      precision) times the input rounded to 8 bits per group, integer dot
      products, the way llama.cpp runs its Q4 files;
    - ``panels`` (:func:`tokenmill.kernels.cpu.q4_matmul_panels`, CPUs with AVX2
      or AVX512-VNNI, output size a multiple of 16): the same codes, scales and
      rounded input, the weight packed in panels of 16 output columns, one
      load serving 16 (or 8) columns and every input row of a block; the same
      exact integer sums per group, scaled and summed in another order. At one
      input row it streams the weight at least as fast as the row kernel, from a
      few rows on it is 1.2-2.6x faster (docs/performance.md);
    - ``torch`` (``aten._weight_int4pack_mm_for_cpu``): the same codes with
      bfloat16 scales and a bfloat16 copy of the input.

    On CPUs with AMX-BF16, ``panels`` layers multiply calls of at least
    :attr:`amx_min_rows` rows on AMX tiles instead
    (:func:`tokenmill.kernels.cpu.q4_matmul_panels_amx`): the weight dequantized to
    bfloat16 per call, the input rounded to bfloat16, float32 sums.

    All give the same greedy result as float32 most of the time, never
    bit-identical logits; ``tokenmill eval ppl`` measures the cost.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = INT4_GROUP_SIZE,
        kernel: str | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        if kernel is None:
            kernel = (default_quantized_kernel(self.out_features, 4) if group_size == 32
                      else "torch")
        if kernel not in ("native", "panels", "torch"):
            raise ValueError(f"unknown int4 kernel {kernel!r}")
        self.kernel = kernel
        codes, scales, zeros = quantize_int4(weight, group_size)
        # Buffers, not parameters: nothing here is trainable, and module.to(dtype)
        # must not cast the packed bytes.
        if kernel in ("native", "panels"):
            # Half-precision d and m, as in llama.cpp's files: 0.625 bytes per weight in
            # all instead of 0.75, and single-stream decode is bound by bytes.
            d, m = q4_1_scales(scales, zeros)
        if kernel == "native":
            self.register_buffer("packed", cpu.pack_q4(codes))
            self.register_buffer("scales", d)
            self.register_buffer("mins", m)
        elif kernel == "panels":  # codes, d and m interleaved per 16-column panel
            self.register_buffer("packed", cpu.pack_q4_panels(codes, d, m))
        else:
            self.register_buffer(
                "packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            )
            # [K // group, N, 2] (scale, zero): the kernel's layout.
            self.register_buffer(
                "scales_zeros",
                torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
                .to(torch.bfloat16),
            )
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        # Input rows from which the product runs on AMX tiles (then never dense: the tiles
        # beat the dense path at every row count), else a float GEMM on dequantized tiles.
        self.amx_min_rows = panel_amx_min_rows(self.out_features, kernel, 4)
        self.dense_min_rows = (0 if self.amx_min_rows else
                               dequant_matmul.PANEL_DENSE_MIN_ROWS if kernel == "panels"
                               else dequant_matmul.DENSE_MIN_ROWS)

    @classmethod
    def from_linear(cls, linear: Linear, group_size: int = INT4_GROUP_SIZE) -> Int4Linear:
        return cls(linear.weight.data, linear.bias, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        if self.kernel in ("native", "panels"):
            bias = None if self.bias is None else self.bias.float()
            y = None
            if self.amx_min_rows and flat.shape[0] >= self.amx_min_rows:
                y = cpu.q4_matmul_panels_amx(flat.float(), self.packed, bias)
            elif dequant_matmul.use_dense(flat.shape[0], self.dense_min_rows):
                y = dequant_matmul.tiled_dense_matmul(
                    flat.float(), self.out_features, self._dequantize_rows, bias,
                    row_multiple=16)
            if y is None and self.kernel == "panels":
                y = cpu.q4_matmul_panels(flat.float(), self.packed, bias)
            elif y is None:
                y = cpu.q4_matmul(flat.float(), self.packed, self.scales, self.mins, bias)
            if y is None:
                raise RuntimeError(f"int4 kernel {self.kernel!r} is not available on this CPU")
            return y.to(x.dtype).reshape(*lead, self.out_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat.to(torch.bfloat16), self.packed, self.group_size, self.scales_zeros
        ).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def _dequantize_rows(self, start: int, stop: int) -> torch.Tensor | None:
        if self.kernel == "panels":
            return cpu.q4_panels_dequantize(self.packed, start, stop)
        return cpu.q4_dequantize(self.packed, self.scales, self.mins, start, stop)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, group={self.group_size}, "
                f"kernel={self.kernel}, bias={self.bias is not None}")


def _quantized(linear: Linear, bits: int) -> nn.Module:
    if bits == 4:
        return Int4Linear.from_linear(linear)
    return Int8Linear(linear.weight.data, linear.bias)


def _quantized_weight(weight: torch.Tensor, bits: int) -> nn.Module:
    return Int4Linear(weight) if bits == 4 else Int8Linear(weight)


def quantize_model(model: nn.Module, method: str | None) -> int:
    """Replace the quantizable ``Linear`` layers of ``model`` in place; returns how many.

    Layers whose input size is not a multiple of 32 stay dense. Experts of a
    mixture-of-experts layer are quantized like linear layers. The LM head
    (``model.lm_head``, or for an embedding-tied model a quantized copy of the
    embedding set with ``set_quantized_lm_head``) always gets 8 bits; the
    embedding itself stays dense for lookups.
    """
    if method is None:
        return 0
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization {method!r}")
    layer_bits = 4 if method == "int4" else 8
    head = getattr(model, "lm_head", None)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear) and child.in_features % INT4_GROUP_SIZE == 0:
                setattr(parent, name, _quantized(child, 8 if child is head else layer_bits))
                replaced += 1
    for module in list(model.modules()):
        # Mixture-of-experts layers: each expert's matrices, the same way (router stays dense).
        quantize_experts = getattr(module, "quantize_experts", None)
        if quantize_experts is not None:
            replaced += quantize_experts(lambda w: _quantized_weight(w, layer_bits))
    set_head = getattr(model, "set_quantized_lm_head", None)
    if set_head is not None and head is None:
        embedding = model.lm_head_weight
        if embedding.shape[1] % INT8_GROUP_SIZE == 0:
            set_head(Int8Linear(embedding))
            replaced += 1
    logger.info("%s weight-only quantization: %d linear layers", method, replaced)
    return replaced
