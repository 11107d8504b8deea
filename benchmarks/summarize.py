"""Print the ratio table of a pytest-benchmark JSON written by ``make bench``.

Usage: ``python benchmarks/summarize.py benchmarks/results/latest.json``

One row per (op, case, device, variant) with the median time and ``vs native``, the variant's
median over the native kernel's (how many times faster the native kernel is), as a Markdown
table that can be pasted into benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def rows(report: dict) -> list[list[str]]:
    """Table rows, grouped by case with the native kernel first."""
    cases = defaultdict(dict)
    for bench in report.get("benchmarks", []):
        info = bench.get("extra_info", {})
        key = (info.get("op", bench["group"] or bench["name"]), info.get("case", ""),
               info.get("device", ""))
        cases[key][info.get("variant", bench["name"])] = bench
    table = []
    for (op, case, device), variants in cases.items():
        native = variants.get("native")
        native_median = native["stats"]["median"] if native else None
        order = sorted(variants, key=lambda v: (v != "native", v))
        for variant in order:
            bench = variants[variant]
            median = bench["stats"]["median"]
            ratio = f"{median / native_median:.1f}x" if native_median else "n/a"
            info = bench.get("extra_info", {})
            share = info.get("bandwidth_share")
            bandwidth = (f"{info['achieved_GBps']:.1f} GB/s ({100 * share:.0f}% of copy)"
                         if share is not None else "")
            rounds = bench["stats"].get("rounds", "")
            table.append([op, case, device, variant, _time(median), ratio, bandwidth,
                          str(rounds)])
    return table


def markdown(table: list[list[str]]) -> str:
    header = ["op", "case", "device", "variant", "median", "vs native", "bandwidth", "rounds"]
    widths = [max(len(str(r[i])) for r in [header] + table) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in table]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        report = json.load(f)
    table = rows(report)
    if not table:
        print(f"{args.json} holds no benchmark results", file=sys.stderr)
        return 1
    machine = report.get("machine_info", {})
    print(f"machine: {machine.get('cpu_model', machine.get('cpu', {}).get('brand_raw', '?'))}, "
          f"{machine.get('torch_threads', '?')} torch threads, torch {machine.get('torch', '?')}"
          + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
          + (f", bdfast ISA {machine['bdfast_cpu_isa']}" if machine.get("bdfast_cpu_isa") else ""))
    commit = report.get("commit_info", {})
    dirty = " (working tree dirty at the end)" if commit.get("dirty") else ""
    print(f"code version {machine.get('bdfast_code_version', 'not recorded')}, commit "
          f"{commit.get('id', '?')[:12]}{dirty}")
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
