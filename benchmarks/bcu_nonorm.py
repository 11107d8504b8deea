"""Why BCU collapsed on the lab's nets without BatchNorm: one change at a time.

On the digits lab, ``plain_cnn`` (no normalisation), ``gn_resnet`` (GroupNorm) and
``convnext_lab`` (LayerNorm) x badnets and blended x seeds 0 (2 threads) and 1 (1 thread), the
thread counts of the efficacy matrix's rows, this runs BCU with the library defaults and with
one option changed at a time: the learning rate, the replacement values (``init``), the ratios
(``ratio_scale``) and the epochs. Each row holds ACC / ASR after (digits test split) and the
student's agreement with the teacher on the 270 clean images BCU trained on, which is what the
collapse guard (``bdfast.defenses.distill``) measures.

Rows are appended to ``--results`` as they finish; a later run skips rows already there.

    python benchmarks/bcu_nonorm.py                      # every cell and variant
    python benchmarks/bcu_nonorm.py --archs plain_cnn --variants default lr0.01
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict

import torch

from bdfast import defenses, lab
from bdfast.lab.metrics import evaluate

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("plain_cnn", "gn_resnet", "convnext_lab")
ATTACKS = ("blended", "badnets")
# The matrix measured seed 0 at 2 threads and seed 1 at 1 thread on these nets.
THREADS = {0: 2, 1: 1}
VARIANTS: Dict[str, Dict] = {
    "default": {},
    "lr0.01": {"lr": 0.01},
    "lr0.02": {"lr": 0.02},
    "reset": {"init": "reset"},
    "x1": {"ratio_scale": 1.0},
    "epochs50": {"epochs": 50},
    "epochs200": {"epochs": 200},
}


@torch.no_grad()
def agreement(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor) -> float:
    """Share of images ``x [N, C, H, W]`` on which the two models' argmax agree."""
    return float((student(x).argmax(1) == teacher(x).argmax(1)).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--results", type=Path,
                        default=ROOT / "benchmarks" / "results" / "bcu_nonorm.jsonl")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "efficacy")
    args = parser.parse_args()
    done = set()
    if args.results.exists():
        done = {(r["arch"], r["attack"], r["seed"], r["variant"])
                for r in map(json.loads, args.results.read_text().splitlines())}
    data = lab.lab_data("digits")
    for variant in args.variants:
        for arch in args.archs:
            for attack in args.attacks:
                for seed in args.seeds:
                    if (arch, attack, seed, variant) in done:
                        continue
                    torch.set_num_threads(THREADS.get(seed, 1))
                    model = lab.backdoored("digits", arch, attack, seed, cache=args.cache)
                    teacher = model.model
                    before = evaluate(teacher, *data.test, attack=model.attack)
                    start = time.perf_counter()
                    outcome = defenses.run("bcu", teacher, clean=data.clean, seed=seed,
                                           progress=False, **VARIANTS[variant])
                    seconds = time.perf_counter() - start
                    after = evaluate(outcome.model, *data.test, attack=model.attack)
                    row = dict(arch=arch, attack=attack, seed=seed, variant=variant,
                               options=VARIANTS[variant], threads=torch.get_num_threads(),
                               acc_before=before["acc"], asr_before=before["asr"],
                               acc=after["acc"], asr=after["asr"],
                               agreement=agreement(outcome.model, teacher, data.clean[0]),
                               seconds=round(seconds, 1), teacher=model.key,
                               isa=torch.backends.cpu.get_cpu_capability())
                    args.results.parent.mkdir(parents=True, exist_ok=True)
                    with args.results.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"{arch} {attack} s{seed} {variant:10s} ACC {before['acc']:.3f} -> "
                          f"{after['acc']:.3f} ASR {before['asr']:.3f} -> {after['asr']:.3f} "
                          f"agree {row['agreement']:.3f} {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
