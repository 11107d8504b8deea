"""Writing a demo's results: report.json, report.md and a PNG chart of ACC and ASR."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

from bdfast.lab.metrics import __doc__ as METRIC_DEFINITIONS

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


QUICK_NOTE = ("a --quick smoke run with tiny training budgets: its numbers check that everything "
              "runs, they do not measure the defenses")


def write_chart(rows: Sequence[dict], path: str, quick: bool = False) -> Optional[str]:
    """Grouped bars of ACC and ASR per attack and defense; returns None without matplotlib.

    A ``quick`` run says so in the title and in the PNG's Description metadata.
    """
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
    # Beside the plots: inside, it covered the last attack's bars.
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="defense")
    title = ("bdfast demo: digits CNN, clean accuracy (higher is better) and attack success "
             "(lower is better)")
    if quick:
        title = "QUICK SMOKE RUN (tiny budgets, not a measurement)\n" + title
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Title": "bdfast demo",
                                         "Description": QUICK_NOTE if quick else "full run"})
    plt.close(fig)
    return path


def not_implanted(rows: Sequence[dict], threshold: float) -> Dict[str, float]:
    """Attacks whose ASR before any defense was below ``threshold``, with that ASR."""
    return {r["attack"]: r["asr_before"] for r in rows if not r["asr_before"] >= threshold}


def best_sentence(best: Dict[str, dict], missed: Dict[str, float], threshold: float) -> str:
    """"Best defense per attack: ..." naming none for attacks that did not implant."""
    parts = [f"{a}: {r['defense']} (ACC {r['acc']:.3f}, ASR {r['asr']:.3f})"
             for a, r in best.items()]
    parts += [f"{a}: none named (ASR before any defense {asr:.3f} < {threshold}: the attack did "
              "not implant)" for a, asr in missed.items()]
    return "Best defense per attack (highest DER): " + ("; ".join(parts) if parts else "none yet")


def write_report(out_dir: str, rows: List[dict], config: dict, environment: dict,
                 best: Dict[str, dict], *, implanted_asr: float, complete: bool = True
                 ) -> Dict[str, Optional[str]]:
    """Write report.json, report.md and (when ``complete``) chart.png into ``out_dir``.

    ``rows`` are :class:`bdfast.lab.demo.DemoRow` dicts, ``best`` maps attack -> best row dict
    (attacks whose ``asr_before`` is below ``implanted_asr`` have none). A run that is not
    ``complete`` (written after each row, so an interrupted demo keeps what it measured) is
    marked as partial; ``config["quick"]`` marks a smoke run in all three files. Returns the
    paths (``chart`` None when not drawn).
    """
    os.makedirs(out_dir, exist_ok=True)
    quick = bool(config.get("quick"))
    missed = not_implanted(rows, implanted_asr)
    paths: Dict[str, Optional[str]] = {}
    report = {"quick": quick, "complete": complete, "rows": rows, "config": config,
              "definitions": METRIC_DEFINITIONS.strip(), "environment": environment,
              "best": {attack: row["defense"] for attack, row in best.items()},
              "not_implanted": missed}
    paths["json"] = os.path.join(out_dir, "report.json")
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=2, default=str)
    paths["chart"] = write_chart(rows, os.path.join(out_dir, "chart.png"), quick) \
        if complete else None
    md = ["# bdfast demo report", ""]
    if quick:
        md += [f"**This is {QUICK_NOTE}.**", ""]
    if not complete:
        md += ["**Partial report: the run has not finished (or was interrupted); the rows below "
               "are those measured so far.**", ""]
    md += ["Backdoored digits CNNs (scikit-learn's handwritten digits, 16x16), one per attack, "
           "and every defense run on each.", "", table(rows), "",
           best_sentence(best, missed, implanted_asr), "",
           "## Definitions", "", METRIC_DEFINITIONS.strip(), "",
           "## Environment", "", "```", json.dumps(environment, indent=2), "```", ""]
    if paths["chart"]:
        md += ["![ACC and ASR](chart.png)", ""]
    elif complete:
        md += [f"(No chart: {PLOT_HINT}.)"]
    paths["markdown"] = os.path.join(out_dir, "report.md")
    with open(paths["markdown"], "w") as f:
        f.write("\n".join(md))
    return paths
