"""Whole MEDIC runs (teacher statistics + every epoch) against a loop written the way the
released code does it, on the lab's backdoored models, with ACC / ASR after each.

Usage (the issue's settings are the defaults: 60 epochs, every case and variant)::

    python benchmarks/bench_medic_run.py                       # or: make bench-run
    python benchmarks/bench_medic_run.py --epochs 5 --cases digits --variants released,cache

Cases (CPU; the clean set is the digits ``clean`` split, 270 images, batches of 64, shuffled):

- ``digits``: the lab's digits CNN, 1 x 16 x 16;
- ``wrn``: WRN-16-1 on the same images resized to 32 x 32 (bilinear) and repeated to 3 channels.

The teacher of each case is the lab's (:func:`bdfast.lab.backdoored`): trained on the
badnets-poisoned digits training split (rate 0.1, seed 0, ``bdfast.train`` defaults) and cached
under ``.cache/bench_medic_run/``.

Variants (every one from the same teacher, data, epochs and seed):

- ``released``: statistics by :func:`bdfast.defenses.medic.teacher_statistics`, the student
  re-initialised as bdfast does, then per batch :func:`bench_medic_step.released_step` (batch-mean
  CE, full backward through both nets with ``retain_graph``, a second backward, per-layer softmax
  loop), Adam with the same per-step cosine schedule;
- ``nocache``: ``Medic(cache_teacher=False)``; ``cache``: ``cache_teacher=True`` with the
  default ``cache_dtype="auto"`` (float32 here: the table fits the default budget);
  ``cache-nchw``: the same with ``channels_last=False`` (every other bdfast variant runs the
  default, channels-last on the CPU); ``cache-bf16``, ``cache-fp16``: with that ``cache_dtype``;
- ``released+aug``, ``aug``: both with the in-loop random crop (``augment="crop"`` on digits,
  ``"crop+flip"`` on WRN; the released loop applies the same seeded ``RandomCrop``).

bdfast runs with ``reference_compat=True`` (signed z and q, g from the batch-mean CE) so that it
computes the same loss as the released loop and the two must reach the same ACC / ASR; the
option does not change the cost. tau and lam are the library's defaults (20 and 3).
``--repeat N`` runs the whole list of variants N times in turn, so that a slow spell of a noisy
machine hits every variant alike; the table reports each variant's fastest run and the ratios of
the fastest runs. Writes ``benchmarks/results/medic_run.json`` (``--out``, every run) and prints
a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from bench_medic_step import released_step

from bdfast import lab
from bdfast._utils import seed_everything
from bdfast.defenses.augment import RandomCrop
from bdfast.loaders import tensor_loader
from bdfast.hooks import copy_without_hooks, disable_inplace, select_layers
from bdfast.defenses.medic import Medic, MedicConfig, _student, auto_layers, teacher_statistics

ROOT = Path(__file__).resolve().parents[1]

CASES = ("digits", "wrn")
VARIANTS = ("released", "nocache", "cache", "cache-nchw", "cache-bf16", "cache-fp16",
            "released+aug", "aug")
DTYPES = {"cache": "auto", "cache-nchw": "auto", "cache-bf16": torch.bfloat16,
          "cache-fp16": torch.float16}
ATTACK, SEED, BATCH = "badnets", 0, 64


def setup(case: str, images: int, cache_dir: Path):
    """(teacher, clean x, clean y, test x, test y, triggered test x, target labels, augment)."""
    lab_model = lab.backdoored("digits", "wrn16_1" if case == "wrn" else "digits_cnn", ATTACK,
                               SEED, view="rgb32" if case == "wrn" else "native",
                               cache=cache_dir, progress=True)
    attack, view = lab_model.attack, lab_model.view
    x_clean, y_clean = lab_model.data.clean
    x_test, y_test = lab_model.data.test
    # The trigger goes on the data set's own images, then the model's view (as in training).
    x_raw, _ = lab.lab_data("digits").test
    eligible = y_test != attack.target
    x_trig = view(attack.apply(x_raw[eligible]))
    y_trig = attack.target_labels(y_test[eligible], 10)
    augment = "crop+flip" if case == "wrn" else "crop"
    return (lab_model.model, x_clean[:images], y_clean[:images], x_test, y_test, x_trig, y_trig,
            augment)


@torch.no_grad()
def metrics(model, x_test, y_test, x_trig, y_trig):
    model.eval()
    acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    asr = (model(x_trig).argmax(1) == y_trig).float().mean().item()
    return acc, asr


def released_run(teacher, loader, *, epochs: int, seed: int, augment):
    """The released code's loop around :func:`released_step`; returns the student."""
    cfg = MedicConfig()
    seed_everything(seed)
    t_model = copy_without_hooks(teacher).eval().requires_grad_(False)
    disable_inplace(t_model)
    # MedicConfig's layers="auto" resolves by how the net normalises, as Medic.fit does.
    names = select_layers(t_model, auto_layers(t_model) if cfg.layers == "auto" else cfg.layers)
    student = _student(teacher, names, fresh=True)
    next(iter(loader))  # Medic.fit reads the first batch here too: the same order of batches
    mu, sigma = teacher_statistics(t_model, names, loader, device=torch.device("cpu"))
    step = released_step(t_model, student, names, mu, sigma, tau=cfg.tau, lam=cfg.lam)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1.0 + math.cos(math.pi * min(i, total) / total)))
    crop = RandomCrop.from_spec(augment, seed)
    for _ in range(epochs):
        student.train()
        for x, y in loader:
            if crop is not None:
                x = crop(x)
            step(x, y, opt)
            sched.step()
    return student.eval()


