"""Line coverage of the CUDA kernels (csrc/cuda/*.cu and common.cuh) under the emulated tests.

    python scripts/cuda_coverage.py build/cuda-emu-coverage

Reads the gcov counters that a run of the emulated CUDA tests left in a build configured with
-DBDFAST_COVERAGE=ON (``make coverage-cuda`` does both) and prints, per file, the executable
lines that ran and the line numbers of those that did not.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_DIR = os.path.join(ROOT, "csrc", "cuda")


def kernel_file(path: str) -> bool:
    path = os.path.realpath(os.path.join(ROOT, path))
    return os.path.dirname(path) == KERNEL_DIR and path.endswith((".cu", ".cuh"))


def line_counts(build_dir: str) -> Dict[str, Dict[int, int]]:
    """{kernel source: {line: executions}}, summed over every object that includes it."""
    counts: Dict[str, Dict[int, int]] = {}
    notes = [os.path.abspath(os.path.join(d, f)) for d, _, files in os.walk(build_dir)
             for f in files if f.endswith(".gcda")]
    if not notes:
        sys.exit(f"no .gcda files under {build_dir}: run the emulated tests with this build first")
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(["gcov", "--json-format", "--preserve-paths", *notes], cwd=out,
                       check=True, capture_output=True)
        for name in os.listdir(out):
            with gzip.open(os.path.join(out, name), "rt") as f:
                report = json.load(f)
            for entry in report["files"]:
                if not kernel_file(entry["file"]):
                    continue
                lines = counts.setdefault(os.path.realpath(entry["file"]), {})
                for line in entry["lines"]:
                    lines[line["line_number"]] = (lines.get(line["line_number"], 0)
                                                  + line["count"])
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build_dir")
    args = parser.parse_args()
    counts = line_counts(args.build_dir)
    total = covered = 0
    for path in sorted(counts):
        lines = counts[path]
        missed: Set[int] = {n for n, c in lines.items() if c == 0}
        total += len(lines)
        covered += len(lines) - len(missed)
        share = 100 * (len(lines) - len(missed)) / max(len(lines), 1)
        print(f"{os.path.relpath(path, ROOT):36s} {len(lines) - len(missed):4d} / {len(lines):4d} "
              f"lines  {share:5.1f} %" + (f"   not run: {sorted(missed)}" if missed else ""))
    print(f"{'all kernel files':36s} {covered:4d} / {total:4d} lines  "
          f"{100 * covered / max(total, 1):5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
