"""BCU's collapse-guard agreement on the lab's models: what ``COLLAPSE_AGREEMENT`` is set from.

For each cell (data set, architecture, attack, seed) this runs :func:`bdfast.defenses.bcu.bcu_fit`
with the library's defaults on the lab model, fed as :func:`bdfast.defenses.run` feeds BCU
(:func:`~bdfast.defenses.registry.defense_loader`: the clean images without labels, batches of
64, shuffled with the seed), and appends one JSON line (a cell already there is skipped):
ACC before, ACC / ASR after, the student's agreement with the teacher's predictions on those
images (``agreement``, what the guard compares), and the lr of the second training when the
first collapsed (``retried_lr``; then ``agreement`` is the second training's).

    python benchmarks/bcu_agreement.py --data digits --archs plain_cnn --attacks badnets \\
        --seeds 0 1 2 3 --threads 1
"""
from __future__ import annotations

import argparse
import warnings
import torch

from bdfast import lab
from bdfast.defenses.bcu import bcu_fit
from bdfast.defenses.registry import defense_loader
from bdfast.lab.metrics import evaluate
from efficacy import add_cell_options, append_row, measured_cells, provenance

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cell_options(parser, "bcu_agreement.jsonl", arch="plain_cnn", attack="badnets",
                     threads=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    done = measured_cells(args.results, ("data", "arch", "attack", "seed"), args.threads)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for data in args.data:
        for arch in args.archs:
            for attack in args.attacks:
                for seed in args.seeds:
                    if (data, arch, attack, seed) in done:
                        continue
                    model = lab.backdoored(data, arch, attack, seed, cache=args.cache)
                    loader = defense_loader("bcu", model.data.clean, seed=seed)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)  # recorded below
                        result = bcu_fit(model.model, loader, seed=seed, progress=False)
                    before = evaluate(model.model, *model.data.test, attack=model.attack)
                    after = evaluate(result.model, *model.data.test, attack=model.attack)
                    row = dict(data=data, arch=arch, attack=attack, seed=seed,
                               threads=args.threads, acc_before=before["acc"], acc=after["acc"],
                               asr=after["asr"], agreement=result.agreement_after,
                               retried_lr=result.retried_lr, **provenance())
                    append_row(args.results, row)
                    print(f"{data} / {arch} / {attack} / seed {seed}: ACC {before['acc']:.3f} -> "
                          f"{after['acc']:.3f}, ASR {after['asr']:.3f}, agreement "
                          f"{result.agreement_after:.3f}"
                          + (f" (retried at lr={result.retried_lr:g})" if result.retried_lr
                             else ""), flush=True)


if __name__ == "__main__":
    main()
