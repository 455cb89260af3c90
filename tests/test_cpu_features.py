"""CPU feature detection used to pick numeric paths per machine."""

from __future__ import annotations

from tokenmill.kernels.cpu_features import cpu_flags, has_native_bf16, parse_cpu_flags

CPUINFO = """processor\t: 0
model name\t: Some CPU
flags\t\t: fpu sse2 avx2 fma f16c
processor\t: 1
flags\t\t: fpu sse2 avx2 fma f16c
"""


def test_parse_cpu_flags():
    assert parse_cpu_flags(CPUINFO) == {"fpu", "sse2", "avx2", "fma", "f16c"}
    assert parse_cpu_flags("processor: 0\n") == frozenset()


def test_native_bf16_selection():
    assert not has_native_bf16(parse_cpu_flags(CPUINFO))
    assert has_native_bf16(frozenset({"avx2", "avx512_bf16"}))
    assert has_native_bf16(frozenset({"amx_bf16"}))
    assert isinstance(has_native_bf16(), bool)  # this machine, whatever it has
    assert isinstance(cpu_flags(), frozenset)

