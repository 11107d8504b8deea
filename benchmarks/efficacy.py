"""The efficacy matrix: every defense on data sets x models x attacks x seeds, on the CPU.

For each cell (data set, model, attack, seed) a backdoored lab model is trained (poison rate 0.1,
``bdfast.train`` defaults) or taken from the cache, and every requested defense setting runs on
it. A result row holds ACC / ASR / RA before and after, the seconds the defense took and whether
it meets the bound a user cares about: **ASR <= 0.10 with an ACC drop <= 0.03**.

Data, subsampled so that the whole matrix fits a 2-core machine:

- ``digits``: scikit-learn's 1,797 handwritten digits at 16x16 (``load_digits``): 1,077 train,
  270 clean (the defender's set), 450 test.
- ``fmnist``: Fashion-MNIST (``load_fashion_mnist``, Debian's dataset-fashion-mnist): a stratified
  2,000 of the training images to poison and train on, 500 clean, 1,000 of the test images,
  area-downsampled from 28x28 to 16x16.
- ``fmnist28``: Fashion-MNIST at its own 28x28: 5,000 training images, 500 clean, 2,000 test.
  Run on request (``--data fmnist28``), and held out at every seed: no default was chosen on it.

Models: ``digits_cnn``, ``vgg_small`` and ``preact_resnet18`` at width 16 (the DDE/MBNS papers'
architecture with a quarter of its channels: 976 BN channels), and three nets without BatchNorm:
``gn_resnet`` (GroupNorm, GELU, depthwise-separable residual blocks), ``convnext_lab``
(LayerNorm, ConvNeXt blocks) and ``plain_cnn`` (no normalisation), and two in the layouts of
today's downloaded nets: ``vit_lab`` (a small ViT: LayerNorm and ``nn.MultiheadAttention`` on
tokens) and ``convnext_cl_lab`` (a channels-last ConvNeXt: LayerNorm and Linear layers on
``[B, H, W, C]``, layer scales). DDE and MBNS need BatchNorm and are not run on the last five.

Each defense gets its data as a user would give it: MEDIC the clean set with labels, BCU the
clean images without labels (the ``images2000`` setting: 2,000, the 500 clean
images plus spare Fashion-MNIST training images, see ``unlabeled_images``), fine-tuning the
clean set, DDE the poisoned training images (and, for ``u="auto"``, the labelled clean set to
validate on), MBNS the labelled clean set (its statistics ignore the labels; ``u="auto"``
validates on the held-out half of each batch against them); batches of 64 for training, 256
for statistics. A *setting* is a named set of options (``SETTINGS``);
``default`` is whatever the library's signature says, resolved to explicit values when the row
is written, so a later change of a default shows as a different row.

Rows are appended to ``--results`` (JSON lines) as they finish and a later run skips every row
already there with the same options, so an interrupted run resumes; trained models are cached
under ``--cache``. ``--report`` writes the Markdown tables, a JSON summary and a chart from the
rows without running anything. Every run ends by writing them, beside ``--results`` and named
after it (``efficacy.jsonl``: ``efficacy.md``, ``efficacy.json``, ``efficacy.png``).

    python benchmarks/efficacy.py                          # the whole matrix
    python benchmarks/efficacy.py --data digits --seeds 0  # a slice
    python benchmarks/efficacy.py --report                 # tables and chart only
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from bdfast import defenses, lab
from bdfast.lab import attacks
from bdfast.lab.data import LabData
from bdfast.hooks import BATCHNORM
from bdfast.defenses.medic import auto_layers
from bdfast.lab.metrics import evaluate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

ASR_MAX = 0.10
MAX_ACC_DROP = 0.03

DATA = lab.DATA
# The 28x28 Fashion-MNIST set runs when asked for (--data fmnist28): its teachers take minutes each.
DEFAULT_DATA = ("digits", "fmnist")
ARCHS = ("digits_cnn", "preact_resnet18", "vgg_small", "gn_resnet", "convnext_lab", "plain_cnn",
         "vit_lab", "convnext_cl_lab")
ATTACKS = ("badnets", "blended", "wanet", "sig")
# The baselines first, then the library's defenses, in the registry's order.
DEFENSES = tuple(sorted(defenses.names(baselines=True), key=lambda n: not defenses.get(n).baseline))

# The seeds the MEDIC and BCU defaults were chosen on; results on other seeds are held out.
SELECTION_SEEDS = (0, 1)
# The core runs: every default data set x these nets x these attacks.
CORE_CELLS = {(data, arch, attack) for data in DEFAULT_DATA
              for arch in ("digits_cnn", "preact_resnet18") for attack in ("badnets", "blended")}

# Options that make a run resumable and change nothing it computes (docs/long-runs.md): rows
# written since they exist record them, older rows do not, and both are the same run.
RESUMABILITY = ("checkpoint", "resume")
# A setting's lab-side option, not the defense's: how many unlabeled images BCU gets.
UNLABELED = "unlabeled_images"
# Named option sets per defense. "default" is the library's own; the others are the papers'
# values and the candidates the defaults were chosen from (docs/medic-experiments.md,
# docs/bcu-experiments.md, docs/pruning.md).
SETTINGS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "none": {"default": {}},
    "finetune": {"default": {"epochs": 20, "lr": 0.01}},
    "medic": {"default": {}, "paper": {"lam": 10.0, "tau": 5.0},
              "lam1-tau10": {"lam": 1.0, "tau": 10.0}, "lam3-tau10": {"lam": 3.0, "tau": 10.0},
              "lam3-tau20": {"lam": 3.0, "tau": 20.0}, "lam10-tau20": {"lam": 10.0, "tau": 20.0},
              "lam1-tau20": {"lam": 1.0, "tau": 20.0}, "lam3-tau40": {"lam": 3.0, "tau": 40.0},
              "augment": {"augment": True}, "crop": {"augment": "crop"},
              # Which outputs to clone on the nets without BatchNorm (docs/medic-experiments.md).
              "block+linear": {"layers": "block+linear"}, "act+linear": {"layers": "act+linear"},
              "conv+norm+linear": {"layers": "conv+norm+linear"},
              # The student's Adam step on the transformer-style nets (docs/medic-experiments.md).
              "lr0.001": {"lr": 0.001},
              # Twice the epochs, with and without crops, on the ViT (docs/medic-experiments.md).
              "e120": {"epochs": 120}, "crop-e120": {"augment": "crop", "epochs": 120},
              # What else was tried on the ViT's held-out blended runs (docs/medic-experiments.md).
              "wd1e-3": {"weight_decay": 1e-3}, "wd1e-2": {"weight_decay": 1e-2},
              "signed": {"signed": True},
              # A sharper importance, with more epochs or another clone weight, on the same runs.
              "lam3-tau40-e120": {"tau": 40.0, "epochs": 120}, "lam3-tau80": {"tau": 80.0},
              "lam10-tau40": {"lam": 10.0, "tau": 40.0}, "lam1-tau40": {"lam": 1.0, "tau": 40.0},
              # No clone term: the labels alone, what a student from scratch reaches without
              # the teacher.
              "lam0": {"lam": 0.0}},
    "bcu": {"default": {},
            "paper": {"lr": 0.01, "epochs": 100, "init": "reset", "ratio_scale": 1.0},
            "lr0.05": {"lr": 0.05, "epochs": 100, "init": "reset", "ratio_scale": 1.0},
            "kaiming": {"lr": 0.01, "epochs": 100, "init": "kaiming", "ratio_scale": 1.0},
            "kaiming-lr0.05": {"lr": 0.05, "epochs": 100, "init": "kaiming", "ratio_scale": 1.0},
            "augment": {"augment": True, "ratio_scale": 1.0},
            "crop": {"augment": "crop", "ratio_scale": 1.0},
            "x2": {"ratio_scale": 2.0},
            # The paper's BCU had 2,500-5,000 unlabeled images (its Fig. 4: more images, lower
            # ASR); these give it more of Fashion-MNIST's spare images (unlabeled_images()).
            "images2000": {UNLABELED: 2000},
            "T1": {"temperature": 1.0},
            # Every conv/linear weight replaced: how low distillation alone takes ASR, whatever
            # the ratios (docs/bcu-experiments.md, "How low can any ratio go?").
            "fresh": {"ratios": "uniform:1.0", "ratio_scale": 1.0},
            # Only the lr changed, on the net without normalisation (docs/bcu-experiments.md).
            "defaults-lr0.02": {"lr": 0.02}, "defaults-lr0.01": {"lr": 0.01}},
    "dde": {"default": {}, "paper": {"u": 3.0}, "auto": {"u": "auto"}},
    "mbns": {"default": {}, "paper": {"u": 3.0}, "auto": {"u": "auto"}},
}
def load_data(name: str) -> LabData:
    return lab.lab_data(name)


def unlabeled_images(data_name: str, data: LabData, count: int) -> torch.Tensor:
    """``count`` unlabeled in-distribution images for BCU: the clean split's images first, then
    Fashion-MNIST training images in neither the clean split nor the attacker's 2,000, in a
    fixed random order. The digits have no spare images."""
    clean = data.clean[0]
    if data_name != "fmnist" or count < len(clean):
        raise ValueError(f"unlabeled_images: only the fmnist lab, and at least its {len(clean)} "
                         f"clean images (got {data_name!r}, {count})")
    return torch.cat([clean, lab.fmnist_spare_images()[:count - len(clean)]])


def resolved_options(defense: str, setting: str, arch: Optional[str] = None) -> Dict[str, Any]:
    """The setting's options with every library default of the defense written out; given the
    ``arch``, MEDIC's ``layers="auto"`` is written as the preset it picks on that net
    (:func:`bdfast.defenses.medic.auto_layers`), so a row says what ran."""
    options = dict(SETTINGS[defense][setting])
    if defenses.get(defense).baseline:  # the baselines: their options are all written out
        return options
    # None of these changes what a run computes. The teacher cache keeps float32 rows at these
    # set sizes, so a cached run is the uncached one to float rounding (docs/medic.md).
    skip = {"progress", "seed", "device", "eval_fn", "student", "inplace", "eval_every",
            "backend", "amp", "val_loader", "cache_teacher", "cache_budget", "cache_dtype",
            *RESUMABILITY}
    for name, parameter in defenses.get(defense).options().items():
        if name not in skip:
            options.setdefault(name, parameter.default)
    # DDE's and MBNS's preset=None is the library's own behaviour, the one rows written before
    # the option existed ran; leaving it out keeps their keys.
    if options.get("preset") is None:
        options.pop("preset", None)
    if arch is not None and options.get("layers") == "auto":
        options["layers"] = auto_layers(_lab_net(arch))
    return options


def run_defense(defense: str, options: Dict[str, Any], teacher: nn.Module, data_name: str,
                data: LabData, x_poisoned: torch.Tensor, seed: int) -> defenses.Outcome:
    """The defense's outcome, given the data a user of that defense has: the clean set (or, for
    a BCU setting with ``unlabeled_images``, that many unlabeled images) and the poisoned
    training images."""
    options = dict(options)
    count = options.pop(UNLABELED, None)
    clean = data.clean if count is None else unlabeled_images(data_name, data, count)
    return defenses.run(defense, teacher, clean=clean, train=x_poisoned, seed=seed,
                        progress=False, **options)


def run_recording_warnings(*args: Any) -> Tuple[defenses.Outcome, List[str]]:
    """:func:`run_defense`'s outcome and the RuntimeWarnings the run gave (BCU's collapse guard
    and its second training, MEDIC's), which the row keeps as ``warnings``; each is shown too."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        outcome = run_defense(*args)
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return outcome, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@functools.lru_cache(maxsize=None)
def _lab_net(arch: str) -> nn.Module:
    """One untrained lab net per architecture, to read its structure from (the report asks for
    every row)."""
    return lab.build_model(arch, 10, 1)


