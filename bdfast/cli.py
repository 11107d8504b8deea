"""The ``bdfast`` command line: ``demo``, ``clean``, ``bench``, ``info`` and ``selftest``.

Every user error (missing file, unimportable factory, data that does not fit the model, a
checkpoint that does not fit the architecture, an unknown or invalid option, a device that is
not there) prints one line and exits with code 2, and nothing is written. Checks that need no
defense run before it, so a mistake costs seconds. A ``clean --checkpoint DIR`` run stopped by
SIGTERM or Ctrl-C writes a checkpoint after the step it is running and exits with code 75
(:data:`bdfast.defenses.checkpoint.EXIT_INTERRUPTED`); ``--resume`` continues it
(docs/long-runs.md).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from bdfast import defenses
from bdfast._utils import channels_last_hint, check_pixel_range, eval_mode
from bdfast.defenses.checkpoint import EXIT_INTERRUPTED, Interrupted, write_atomically


class UsageError(Exception):
    """A problem with the user's input: reported in one line, exit code 2."""


# ----------------------------------------------------------------------------- demo

# Where `bdfast demo` writes its report unless --out says otherwise.
DEMO_OUT = "bdfast-demo"


def _cmd_demo(args: argparse.Namespace) -> int:
    from bdfast.lab.demo import (IMPLANTED_ASR, DemoConfig, best_per_attack, environment,
                                 rows_as_dicts, run_demo)
    from bdfast.lab.report import PLOT_HINT, best_sentence, not_implanted, table, write_report

    overrides = {"device": args.device, "seed": args.seed}
    if args.attacks:
        overrides["attacks"] = args.attacks
    if args.defenses:
        overrides["defenses"] = args.defenses
    if args.device:
        _check_device(args.device, "--device")
    if args.save_model is not None:
        return _save_demo_model(args, overrides)
    cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    out = DEMO_OUT if args.out is None else args.out
    config = dataclasses.asdict(cfg)
    config["quick"] = args.quick
    env = environment()

    def report(rows, complete: bool):
        best = {a: dataclasses.asdict(r) for a, r in best_per_attack(rows).items()}
        return write_report(out, rows_as_dicts(rows), config, env, best,
                            implanted_asr=IMPLANTED_ASR, complete=complete)

    start = time.perf_counter()
    try:
        rows = run_demo(cfg, show_progress=not args.no_progress,
                        on_row=lambda rows: report(rows, complete=False))
    except ValueError as error:
        raise UsageError(str(error)) from error
    total = time.perf_counter() - start
    paths = report(rows, complete=True)
    row_dicts = rows_as_dicts(rows)
    best = {a: dataclasses.asdict(r) for a, r in best_per_attack(rows).items()}
    print()
    if args.quick:
        print("Quick smoke run: tiny budgets, the numbers do not measure the defenses.")
    print(table(row_dicts))
    print()
    print(f"Wrote {paths['json']}, {paths['markdown']}"
          + (f" and {paths['chart']}" if paths["chart"] else f" (no chart: {PLOT_HINT})")
          + f" in {total:.0f}s.")
    print(best_sentence(best, not_implanted(row_dicts, IMPLANTED_ASR), IMPLANTED_ASR))
    return 0


def _save_demo_model(args: argparse.Namespace, overrides: Dict[str, object]) -> int:
    """``bdfast demo --save-model PATH``: train the demo's backdoored model for one attack, save
    its state_dict and stop, so that a newcomer has a suspicious model to clean in seconds."""
    from bdfast.lab.demo import DEMO_ARCH, DemoConfig, backdoored_teacher
    from bdfast.lab.metrics import evaluate

    given = [flag for flag, value in (("--defenses", args.defenses), ("--out", args.out))
             if value is not None]
    if given:
        raise UsageError(f"--save-model only trains the backdoored model and saves it, so it "
                         f"takes no {' or '.join(given)}; run the demo without --save-model "
                         "for the defenses' report")
    attacks = overrides.pop("attacks", ["badnets"])
    if len(attacks) != 1:
        raise UsageError(f"--save-model saves one model, so give one attack with --attacks, "
                         f"got {len(attacks)}")
    _check_output_file(args.save_model, "--save-model")
    cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    attack = attacks[0]
    lab_model = backdoored_teacher(attack, cfg, show_progress=not args.no_progress)
    write_atomically({k: v.detach().cpu() for k, v in lab_model.model.state_dict().items()},
                     args.save_model)
    metrics = evaluate(lab_model.model, *lab_model.data.test, attack=lab_model.attack)
    print(f"Wrote the {attack}-backdoored digits model to {args.save_model} (acc "
          f"{metrics['acc']:.3f}, asr {metrics['asr']:.3f} on the digits test split); load it "
          f"into bdfast.lab.models.{DEMO_ARCH}() with load_state_dict(torch.load(path, "
          "weights_only=True)).")
    return 0


