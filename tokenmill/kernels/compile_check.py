"""Compile every Triton kernel for an NVIDIA target without a GPU.

Triton's interpreter checks what the kernels compute but not whether the real
compiler accepts them (types of loop-carried values, ``tl.dot`` shape limits)
or whether a tile configuration fits in shared memory. Triton can compile
ahead of time for a named target on any machine, so this module compiles the
production configurations for Hopper (sm_90) and reports their shared-memory
use. Run ``python -m tokenmill.kernels.compile_check`` with ``TRITON_INTERPRET``
unset.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

# Opt-in shared memory per block on H100 (227 KiB).
HOPPER_SHARED_LIMIT = 232448


@dataclass
class CompiledKernel:
    """One compiled configuration and what it costs on chip."""

    name: str
    shared_bytes: int
    num_warps: int


def _signature(kernel, ptr_dtype: str, constexprs: dict, floats: tuple[str, ...],
               ptr_overrides: dict) -> dict:
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_overrides.get(name, ptr_dtype)
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


@dataclass
class _Config:
    name: str
    kernel: object
    ptr_dtype: str  # "*bf16" etc. for the data pointers
    constexprs: dict
    floats: tuple[str, ...] = ()
    num_warps: int = 4
    pointers: dict = field(default_factory=dict)  # per-pointer dtype overrides


INDEX_POINTERS = {
    "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32",
    "slot_mapping_ptr": "*i64", "positions_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
    "part_out_ptr": "*fp32", "part_ml_ptr": "*fp32",
}


def _configs() -> list[_Config]:
    from tokenmill.kernels import (
        activation,
        kv_write,
        paged_decode,
        prefill_attention,
        rmsnorm,
        rotary,
    )
    from tokenmill.kernels.paged_decode import decode_block_n
    from tokenmill.kernels.prefill_attention import prefill_tile_sizes

    out = []
    for dtype, head_dim, group, block_size in [
        ("bf16", 128, 4, 16), ("bf16", 128, 8, 16), ("bf16", 64, 7, 32),
        ("fp16", 256, 2, 16), ("fp32", 128, 4, 8),
    ]:
        precision = "ieee" if dtype == "fp32" else "tf32"
        block_d = 1 << (head_dim - 1).bit_length()
        for segments in (1, 16):
            const = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
                         BLOCK_G=max(16, 1 << (group - 1).bit_length()), BLOCK_D=block_d,
                         BLOCK_N=decode_block_n(head_dim), NUM_SEGMENTS=segments,
                         UPCAST=False, PRECISION=precision, KV_QUANT=0)
            out.append(_Config(f"decode {dtype} d{head_dim} g{group} seg{segments}",
                               paged_decode._paged_decode_kernel, f"*{dtype}", const,
                               ("scale_log2",)))
        group_p2 = 1 << (group - 1).bit_length()
        block_m, block_n = prefill_tile_sizes(head_dim, group)
        const = dict(GROUP=group, GROUP_P2=group_p2, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
                     BLOCK_Q=block_m // group_p2, BLOCK_D=block_d, BLOCK_N=block_n,
                     UPCAST=False, PRECISION=precision, KV_QUANT=0)
        out.append(_Config(f"prefill {dtype} d{head_dim} g{group}",
                           prefill_attention._prefill_attention_kernel, f"*{dtype}", const,
                           ("scale_log2",)))
        if dtype == "bf16" and group == 4:
            # 8-bit KV: codes through int8/uint8 pointers, scales through a float32 view.
            for quant, code_ptr in ((1, "*i8"), (2, "*u8")):
                ptrs = {"k_cache_ptr": code_ptr, "v_cache_ptr": code_ptr,
                        "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}
                name = "int8" if quant == 1 else "fp8"
                out.append(_Config(f"prefill {dtype} kv-{name} d{head_dim}",
                                   prefill_attention._prefill_attention_kernel, f"*{dtype}",
                                   {**const, "KV_QUANT": quant}, ("scale_log2",),
                                   pointers=ptrs))
                dconst = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
                              BLOCK_G=16, BLOCK_D=block_d, BLOCK_N=decode_block_n(head_dim),
                              NUM_SEGMENTS=1, UPCAST=False, PRECISION=precision,
                              KV_QUANT=quant)
                out.append(_Config(f"decode {dtype} kv-{name} d{head_dim}",
                                   paged_decode._paged_decode_kernel, f"*{dtype}", dconst,
                                   ("scale_log2",), pointers=ptrs))
                out.append(_Config(f"kv write kv-{name}", kv_write._kv_write_kernel, "*bf16",
                                   dict(NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128,
                                        KV_QUANT=quant), pointers=ptrs))
    out.append(_Config("merge segments", paged_decode._merge_segments_kernel, "*bf16",
                       dict(HEAD_DIM=128, BLOCK_D=128, NUM_SEGMENTS=16)))
    out.append(_Config("kv write bf16", kv_write._kv_write_kernel, "*bf16",
                       dict(NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128, KV_QUANT=0)))
    for hidden in (896, 4096, 8192):
        block = 1 << (hidden - 1).bit_length()
        out.append(_Config(f"rmsnorm+residual h{hidden}", rmsnorm._rms_norm_kernel, "*bf16",
                           dict(HAS_RESIDUAL=True, BLOCK=block), ("eps",),
                           num_warps=rmsnorm.num_warps_for(block)))
    out.append(_Config("silu_and_mul", activation._silu_and_mul_kernel, "*bf16",
                       dict(BLOCK=activation.BLOCK)))
    out.append(_Config("rotary q32 k8 d128", rotary._rotary_kernel, "*bf16",
                       dict(NUM_Q_HEADS=32, NUM_K_HEADS=8, HALF=64, BLOCK_QH=32, BLOCK_KH=8,
                            BLOCK_HALF=64)))
    return out


def compile_all(arch: int = 90, only: Sequence[str] = ()) -> list[CompiledKernel]:
    """Compile the production configurations for ``sm_<arch>``; raises on any failure.

    ``only``: keep the configurations whose name contains one of these strings.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    results = []
    for cfg in _configs():
        if only and not any(part in cfg.name for part in only):
            continue
        sig = _signature(cfg.kernel, cfg.ptr_dtype, cfg.constexprs, cfg.floats,
                         {**INDEX_POINTERS, **cfg.pointers})
        src = ASTSource(fn=cfg.kernel, signature=sig, constexprs=cfg.constexprs)
        compiled = triton.compile(src, target=target, options={"num_warps": cfg.num_warps})
        results.append(
            CompiledKernel(cfg.name, compiled.metadata.shared, compiled.metadata.num_warps))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10")
    parser.add_argument("--only", default="", help="comma-separated name filters")
    args = parser.parse_args(argv)
    from tokenmill.kernels.triton_utils import interpreter_active

    if interpreter_active():
        print("unset TRITON_INTERPRET: the interpreter cannot compile", file=sys.stderr)
        return 2
    worst = 0
    only = [part for part in args.only.split(",") if part]
    for kernel in compile_all(args.arch, only):
        worst = max(worst, kernel.shared_bytes)
        print(f"{kernel.name:36s} shared {kernel.shared_bytes:7d} B  warps {kernel.num_warps}")
    if worst > HOPPER_SHARED_LIMIT:
        print(f"a kernel needs {worst} B of shared memory (> {HOPPER_SHARED_LIMIT})")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
