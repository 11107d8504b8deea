"""What a blended backdoor answers to: the blend's pattern, or the grey veil it lays on the image.

The blended attack maps an image to ``(1 - alpha) x + alpha p`` with a random pattern ``p``.
Besides the pattern, that lowers the image's contrast and lifts its black background by
``alpha * mean(p)``. This script measures, per cell (data set, architecture, seed) of the
blended attack, each model's ASR under two triggers:

- ``blend``: the attack itself;
- ``veil``: the same blend with the pattern replaced by its mean (per channel), a uniform grey:
  the same change of brightness and contrast, and no pattern.

Models: the backdoored teacher and MEDIC's student of it (library defaults, the defender's clean
set), and the model trained on the *unpoisoned* set (``rate=0``) and MEDIC's student of that.
If the backdoored teacher answers to the veil as to the blend, its trigger is the veil; a student
that answers to it learnt or kept that, pattern or not.

A row per cell is appended to ``--results`` (JSON lines); a cell already there is skipped.

    python benchmarks/blend_veil.py --data digits --archs vit_lab digits_cnn --seeds 0 1 2 3
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict

import torch
from torch import Tensor

from bdfast import defenses, lab
from bdfast.lab import attacks
from bdfast.lab.metrics import evaluate
from efficacy import add_cell_options, append_row, measured_cells, provenance

class Veil(attacks.Blended):
    """The blended attack with its pattern replaced by the pattern's per-channel mean."""

    name = "blended-veil"

    def pattern(self, c: int, h: int, w: int) -> Tensor:
        """A uniform ``[C, H, W]`` image at the blended pattern's mean, per channel."""
        pattern = super().pattern(c, h, w)
        return pattern.mean(dim=(1, 2), keepdim=True).expand(c, h, w).contiguous()


def veil_row(data: str, arch: str, seed: int, cache: Path) -> Dict[str, Any]:
    """ACC / ASR / RA of the four models under the blend and under its veil."""
    backdoored = lab.backdoored(data, arch, "blended", seed, cache=cache, progress=True)
    clean = lab.backdoored(data, arch, "blended", seed, rate=0.0, cache=cache, progress=True)
    splits = backdoored.data
    blend = attacks.get("blended", num_classes=splits.num_classes)
    veil = Veil(num_classes=splits.num_classes)
    models = {
        "teacher": backdoored.model,
        "medic": defenses.run("medic", backdoored.model, clean=splits.clean, seed=seed,
                              progress=False).model,
        "clean": clean.model,
        "medic_of_clean": defenses.run("medic", clean.model, clean=splits.clean, seed=seed,
                                       progress=False).model,
    }
    measured = {name: {"blend": evaluate(model, *splits.test, attack=blend),
                       "veil": evaluate(model, *splits.test, attack=veil)}
                for name, model in models.items()}
    return dict(data=data, arch=arch, attack="blended", seed=seed,
                threads=torch.get_num_threads(), **measured, **provenance(),
                teacher_key=backdoored.key, clean_key=clean.key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cell_options(parser, "blend_veil.jsonl", arch="vit_lab")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    done = measured_cells(args.results, ("data", "arch", "seed"), args.threads)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for data in args.data:
        for arch in args.archs:
            for seed in args.seeds:
                if (data, arch, seed) in done:
                    continue
                row = veil_row(data, arch, seed, args.cache)
                append_row(args.results, row)
                print(f"{data} / {arch} / seed {seed}: ASR blend / veil: " + "; ".join(
                    f"{name} {row[name]['blend']['asr']:.3f} / {row[name]['veil']['asr']:.3f}"
                    for name in ("teacher", "medic", "clean", "medic_of_clean")), flush=True)


if __name__ == "__main__":
    main()