# ----------------------------------------------------------------------------- clean

def _parse_option(text: str) -> tuple:
    if "=" not in text:
        raise UsageError(f"--option must look like key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word such as conv+bn is a string
    return key.strip(), value


def _load_factory(spec: str) -> nn.Module:
    if ":" not in spec:
        raise UsageError(f"--arch must look like module:factory, got {spec!r}")
    module_name, factory_name = spec.split(":", 1)
    sys.path.insert(0, os.getcwd())  # let a user's own module in the working directory import
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any import failure is the user's to fix
        raise UsageError(f"cannot import module {module_name!r} for --arch: {error}") from error
    finally:
        sys.path.pop(0)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UsageError(f"module {module_name!r} has no callable {factory_name!r} for --arch")
    model = factory()
    if not isinstance(model, nn.Module):
        raise UsageError(f"--arch {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def _load_weights(model: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise UsageError(f"--weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"cannot read --weights {path}: {error}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UsageError(f"--weights {path} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UsageError(f"--weights {path} does not fit the architecture: {detail}") from error


def _load_npz(path: str, flag: str, *, min_images: int, need_labels: bool = False):
    """Images ``x [N, C, H, W]`` float32 in [0, 1] and labels ``y [N]`` int64 (or None) of an
    .npz file, with a one-line UsageError for anything a defense could not use."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag} file not found: {path}")
    try:
        with np.load(path) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except Exception as error:
        raise UsageError(f"cannot read {flag} {path} as .npz: {error}") from error
    if "x" not in arrays:
        raise UsageError(f"{flag} {path} has no array 'x' (found {sorted(arrays)})")
    x = arrays["x"]
    if x.ndim != 4:
        raise UsageError(f"{flag} {path}: x must be (N, C, H, W), got shape {x.shape}")
    if len(x) < min_images:
        raise UsageError(f"{flag} {path} must hold at least {min_images} image"
                         f"{'s' if min_images > 1 else ''}, got {len(x)}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    else:
        raise UsageError(f"{flag} {path}: x must be uint8 or floating-point images, got {x.dtype}")
    if not np.isfinite(x).all():
        raise UsageError(f"{flag} {path}: x holds NaN or infinite values")
    x = torch.from_numpy(x)
    try:
        check_pixel_range(x, f"{flag} {path}: x")
    except ValueError as error:
        raise UsageError(str(error)) from error
    y = _labels(arrays["y"], len(x), f"{flag} {path}") if "y" in arrays else None
    if need_labels and y is None:
        raise UsageError(f"{flag} {path} needs labels 'y' for evaluation")
    return x, y


def _labels(y: np.ndarray, count: int, where: str) -> torch.Tensor:
    """Integer class labels [count] as int64; float labels must hold whole numbers."""
    if y.shape != (count,):
        raise UsageError(f"{where}: y must have shape ({count},), got {tuple(y.shape)}")
    if np.issubdtype(y.dtype, np.floating):
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            bad = y[~(np.isfinite(y) & (y == np.round(y)))][0]
            raise UsageError(f"{where}: y must hold whole class numbers, got {bad}")
    elif not np.issubdtype(y.dtype, np.integer):
        raise UsageError(f"{where}: y must hold integer class labels, got dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise UsageError(f"{where}: y must hold class indices >= 0, got {y.min()}")
    return torch.from_numpy(y.astype(np.int64))


def _num_outputs(model: nn.Module, x: torch.Tensor, flag: str) -> int:
    """The number of classes the model predicts, from a forward pass on two images of ``x``;
    a UsageError if the images do not fit the model."""
    try:
        with torch.no_grad(), eval_mode(model):
            logits = model(x[:2])
    except Exception as error:
        raise UsageError(f"{flag} images of shape {tuple(x.shape[1:])} do not fit the model: "
                         f"{str(error).splitlines()[0]}{channels_last_hint(x.shape)}") from error
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise UsageError("the model must return logits (N, classes), got "
                         + (f"shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor)
                            else f"a {type(logits).__name__}"))
    return int(logits.shape[1])


def _check_label_range(y: Optional[torch.Tensor], classes: int, flag: str) -> None:
    if y is not None and len(y) and int(y.max()) >= classes:
        raise UsageError(f"{flag} labels must be below the model's {classes} classes, "
                         f"got {int(y.max())}")


def _check_device(value: object, flag: str) -> torch.device:
    """A torch device that exists on this machine, or a UsageError naming ``flag``."""
    try:
        device = torch.device(value)  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as error:
        raise UsageError(f"{flag} must be a torch device such as cpu or cuda, got {value!r}") \
            from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {value} was asked for, but torch sees no CUDA device here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {value} does not exist: torch sees "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"{flag} must be cpu or cuda, got {value!r}")
    return device


# Options of the Python API that --option refuses, and why: their values are Python objects
# that a shell cannot write, or the command has its own flag for them. ``checkpoint`` and
# ``resume`` are flags too (see _checkpoint_options).
SHELL_REFUSED_OPTIONS = {
    "eval_fn": "it is a Python function called after each epoch; give --eval TEST.npz --attack "
               "NAME to measure the model before and after",
    "student": "it is a model object, which a shell cannot pass; call bdfast.medic_clone from "
               "Python to clone into your own student",
    "val_loader": "it is a Python loader of held-out clean images, which a shell cannot pass; "
                  "call the defense from Python to give one",
    "device": "give the device with --device",
    "seed": "give the seed with --seed",
}


def _method_options(method: str, options: Dict[str, object]) -> defenses.Defense:
    defense = defenses.get(method)
    accepted = [name for name in defense.options() if name not in SHELL_REFUSED_OPTIONS]
    for name in options:
        if name in SHELL_REFUSED_OPTIONS:
            raise UsageError(f"--option {name} is refused: {SHELL_REFUSED_OPTIONS[name]}")
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UsageError(f"unknown --option {unknown} for {method}; it accepts {accepted}")
    return defense


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


@contextlib.contextmanager
def _warnings_on_one_line() -> Iterator[None]:
    """Within: a warning is one line on stderr, ``bdfast: RuntimeWarning: <message>``, instead of
    Python's two (the second being the library's source line that raised it). Left as it is when
    someone already shows warnings their own way (pytest, an embedding program)."""
    if getattr(warnings.showwarning, "__module__", None) != "warnings":
        yield
        return

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"bdfast: {category.__name__}: {_one_line(message)}", file=file or sys.stderr)

    original, warnings.showwarning = warnings.showwarning, show
    try:
        yield
    finally:
        warnings.showwarning = original


# The flags of a checkpoint run, and those of a --backdoorbench run; the other mode refuses them.
CHECKPOINT_FLAGS = ("arch", "weights", "data", "out", "eval", "attack", "target")
BACKDOORBENCH_FLAGS = ("data_root", "bb_root", "clean_ratio")


def _check_output_file(path: str, flag: str) -> None:
    """A UsageError unless ``path`` can be written as a file: not a folder, in one that exists."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory; give the path of the file to write")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} folder does not exist: {folder}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _cmd_clean(args: argparse.Namespace) -> int:
    import bdfast
    from bdfast.lab import attacks
    from bdfast.lab.metrics import evaluate

    # Everything that can be checked without running the defense is checked first, so that a
    # mistake costs seconds, not a whole training run.
    options = dict(_parse_option(o) for o in args.option)
    defense = _method_options(args.method, options)
    _checkpoint_options(args, defense, options)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive int, got {args.batch_size}")
    if args.device:
        _check_device(args.device, "--device")
    if args.backdoorbench is not None:
        return _clean_backdoorbench(args, defense, options)
    given = [_flag(name) for name in BACKDOORBENCH_FLAGS if getattr(args, name) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} go{'es' if len(given) == 1 else ''} with "
                         "--backdoorbench RECORD")
    missing = [_flag(name) for name in ("arch", "weights", "data", "out")
               if getattr(args, name) is None]
    if missing:
        raise UsageError(f"clean needs {', '.join(missing)} (or --backdoorbench RECORD with "
                         "--data-root DIR)")
    target = 0 if args.target is None else args.target
    _check_output_file(args.out, "--out")

    model = _load_factory(args.arch)
    _load_weights(model, args.weights)
    x, y = _load_npz(args.data, "--data", min_images=2)
    classes = _num_outputs(model, x, "--data")
    _check_label_range(y, classes, "--data")
    evaluation = None
    if args.eval:
        if not args.attack:
            raise UsageError("--eval needs --attack NAME to measure the attack success rate")
        if args.attack not in attacks.names():
            raise UsageError(f"unknown --attack {args.attack!r}; choose from {attacks.names()}")
        if not 0 <= target < classes:
            raise UsageError(f"--target must be a class index below the model's {classes} "
                             f"classes, got {target}")
        x_test, y_test = _load_npz(args.eval, "--eval", min_images=1, need_labels=True)
        _num_outputs(model, x_test, "--eval")
        _check_label_range(y_test, classes, "--eval")
        attack = attacks.get(args.attack, target=target, num_classes=classes)
        evaluation = (x_test, y_test, attack)
    data = {"clean" if defense.data == "clean" else "train": (x, y)}
    before, outcome = _run_defense(
        args, defense, model, options, data,
        measure=(lambda m: evaluate(m, *evaluation)) if evaluation else (lambda m: None))
    cleaned, seconds = outcome.model, outcome.seconds
    # Plain Python values (not their repr) so that a run can be repeated from its checkpoint,
    # and so that torch.load(..., weights_only=True) reads the whole file.
    payload = {"state_dict": {k: v.detach().cpu() for k, v in cleaned.state_dict().items()},
               "method": args.method, "options": outcome.options, "seed": args.seed,
               "arch": args.arch, "bdfast_version": bdfast.__version__}
    if outcome.report is not None:
        payload["report"] = json.loads(json.dumps(outcome.report, default=_jsonable))
    write_atomically(payload, args.out)  # an interrupt leaves no temporary file
    read = _data_read(defense, outcome, clean=f"{len(x)} clean images from --data",
                      train=f"{len(x)} training images from --data")
    print(f"{args.method}: cleaned model written to {args.out} ({seconds:.1f}s; read {read})")
    if evaluation:
        _print_metrics(before, evaluate(cleaned, *evaluation))
    return 0


