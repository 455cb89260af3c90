"""What this CPU can do natively, from the kernel's view of it (``/proc/cpuinfo``).

Used to pick numeric paths per machine at run time, never at install time: the
same install runs on hosts with and without, e.g., bfloat16 dot products
(AVX512_BF16, AMX-BF16), where PyTorch's bfloat16 GEMM is native on the first
and emulated (about 3x slower than float32) on the second.

``TOKENMILL_CPU_MAX_ISA`` caps what tokenmill sees, the way ``ONEDNN_MAX_CPU_ISA``
caps oneDNN: ``avx2`` hides AVX-512, AMX and AVX-VNNI (an AVX2-only EPYC),
``avx512`` hides AMX, the bfloat16/fp16 extensions and AVX-VNNI (a Cascade Lake
Xeon). Every choice made from the flags follows - the dtype ``auto`` picks, the
native kernels' ``-march`` (:func:`max_isa_march`), the quantized prefill GEMM - so
one variable runs tokenmill as it would run on the smaller CPU (for benchmarks and
tests), with this CPU's caches, memory and clocks.
"""

from __future__ import annotations

import functools
import os

# Flags under which oneDNN runs bfloat16 matmuls in hardware.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})

MAX_ISA_ENV = "TOKENMILL_CPU_MAX_ISA"
# Per cap: flag prefixes it hides, and the -march the native kernels are built for.
_MAX_ISA = {
    "avx2": (("avx512", "amx", "avx_vnni"), "haswell"),
    "avx512": (("amx", "avx512_bf16", "avx512_fp16", "avx_vnni"), "cascadelake"),
}


def _max_isa() -> str | None:
    name = os.environ.get(MAX_ISA_ENV, "").lower()
    if name in ("", "native"):
        return None
    if name not in _MAX_ISA:
        raise ValueError(f"{MAX_ISA_ENV}={name!r}: choose one of native, "
                         f"{', '.join(_MAX_ISA)}")
    return name


def max_isa_march() -> str | None:
    """The ``-march`` for the native kernels under ``TOKENMILL_CPU_MAX_ISA`` (None: no cap)."""
    name = _max_isa()
    return None if name is None else _MAX_ISA[name][1]


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first ``flags`` line of a ``/proc/cpuinfo`` text (empty if none)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cap_flags(flags: frozenset[str], max_isa: str | None) -> frozenset[str]:
    """``flags`` without those above ``max_isa`` (``avx2``, ``avx512``; None: all)."""
    if max_isa is None:
        return flags
    hidden = _MAX_ISA[max_isa][0]
    return frozenset(f for f in flags if not f.startswith(hidden))


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags, capped by ``TOKENMILL_CPU_MAX_ISA`` (empty where
    ``/proc/cpuinfo`` cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = parse_cpu_flags(f.read())
    except OSError:
        return frozenset()
    return cap_flags(flags, _max_isa())


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether bfloat16 matmuls run in hardware (``flags``: this CPU's by default)."""
    return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))
