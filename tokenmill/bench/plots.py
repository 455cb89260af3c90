"""Pictures of a benchmark: latency distributions and, for sweeps, throughput vs latency.

matplotlib is imported lazily with the Agg backend, so plotting works on headless
machines and costs nothing when no plot is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from tokenmill.bench.metrics import itls_of, tpot_of, ttft_of
from tokenmill.bench.report import RunResult

DISTRIBUTIONS = (
    ("TTFT", lambda r: [t] if (t := ttft_of(r)) is not None else []),
    ("TPOT", lambda r: [t] if (t := tpot_of(r)) is not None else []),
    ("ITL", itls_of),
    ("E2E latency", lambda r: [r.latency] if r.latency is not None else []),
)


def _short_label(result: RunResult, many_targets: bool) -> str:
    load = result.load
    parts = [result.target.name] if many_targets else []
    if not math.isinf(load.request_rate):
        parts.append(f"{load.request_rate:g} req/s")
    if load.max_concurrency:
        parts.append(f"c={load.max_concurrency}")
    return ", ".join(parts) or "run"


def plot_results(results: Sequence[RunResult], path: str, title: str = "") -> None:
    """Draw the latency distributions of ``results`` (and a sweep curve) into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    targets = list(dict.fromkeys(r.target.name for r in results))
    many_targets = len(targets) > 1
    sweep = any(sum(r.target.name == t for r in results) > 1 for t in targets)
    rows = 3 if sweep else 2
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4.2 * rows), squeeze=False)
    single = len(results) == 1

    for ax, (name, values_of) in zip(axes[:2].flat, DISTRIBUTIONS, strict=True):
        for result in results:
            ok = [r for r in result.records if r.success]
            ms = np.sort(np.array([v for r in ok for v in values_of(r)], dtype=float) * 1000)
            if ms.size == 0:
                continue
            if single:
                lo, hi = float(ms[0]), float(ms[-1])
                if hi - lo < 1e-6 * max(1.0, hi):  # all equal: give the bins some width
                    lo, hi = lo - 0.5, hi + 0.5
                ax.hist(ms, bins=min(50, max(5, ms.size // 4)), range=(lo, hi),
                        color="tab:blue", alpha=0.8)
                ax.set_ylabel("requests" if name != "ITL" else "token gaps")
                for q, style in ((50, "--"), (99, ":")):
                    v = float(np.percentile(ms, q))
                    ax.axvline(v, color="black", linestyle=style, label=f"p{q} {v:.1f} ms")
            else:
                ecdf = np.arange(1, ms.size + 1) / ms.size
                ax.step(ms, ecdf, where="post", label=_short_label(result, many_targets))
                ax.set_ylabel("fraction ≤ x")
        ax.set_title(name)
        ax.set_xlabel("ms")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")

    if sweep:
        for ax, (name, get) in zip(axes[2], (
                ("TTFT", lambda s: (s.ttft.median, s.ttft.p99)),
                ("TPOT", lambda s: (s.tpot.median, s.tpot.p99))), strict=True):
            for target in targets:
                runs = [r for r in results if r.target.name == target]
                x = [r.summary.output_throughput for r in runs]
                med = [get(r.summary)[0] for r in runs]
                p99 = [get(r.summary)[1] for r in runs]
                line = ax.plot(x, [np.nan if v is None else v for v in med], marker="o",
                               label=f"{target} median")[0]
                ax.plot(x, [np.nan if v is None else v for v in p99], marker="x",
                        linestyle="--", color=line.get_color(), label=f"{target} p99")
                for xi, yi, r in zip(x, med, runs, strict=True):
                    if yi is not None:
                        ax.annotate(_short_label(r, False), (xi, yi), fontsize="x-small",
                                    textcoords="offset points", xytext=(4, 4))
            ax.set_title(f"{name} vs output throughput")
            ax.set_xlabel("output tokens/s")
            ax.set_ylabel(f"{name} (ms)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")

    fig.suptitle(title or "tokenmill bench serve")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
