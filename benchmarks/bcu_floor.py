"""How low can BCU take a blended backdoor on the Fashion-MNIST lab, whatever its ratios?

The ``fresh`` setting re-initialises every conv and linear weight (``ratios="uniform:1.0",
ratio_scale=1``), so no backdoor weight survives and the student learns from nothing but the
teacher's predictions on the clean images. This script measures, on the digits CNN with the
blended attack, seeds 0 and 1, at each thread count given (the lab model and the student change
with the rounding):

- ``fresh``: as above, the norm layers copied from the teacher (as BCU always does);
- ``fresh + BN reset``: the same, with every BatchNorm's affine parameters and running statistics
  reset too, so nothing of the teacher's weights survives at all;
- ``clean teacher``: a control: the same fresh distillation from a teacher trained on the
  unpoisoned training set (ASR of the trigger on a model that never saw it).

    python benchmarks/bcu_floor.py --threads 1 2   # writes benchmarks/results/bcu_floor.md
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
FRESH = {"ratios": "uniform:1.0", "ratio_scale": 1.0}
VARIANTS = ("fresh", "fresh + BN reset", "clean teacher")


def measure(seed: int, cache: Path) -> List[Dict]:
    """Every variant for one seed, at this process's thread count."""
    import torch
    from torch import nn

    from bdfast import defenses, lab
    from bdfast.defenses import bcu
    from bdfast.lab.metrics import evaluate

    rows = []
    poisoned = lab.backdoored("fmnist", "digits_cnn", "blended", seed, cache=cache)
    clean = lab.backdoored("fmnist", "digits_cnn", "blended", seed, rate=0.0, cache=cache)
    original = bcu.partial_reinit

    def reset_norms_too(model: nn.Module, *args, **kwargs):
        replaced = original(model, *args, **kwargs)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_parameters()
        return replaced

    for variant in VARIANTS:
        teacher = clean if variant == "clean teacher" else poisoned
        bcu.partial_reinit = reset_norms_too if variant == "fresh + BN reset" else original
        try:
            outcome = defenses.run("bcu", teacher.model, clean=teacher.data.clean, seed=seed,
                                   progress=False, **FRESH)
        finally:
            bcu.partial_reinit = original
        before = evaluate(teacher.model, *teacher.data.test, attack=teacher.attack)
        after = evaluate(outcome.model, *teacher.data.test, attack=teacher.attack)
        rows.append({"variant": variant, "seed": seed, "threads": torch.get_num_threads(),
                     "isa": torch.backends.cpu.get_cpu_capability(),
                     "source": lab.code_version(), "acc_before": before["acc"],
                     "asr_before": before["asr"], "acc": after["acc"], "asr": after["asr"]})
    return rows


def table(rows: List[Dict]) -> str:
    variants = sorted({(r["seed"], r["threads"], r["isa"]) for r in rows})
    head = ["variant"] + [f"seed {s}, {t} thr, {i}" for s, t, i in variants]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in VARIANTS:
        cells = []
        for s, t, i in variants:
            found = [r for r in rows if (r["variant"], r["seed"], r["threads"], r["isa"])
                     == (name, s, t, i)]
            cells.append(f"{found[0]['acc']:.3f} / {found[0]['asr']:.3f}" if found else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    asr = {name: [r["asr"] for r in rows if r["variant"] == name] for name in VARIANTS}
    lines += ["", "ACC / ASR after the distillation. ASR range: " + "; ".join(
        f"{name} {min(v):.3f}-{max(v):.3f}" for name, v in asr.items() if v)]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "efficacy")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--worker", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch
        seed, threads = args.worker
        torch.set_num_threads(threads)
        for row in measure(seed, args.cache):
            print(json.dumps(row), flush=True)
        return 0
    rows = []
    for threads in args.threads:
        for seed in args.seeds:
            # A thread count holds for a whole process (torch's pools start once).
            done = subprocess.run([sys.executable, __file__, "--worker", str(seed), str(threads),
                                   "--cache", str(args.cache)], capture_output=True, text=True,
                                  check=True)
            rows += [json.loads(line) for line in done.stdout.splitlines()
                     if line.startswith("{")]
            print(f"seed {seed}, {threads} threads: " + ", ".join(
                f"{r['variant']} {r['asr']:.3f}" for r in rows[-len(VARIANTS):]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bcu_floor.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (args.out / "bcu_floor.md").write_text(table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