def run_variant(case_data, variant: str, epochs: int):
    teacher, x_clean, y_clean, x_test, y_test, x_trig, y_trig, aug_kind = case_data
    loader = tensor_loader(x_clean, y_clean, batch_size=BATCH, shuffle=True, seed=SEED)
    augment = aug_kind if variant.endswith("aug") else False
    start = time.perf_counter()
    extra = {}
    if variant.startswith("released"):
        model = released_run(teacher, loader, epochs=epochs, seed=SEED, augment=augment)
    else:
        cache = variant.startswith("cache")
        options = dict(epochs=epochs, seed=SEED, progress=False, amp=False,
                       reference_compat=True, augment=augment,
                       cache_teacher=bool(cache))
        if cache:
            options["cache_dtype"] = DTYPES[variant]
        if variant == "cache-nchw":
            options["channels_last"] = False
        result = Medic(**options).fit(teacher, loader)
        model = result.model
        extra = {"cache": {k: v for k, v in result.cache.items()},
                 "losses": [h["loss"] for h in result.history],
                 "statistics_s": result.timings["statistics"]}
    seconds = time.perf_counter() - start
    acc, asr = metrics(model, x_test, y_test, x_trig, y_trig)
    return dict(seconds=seconds, acc=acc, asr=asr, **extra)


def fastest(rows):
    """One row per (case, variant): its fastest run, with every run's ``all_seconds``."""
    runs = {}
    for row in rows:
        runs.setdefault((row["case"], row["variant"]), []).append(row)
    return [dict(min(group, key=lambda r: r["seconds"]),
                 all_seconds=[r["seconds"] for r in group]) for group in runs.values()]


def table(rows) -> str:
    lines = ["| case | variant | seconds (fastest; all) | vs released | ACC | ASR "
             "| loss, last epoch |", "|---|---|---:|---:|---:|---:|---:|"]
    rows = fastest(rows)
    for row in rows:
        base = next((r for r in rows if r["case"] == row["case"]
                     and r["variant"] == ("released+aug" if row["variant"].endswith("aug")
                                          else "released")), None)
        ratio = f"{base['seconds'] / row['seconds']:.2f}x" if base else "n/a"
        loss = f"{row['losses'][-1]:.5g}" if row.get("losses") else ""
        runs = ", ".join(f"{s:.1f}" for s in row["all_seconds"])
        lines.append(f"| {row['case']} | {row['variant']} | {row['seconds']:.1f}; {runs} | "
                     f"{ratio} | {row['acc']:.3f} | {row['asr']:.3f} | {loss} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    code_version = lab.code_version()  # of the code this process loaded, before it runs
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--images", type=int, default=270, help="clean images (at most 270)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeat", type=int, default=1, help="runs of each variant, in turn")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "medic_run.json")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "bench_medic_run")
    args = parser.parse_args(argv)
    cases, variants = args.cases.split(","), args.variants.split(",")
    for name, chosen, known in (("case", cases, CASES), ("variant", variants, VARIANTS)):
        unknown = [c for c in chosen if c not in known]
        if unknown:
            parser.error(f"unknown {name}(s) {unknown}; choose from {list(known)}")
    rows = []
    for case in cases:
        data = setup(case, args.images, args.cache)
        for turn in range(args.repeat):
            for variant in variants:
                row = dict(case=case, variant=variant, turn=turn, epochs=args.epochs,
                           images=len(data[1]), **run_variant(data, variant, args.epochs))
                rows.append(row)
                print(f"{case:6s} {variant:12s} {row['seconds']:7.1f} s  ACC {row['acc']:.3f}  "
                      f"ASR {row['asr']:.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = dict(torch=torch.__version__, threads=torch.get_num_threads(),
                   cpu=os.cpu_count(), code_version=code_version)
    args.out.write_text(json.dumps(dict(machine=machine, rows=rows), indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
