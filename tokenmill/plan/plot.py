"""Draw a roofline (attainable FLOP/s against arithmetic intensity) with operating points."""

from __future__ import annotations

from collections.abc import Sequence

from tokenmill.plan.hardware import GPUSpec
from tokenmill.plan.roofline import RooflinePoint

_PHASE_STYLE = {"prefill": ("tab:red", "s"), "decode": ("tab:blue", "o"),
                "linear": ("tab:green", "^")}


def plot_roofline(points: Sequence[RooflinePoint], gpu: GPUSpec, path: str,
                  title: str | None = None) -> None:
    """Write a log-log roofline of ``gpu`` with ``points`` marked and labelled to ``path``."""
    # A bare Figure renders with Agg and leaves pyplot's global backend alone.
    from matplotlib.figure import Figure

    intensities = [p.intensity for p in points] + [gpu.ridge_point]
    low = min(intensities) / 4
    high = max(intensities) * 4
    steps = 200
    xs = [low * (high / low) ** (i / steps) for i in range(steps + 1)]
    roof = [min(gpu.peak_flops, gpu.bandwidth * x) / 1e12 for x in xs]

    fig = Figure(figsize=(9, 6))
    ax = fig.add_subplot()
    ax.plot(xs, roof, color="black", linewidth=2,
            label=f"{gpu.name}: {gpu.bandwidth_tbs:g} TB/s, {gpu.tflops:g} TFLOP/s")
    ax.axvline(gpu.ridge_point, color="gray", linestyle=":",
               label=f"ridge point {gpu.ridge_point:.0f} FLOP/byte")
    seen_phases = set()
    for p in points:
        color, marker = _PHASE_STYLE.get(p.phase, ("tab:purple", "D"))
        ax.scatter([p.intensity], [p.attainable_flops / 1e12], color=color, marker=marker,
                   zorder=3, label=p.phase if p.phase not in seen_phases else None)
        seen_phases.add(p.phase)
        ax.annotate(p.label, (p.intensity, p.attainable_flops / 1e12), fontsize=7,
                    xytext=(4, -10), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("attainable TFLOP/s")
    ax.set_title(title or f"Roofline on {gpu.name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
