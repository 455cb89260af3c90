"""CPU feature detection used to pick numeric paths per machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tokenmill.kernels.cpu_features import (
    MAX_ISA_ENV,
    cap_flags,
    cpu_flags,
    has_native_bf16,
    max_isa_march,
    parse_cpu_flags,
)

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


SAPPHIRE_RAPIDS = frozenset({"avx2", "fma", "avx512f", "avx512vl", "avx512_vnni", "avx512_bf16",
                             "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"})


def test_max_isa_caps_the_flags(monkeypatch) -> None:
    assert cap_flags(SAPPHIRE_RAPIDS, "avx2") == {"avx2", "fma"}
    # A Cascade Lake: AVX-512 with its VNNI, no bfloat16, no AMX, no AVX-VNNI.
    assert cap_flags(SAPPHIRE_RAPIDS, "avx512") == {"avx2", "fma", "avx512f", "avx512vl",
                                                    "avx512_vnni"}
    assert cap_flags(SAPPHIRE_RAPIDS, None) == SAPPHIRE_RAPIDS
    assert not has_native_bf16(cap_flags(SAPPHIRE_RAPIDS, "avx512"))
    monkeypatch.setenv(MAX_ISA_ENV, "AVX2")
    assert max_isa_march() == "haswell"
    monkeypatch.setenv(MAX_ISA_ENV, "native")
    assert max_isa_march() is None
    monkeypatch.setenv(MAX_ISA_ENV, "sse4")
    with pytest.raises(ValueError, match=MAX_ISA_ENV):
        max_isa_march()


def test_max_isa_drives_every_choice() -> None:
    """Under ``TOKENMILL_CPU_MAX_ISA=avx2`` a process picks what an AVX2-only CPU gets:
    float32 for ``--dtype auto``, float32 quantized prefill, kernels built for haswell
    without AMX (a subprocess: the choices are made once, at import)."""
    code = (
        "from tokenmill.engine.args import default_cpu_dtype\n"
        "from tokenmill.kernels import cpu\n"
        "from tokenmill.kernels.cpu_features import cpu_flags\n"
        "from tokenmill.model import dequant_matmul\n"
        "assert not any(f.startswith(('avx512', 'amx')) for f in cpu_flags())\n"
        "print(default_cpu_dtype(None), dequant_matmul.DENSE_DTYPE, cpu._march(),"
        " cpu.amx_bf16_available())\n"
    )
    env = {k: v for k, v in os.environ.items()
           if k not in ("TOKENMILL_CPU_DTYPE", "TOKENMILL_CPU_MARCH", "TOKENMILL_DENSE_DTYPE")}
    env[MAX_ISA_ENV] = "avx2"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["torch.float32", "torch.float32", "haswell", "False"]


def test_default_step_budget_per_device() -> None:
    """The token budget per step: 512 on the CPU (a 2,048-token step stalls every stream
    for seconds there), 8,192 on a GPU; a given budget wins, and without chunked prefill
    it still covers a whole prompt."""
    from tokenmill.engine.args import EngineArgs

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert EngineArgs().scheduler_config(8192, cpu).max_num_batched_tokens == 512
    assert EngineArgs().scheduler_config(8192, cuda).max_num_batched_tokens == 8192
    assert EngineArgs(max_num_batched_tokens=64).scheduler_config(
        8192, cpu).max_num_batched_tokens == 64
    assert EngineArgs(enable_chunked_prefill=False).scheduler_config(
        4096, cpu).max_num_batched_tokens == 4096
