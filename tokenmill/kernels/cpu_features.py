"""What this CPU can do natively, from the kernel's view of it (``/proc/cpuinfo``).

Used to pick numeric paths per machine at run time, never at install time: the
same install runs on hosts with and without, e.g., bfloat16 dot products
(AVX512_BF16, AMX-BF16), where PyTorch's bfloat16 GEMM is native on the first
and emulated (about 3x slower than float32) on the second.
"""

from __future__ import annotations

import functools

# Flags under which oneDNN runs bfloat16 matmuls in hardware.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first ``flags`` line of a ``/proc/cpuinfo`` text (empty if none)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags (empty where ``/proc/cpuinfo`` cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return parse_cpu_flags(f.read())
    except OSError:
        return frozenset()


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether bfloat16 matmuls run in hardware (``flags``: this CPU's by default)."""
    return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))
