"""Run every efficacy acceptance case of the test suite over what varies between machines.

The lab models' weights, and so every ACC / ASR the tests check, change with the seed, torch's
thread count and the CPU's instruction set (conv and GEMM kernels round differently on AVX2 and
AVX-512). A bound only counts if it holds on all of them, with margin. This script runs the cases
of :mod:`bdfast.lab.acceptance` for every variant

    seed in --seeds  x  threads in --threads  x  instruction set in --isa

each variant in its own process (thread counts and instruction sets are fixed at start-up), and
prints a table of ACC / ASR per case and variant, then the worst margin of every case. It exits
with 1 if any case misses a bound on any variant.

``--isa avx2`` emulates an AVX2-only CPU on an AVX-512 machine (``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` for torch, ``BDFAST_CPU_ISA=avx2`` for bdfast's kernels); the
capability that took effect is read back from the worker and shown. Results are appended to
``--results`` (JSON lines) as they arrive and reused by a later run with the same sources
(:func:`bdfast.lab.code_version`), so an interrupted run resumes; trained lab models are cached
in ``--cache`` by :func:`bdfast.lab.backdoored`.

    python scripts/efficacy_margin.py                        # the full matrix (~4 min a variant,
                                                             # 2 cores)
    python scripts/efficacy_margin.py --cases dde mbns -j 2  # a subset, two workers at a time
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List

from bdfast import lab
from bdfast.lab.acceptance import CASES

ROOT = Path(__file__).resolve().parents[1]

ISA_ENV = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "BDFAST_CPU_ISA": "avx2"},
}


def selected(patterns: List[str]):
    if not patterns:
        return CASES
    return [c for c in CASES if any(p in c.name for p in patterns)]


# --- one variant, in its own process --------------------------------------------------------

def worker(args: argparse.Namespace) -> None:
    import torch

    from bdfast.lab.acceptance import lab_model

    torch.set_num_threads(args.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    for case in selected(args.cases):
        model = lab_model(case, args.seed, cache=args.cache)
        start = time.perf_counter()
        before, after = case.run(model, args.seed)
        print(json.dumps({"case": case.name, "key": case.key, "seed": args.seed,
                          "threads": args.threads,
                          "isa": args.isa, "capability": capability,
                          "before": before, "after": after,
                          "margin": case.margin(before, after),
                          "seconds": round(time.perf_counter() - start, 1)}), flush=True)


# --- the driver -------------------------------------------------------------------------------

def run_variant(args, seed: int, threads: int, isa: str) -> List[dict]:
    env = dict(os.environ, **ISA_ENV[isa])
    env.pop("OMP_NUM_THREADS", None)
    # Variants run side by side share the cores; spinning OpenMP threads would starve each
    # other. The results do not depend on it: work is split by the thread count alone.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, __file__, "--worker", "--seed", str(seed), "--threads", str(threads),
           "--isa", isa, "--cache", args.cache]
    if args.cases:
        cmd += ["--cases", *args.cases]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"variant seed {seed}, {threads} threads, {isa} failed:\n"
                           + proc.stderr[-3000:])
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def fmt(row: dict) -> str:
    return f"{row['after']['acc']:.3f} / {row['after']['asr']:.3f}"


def table(rows: List[dict], cases, seeds, threads, isas) -> str:
    by_key = {(r["key"], r["seed"], r["threads"], r["isa"]): r for r in rows}
    variants = [(t, i) for i in isas for t in threads]
    caps = {r["isa"]: r["capability"] for r in rows}
    head = ["case", "seed", "before ACC / ASR"] + [
        f"{t} thr, {caps.get(i, i)}" for t, i in variants]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in cases:
        for seed in seeds:
            cells = [by_key.get((case.key, seed, t, i)) for t, i in variants]
            first = next((c for c in cells if c), None)
            before = (f"{first['before']['acc']:.3f} / {first['before']['asr']:.3f}"
                      if first else "")
            lines.append("| " + " | ".join(
                [case.name, str(seed), before]
                + [(fmt(c) + ("" if c["margin"] >= 0 else " **x**")) if c else "" for c in cells])
                + " |")
    lines += ["", "| case | bound | worst variant | ACC / ASR there | margin |",
              "|---|---|---|---|---:|"]
    for case in cases:
        mine = [r for r in rows if r["key"] == case.key]
        if not mine:
            continue
        worst = min(mine, key=lambda r: r["margin"])
        if case.defense == "none":
            bound = f"ACC >= {case.acc_min}" + (f", ASR >= {case.asr_min}" if case.asr_min else "")
        else:
            bound = (f"ASR <= {case.asr_max}, " if case.asr_max is not None else "") + \
                f"drop <= {case.max_acc_drop}"
        lines.append(f"| {case.name} | {bound} | seed {worst['seed']}, {worst['threads']} thr, "
                     f"{worst['capability']} | {fmt(worst)} | {worst['margin']:+.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--isa", nargs="+", default=["native", "avx2"], choices=list(ISA_ENV))
    parser.add_argument("--cases", nargs="*", default=[],
                        help="run only the cases whose name contains one of these strings")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="variants run at once")
    parser.add_argument("--results", default=str(ROOT / ".cache/margin/results.jsonl"))
    parser.add_argument("--cache", default=str(ROOT / ".cache/margin/models"))
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: print the table of the results already measured")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        args.isa = args.isa[0]
        worker(args)
        return 0

    tag = lab.code_version()
    cases = selected(args.cases)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = []
    if results.exists():
        done = [r for r in map(json.loads, results.read_text().splitlines()) if r["tag"] == tag]
    have = {(r["key"], r["seed"], r["threads"], r["isa"]) for r in done}
    # Fewest threads first, both instruction sets side by side: an interrupted run has covered
    # every instruction set for the thread counts it reached.
    todo = [(s, t, i) for t in args.threads for s in args.seeds for i in args.isa
            if not args.table_only and any((c.key, s, t, i) not in have for c in cases)]
    print(f"{len(cases)} cases x {len(args.seeds) * len(args.threads) * len(args.isa)} variants; "
          f"{len(todo)} variants to run", flush=True)

    def one(variant):
        start = time.perf_counter()
        rows = run_variant(args, *variant)
        with results.open("a") as f:
            for row in rows:
                f.write(json.dumps(dict(row, tag=tag)) + "\n")
        print(f"  seed {variant[0]}, {variant[1]} threads, {variant[2]}: "
              f"{time.perf_counter() - start:.0f} s, worst margin "
              f"{min(r['margin'] for r in rows):+.3f}", flush=True)
        return rows

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for rows in pool.map(one, todo):
            done += rows
    wanted = {(c.key, s, t, i) for c in cases for s in args.seeds for t in args.threads
              for i in args.isa}
    rows = {(r["key"], r["seed"], r["threads"], r["isa"]): r for r in done}
    rows = [r for k, r in rows.items() if k in wanted]
    text = table(rows, cases, args.seeds, args.threads, args.isa)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    ran = sorted({(r["seed"], r["threads"], r["isa"]) for r in rows})
    print(f"\n{len(ran)} variants measured (seed, threads, instruction set): "
          + ", ".join(f"{s}/{t}/{i}" for s, t, i in ran))
    failed = sorted({r["case"] for r in rows if not r["margin"] >= 0})
    print(f"\nworst margin {min(r['margin'] for r in rows):+.3f}; "
          + (f"FAILED: {', '.join(failed)}" if failed else "every case passes on every variant"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
