"""Writing a demo's results: report.json, report.md and a PNG chart of ACC and ASR."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

from bdfast.metrics import __doc__ as METRIC_DEFINITIONS

PLOT_HINT = "pip install 'bdfast[plot]' (matplotlib) to get the chart"


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.3f}"


def table(rows: Sequence[dict]) -> str:
    """A Markdown table of attack, defense, ACC, ASR, RA, DER and seconds."""
    lines = ["| attack | defense | ACC | ASR | RA | DER | seconds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['attack']} | {r['defense']} | {_fmt(r['acc'])} | {_fmt(r['asr'])} | "
                     f"{_fmt(r['ra'])} | {_fmt(r['der'])} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def write_chart(rows: Sequence[dict], path: str) -> Optional[str]:
    """Grouped bars of ACC and ASR per attack and defense; returns None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    by_key = {(r["attack"], r["defense"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    width = 0.8 / len(defenses)
    for ax, metric in zip(axes, ("acc", "asr")):
        for i, defense in enumerate(defenses):
            values = [by_key.get((a, defense), {}).get(metric, float("nan")) for a in attacks]
            ax.bar([k + i * width for k in range(len(attacks))], values, width, label=defense)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(attacks))], attacks)
        ax.set_title(metric.upper())
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(loc="upper right", fontsize=8)
    fig.suptitle("bdfast demo: digits CNN, clean accuracy (higher is better) and attack "
                 "success (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out_dir: str, rows: List[dict], config: dict, environment: dict,
                 best: Dict[str, dict]) -> Dict[str, Optional[str]]:
    """Write report.json, report.md and chart.png into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths: Dict[str, Optional[str]] = {}
    report = {"rows": rows, "config": config, "definitions": METRIC_DEFINITIONS.strip(),
              "environment": environment,
              "best": {attack: row["defense"] for attack, row in best.items()}}
    paths["json"] = os.path.join(out_dir, "report.json")
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=2, default=str)
    paths["chart"] = write_chart(rows, os.path.join(out_dir, "chart.png"))
    md = ["# bdfast demo report", "",
          "Backdoored digits CNNs (scikit-learn's handwritten digits, 16x16), one per attack, "
          "and every defense run on each.", "", table(rows), "",
          "Best defense per attack (highest DER): " +
          ", ".join(f"{a}: {r['defense']}" for a, r in best.items()), "",
          "## Definitions", "", METRIC_DEFINITIONS.strip(), "",
          "## Environment", "", "```", json.dumps(environment, indent=2), "```", ""]
    md += ["![ACC and ASR](chart.png)", ""] if paths["chart"] else [f"(No chart: {PLOT_HINT}.)"]
    paths["markdown"] = os.path.join(out_dir, "report.md")
    with open(paths["markdown"], "w") as f:
        f.write("\n".join(md))
    return paths