def _checkpoint_options(args: argparse.Namespace, defense: defenses.Defense,
                        options: Dict[str, object]) -> None:
    """Hand ``--checkpoint DIR`` and ``--resume`` to a training defense as its options."""
    given = sorted({"checkpoint", "resume"} & set(options))
    if given:
        raise UsageError(f"give {' and '.join('--' + name for name in given)} as "
                         f"{'flags' if len(given) > 1 else 'a flag'}, not as --option")
    if args.checkpoint is None:
        if args.resume:
            raise UsageError("--resume needs --checkpoint DIR, the folder to resume from")
        return
    if "checkpoint" not in defense.options():
        raise UsageError(f"--checkpoint is for the defenses that train (medic, bcu); "
                         f"{args.method} trains nothing, so it has nothing to resume")
    if os.path.exists(args.checkpoint) and not os.path.isdir(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint} is a file; give a folder")
    options.update(checkpoint=args.checkpoint, resume=args.resume)


def _run_defense(args: argparse.Namespace, defense: defenses.Defense, model: nn.Module,
                 options: Dict[str, object], data: Dict[str, object],
                 measure: Callable[[nn.Module], Optional[Dict[str, float]]]
                 ) -> Tuple[Optional[Dict[str, float]], defenses.Outcome]:
    """Move ``model`` to --device, ``measure`` it, and run the defense on ``data`` (its
    ``clean`` and ``train`` sets): the metrics before and the outcome. The one-sentence errors
    of the defenses' checks become a UsageError naming the method."""
    if args.device:
        model = model.to(args.device)
        options.setdefault("device", args.device)
    try:
        before = measure(model)
        outcome = defenses.run(defense.name, model, batch_size=args.batch_size, seed=args.seed,
                               **data, **options)
    except (ValueError, TypeError, FloatingPointError) as error:
        raise UsageError(f"{defense.name}: {_one_line(error)}") from error
    return before, outcome


