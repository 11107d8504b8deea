"""The attack success rate of models that never saw the trigger: the floor of a cell's ASR.

ASR counts the test images of other classes that land on the target class once the trigger is
applied. A model can do that without a backdoor when the trigger hides the image from it: a
blended pattern over a small digit is a different picture to a net that learned from a few
hundred images. For each cell (data set, architecture, attack, seed) this script trains the lab
model on the *unpoisoned* training set (:func:`bdfast.lab.backdoored` with ``rate=0``) and
measures, on the same triggered test images as the efficacy matrix:

- ``clean``: that clean model;
- ``medic_of_clean``: MEDIC's student of the clean model, with the library's defaults and the
  defender's clean set (what MEDIC can at best reach on that cell, since nothing is to remove).

A row per cell is appended to ``--results`` (JSON lines); a cell already there is skipped.
The clean model of a data set, net and seed is trained once for all the attacks asked for.

    python benchmarks/attack_floor.py --data digits --archs vit_lab digits_cnn \\
        --attacks blended --seeds 0 1 2 3
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List

import torch

from bdfast import defenses, lab
from bdfast.lab import attacks
from bdfast.lab.metrics import evaluate
from efficacy import add_cell_options, append_row, measured_cells, provenance

def floor_rows(data: str, arch: str, attack_names: List[str], seed: int,
               cache: Path) -> List[Dict[str, Any]]:
    """One row per attack: the clean model's and its MEDIC student's ACC / ASR / RA on that
    attack's triggered test set. At ``rate=0`` no attack changes a training image, so the clean
    model and its student are the same for every attack: both are trained once, on the first
    attack's cell (whose key the rows name as ``teacher``)."""
    clean_model = lab.backdoored(data, arch, attack_names[0], seed, rate=0.0, cache=cache,
                                 progress=True)
    splits = clean_model.data
    student = defenses.run("medic", clean_model.model, clean=splits.clean, seed=seed,
                           progress=False).model
    rows = []
    for name in attack_names:
        trigger = attacks.get(name, num_classes=splits.num_classes)
        rows.append(dict(data=data, arch=arch, attack=name, seed=seed,
                         threads=torch.get_num_threads(),
                         clean=evaluate(clean_model.model, *splits.test, attack=trigger),
                         medic_of_clean=evaluate(student, *splits.test, attack=trigger),
                         **provenance(), teacher=clean_model.key))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cell_options(parser, "attack_floor.jsonl", arch="vit_lab", attack="blended")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    done = measured_cells(args.results, ("data", "arch", "attack", "seed"), args.threads)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for data in args.data:
        for arch in args.archs:
            for seed in args.seeds:
                todo = [attack for attack in args.attacks
                        if (data, arch, attack, seed) not in done]
                if not todo:
                    continue
                for row in floor_rows(data, arch, todo, seed, args.cache):
                    append_row(args.results, row)
                    print(f"{data} / {arch} / {row['attack']} / seed {seed}: clean model ACC "
                          f"{row['clean']['acc']:.3f} ASR {row['clean']['asr']:.3f}; its MEDIC "
                          f"student ACC {row['medic_of_clean']['acc']:.3f} ASR "
                          f"{row['medic_of_clean']['asr']:.3f}", flush=True)


if __name__ == "__main__":
    main()
