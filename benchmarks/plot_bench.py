"""Plots of time and peak memory against N, one line per method, from a benchmark JSON.

    python benchmarks/plot_bench.py out.json --out DIR

Reads the JSON of `pytest benchmarks/ --benchmark-json out.json` or of `bench_fused_linear.py --json` (the same
shape: benchmarks[] with extra_info {method, N, D, total_ms, peak_extra_mib}). Writes one PNG per benchmark group
(e.g. `fused_linear D=1536`): left, total time (ms, log scale) against N; right, peak memory beyond inputs (MiB).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict


def _rows(doc):
    for b in doc.get("benchmarks", []):
        e = dict(b.get("extra_info") or {})
        p = b.get("params") or {}
        method, n = e.get("method", p.get("method")), e.get("N", p.get("N"))
        if method is None or n is None:
            continue
        t = e.get("total_ms")
        if t is None and b.get("stats"):
            t = b["stats"]["median"] * 1e3
        yield b.get("group") or "benchmark", method, int(n), t, e.get("peak_extra_mib")


def plot(json_path: str, out_dir: str) -> list[str]:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    with open(json_path) as f:
        doc = json.load(f)
    groups: dict = defaultdict(lambda: defaultdict(list))
    for group, method, n, t, mem in _rows(doc):
        groups[group][method].append((n, t, mem))
    device = (doc.get("machine_info") or {}).get("device") or (doc.get("machine_info") or {}).get("node", "")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for group, methods in sorted(groups.items()):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
        for method, pts in sorted(methods.items()):
            pts.sort()
            tp = [(n, t) for n, t, _ in pts if t is not None]
            mp = [(n, m) for n, _, m in pts if m is not None]
            if tp:
                ax_t.plot(*zip(*tp), marker="o", label=method)
            if mp:
                ax_m.plot(*zip(*mp), marker="o", label=method)
        for ax, ylabel in ((ax_t, "total time fwd+bwd (ms)"), (ax_m, "peak memory beyond inputs (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=7)
        fig.suptitle(f"{group}  ({device})")
        fig.tight_layout()
        path = os.path.join(out_dir, re.sub(r"[^A-Za-z0-9_.-]+", "_", group) + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json")
    ap.add_argument("--out", default=".")
    a = ap.parse_args(argv)
    for p in plot(a.json, a.out):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
