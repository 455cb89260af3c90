"""Accelerator specifications used by the planner: memory, bandwidth and peak FLOP/s."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator as the roofline model sees it.

    ``memory_gib`` is the device memory in GiB (2**30 bytes), ``bandwidth_tbs`` the
    peak memory bandwidth in TB/s (10**12 bytes/s) and ``tflops`` the dense
    (no structured sparsity) 16-bit tensor-core throughput in TFLOP/s (10**12).
    """

    name: str
    memory_gib: float
    bandwidth_tbs: float
    tflops: float
    note: str = ""

    def __post_init__(self) -> None:
        for field_name in ("memory_gib", "bandwidth_tbs", "tflops"):
            if not getattr(self, field_name) > 0:
                raise ValueError(f"GPU {self.name!r}: {field_name} must be positive")

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def bandwidth(self) -> float:
        """Peak memory bandwidth in bytes per second."""
        return self.bandwidth_tbs * 1e12

    @property
    def peak_flops(self) -> float:
        """Peak dense 16-bit FLOP per second."""
        return self.tflops * 1e12

    @property
    def ridge_point(self) -> float:
        """Arithmetic intensity (FLOP/byte) where compute and memory time are equal."""
        return self.peak_flops / self.bandwidth


# Datasheet numbers (dense bf16/fp16 tensor-core FLOP/s, i.e. half the "with
# sparsity" figure NVIDIA usually prints first). Measured bandwidth is lower:
# an H100 SXM copies at about 3.0 TB/s, not 3.35.
GPUS: dict[str, GPUSpec] = {
    spec.name.lower(): spec
    for spec in (
        GPUSpec("A100-40G", 40, 1.555, 312, "A100 SXM4 40 GB, HBM2"),
        GPUSpec("A100-80G", 80, 2.039, 312, "A100 SXM4 80 GB, HBM2e"),
        GPUSpec("H100-SXM", 80, 3.35, 989, "H100 SXM5 80 GB, HBM3"),
        GPUSpec("H100-PCIE", 80, 2.0, 756, "H100 PCIe 80 GB, HBM2e"),
        GPUSpec("H200", 141, 4.8, 989, "H200 SXM 141 GB, HBM3e"),
        GPUSpec("L4", 24, 0.3, 121, "L4 24 GB, GDDR6"),
        GPUSpec("L40S", 48, 0.864, 362, "L40S 48 GB, GDDR6"),
        GPUSpec("RTX-4090", 24, 1.008, 165.2,
                "GeForce RTX 4090, GDDR6X; bf16 with fp32 accumulate (fp16 accumulate: 330)"),
    )
}


def get_gpu(name: str) -> GPUSpec:
    """Look up a GPU by name (case-insensitive, e.g. ``"a100-80g"``)."""
    try:
        return GPUS[name.lower()]
    except KeyError:
        known = ", ".join(spec.name for spec in GPUS.values())
        raise ValueError(f"unknown GPU {name!r}; known GPUs: {known} "
                         "(or give --gpu-memory-gb, --gpu-bandwidth-tbs and --gpu-tflops)"
                         ) from None