def _data_read(defense: defenses.Defense, outcome: defenses.Outcome, *, clean: Optional[str],
               train: Optional[str]) -> str:
    """What the success line says the defense read, from the descriptions of the ``clean`` and
    ``train`` sets it was offered: the set it declares (:attr:`Defense.data`), and, for DDE
    with ``u="auto"``, also the clean images it chose u on."""
    if defense.data == "clean":
        return str(clean)
    read = str(train)
    chose_u_on_clean = outcome.report is not None and outcome.report.get("sweep") is not None \
        and "val_loader" in outcome.options
    if chose_u_on_clean and clean is not None:
        read += f", and {clean} to choose u"
    return read


def _print_metrics(before: Dict[str, float], after: Dict[str, float]) -> None:
    for name, metrics in (("before", before), ("after", after)):
        print(f"  {name:>6}: acc {metrics['acc']:.3f}  asr {metrics['asr']:.3f}  "
              f"ra {metrics['ra']:.3f}")


def _clean_backdoorbench(args: argparse.Namespace, defense: defenses.Defense,
                         options: Dict[str, object]) -> int:
    """``bdfast clean --backdoorbench RECORD``: the record's model, cleaned with the data a
    BackdoorBench defense gets, written back into the record (docs/backdoorbench.md)."""
    from bdfast.interop import backdoorbench as bb

    given = [_flag(name) for name in CHECKPOINT_FLAGS if getattr(args, name) is not None]
    if given:
        raise UsageError(f"--backdoorbench reads the model and the data from the record, so it "
                         f"takes no {', '.join(given)}")
    if args.data_root is None:
        raise UsageError("--backdoorbench needs --data-root DIR, the folder the attack read its "
                         "data set from (BackdoorBench's data/<data set>)")
    ratio = bb.DEFAULT_CLEAN_RATIO if args.clean_ratio is None else args.clean_ratio
    if not 0 < ratio <= 1:
        raise UsageError(f"--clean-ratio must be a fraction in (0, 1], got {ratio}")
    try:
        record = bb.load_record(args.backdoorbench, args.data_root, bb_root=args.bb_root)
        clean = bb.clean_subset(record.clean_train, ratio, seed=args.seed)
    except (ValueError, FileNotFoundError, ImportError) as error:
        raise UsageError(_one_line(error)) from error
    train = None
    if defense.data == "training":
        if record.bd_train is None:
            raise UsageError(f"{args.method} needs the poisoned training set, and the record "
                             f"{args.backdoorbench} holds none (its bd_train is None)")
        train = record.bd_train.batches(args.batch_size)
    before, outcome = _run_defense(args, defense, record.model, options,
                                   {"clean": clean, "train": train},
                                   measure=lambda m: bb.evaluate_record(m, record))
    after = bb.evaluate_record(outcome.model, record)
    path = bb.save_defense_result(record.record_dir, args.method, outcome.model, after)
    read = _data_read(defense, outcome,
                      clean=f"{len(clean[0])} clean images ({ratio:g} of the clean training set)",
                      train=None if train is None else
                      f"the {len(record.bd_train)} poisoned training images of the record")
    print(f"{args.method}: cleaned model written to {path} ({outcome.seconds:.1f}s; read {read})")
    _print_metrics(before, after)
    return 0


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# ----------------------------------------------------------------------------- bench, info

