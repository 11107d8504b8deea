"""BCU's collapse-guard agreement on the lab's models: what ``COLLAPSE_AGREEMENT`` is set from.

For each cell (data set, architecture, attack, seed) this runs :func:`bdfast.defenses.bcu.bcu_fit`
with the library's defaults on the lab model, fed as :func:`bdfast.defenses.run` feeds BCU (the
clean images without labels, batches of 64, shuffled with the seed), and appends one JSON line:
ACC before, ACC / ASR after, the student's agreement with the teacher's predictions on those
images (``agreement``, what the guard compares), and the lr of the second training when the
first collapsed (``retried_lr``; then ``agreement`` is the second training's).

    python benchmarks/bcu_agreement.py --data digits --archs plain_cnn --attacks badnets \\
        --seeds 0 1 2 3 --threads 1
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

from bdfast import lab
from bdfast.defenses.bcu import bcu_fit
from bdfast.defenses.registry import TRAIN_BATCH
from bdfast.lab import attacks
from bdfast.lab.metrics import evaluate
from bdfast.loaders import tensor_loader
from efficacy import append_row, provenance

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=["digits"], choices=lab.DATA)
    parser.add_argument("--archs", nargs="+", default=["plain_cnn"], choices=lab.ARCHS)
    parser.add_argument("--attacks", nargs="+", default=["badnets"], choices=attacks.names())
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path,
                        default=ROOT / "benchmarks" / "results" / "bcu_agreement.jsonl")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "efficacy")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for data in args.data:
        for arch in args.archs:
            for attack in args.attacks:
                for seed in args.seeds:
                    model = lab.backdoored(data, arch, attack, seed, cache=args.cache)
                    loader = tensor_loader(model.data.clean[0], None, batch_size=TRAIN_BATCH,
                                           shuffle=True, seed=seed)
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
