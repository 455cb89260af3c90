"""Collect the results of benchmarks/side_by_side.sh into summary.md and summary.png.

    python benchmarks/side_by_side_report.py RESULTS_DIR

Reads every ``*.json`` written by ``tokenmill bench serve`` in RESULTS_DIR (each holds a
tokenmill run and a peer run at the same load, measured back to back) and writes:

* ``summary.md``: one row per run, then the ratio tokenmill ÷ peer per paired table;
* ``summary.png``: output throughput and mean TTFT against concurrency per server
  (random workload).
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def load_docs(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(folder.glob("*.json")):
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and doc.get("runs"):
            docs.append((path.stem, doc))
    return docs


def server_name(label: str) -> str:
    """``llama-server -np 8`` → ``llama-server``: one line per server across concurrencies."""
    return re.sub(r"\s+-np\s+\d+$", "", label)


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def run_rows(docs: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for stem, doc in docs:
        for run in doc["runs"]:
            s = run["summary"]
            rows.append({
                "table": stem,
                "workload": doc.get("args", {}).get("workload", "?"),
                "concurrency": run["load"]["max_concurrency"],
                "label": run["target"]["label"],
                "server": server_name(run["target"]["label"]),
                "req_s": s["request_throughput"],
                "out_tok_s": s["output_throughput"],
                "ttft_mean": s["ttft"]["mean"],
                "ttft_p99": s["ttft"]["p99"],
                "tpot_mean": s["tpot"]["mean"],
                "itl_p50": s["itl"]["median"],
                "e2e_mean": s["e2e"]["mean"],
                "ok": s["completed"],
                "failed": s["failed"],
            })
    return rows


def ratio_rows(docs: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for stem, doc in docs:
        for comp in doc.get("comparisons", []):
            by_metric = {r["metric"]: r["ratio"] for r in comp["rows"]}
            load = doc["runs"][0]["load"]
            rows.append({
                "table": stem,
                "workload": doc.get("args", {}).get("workload", "?"),
                "concurrency": load["max_concurrency"],
                "a": comp["a"],
                "b": comp["b"],
                "throughput": by_metric.get("Output token throughput (tok/s)"),
                "ttft": by_metric.get("Mean TTFT (ms)"),
                "tpot": by_metric.get("Mean TPOT (ms)"),
                "itl": by_metric.get("Median ITL (ms)"),
            })
    return rows


def write_markdown(folder: Path, runs: list[dict], ratios: list[dict]) -> Path:
    lines = ["# Side-by-side serving benchmark", ""]
    machine = folder / "machine.txt"
    if machine.exists():
        lines += ["```", machine.read_text().rstrip(), "```", ""]
    lines += [
        "Each table below was measured back to back: tokenmill, then the peer, with the",
        "same prompts and the same concurrency. Latencies in ms.", "",
        "| workload | concurrency | server | req/s | output tok/s | TTFT mean | TTFT p99 "
        "| TPOT mean | ITL p50 | E2E mean | ok / failed |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['workload']} | {r['concurrency']} | {r['label']} | {fmt(r['req_s'], 2)} "
            f"| {fmt(r['out_tok_s'])} | {fmt(r['ttft_mean'], 0)} | {fmt(r['ttft_p99'], 0)} "
            f"| {fmt(r['tpot_mean'])} | {fmt(r['itl_p50'])} | {fmt(r['e2e_mean'], 0)} "
            f"| {r['ok']} / {r['failed']} |")
    if ratios:
        lines += _ratio_lines(ratios)
    lines += ["", "Per-table details: the `.txt`, `.json` and `.png` files next to this one.", ""]
    out = folder / "summary.md"
    out.write_text("\n".join(lines))
    return out


def _ratio_lines(ratios: list[dict]) -> list[str]:
    lines = [
        "", "## Ratios, tokenmill ÷ peer", "",
        "Throughput: above 1 is better for tokenmill; latencies: below 1 is better.", "",
        "| workload | concurrency | peer | output tok/s | mean TTFT | mean TPOT | median ITL |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in ratios:
        lines.append(
            f"| {r['workload']} | {r['concurrency']} | {r['b']} | {fmt(r['throughput'], 2)}× "
            f"| {fmt(r['ttft'], 2)}× | {fmt(r['tpot'], 2)}× | {fmt(r['itl'], 2)}× |")
    return lines


def plot_summary(folder: Path, runs: list[dict]) -> Path | None:
    random_runs = [r for r in runs if r["workload"] == "random" and r["concurrency"]]
    if not random_runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_ttft) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_server: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in random_runs:
        by_server[r["server"]][r["concurrency"]].append(r)
    for server, points in sorted(by_server.items()):
        cs = sorted(points)
        for ax, key in ((ax_tp, "out_tok_s"), (ax_ttft, "ttft_mean")):
            means = []
            for c in cs:
                values = [p[key] for p in points[c] if p[key] is not None]
                means.append(sum(values) / len(values) if values else float("nan"))
            line = ax.plot(cs, means, marker="o", label=f"{server} (mean)")[0]
            for c in cs:  # every measurement, when a server was measured more than once
                values = [p[key] for p in points[c] if p[key] is not None]
                ax.scatter([c] * len(values), values, s=14, alpha=0.5, color=line.get_color())
    all_cs = sorted({r["concurrency"] for r in random_runs})
    ax_tp.set_title("Output throughput, random workload")
    ax_tp.set_ylabel("output tokens/s")
    ax_ttft.set_title("Mean time to first token, random workload")
    ax_ttft.set_ylabel("ms")
    ax_ttft.set_yscale("log")
    for ax in (ax_tp, ax_ttft):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_cs, [str(c) for c in all_cs])
        ax.set_xlabel("concurrency")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = folder / "summary.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    folder = Path(argv[0])
    docs = load_docs(folder)
    if not docs:
        print(f"no bench results in {folder}", file=sys.stderr)
        return 1
    runs, ratios = run_rows(docs), ratio_rows(docs)
    md = write_markdown(folder, runs, ratios)
    png = plot_summary(folder, runs)
    print(md.read_text())
    print(f"wrote {md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
