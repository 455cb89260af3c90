"""Native CPU kernels: C sources compiled on first use, called through ctypes.

The C code has no PyTorch headers, so it compiles in about a second with the
system C compiler (``$CC``, else ``cc``/``gcc``) and needs no build step at
install time. The shared object is cached under ``$TOKENMILL_CACHE_DIR``
(default ``~/.cache/tokenmill``) keyed by the source, the flags, the compiler
and the CPU's feature flags (it is built with ``-march=native``, or
``$TOKENMILL_CPU_MARCH``, else the ``-march`` of ``$TOKENMILL_CPU_MAX_ISA``), so a
cache shared between different machines never runs foreign instructions. The AVX2
paths have portable C twins that give the same results up to float summation order.

OpenMP: the library links ``libgomp.so.1``, which resolves to the copy
PyTorch has already loaded (same soname), so its parallel loops run on
PyTorch's thread pool with ``torch.set_num_threads`` threads.

If no compiler is found or the build fails, :func:`cpu_kernels` returns None
(logged once) and callers use their PyTorch path. ``TOKENMILL_CPU_KERNELS=0``
turns the native kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from tokenmill.kernels.cpu_features import cpu_flags, max_isa_march

logger = logging.getLogger(__name__)

_SOURCES = ("paged_attention.c", "paged_attention_q8.c", "int8_matmul.c", "q4_matmul.c",
            "dequantize.c", "rope_kv_write.c", "decoder_stack.c", "bf16_ops.c",
            "bf16_matmul.c", "argmax.c", "decoder_stack_bf16.c", "f32_matmul.c",
            "prefill_attention.c", "bf16_matmul_dot.c", "q4_matmul_panels.c",
            "int8_matmul_panels.c", "panel_matmul_amx.c", "panel_matmul_amx_exact.c")
# Included by the sources: part of the cache key, not compiled on their own.
_HEADERS = ("q8_input.h", "bf16.h", "fp16.h", "vec_math.h", "decoder_stack.h",
            "paged_attention_avx2.inc", "paged_attention_avx512.inc", "paged_attention_items.h",
            "prefill_attention.inc", "kv_cache_types.h", "amx_tiles.h",
            "panel_matmul_amx_exact.h")
_FLAGS = ("-O3", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")


def _march() -> str:
    """Target CPU: this one, unless ``TOKENMILL_CPU_MARCH`` names another (e.g. x86-64,
    which builds the portable loops instead of the AVX2 paths; tests use it) or
    ``TOKENMILL_CPU_MAX_ISA`` caps it (haswell for avx2, cascadelake for avx512)."""
    return os.environ.get("TOKENMILL_CPU_MARCH") or max_isa_march() or "native"

_i64, _i32, _f32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
_ATTENTION_ARGTYPES = [
    _ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr,
    _i32, _i32, _i32, _i32, _i32, _i32, _f32, _i32, _i32,
]
# + kind (0 int8, 1 fp8 e4m3) and whether q/out are bfloat16
_Q8_ATTENTION_ARGTYPES = [*_ATTENTION_ARGTYPES, _i32, _i32]
_INT8_MATMUL_ARGTYPES = [_ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i32, _i32, _i32]
_Q4_MATMUL_ARGTYPES = [_ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i32, _i32, _i32]
_Q4_DEQUANTIZE_ARGTYPES = [_ptr, _ptr, _ptr, _ptr, _i32, _i32]
_PANEL_MATMUL_ARGTYPES = [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i32, _i32, _i32]
_Q8_DEQUANTIZE_ARGTYPES = [_ptr, _ptr, _ptr, _i32, _i32]
_ROPE_KV_WRITE_ARGTYPES = [_ptr, _i64, _i32, _i32, _i32, _i32, _ptr, _ptr, _ptr, _ptr, _ptr,
                           _ptr]
_RMS_NORM_ARGTYPES = [_ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i32, _i32, _f32]
_SILU_MUL_ARGTYPES = [_ptr, _i64, _ptr, _i32, _i32]
_DECODER_STACK_ARGTYPES = [_ptr, _ptr, _i32, _ptr, _ptr, _ptr]
_PACKED_MATMUL_ARGTYPES = [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i32, _i32, _i32]


# TOKENMILL_CPU_FUSED_ROPE=0: rotary and K/V write as PyTorch ops (for A/B measurements).
_FUSED_ROPE = os.environ.get("TOKENMILL_CPU_FUSED_ROPE", "1") != "0"

# Quantized KV caches the native kernel reads: storage dtype -> kind argument.
_Q8_KINDS = {torch.int8: 0, torch.uint8: 1}
# A float32 model's cache types (kv_cache_types.h): storage dtype -> kv_kind argument, and
# the suffix of the kernels that read (and write) it.
KV_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_KV_SUFFIX = {torch.float32: "", torch.bfloat16: "_kvbf16", torch.float16: "_kvf16"}
# Every cache type the prompt kernel reads: the above and the 8-bit ones (TM_KV_INT8,
# TM_KV_FP8).
_PREFILL_KV_KINDS = {**KV_KINDS, torch.int8: 3, torch.uint8: 4}
_PER_TILE = 16  # TM_KV_PER_TILE


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    root = os.environ.get("TOKENMILL_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "tokenmill")
    return Path(root) / "kernels"


def _build(compiler: str) -> Path:
    here = Path(__file__).parent
    sources = [here / name for name in _SOURCES]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    flags = (*_FLAGS, f"-march={_march()}")
    headers = [here / name for name in _HEADERS]
    for part in [*(p.read_bytes() for p in sources + headers), " ".join(flags).encode(),
                 version.encode(), " ".join(sorted(cpu_flags())).encode()]:
        key.update(part)
    target = _cache_dir() / f"tokenmill_cpu_{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target, then rename: concurrent builders never see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *flags, *map(str, sources), "-o", tmp, "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def cpu_kernels() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when native kernels are unavailable."""
    if os.environ.get("TOKENMILL_CPU_KERNELS", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        logger.warning("no C compiler found: CPU attention uses the PyTorch path")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError) as exc:
        logger.warning("CPU kernels unavailable, using the PyTorch path: %s", exc)
        return None
    for name in ("paged_attention_f32", "paged_attention_bf16", "paged_attention_f32_kvbf16",
                 "paged_attention_f32_kvf16"):
        fn = getattr(lib, name)
        fn.argtypes = _ATTENTION_ARGTYPES
        fn.restype = None
    lib.prefill_attention_f32.argtypes = [*_ATTENTION_ARGTYPES, _i32]  # + kv_kind
    lib.prefill_attention_f32.restype = ctypes.c_int
    lib.prefill_attention_supported.argtypes = [_i32]
    lib.prefill_attention_supported.restype = ctypes.c_int
    lib.paged_attention_q8.argtypes = _Q8_ATTENTION_ARGTYPES
    lib.paged_attention_q8.restype = None
    lib.int8_matmul_f32.argtypes = _INT8_MATMUL_ARGTYPES
    lib.int8_matmul_f32.restype = ctypes.c_int
    lib.q4_matmul_f32.argtypes = _Q4_MATMUL_ARGTYPES
    lib.q4_matmul_f32.restype = ctypes.c_int
    lib.q4_dequantize_f32.argtypes = _Q4_DEQUANTIZE_ARGTYPES
    lib.q4_dequantize_f32.restype = None
    for kind in ("q4", "int8"):
        getattr(lib, f"{kind}_matmul_panels_f32").argtypes = [*_PANEL_MATMUL_ARGTYPES, _i32]
        getattr(lib, f"{kind}_matmul_panels_f32").restype = ctypes.c_int
        getattr(lib, f"{kind}_matmul_panels_available").argtypes = []
        getattr(lib, f"{kind}_matmul_panels_available").restype = ctypes.c_int
    for name in ("q4_matmul_panels_amx", "int8_matmul_panels_amx"):
        getattr(lib, name).argtypes = _PANEL_MATMUL_ARGTYPES
        getattr(lib, name).restype = ctypes.c_int
    for name in ("panel_matmul_amx_available", "panel_matmul_amx_exact_available"):
        getattr(lib, name).argtypes = []
        getattr(lib, name).restype = ctypes.c_int
    for name in ("q4_panels_dequantize_f32", "q8_panels_dequantize_f32"):
        getattr(lib, name).argtypes = [_ptr, _ptr, _i32, _i32]
        getattr(lib, name).restype = None
    lib.q8_dequantize_f32.argtypes = _Q8_DEQUANTIZE_ARGTYPES
    lib.q8_dequantize_f32.restype = None
    for name in ("rope_kv_write_f32", "rope_kv_write_bf16", "rope_kv_write_f32_kvbf16",
                 "rope_kv_write_f32_kvf16"):
        getattr(lib, name).argtypes = _ROPE_KV_WRITE_ARGTYPES
        getattr(lib, name).restype = None
    lib.rms_norm_f32.argtypes = _RMS_NORM_ARGTYPES
    lib.rms_norm_f32.restype = None
    for name in ("silu_mul_f32", "silu_mul_bf16"):
        getattr(lib, name).argtypes = _SILU_MUL_ARGTYPES
        getattr(lib, name).restype = None
    lib.rms_norm_bf16.argtypes = _RMS_NORM_ARGTYPES
    lib.rms_norm_bf16.restype = None
    for name in ("decoder_stack_f32", "decoder_stack_bf16"):
        getattr(lib, name).argtypes = _DECODER_STACK_ARGTYPES
        getattr(lib, name).restype = ctypes.c_int
    lib.bf16_matmul_amx.argtypes = _PACKED_MATMUL_ARGTYPES
    lib.bf16_matmul_amx.restype = ctypes.c_int
    lib.bf16_matmul_amx_init.argtypes = []
    lib.bf16_matmul_amx_init.restype = ctypes.c_int
    lib.bf16_matmul_dot.argtypes = _PACKED_MATMUL_ARGTYPES
    lib.bf16_matmul_dot.restype = ctypes.c_int
    lib.bf16_matmul_dot_available.argtypes = []
    lib.bf16_matmul_dot_available.restype = ctypes.c_int
    lib.f32_matmul_packed.argtypes = _PACKED_MATMUL_ARGTYPES
    lib.f32_matmul_packed.restype = ctypes.c_int
    lib.f32_matmul_available.argtypes = []
    lib.f32_matmul_available.restype = ctypes.c_int
    lib.argmax_rows_f32.argtypes = [_ptr, _i64, _i32, _i32, _ptr]
    lib.argmax_rows_f32.restype = None
    return lib


