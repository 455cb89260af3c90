"""CPU feature detection used to pick numeric paths per machine."""

from __future__ import annotations

import pytest
import torch

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


def test_auto_cpu_dtype(monkeypatch) -> None:
    from tokenmill.engine.args import CPU_DTYPE_ENV, EngineArgs, default_cpu_dtype

    monkeypatch.delenv(CPU_DTYPE_ENV, raising=False)
    assert default_cpu_dtype(None, native_bf16=True) == torch.bfloat16
    assert default_cpu_dtype(None, native_bf16=False) == torch.float32
    # Quantized weights: the integer kernels take float32 activations.
    assert default_cpu_dtype("int4", native_bf16=True) == torch.float32
    assert default_cpu_dtype("int8", native_bf16=True) == torch.float32
    want = torch.bfloat16 if has_native_bf16() else torch.float32
    assert EngineArgs().resolved_dtype(torch.device("cpu")) == want
    assert EngineArgs(dtype="float32").resolved_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setenv(CPU_DTYPE_ENV, "bf16")
    assert default_cpu_dtype(None, native_bf16=False) == torch.bfloat16
    monkeypatch.setenv(CPU_DTYPE_ENV, "float16")
    with pytest.raises(ValueError, match=CPU_DTYPE_ENV):
        default_cpu_dtype(None)