def has_batchnorm(arch: str) -> bool:
    return any(isinstance(m, BATCHNORM) for m in _lab_net(arch).modules())


def _family(row: Dict[str, Any]) -> str:
    return "BatchNorm" if has_batchnorm(row["arch"]) else "no BatchNorm"


def _label(row: Dict[str, Any]) -> str:
    """The row's setting name; "former default" for a "default" row whose options are no longer
    the library's default on its net (MEDIC's layers before ``layers="auto"``)."""
    if row["setting"] != "default" or row["defense"] not in SETTINGS:
        return row["setting"]
    today = json.dumps(resolved_options(row["defense"], "default", row["arch"]), sort_keys=True)
    return "default" if _options_key(row) == today else "former default"


def row_key(row: Dict[str, Any]) -> str:
    return json.dumps([row["data"], row["arch"], row["attack"], row["seed"], row["threads"],
                       row["defense"], _computing(row["options"])], sort_keys=True)


def read_rows(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def add_cell_options(parser: argparse.ArgumentParser, results: str, *, arch: str,
                     attack: Optional[str] = None, threads: int = 2) -> None:
    """The options of a script that measures lab cells one at a time: ``--data`` (default the
    digits), ``--archs`` (``arch``), ``--attacks`` (``attack``; left out when None),
    ``--seeds`` (0-3), ``--threads``, ``--results`` (``results`` in ``benchmarks/results``) and
    ``--cache`` (the lab models, shared with this script)."""
    parser.add_argument("--data", nargs="+", default=["digits"], choices=lab.DATA)
    parser.add_argument("--archs", nargs="+", default=[arch], choices=lab.ARCHS)
    if attack is not None:
        parser.add_argument("--attacks", nargs="+", default=[attack], choices=attacks.names())
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--results", type=Path, default=RESULTS / results)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "efficacy")


def measured_cells(results: Path, fields: Tuple[str, ...], threads: int) -> Set[Tuple[Any, ...]]:
    """The cells (the values of ``fields``) that ``results`` holds a row for at ``threads``
    threads on this machine's instruction set: what a resumed run skips."""
    isa = torch.backends.cpu.get_cpu_capability()
    return {tuple(row[f] for f in fields) for row in read_rows(results)
            if row["threads"] == threads and row.get("isa") == isa}


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    done = {row_key(r) for r in read_rows(args.results)}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for data_name in args.data:
        data = load_data(data_name)
        for arch in args.archs:
            for attack_name in args.attacks:
                for seed in args.seeds:
                    todo = []
                    for defense in args.defenses:
                        for setting in args.settings.get(defense, ["default"]):
                            options = resolved_options(defense, setting, arch)
                            row = dict(data=data_name, arch=arch, attack=attack_name, seed=seed,
                                       threads=args.threads, defense=defense, setting=setting,
                                       options=options)
                            if row_key(row) not in done:
                                todo.append(row)
                                done.add(row_key(row))
                    # DDE and MBNS refuse a net without BatchNorm by design (they score BN
                    # channels); the matrix records nothing for them there.
                    prunable = has_batchnorm(arch)
                    todo = [row for row in todo
                            if prunable or defenses.get(row["defense"]).returns != "prune"]
                    if not todo:
                        continue
                    print(f"{data_name} / {arch} / {attack_name} / seed {seed}", flush=True)
                    lab_model = lab.backdoored(data_name, arch, attack_name, seed,
                                               cache=args.cache, progress=True)
                    teacher, attack = lab_model.model, lab_model.attack
                    before = evaluate(teacher, *data.test, attack=attack)
                    for row in todo:
                        outcome, warned = run_recording_warnings(
                            row["defense"], row["options"], teacher, data_name, data,
                            lab_model.poisoned[0], seed)
                        seconds = outcome.seconds
                        after = evaluate(outcome.model, *data.test, attack=attack)
                        row.update(acc_before=before["acc"], asr_before=before["asr"],
                                   acc=after["acc"], asr=after["asr"], ra=after["ra"],
                                   seconds=round(seconds, 2), meets=meets(before, after),
                                   **provenance(), teacher=lab_model.key)
                        if warned:
                            row.update(warnings=warned)
                        if outcome.report is not None and row["options"].get("u") == "auto":
                            row.update(chosen_u=outcome.report["u"],
                                       sweep=outcome.report["sweep"])
                        append_row(args.results, row)
                        print(f"  {row['defense']:8s} {row['setting']:14s} ACC "
                              f"{before['acc']:.3f} -> {after['acc']:.3f}  ASR "
                              f"{before['asr']:.3f} -> {after['asr']:.3f}  "
                              f"{seconds:6.1f} s", flush=True)


def append_row(path: Path, row: Dict[str, Any]) -> None:
    """Append ``row`` to the JSON-lines file ``path`` as soon as it is measured, so that an
    interrupted run keeps what it finished."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def provenance() -> Dict[str, Any]:
    """What a row's numbers depend on besides its cell and thread count: torch's version, the
    CPU, the capability torch's kernels ran at, and the code version."""
    return dict(torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                isa=torch.backends.cpu.get_cpu_capability(), source=lab.code_version())


def meets(before: Dict[str, float], after: Dict[str, float]) -> bool:
    return after["asr"] <= ASR_MAX and after["acc"] >= before["acc"] - MAX_ACC_DROP


# --- report -----------------------------------------------------------------------------------

def _cell(row: Dict[str, Any]) -> Tuple[str, str, str]:
    return row["data"], row["arch"], row["attack"]


def _options_key(row: Dict[str, Any]) -> str:
    return json.dumps(_computing(row["options"]), sort_keys=True)


def _computing(options: Dict[str, Any]) -> Dict[str, Any]:
    """``options`` without :data:`RESUMABILITY`, which some rows record and others do not."""
    return {name: value for name, value in options.items() if name not in RESUMABILITY}


def _sample(row: Dict[str, Any]) -> str:
    """"in" for the seeds the defaults were chosen on, "held_out" for the others and for every
    seed of a data set no default was chosen on (fmnist28)."""
    chosen_on = row["data"] in DEFAULT_DATA and row["seed"] in SELECTION_SEEDS
    return "in" if chosen_on else "held_out"


def summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per defense setting: how many (cell, seed) runs meet the bound, on implanted backdoors,
    in sample (seeds :data:`SELECTION_SEEDS`, on which the defaults were chosen) and held out
    (every other seed, never used to choose anything).

    Settings with the same options are one entry, named by all their labels ("default =
    lam3-tau10" once the library's default is that candidate). A run counts only where the
    backdoor took (ASR before >= 0.5); SIG on these small images often does not implant, and
    then no defense can be said to remove it."""
    by_options: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for row in rows:
        if row["defense"] == "none" or row["asr_before"] < 0.5:
            continue
        key = (row["defense"], _family(row), _options_key(row))
        entry = by_options.setdefault(key, {
            "defense": row["defense"], "nets": key[1], "labels": set(),
            "options": row["options"],
            "runs": {"in": set(), "held_out": set()}, "meets": {"in": set(), "held_out": set()},
            "worst_drop": 0.0, "worst_asr": 0.0})
        run = (row["data"], row["arch"], row["attack"], row["seed"], row["threads"])
        entry["labels"].add(_label(row))
        entry["runs"][_sample(row)].add(run)
        if row["meets"]:
            entry["meets"][_sample(row)].add(run)
        entry["worst_drop"] = max(entry["worst_drop"], row["acc_before"] - row["acc"])
        entry["worst_asr"] = max(entry["worst_asr"], row["asr"])
    settings = []
    for entry in by_options.values():
        labels = sorted(entry["labels"], key=lambda label: (label != "default", label))
        named = next((label for label in labels if label in SETTINGS[entry["defense"]]
                      and label != "default"), "default")
        shown = SETTINGS[entry["defense"]][named] or "library defaults"
        if labels == ["former default"]:  # what differs from the library's default today
            today = resolved_options(entry["defense"], "default")
            shown = {k: v for k, v in entry["options"].items() if today.get(k) != v}
        settings.append({"defense": entry["defense"], "nets": entry["nets"],
                         "setting": " = ".join(labels), "options": shown,
                         "runs": len(entry["runs"]["in"]), "meets": len(entry["meets"]["in"]),
                         "held_out_runs": len(entry["runs"]["held_out"]),
                         "held_out_meets": len(entry["meets"]["held_out"]),
                         "worst_drop": entry["worst_drop"], "worst_asr": entry["worst_asr"]})
    settings.sort(key=lambda e: (e["defense"], e["nets"], -e["meets"] / max(e["runs"], 1)))
    return {"bound": {"asr_max": ASR_MAX, "max_acc_drop": MAX_ACC_DROP},
            "selection_seeds": list(SELECTION_SEEDS), "settings": settings}


def core_table(rows: List[Dict[str, Any]]) -> List[str]:
    """The library defaults of MEDIC and BCU on the core runs, in sample and held out side by
    side, with the machines each column was measured on."""
    lines = ["| defense | in sample: seeds "
             + ", ".join(map(str, SELECTION_SEEDS)) + " (the defaults were chosen here) | "
             "held out: other seeds (never used to choose) |", "|---|---:|---:|"]
    for defense in ("medic", "bcu"):
        found = [r for r in rows if r["defense"] == defense and _cell(r) in CORE_CELLS
                 and _label(r) == "default"]
        cells = []
        for sample in ("in", "held_out"):
            mine = [r for r in found if _sample(r) == sample]
            seeds = sorted({r["seed"] for r in mine})
            isas = sorted({r.get("isa", "?") for r in mine})
            cells.append(f"{sum(r['meets'] for r in mine)} of {len(mine)} (seeds "
                         f"{', '.join(map(str, seeds))}; {', '.join(isas)})" if mine else "–")
        lines.append(f"| {defense} default | " + " | ".join(cells) + " |")
    return lines


def markdown(rows: List[Dict[str, Any]]) -> str:
    lines = ["# Efficacy matrix", "",
             f"Bound: ASR <= {ASR_MAX:.2f} with ACC drop <= {MAX_ACC_DROP:.2f}. Each entry is "
             "ACC / ASR after the defense for seed 0 · seed 1 ...; **bold** where it meets the "
             "bound. `benchmarks/efficacy.py` explains the data, models and settings.", "",
             "## The library defaults on the core runs", "",
             "Data sets x digits CNN and PreAct-ResNet-18 x badnets and blended.", "",
             *core_table(rows), "",
             "## Settings: runs that meet the bound (implanted backdoors only)", "",
             "In sample: seeds " + ", ".join(map(str, SELECTION_SEEDS)) + ", the runs the "
             "defaults were chosen on; held out: every other seed.", "",
             "| defense | nets | setting | options | in sample: meets of runs | held out: meets "
             "of runs | worst ACC drop | worst ASR |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for e in summary(rows)["settings"]:
        shown = e["options"] if isinstance(e["options"], str) else f"`{json.dumps(e['options'])}`"
        held = f"{e['held_out_meets']} of {e['held_out_runs']}" if e["held_out_runs"] else "–"
        lines.append(f"| {e['defense']} | {e['nets']} | {e['setting']} | {shown} | "
                     f"{e['meets']} of {e['runs']} | {held} | {e['worst_drop']:.3f} | "
                     f"{e['worst_asr']:.3f} |")
    # One column per (defense, options): a candidate that became the default is one column.
    labels: Dict[Tuple[str, str], set] = {}
    for r in rows:
        labels.setdefault((r["defense"], _options_key(r)), set()).add(_label(r))
    columns = sorted(labels, key=lambda c: (DEFENSES.index(c[0]) if c[0] in DEFENSES else 99,
                                            sorted(labels[c])))
    cells = sorted({_cell(r) for r in rows})
    names = [f"{d} {' = '.join(sorted(labels[(d, k)], key=lambda x: (x != 'default', x)))}"
             for d, k in columns]
    lines += ["", "## Every cell", "",
              "| data | model | attack | " + " | ".join(names) + " |",
              "|---|---|---|" + "---|" * len(columns)]
    for cell in cells:
        entries = []
        for defense, key in columns:
            found = sorted((r for r in rows if _cell(r) == cell and r["defense"] == defense
                            and _options_key(r) == key), key=lambda r: r["seed"])
            text = []
            for r in found:
                value = f"{r['acc']:.2f}/{r['asr']:.2f}"
                text.append(f"**{value}**" if r["meets"] and defense != "none" else value)
            entries.append(" · ".join(text) or "–")
        lines.append(f"| {' | '.join(cell)} | " + " | ".join(entries) + " |")
    return "\n".join(lines) + "\n"


def chart(rows: List[Dict[str, Any]], path: Path) -> Optional[Path]:
    """ASR after against ACC drop, one panel per defense, with the bound's box."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install bdfast[plot]); no chart", file=sys.stderr)
        return None
    defenses = [d for d in DEFENSES if d != "none" and any(r["defense"] == d for r in rows)]
    if not defenses:
        return None
    fig, axes = plt.subplots(1, len(defenses), figsize=(3.2 * len(defenses), 3.2), sharey=True,
                             squeeze=False)
    for ax, defense in zip(axes[0], defenses):
        for setting in sorted({r["setting"] for r in rows if r["defense"] == defense}):
            found = [r for r in rows if r["defense"] == defense and r["setting"] == setting
                     and r["asr_before"] >= 0.5]
            ax.scatter([r["acc_before"] - r["acc"] for r in found], [r["asr"] for r in found],
                       s=14, alpha=0.7, label=setting)
        ax.axvline(MAX_ACC_DROP, color="gray", lw=0.8, ls="--")
        ax.axhline(ASR_MAX, color="gray", lw=0.8, ls="--")
        ax.set_title(defense)
        ax.set_xlabel("ACC drop")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("ASR after")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(rows: List[Dict[str, Any]], results: Path) -> None:
    """The tables, summary and chart of ``rows``, beside ``results`` and named after it
    (``efficacy.jsonl`` -> ``efficacy.md``, ``.json``, ``.png``), so the report of a second
    results file, such as another machine's rows, never overwrites the main one."""
    results.parent.mkdir(parents=True, exist_ok=True)
    tables, digest = results.with_suffix(".md"), results.with_suffix(".json")
    tables.write_text(markdown(rows))
    digest.write_text(json.dumps(summary(rows), indent=1) + "\n")
    written = chart(rows, results.with_suffix(".png"))
    print(f"wrote {tables}, {digest}" + (f", {written}" if written else ""))


def parse_settings(values: List[str]) -> Dict[str, List[str]]:
    """``["medic:paper,default", "bcu:kaiming"]`` -> {"medic": ["paper", "default"], ...}."""
    chosen: Dict[str, List[str]] = {}
    for value in values:
        defense, _, names = value.partition(":")
        if defense not in SETTINGS:
            raise SystemExit(f"--settings: unknown defense {defense!r}")
        names_list = names.split(",") if names else list(SETTINGS[defense])
        unknown = [n for n in names_list if n not in SETTINGS[defense]]
        if unknown:
            raise SystemExit(f"--settings: {defense} has no setting {unknown}; choose from "
                             f"{list(SETTINGS[defense])}")
        chosen[defense] = names_list
    return chosen


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=list(DEFAULT_DATA), choices=DATA)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--defenses", nargs="+", default=list(DEFENSES), choices=DEFENSES)
    parser.add_argument("--settings", nargs="*", default=[],
                        help="defense:setting[,setting...] (default: each defense's 'default'; "
                             "'defense:' alone runs all its settings)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS / "efficacy.jsonl")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "efficacy")
    parser.add_argument("--report", action="store_true", help="only write the tables and chart")
    args = parser.parse_args(argv)
    args.settings = parse_settings(args.settings)
    if not args.report:
        run(args)
    write_report(read_rows(args.results), args.results)


if __name__ == "__main__":
    main()