def _cmd_bench(args: argparse.Namespace) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = os.path.join(root, "benchmarks")
    if not os.path.isdir(bench_dir):
        raise UsageError("the benchmarks ship with the source checkout, not the installed "
                         f"package; run bdfast bench from a clone (looked in {bench_dir})")
    os.makedirs(os.path.join(bench_dir, "results"), exist_ok=True)
    result_json = os.path.join(bench_dir, "results", "latest.json")
    command = [sys.executable, "-m", "pytest", bench_dir, "-q", "--benchmark-only",
               f"--benchmark-json={result_json}"] + (["-k", args.k] if args.k else [])
    code = subprocess.call(command, cwd=root)
    if code != 0:
        return code
    return subprocess.call([sys.executable, os.path.join(bench_dir, "summarize.py"),
                            result_json], cwd=root)


def _cmd_info(args: argparse.Namespace) -> int:
    import bdfast
    print(json.dumps(bdfast.backend_info(), indent=2))
    print("Run `bdfast selftest` to check every compiled op against the reference on this "
          "machine's devices.", file=sys.stderr)
    return 0


def _cmd_selftest(args: argparse.Namespace) -> int:
    from bdfast.ops import selftest
    devices = args.device or selftest.available_devices()
    if not devices:
        raise UsageError("no device has compiled kernels for every op (see `bdfast info`)")
    checks = selftest.run(devices)
    print(selftest.format_table(checks))
    failed = [c for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from bdfast.lab.demo import (ATTACKS, DEMO_ARCH, DEMO_DEFENSES, FULL_RUN_SECONDS,
                                 QUICK_RUN_SECONDS, DemoConfig)
    from bdfast.interop.backdoorbench import DEFAULT_CLEAN_RATIO
    parser = argparse.ArgumentParser(
        prog="bdfast",
        description="Remove backdoors from PyTorch image classifiers (MEDIC, BCU, DDE, MBNS).",
        epilog="Run 'bdfast demo' for the whole story on embedded data, or 'bdfast clean -h' to "
               "clean your own model.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="backdoor digits classifiers and compare every defense",
        description="Train one backdoored digits CNN per attack on scikit-learn's embedded "
                    "handwritten digits, run every defense on it, print an ACC/ASR/RA/DER/time "
                    f"table and write report.json, report.md and chart.png. {FULL_RUN_SECONDS} s "
                    f"on a 2-core CPU machine; --quick is a {QUICK_RUN_SECONDS} s smoke run.")
    demo.add_argument("--out", default=None, help=f"output folder (default: {DEMO_OUT})")
    demo.add_argument("--attacks", nargs="+", choices=ATTACKS, metavar="ATTACK",
                      help=f"attacks to run (default: all of {', '.join(ATTACKS)})")
    demo.add_argument("--defenses", nargs="+", choices=DEMO_DEFENSES, metavar="DEFENSE",
                      help=f"defenses to run (default: all of {', '.join(DEMO_DEFENSES)})")
    demo.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    demo.add_argument("--seed", type=int, default=0, help="seed of data split, poisoning and "
                      "training (default: %(default)s)")
    demo.add_argument("--quick", action="store_true",
                      help=f"tiny budgets: a smoke test of everything ({QUICK_RUN_SECONDS} s on "
                           "2 CPU cores), marked as such in the report; its numbers do not "
                           "measure the defenses")
    demo.add_argument("--save-model", metavar="PATH",
                      help="instead of the demo, only train the demo's backdoored model for one "
                           "attack (--attacks, default badnets) and save its state_dict to "
                           "PATH, a suspicious model to try the README's quick start on; it "
                           f"loads into bdfast.lab.models.{DEMO_ARCH}(). It trains "
                           f"{DemoConfig().attack_epochs} epochs (--quick: "
                           f"{DemoConfig.quick().attack_epochs}); no defense runs and no report "
                           "is written")
    demo.add_argument("--no-progress", action="store_true",
                      help="no progress (by default a bar on a terminal, else a line per epoch)")
    demo.set_defaults(run=_cmd_demo)

    clean = sub.add_parser(
        "clean", help="clean a model checkpoint with one defense",
        description="Load MODULE:FACTORY() with the weights of CKPT, run the chosen defense on "
                    "the images of DATA.npz and save the cleaned state_dict with metadata. Or, "
                    "with --backdoorbench, clean the model of a BackdoorBench attack record and "
                    "write the result into the record.",
        epilog="DATA.npz holds x (N,C,H,W; float in [0,1] or uint8) and optionally y. "
               + defenses.data_help() + " Example: bdfast "
               "clean --method mbns --arch bdfast.lab.models:digits_cnn --weights model.pt --data "
               "clean.npz --out cleaned.pt --option u=3. From BackdoorBench's folder: bdfast "
               "clean --backdoorbench record/NAME --data-root data/cifar10 --method mbns "
               "(docs/backdoorbench.md).")
    clean.add_argument("--method", required=True, choices=defenses.names())
    clean.add_argument("--arch", metavar="MODULE:FACTORY",
                       help="importable factory that builds the architecture")
    clean.add_argument("--weights", metavar="CKPT",
                       help="state_dict file (or a bdfast checkpoint)")
    clean.add_argument("--data", metavar="DATA.npz")
    clean.add_argument("--out", metavar="OUT.pt")
    clean.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="any keyword option of the method, e.g. epochs=20 (repeatable); "
                            "not those whose values are Python objects (eval_fn, student, "
                            "val_loader) nor those with a flag of their own (device, seed, "
                            "checkpoint, resume)")
    clean.add_argument("--eval", metavar="TEST.npz", help="labelled test set: report ACC/ASR "
                       "before and after")
    clean.add_argument("--attack", metavar="NAME", help="attack used with --eval")
    clean.add_argument("--target", type=int, help="attack target class (default 0)")
    clean.add_argument("--batch-size", type=int, default=64)
    clean.add_argument("--device", default=None, help="torch device, e.g. cuda (default: the "
                       "CPU)")
    clean.add_argument("--seed", type=int, default=0, help="seed of the shuffling and, for medic "
                       "and bcu, of the initialisation (default: %(default)s); stored in the "
                       "checkpoint with the options")
    clean.add_argument("--checkpoint", metavar="DIR",
                       help="medic and bcu: write a resumable training checkpoint to this "
                            "folder after every epoch and, on SIGTERM or Ctrl-C, after the "
                            "current step (then exit with code 75); the last two are kept")
    clean.add_argument("--resume", action="store_true",
                       help="continue the run saved in --checkpoint DIR (from the start if it "
                            "holds none); the same inputs give the same model as an "
                            "uninterrupted run")
    clean.add_argument("--backdoorbench", metavar="RECORD",
                       help="a BackdoorBench attack record, record/NAME: clean its model with "
                            "the data a BackdoorBench defense gets and write "
                            "RECORD/defense/bdfast-METHOD/ (instead of --arch, --weights, --data, "
                            "--out and --eval)")
    clean.add_argument("--data-root", metavar="DIR",
                       help="with --backdoorbench: the folder the attack read its data set from, "
                            "BackdoorBench's data/<data set> (e.g. data/cifar10)")
    clean.add_argument("--bb-root", metavar="DIR",
                       help="with --backdoorbench: the BackdoorBench folder the record's image "
                            "paths are relative to (default: the folder above record/)")
    clean.add_argument("--clean-ratio", type=float, metavar="FRACTION",
                       help="with --backdoorbench: the share of the clean training set that "
                            "medic, bcu and mbns get (and dde for u='auto'), drawn with --seed "
                            f"(default: {DEFAULT_CLEAN_RATIO}, BackdoorBench's)")
    clean.set_defaults(run=_cmd_clean)

    bench = sub.add_parser("bench", help="run the speed benchmarks and print the ratio table",
                           description="Runs benchmarks/ with pytest-benchmark (source checkout "
                                       "only) and prints each variant's time relative to native.")
    bench.add_argument("-k", default=None, help="pytest -k expression to select cases")
    bench.set_defaults(run=_cmd_bench)

    info = sub.add_parser("info", help="which compiled backends are usable here, and why not")
    info.set_defaults(run=_cmd_info)

    selftest = sub.add_parser(
        "selftest", help="check every compiled op against the reference on each device",
        description="Runs each compiled op (medic_clone_loss with its backward, "
                    "histogram_entropy, gaussian_kl, layer_outliers) on small awkward inputs "
                    "and compares it with the float64 reference. Prints a table and exits 1 if "
                    "any check fails.")
    selftest.add_argument("--device", action="append", metavar="DEVICE",
                          help="check this device only, e.g. cuda:1 (repeatable; default: the "
                               "CPU and every GPU the kernels were built for)")
    selftest.set_defaults(run=_cmd_selftest)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # SIGTERM (kill, a batch scheduler) unwinds like Ctrl-C, so that no temporary file is left.
    # Signal handlers can only be set from the main thread.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        with _warnings_on_one_line():
            return args.run(args)
    except UsageError as error:
        print(f"bdfast {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"bdfast {args.command}: {stop}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("bdfast: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a failure inside a defense or the demo, not bad input
        if os.environ.get("BDFAST_TRACEBACK", "0") not in ("", "0"):
            raise
        print(f"bdfast {args.command}: failed: {type(error).__name__}: {_one_line(error)} (set "
              "BDFAST_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


__all__: List[str] = ["main", "build_parser"]