def argmax_rows(x: torch.Tensor) -> torch.Tensor | None:
    """``x.argmax(dim=-1)`` (int64 ``[rows]``) for float32 ``x`` ``[rows, n]`` with unit
    stride in its last dimension: the same indices (first maximum; a row with a NaN
    gives its first NaN). None when the kernel cannot run these inputs."""
    lib = cpu_kernels()
    if (lib is None or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2
            or x.stride(1) != 1 or x.shape[1] == 0):
        return None
    out = torch.empty(x.shape[0], dtype=torch.int64)
    if x.shape[0]:
        lib.argmax_rows_f32(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], out.data_ptr())
    return out


@functools.cache
def amx_bf16_available() -> bool:
    """Whether :func:`bf16_matmul_amx` runs here: the library was built with AMX-BF16
    (``-march`` of a CPU that has it) and Linux lets this process use the tiles."""
    lib = cpu_kernels()
    return lib is not None and lib.bf16_matmul_amx_init() == 1


def amx_shape_supported(out_features: int, in_features: int) -> bool:
    """Whether a ``[out, in]`` weight fits the AMX kernel's blocking (both multiples of 32)."""
    return out_features % 32 == 0 and in_features % 32 == 0


def pack_bf16_amx(weight: torch.Tensor) -> torch.Tensor:
    """A bfloat16 weight ``[N, K]`` as AMX B tiles, in the order the kernel reads them:
    ``[N / 16, K / 32, 16, 16, 2]`` with ``packed[nb, kb, r, c, e] = W[16 nb + c, 32 kb + 2 r
    + e]`` (``bf16_matmul.c``). :func:`unpack_bf16_amx` inverts it."""
    n, k = weight.shape
    return (weight.detach().reshape(n // 16, 16, k // 32, 16, 2)
            .permute(0, 2, 3, 1, 4).contiguous())


def unpack_bf16_amx(packed: torch.Tensor) -> torch.Tensor:
    """The ``[N, K]`` weight of a :func:`pack_bf16_amx` result (a new tensor)."""
    nb, kb = packed.shape[:2]
    return packed.permute(0, 3, 1, 2, 4).reshape(nb * 16, kb * 32)


def bf16_matmul_amx(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``x @ W.T + bias`` on AMX tiles for bfloat16 ``x`` ``[M, K]`` (unit stride in the
    last dimension) and ``packed`` from :func:`pack_bf16_amx`; ``bias`` bfloat16 ``[N]``.

    Each output is a float32 sum of exact products plus the bias, rounded to
    bfloat16 once (oneDNN's AMX arithmetic; a row's result does not depend on the
    others). None, having done nothing, when the kernel cannot run these inputs.
    """
    return _bf16_packed_matmul("bf16_matmul_amx", amx_bf16_available(), x, packed, bias)


@functools.cache
def bf16_dot_available() -> bool:
    """Whether :func:`bf16_matmul_dot` runs here: the library was built for a CPU with
    AVX512-BF16 (``-march`` of a CPU that has it)."""
    lib = cpu_kernels()
    return lib is not None and lib.bf16_matmul_dot_available() == 1


def bf16_matmul_dot(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """:func:`bf16_matmul_amx`'s product on AVX512-BF16 dot products (``vdpbf16ps``), for
    CPUs without AMX: the same inputs (``packed`` from :func:`pack_bf16_amx`) and the
    same arithmetic up to summation order. None, having done nothing, when the kernel
    cannot run these inputs."""
    return _bf16_packed_matmul("bf16_matmul_dot", bf16_dot_available(), x, packed, bias)


def _bf16_packed_matmul(
    name: str, available: bool, x: torch.Tensor, packed: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor | None:
    """One of the bfloat16 kernels on a :func:`pack_bf16_amx` weight, when ``available``
    and the sizes fit the layout; None otherwise."""
    n, k = packed.shape[0] * 16, packed.shape[1] * 32
    if not available or not amx_shape_supported(n, k):
        return None
    return _packed_matmul(name, torch.bfloat16, x, packed, bias, n, k)


@functools.cache
def _f32_panel_level() -> int:
    """``f32_matmul_available()`` of the library: 0 no kernel, 1 AVX2 build, 2 AVX-512 build."""
    lib = cpu_kernels()
    return 0 if lib is None else lib.f32_matmul_available()


def f32_panel_available() -> bool:
    """Whether :func:`f32_matmul_panel` runs here (the library was built for a CPU with
    AVX2 and FMA)."""
    return _f32_panel_level() >= 1


def f32_panel_preferred() -> bool:
    """Whether :func:`f32_matmul_panel` is the faster float32 matmul here: it runs, and the
    CPU lacks AVX-512 (where oneDNN's kernels win from 16 rows on)."""
    return _f32_panel_level() == 1


def pack_f32_panels(weight: torch.Tensor) -> torch.Tensor:
    """A float32 weight ``[N, K]`` (N a multiple of 16) as panels of 16 output columns:
    ``[N / 16, K, 16]`` with ``packed[nb, k, c] = W[16 nb + c, k]`` (``f32_matmul.c``).
    :func:`unpack_f32_panels` inverts it."""
    n, k = weight.shape
    return weight.detach().reshape(n // 16, 16, k).permute(0, 2, 1).contiguous()


def unpack_f32_panels(packed: torch.Tensor) -> torch.Tensor:
    """The ``[N, K]`` weight of a :func:`pack_f32_panels` result (a new tensor)."""
    nb, k = packed.shape[:2]
    return packed.permute(0, 2, 1).reshape(nb * 16, k)


def f32_matmul_panel(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``x @ W.T + bias`` for float32 ``x`` ``[M, K]`` (unit stride in the last
    dimension) and ``packed`` from :func:`pack_f32_panels`; ``bias`` float32 ``[N]``.

    Each output is the float32 sum over the inputs in order, one fused multiply-add
    per term, then + bias (a row's result does not depend on the others). None,
    having done nothing, when the kernel cannot run these inputs.
    """
    if not f32_panel_available():
        return None
    return _packed_matmul("f32_matmul_packed", torch.float32, x, packed, bias,
                          packed.shape[0] * 16, packed.shape[1])


def _packed_matmul(
    name: str, dtype: torch.dtype, x: torch.Tensor, packed: torch.Tensor,
    bias: torch.Tensor | None, n: int, k: int,
) -> torch.Tensor | None:
    """Call the packed-weight matmul kernel ``name`` (``x, ldx, packed, bias, out, ldo, M,
    N, K``) when ``x`` ``[M, K]``, ``packed`` and ``bias`` ``[N]`` are ``dtype`` CPU
    tensors it can read (unit stride along K, ``packed`` and ``bias`` contiguous); None,
    having done nothing, otherwise."""
    if (x.dtype != dtype or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != k
            or x.stride(1) != 1 or packed.dtype != dtype or not packed.is_contiguous()
            or (bias is not None and (bias.dtype != dtype or bias.shape != (n,)
                                      or not bias.is_contiguous()))):
        return None
    m = x.shape[0]
    out = torch.empty(m, n, dtype=dtype)
    if m == 0:
        return out
    status = getattr(cpu_kernels(), name)(
        x.data_ptr(), x.stride(0), packed.data_ptr(),
        None if bias is None else bias.data_ptr(), out.data_ptr(), n, m, n, k)
    return out if status == 0 else None


def _run_matmul(
    name: str, x: torch.Tensor, n: int, w0: int, w1: int, w2: int | None,
    bias: torch.Tensor | None,
) -> torch.Tensor | None:
    """Call a quantized matmul kernel (weight pointers ``w0, w1[, w2]``) on float32 ``x``."""
    lib = cpu_kernels()
    if lib is None or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    out = torch.empty(m, n, dtype=torch.float32)
    weights = (w0, w1) if w2 is None else (w0, w1, w2)
    status = getattr(lib, name)(
        x.data_ptr(), x.stride(0), *weights,
        None if bias is None else bias.data_ptr(), out.data_ptr(), n, m, n, k,
    )
    if status != 0:
        raise MemoryError(f"{name}: out of memory for the quantized input")
    return out


def pack_q4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes ``[N, K]`` (0..15) into ``[N, K // 2]`` bytes, Q4_1's order.

    Byte ``j`` of group ``g`` holds element ``32 g + j`` in its low nibble and
    element ``32 g + j + 16`` in its high nibble.
    """
    n, k = codes.shape
    groups = codes.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (groups[:, :, 0] | (groups[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def _check_q4_scales(scales: torch.Tensor, mins: torch.Tensor) -> None:
    for name, t in (("scales", scales), ("mins", mins)):
        if t.dtype != torch.float16 or not t.is_contiguous():
            layout = "contiguous" if t.is_contiguous() else "non-contiguous"
            raise ValueError(f"Q4_1 {name} must be contiguous float16, got {layout} {t.dtype}")


def q4_matmul(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor | None:
    """``x @ W.T + bias`` with ``W = scales * code + mins`` per group of 32 (Q4_1).

    ``x`` is float32 ``[M, K]`` (rounded to 8 bits per group of 32 inside, as
    llama.cpp does); ``packed`` from :func:`pack_q4`; ``scales``/``mins``
    float16 ``[N, K // 32]``, contiguous (Q4_1 keeps them in half precision too).
    None when the kernel is unavailable.
    """
    _check_q4_scales(scales, mins)
    return _run_matmul("q4_matmul_f32", x, packed.shape[0],
                       packed.data_ptr(), scales.data_ptr(), mins.data_ptr(), bias)


def q4_dequantize(
    packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, start: int = 0,
    stop: int | None = None,
) -> torch.Tensor | None:
    """Float32 rows ``start:stop`` of the Q4_1 weight ``scales * code + mins``.

    Arguments as for :func:`q4_matmul` (contiguous); the result is ``[stop - start,
    K]``, equal to PyTorch's ``scales * code + mins`` per element. None when the
    kernel is unavailable.
    """
    _check_q4_scales(scales, mins)
    lib = cpu_kernels()
    if lib is None:
        return None
    n, k = packed.shape[0], packed.shape[1] * 2
    stop = n if stop is None else stop
    rows, groups = stop - start, k // 32
    out = torch.empty(rows, k, dtype=torch.float32)
    lib.q4_dequantize_f32(packed.data_ptr() + start * (k // 2),
                          scales.data_ptr() + 2 * start * groups,
                          mins.data_ptr() + 2 * start * groups, out.data_ptr(), rows, k)
    return out


# Bytes of one (16-column panel, group of 32) block of pack_q4_panels's layout.
Q4_PANEL_BLOCK = 320


def _per_panel_bytes(values: torch.Tensor) -> torch.Tensor:
    """Per-(column, group) values ``[N, G]`` as the bytes of their 16-column panels:
    ``[N // 16, G, 16 * itemsize]``, panel p's block for group g holding columns
    16 p .. 16 p + 15 in order (the scale part of both panel layouts)."""
    n, groups = values.shape
    raw = values.contiguous().view(torch.uint8).reshape(n // 16, 16, groups, -1)
    return raw.permute(0, 2, 1, 3).reshape(n // 16, groups, -1)


def q4_panels_available() -> bool:
    """Whether :func:`q4_matmul_panels` runs here: the library was built for a CPU with
    AVX512-VNNI or with AVX2, FMA and F16C (``-march`` of such a CPU)."""
    lib = cpu_kernels()
    return lib is not None and lib.q4_matmul_panels_available() == 1


def pack_q4_panels(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Q4_1 codes ``[N, K]`` (0..15) with their float16 ``scales``/``mins`` ``[N, K // 32]``
    in :func:`q4_matmul_panels`'s layout: ``[N // 16, K // 32, 320]`` bytes, one block per
    panel of 16 output columns and group of 32 inputs (``kernels/cpu/q4_matmul_panels.c``).

    Block bytes ``64 h + 4 c + b`` hold column ``c``'s codes for inputs ``8 h + b`` (low
    nibble) and ``8 h + 4 + b`` (high nibble); then the 16 columns' scales and minimums.
    ``N % 16 == 0``, ``K % 32 == 0``.
    """
    n, k = codes.shape
    if n % 16 or k % 32:
        raise ValueError(f"pack_q4_panels needs N % 16 == 0 and K % 32 == 0, got {n} x {k}")
    _check_q4_scales(scales, mins)
    panels, groups = n // 16, k // 32
    nibbles = codes.to(torch.uint8).reshape(panels, 16, groups, 4, 2, 4)
    data = (nibbles[..., 0, :] | (nibbles[..., 1, :] << 4)).permute(0, 2, 3, 1, 4)
    return torch.cat([data.reshape(panels, groups, 256), _per_panel_bytes(scales),
                      _per_panel_bytes(mins)], dim=2).contiguous()


# path argument of q4_matmul_panels_f32 / int8_matmul_panels_f32 (panel_matmul_amx_exact.h)
_PANEL_PATHS = {False: 0, True: 1, None: 2}


def _panel_matmul(name: str, block: int, x: torch.Tensor, packed: torch.Tensor,
                 bias: torch.Tensor | None, *path: int) -> torch.Tensor | None:
    lib = cpu_kernels()
    if (lib is None or x.dtype != torch.float32 or x.device.type != "cpu"
            or (bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()))):
        return None
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = packed.shape[0] * 16
    if packed.shape[1:] != (k // 32, block):
        raise ValueError(f"packed weight {tuple(packed.shape)} does not fit input size {k}")
    out = torch.empty(m, n, dtype=torch.float32)
    if m == 0:
        return out
    status = getattr(lib, name)(x.data_ptr(), x.stride(0), packed.data_ptr(),
                                None if bias is None else bias.data_ptr(), out.data_ptr(),
                                n, m, n, k, *path)
    if status == -2:
        return None
    if status != 0:
        raise MemoryError(f"{name}: out of memory for the quantized input")
    return out


def _panel_dequantize(name: str, packed: torch.Tensor, start: int,
                     stop: int | None) -> torch.Tensor | None:
    lib = cpu_kernels()
    if lib is None:
        return None
    n, groups = packed.shape[0] * 16, packed.shape[1]
    stop = n if stop is None else stop
    if start % 16 or stop % 16:
        raise ValueError(f"rows {start}:{stop} must start and stop on 16-row panels")
    out = torch.empty(stop - start, groups * 32, dtype=torch.float32)
    getattr(lib, name)(packed[start // 16:].data_ptr(), out.data_ptr(), (stop - start) // 16,
                       groups * 32)
    return out


def q4_matmul_panels(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None, *,
    tiles: bool | None = None,
) -> torch.Tensor | None:
    """:func:`q4_matmul`'s product with the weight from :func:`pack_q4_panels`
    (``vpdpbusd`` on AVX512-VNNI CPUs, ``maddubs`` on AVX2, ``tdpbsud`` on AMX int8 tiles):
    the same rounded input and the same exact integer sums per group, scaled and summed in
    another order (float32 rounding apart, the same result). A row's result does not
    depend on the other rows, nor on which of these instructions ran.

    ``tiles``: None lets the kernel take AMX tiles where it measured them faster (from 32
    rows, outputs a multiple of 32, :func:`panel_tiles_available`); False never; True
    always (None returned where they are unavailable or the outputs are not a multiple
    of 32). None, having done nothing, when the kernel is unavailable or ``x`` is not
    float32 on the CPU.
    """
    return _panel_matmul("q4_matmul_panels_f32", Q4_PANEL_BLOCK, x, packed, bias,
                         _PANEL_PATHS[tiles])


def panels_amx_available() -> bool:
    """Whether :func:`q4_matmul_panels_amx` and :func:`int8_matmul_panels_amx` run here:
    AMX-BF16 in this build and CPU, tiles granted to this process
    (:func:`amx_bf16_available`)."""
    lib = cpu_kernels()
    return (lib is not None and lib.panel_matmul_amx_available() == 1
            and amx_bf16_available())


def q4_matmul_panels_amx(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """:func:`q4_matmul_panels`'s product on AMX tiles (``panel_matmul_amx.c``): ``x`` and
    the dequantized weight rounded to bfloat16, float32 sums - the dense bfloat16 path's
    numbers without a float copy of the weight. A row's result does not depend on the
    other rows. None, having done nothing, when :func:`panels_amx_available` is false, the
    output size is not a multiple of 32 or ``x`` is not float32 on the CPU."""
    if not panels_amx_available():
        return None
    return _panel_matmul("q4_matmul_panels_amx", Q4_PANEL_BLOCK, x, packed, bias)


def panel_tiles_available() -> bool:
    """Whether :func:`q4_matmul_panels` and :func:`int8_matmul_panels` can run on AMX int8
    tiles here (``tiles=True``; ``panel_matmul_amx_exact.c``): AMX-INT8 in this build and
    CPU, tiles granted to this process."""
    lib = cpu_kernels()
    return lib is not None and lib.panel_matmul_amx_exact_available() == 1


def q4_panels_dequantize(
    packed: torch.Tensor, start: int = 0, stop: int | None = None,
) -> torch.Tensor | None:
    """Float32 rows ``start:stop`` (multiples of 16) of a :func:`pack_q4_panels` weight,
    equal to :func:`q4_dequantize` of the same codes; None when the kernels are
    unavailable."""
    return _panel_dequantize("q4_panels_dequantize_f32", packed, start, stop)


# Bytes of one (16-column panel, group of 32) block of pack_int8_panels's layout.
INT8_PANEL_BLOCK = 576


def int8_panels_available() -> bool:
    """Whether :func:`int8_matmul_panels` runs here (AVX512-VNNI, or AVX2 with FMA and F16C)."""
    lib = cpu_kernels()
    return lib is not None and lib.int8_matmul_panels_available() >= 1


def int8_panels_vnni() -> bool:
    """Whether :func:`int8_matmul_panels` runs on AVX512-VNNI here (one ``vpdpbusd`` per 64
    byte products; the AVX2 path needs two ``maddubs`` per 32)."""
    lib = cpu_kernels()
    return lib is not None and lib.int8_matmul_panels_available() == 2


def pack_int8_panels(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Q8_0 codes ``[N, K]`` (-127..127) and float32 ``scales`` ``[N, K // 32]`` in
    :func:`int8_matmul_panels`'s layout: ``[N // 16, K // 32, 576]`` bytes, one block per
    panel of 16 output columns and group of 32 inputs (``kernels/cpu/int8_matmul_panels.c``).

    Block bytes ``64 s + 4 c + b`` hold column ``c``'s code for input ``4 s + b`` plus 128;
    then the 16 columns' scales. ``N % 16 == 0``, ``K % 32 == 0``.
    """
    n, k = codes.shape
    if n % 16 or k % 32:
        raise ValueError(f"pack_int8_panels needs N % 16 == 0 and K % 32 == 0, got {n} x {k}")
    panels, groups = n // 16, k // 32
    offset = (codes.to(torch.int16) + 128).to(torch.uint8).reshape(panels, 16, groups, 8, 4)
    data = offset.permute(0, 2, 3, 1, 4).reshape(panels, groups, 512)
    return torch.cat([data, _per_panel_bytes(scales.float())], dim=2).contiguous()


def int8_matmul_panels_amx(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """:func:`int8_matmul_panels`'s product on AMX tiles, as :func:`q4_matmul_panels_amx`
    (weight ``code * scale`` rounded to bfloat16). None when that one would be."""
    if not panels_amx_available():
        return None
    return _panel_matmul("int8_matmul_panels_amx", INT8_PANEL_BLOCK, x, packed, bias)


def int8_matmul_panels(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None, *,
    tiles: bool | None = None,
) -> torch.Tensor | None:
    """:func:`int8_matmul`'s product on AVX512-VNNI, AVX2 or AMX int8 tiles (the same
    bits), the weight from :func:`pack_int8_panels`: the same rounded input and exact
    integer sums per group, summed in another float order. A row's result does not depend
    on the other rows. ``tiles`` as for :func:`q4_matmul_panels` (None: AMX tiles from 8
    rows). None, having done nothing, when the kernel is unavailable or ``x`` is not
    float32 on the CPU."""
    return _panel_matmul("int8_matmul_panels_f32", INT8_PANEL_BLOCK, x, packed, bias,
                         _PANEL_PATHS[tiles])


def int8_panels_dequantize(
    packed: torch.Tensor, start: int = 0, stop: int | None = None,
) -> torch.Tensor | None:
    """Float32 rows ``start:stop`` (multiples of 16) of a :func:`pack_int8_panels` weight,
    equal to :func:`q8_dequantize` of the same codes; None when the kernels are
    unavailable."""
    return _panel_dequantize("q8_panels_dequantize_f32", packed, start, stop)


def q8_dequantize(
    codes: torch.Tensor, scales: torch.Tensor, start: int = 0, stop: int | None = None,
) -> torch.Tensor | None:
    """Float32 rows ``start:stop`` of the Q8_0 weight ``codes * scales`` (see
    :func:`int8_matmul`); None when the kernel is unavailable."""
    lib = cpu_kernels()
    if lib is None:
        return None
    n, k = codes.shape
    stop = n if stop is None else stop
    rows, groups = stop - start, k // 32
    out = torch.empty(rows, k, dtype=torch.float32)
    lib.q8_dequantize_f32(codes.data_ptr() + start * k, scales.data_ptr() + 4 * start * groups,
                          out.data_ptr(), rows, k)
    return out


def int8_matmul(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """``x @ (codes * scales).T + bias`` for float32 ``x`` ``[M, K]``; None if unavailable.

    ``codes`` int8 ``[N, K]`` and ``scales`` float32 ``[N, K // 32]``, contiguous;
    ``x`` is rounded to 8 bits per group of 32 inside (integer dot products).
    """
    return _run_matmul("int8_matmul_f32", x, codes.shape[0],
                       codes.data_ptr(), scales.data_ptr(), None, bias)


# Kernels built for both float dtypes: dtype -> name suffix.
_ELEMENTWISE_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}


def rope_kv_write(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor,
    sin_folded: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor | None:
    """Rotate Q and K of a fused float32 or bfloat16 QKV output, store K/V into their
    cache slots.

    ``qkv`` ``[T, (H + 2 KVH) * D]`` (unit stride in its last dimension); ``cos`` /
    ``sin_folded`` ``[T, 1, D]`` from the rotary table (``sin_folded`` as
    :func:`~tokenmill.model.layers.fold_rotary_sign` makes it); caches
    ``[num_blocks, block_size, KVH, D]`` of the same dtype (or, for float32 ``qkv``,
    bfloat16 or float16: K/V rounded to nearest even on store), contiguous; ``slot_mapping``
    ``[T]`` int64 with no padding (every slot >= 0). Returns the rotated Q
    ``[T, H, D]`` - bit-identical to :func:`~tokenmill.model.layers.rotate_eager`
    - or None, having done nothing, when these inputs need the PyTorch path (or
    ``TOKENMILL_CPU_FUSED_ROPE=0``).
    """
    lib = cpu_kernels() if _FUSED_ROPE else None
    tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1] if k_cache.dim() == 4 else 0
    cache_ok = (k_cache.dtype == v_cache.dtype
                and (k_cache.dtype == qkv.dtype
                     or (qkv.dtype == torch.float32 and k_cache.dtype in KV_KINDS)))
    if (
        lib is None or qkv.device.type != "cpu" or head_dim == 0 or head_dim % 2
        or qkv.dtype not in _ELEMENTWISE_DTYPES or not cache_ok
        or not (qkv.dtype == cos.dtype == sin_folded.dtype)
        or qkv.dim() != 2 or qkv.stride(1) != 1
        or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim
        or k_cache.shape[2] != num_kv_heads
        or cos.shape != (tokens, 1, head_dim) or sin_folded.shape != cos.shape
        or not (cos.is_contiguous() and sin_folded.is_contiguous())
        or not (k_cache.is_contiguous() and v_cache.is_contiguous())
        or slot_mapping.dtype != torch.int64 or slot_mapping.shape != (tokens,)
        or not slot_mapping.is_contiguous()
    ):
        return None
    q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype)
    suffix = _KV_SUFFIX[k_cache.dtype] if qkv.dtype == torch.float32 else ""
    kernel = getattr(lib, f"rope_kv_write_{_ELEMENTWISE_DTYPES[qkv.dtype]}{suffix}")
    kernel(
        qkv.data_ptr(), qkv.stride(0), tokens, num_heads, num_kv_heads, head_dim,
        cos.data_ptr(), sin_folded.data_ptr(), q.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), slot_mapping.data_ptr(),
    )
    return q


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """RMS norm of float32 or bfloat16 rows ``x`` ``[T, N]`` (unit stride in the last
    dimension), ``weight`` of the same dtype.

    With ``residual`` (``[T, N]``) the norm is of ``x + residual``, and that sum
    is returned too as a new tensor: ``(norm, sum)``, the fused residual add of
    :class:`~tokenmill.model.layers.RMSNorm`. None when the kernel cannot run
    these inputs (the caller uses PyTorch). float32: the same arithmetic as the
    decoder stack's own norms (``decoder_stack.c``); bfloat16: rounded where
    PyTorch's bfloat16 ops round (``bf16_ops.c``).
    """
    lib = cpu_kernels()
    dtype = x.dtype
    if (lib is None or x.device.type != "cpu" or x.dim() != 2 or x.stride(1) != 1
            or dtype not in _ELEMENTWISE_DTYPES or weight.dtype != dtype
            or not weight.is_contiguous() or weight.shape != (x.shape[1],)):
        return None
    if residual is not None and (residual.dtype != dtype or residual.shape != x.shape
                                 or not residual.is_contiguous()):
        return None
    tokens, n = x.shape
    out = torch.empty(tokens, n, dtype=dtype)
    total = None if residual is None else torch.empty(tokens, n, dtype=dtype)
    kernel = getattr(lib, f"rms_norm_{_ELEMENTWISE_DTYPES[dtype]}")
    kernel(x.data_ptr(), x.stride(0), None if residual is None else residual.data_ptr(),
           None if total is None else total.data_ptr(), weight.data_ptr(),
           out.data_ptr(), tokens, n, float(eps))
    return out if total is None else (out, total)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) * up`` for float32 or bfloat16 rows ``[T, 2 I]`` holding ``[gate |
    up]``; None when the kernel cannot run these inputs. The native decoder stacks' own
    arithmetic: float32 ``g / (1 + exp(-g)) * u``; bfloat16 rounded where PyTorch's
    ``F.silu(g) * u`` rounds, with an exp within 2 ulp of PyTorch's (``bf16_ops.c``)."""
    lib = cpu_kernels()
    if (lib is None or x.device.type != "cpu" or x.dim() != 2 or x.stride(1) != 1
            or x.dtype not in _ELEMENTWISE_DTYPES or x.shape[1] % 2):
        return None
    tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(tokens, inter, dtype=x.dtype)
    kernel = getattr(lib, f"silu_mul_{_ELEMENTWISE_DTYPES[x.dtype]}")
    kernel(x.data_ptr(), x.stride(0), out.data_ptr(), tokens, inter)
    return out


def paged_attention(
    q: torch.Tensor,
    out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_q_len: int,
    sliding_window: int = 0,
) -> bool:
    """Attention of every sequence with at most ``max_q_len`` query tokens, into ``out``.

    ``sliding_window`` > 0: each query sees only its last ``sliding_window``
    positions (blocks before them are not read).

    ``q``/``out`` are ``[T, H, D]`` with contiguous heads; caches are
    ``[num_blocks, block_size, KVH, D]`` in ``q``'s dtype (float32 ``q`` may also read a
    bfloat16 or float16 cache), or quantized
    (``int8``/``uint8`` = fp8 rows of ``D`` codes + a float32 scale, see
    :mod:`tokenmill.kernels.kv_quant`), read in place and
    widened or dequantized in registers; metadata tensors are int32 on the CPU. Rows of
    longer sequences are left untouched. Returns False (doing nothing) when the
    kernel cannot run these inputs, so the caller falls back.
    """
    lib = cpu_kernels()
    dtype = q.dtype
    quant = _Q8_KINDS.get(k_cache.dtype)
    cache_ok = k_cache.dtype == v_cache.dtype and (
        quant is not None or k_cache.dtype == dtype
        or (dtype == torch.float32 and k_cache.dtype in KV_KINDS))
    if (
        lib is None
        or dtype not in (torch.float32, torch.bfloat16)
        or out.dtype != dtype or not cache_ok
        or not _attention_layout_ok(q, out, k_cache, v_cache, query_start_loc, seq_lens,
                                    block_tables)
    ):
        return False
    head_dim = q.shape[2]
    args = _attention_args(q, out, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
                           scale, max_q_len, sliding_window)
    if quant is not None:
        if k_cache.shape[3] != head_dim + 4:
            return False
        lib.paged_attention_q8(*args, quant, int(dtype == torch.bfloat16))
    elif dtype == torch.float32:
        getattr(lib, f"paged_attention_f32{_KV_SUFFIX[k_cache.dtype]}")(*args)
    else:
        lib.paged_attention_bf16(*args)
    return True


def prefill_attention_supported(head_dim: int) -> bool:
    """Whether :func:`prefill_attention` runs float32 heads of ``head_dim`` here (AVX2
    builds, ``head_dim`` a multiple of 8)."""
    lib = cpu_kernels()
    return lib is not None and bool(lib.prefill_attention_supported(head_dim))


def prefill_attention(
    q: torch.Tensor,
    out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    min_q_len: int,
    sliding_window: int = 0,
    widen_per_tile: bool = False,
) -> bool:
    """Attention of every sequence with more than ``min_q_len`` query tokens, into ``out``:
    the long prefill chunks :func:`paged_attention` leaves (tiled, online softmax).

    float32 queries over a float32, bfloat16, float16 or 8-bit cache (widened or
    dequantized to float32 once per call; ``widen_per_tile``: once per tile instead, as
    the kernel does past its memory limit); layouts and
    ``sliding_window`` as :func:`paged_attention`. Rows of
    shorter sequences are left untouched. Returns False (the caller falls back, and
    rewrites every row it needs) when the kernel cannot run these inputs.
    """
    lib = cpu_kernels()
    kind = _PREFILL_KV_KINDS.get(k_cache.dtype)
    row = q.shape[2] + (4 if k_cache.dtype in _Q8_KINDS else 0)
    if (
        lib is None or kind is None
        or not (q.dtype == out.dtype == torch.float32)
        or v_cache.dtype != k_cache.dtype or k_cache.shape[3] != row
        or not _attention_layout_ok(q, out, k_cache, v_cache, query_start_loc, seq_lens,
                                    block_tables)
    ):
        return False
    return bool(lib.prefill_attention_f32(*_attention_args(
        q, out, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, min_q_len,
        sliding_window), kind | (_PER_TILE if widen_per_tile else 0)))


def _attention_layout_ok(
    q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
) -> bool:
    """The layouts both attention kernels read: q/out [T, H, D] with contiguous heads,
    contiguous caches, contiguous int32 metadata, all on the CPU."""
    return (
        q.device.type == "cpu"
        and q.stride(2) == 1 and q.stride(1) == q.shape[2]
        and out.stride(2) == 1 and out.stride(1) == out.shape[2]
        and k_cache.is_contiguous() and v_cache.is_contiguous()
        and query_start_loc.dtype == seq_lens.dtype == block_tables.dtype == torch.int32
        and query_start_loc.is_contiguous() and seq_lens.is_contiguous()
        and block_tables.is_contiguous()
    )


def _attention_args(
    q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
    scale: float, q_len_limit: int, sliding_window: int,
) -> list:
    """The attention kernels' shared arguments (``_ATTENTION_ARGTYPES``)."""
    return [
        q.data_ptr(), q.stride(0), out.data_ptr(), out.stride(0),
        k_cache.data_ptr(), v_cache.data_ptr(),
        query_start_loc.data_ptr(), seq_lens.data_ptr(), block_tables.data_ptr(),
        seq_lens.shape[0], block_tables.shape[1] if block_tables.dim() == 2 else 0,
        q.shape[1], k_cache.shape[2], q.shape[2], k_cache.shape[1], float(scale),
        int(q_len_limit), int(sliding_window),
    ]
