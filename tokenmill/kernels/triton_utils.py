"""Small helpers shared by the Triton kernels.

Triton kernels normally run on CUDA tensors. For tests and CPU-only machines
the same kernels run through Triton's interpreter (numpy on the host), which
is exact but slow. Triton decides at *import* time: ``TRITON_INTERPRET=1`` must
be in the environment before ``triton`` is first imported in the process
(its own standard library is decorated then). :func:`launcher` turns the
otherwise obscure failure into a clear message.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


def interpreter_active() -> bool:
    """True when Triton was imported in interpreter mode (TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


@triton.jit
def _loop_probe_kernel(out_ptr):
    total = 0
    for i in range(0, tl.program_id(0) + 2):
        total += i
    tl.store(out_ptr, total)


def interpreter_problem() -> str | None:
    """Why Triton kernels cannot run on CPU tensors here, or None if they can.

    Checks that the interpreter is active and that it handles loop bounds
    computed from program ids (Triton 3.6's interpreter fails on those with
    numpy >= 2.4; Triton 3.9 works).
    """
    if not interpreter_active():
        return ("Triton was imported without TRITON_INTERPRET=1, so it cannot run on the CPU "
                "(set it in the environment before triton is first imported)")
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_probe_kernel[(1,)](out)
    except Exception as exc:  # noqa: BLE001 - any failure means the interpreter is unusable
        return (f"Triton {triton.__version__}'s interpreter cannot run these kernels with "
                f"this numpy ({type(exc).__name__}: {exc}); try a newer triton")
    return None if int(out[0]) == 1 else "Triton's interpreter miscomputed a loop"


def launcher(kernel, device: torch.device):
    """Return ``kernel`` after checking it can run on tensors living on ``device``."""
    if device.type == "cpu" and not interpreter_active():
        raise RuntimeError(
            "Triton kernels need CUDA tensors; to run them on the CPU set "
            "TRITON_INTERPRET=1 in the environment before triton is first imported"
        )
    return kernel


def needs_fp32_compute(device: torch.device) -> bool:
    """True when kernels must upcast bf16 loads before any arithmetic.

    Triton's interpreter keeps bfloat16 values as raw uint16 numpy arrays, so
    adding or multiplying them (or feeding them to ``tl.dot``) gives garbage;
    converting to float32 right after loading is exact. On the GPU the kernels
    keep bf16/fp16 operands for the tensor cores.
    """
    return device.type == "cpu"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact for float32 data, default for 16-bit types."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


@functools.cache
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (used by launch heuristics)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_parallelism(device: torch.device) -> int:
    """How many programs the device runs at once, roughly; a fixed guess off-GPU."""
    if device.type == "cuda":
        return num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 8


TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
