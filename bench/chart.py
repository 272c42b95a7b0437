"""Draw the benchmark chart: fan-out throughput by subscriber count, latency percentiles.

Usage: python bench/chart.py RECORD.json OUT.png   (RECORD is one line of history.jsonl)
Runs in bench/.venv (matplotlib is a bench tool, not a project dependency).
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {"tessera": "#1f77b4", "mosquitto": "#2ca02c", "nats": "#ff7f0e"}


def main(src: str, out: str) -> None:
    with open(src) as f:
        rec = json.load(f)
    summary = rec["summary"]
    peers = list(summary)
    subs = rec["args"]["subs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / max(1, len(peers))
    for i, p in enumerate(peers):
        meds, lo, hi = [], [], []
        for s in subs:
            m = summary[p].get(f"fanout_{s}.deliveries_per_s")
            meds.append(m["median"] / 1e3 if m else 0)
            lo.append((m["median"] - m["min"]) / 1e3 if m else 0)
            hi.append((m["max"] - m["median"]) / 1e3 if m else 0)
        xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(subs))]
        label = f"{p} {rec['versions'].get(p, '')}"
        ax1.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=label, color=COLORS.get(p))
        for x, m in zip(xs, meds, strict=True):
            ax1.text(x, m, f"{m:,.0f}k", ha="center", va="bottom", fontsize=8)
    ax1.axhline(1000, color="red", linestyle="--", linewidth=1, label="target 1M/s")
    ax1.set_xticks(range(len(subs)), [f"S={s}" for s in subs])
    ax1.set_ylabel("deliveries/s (thousands), median, min-max")
    ax1.set_title("TLS fan-out, 1 publisher, 256 B payloads, broker on one core")
    ax1.legend(fontsize=8)

    pcts = [("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms"), ("p99.9", "p999_ms")]
    for p in peers:
        ys = []
        for _label, key in pcts:
            m = summary[p].get(f"latency.{key}")
            ys.append(m["median"] if m else float("nan"))
        if "latency.p90_ms" not in summary[p]:
            # p90 is not in the summary table; take it from the raw runs
            vals = sorted(r["p90_ms"] for r in rec["raw"][p].get("latency", []) if r.get("ok"))
            ys[1] = vals[len(vals) // 2] if vals else float("nan")
        ax2.plot([lbl for lbl, _ in pcts], ys, marker="o", label=p, color=COLORS.get(p))
    ax2.set_yscale("log")
    ax2.set_ylabel("latency, ms (log scale)")
    ax2.set_title(f"latency, {rec['args']['rate']:g} msg/s to S={rec['args']['lat_subs']} over TLS")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    title = f"Tessera benchmark {rec['time']} ({rec['cpu']}, {rec['cores']} cores)"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
