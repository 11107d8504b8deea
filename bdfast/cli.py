"""The ``bdfast`` command line: ``demo``, ``clean``, ``bench`` and ``info``.

Every user error (missing file, unimportable factory, data that does not fit the model, a
checkpoint that does not fit the architecture, an unknown option) prints one line and exits
with code 2, and nothing is written.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

METHODS = ("medic", "bcu", "dde", "mbns")


class UsageError(Exception):
    """A problem with the user's input: reported in one line, exit code 2."""


# ----------------------------------------------------------------------------- demo

def _cmd_demo(args: argparse.Namespace) -> int:
    from bdfast.demo import DemoConfig, best_per_attack, environment, rows_as_dicts, run_demo
    from bdfast.report import PLOT_HINT, table, write_report

    overrides = {"device": args.device, "seed": args.seed}
    if args.attacks:
        overrides["attacks"] = args.attacks
    if args.defenses:
        overrides["defenses"] = args.defenses
    cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    start = time.perf_counter()
    try:
        rows = run_demo(cfg, show_progress=not args.no_progress)
    except ValueError as error:
        raise UsageError(str(error)) from error
    total = time.perf_counter() - start
    row_dicts = rows_as_dicts(rows)
    best = {a: dataclasses.asdict(r) for a, r in best_per_attack(rows).items()}
    config = dataclasses.asdict(cfg)
    config["quick"] = args.quick
    paths = write_report(args.out, row_dicts, config, environment(), best)
    print()
    print(table(row_dicts))
    print()
    print(f"Wrote {paths['json']}, {paths['markdown']}"
          + (f" and {paths['chart']}" if paths["chart"] else f" (no chart: {PLOT_HINT})")
          + f" in {total:.0f}s.")
    print("Best defense per attack: " + ", ".join(
        f"{a}: {r['defense']} (ACC {r['acc']:.3f}, ASR {r['asr']:.3f})" for a, r in best.items()))
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


def _load_npz(path: str, flag: str, need_labels: bool = False):
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
    x = torch.from_numpy(x.astype(np.float32) / 255.0 if x.dtype == np.uint8
                         else x.astype(np.float32))
    y = torch.from_numpy(arrays["y"].astype(np.int64)) if "y" in arrays else None
    if y is not None and y.shape != (len(x),):
        raise UsageError(f"{flag} {path}: y must have shape ({len(x)},), got {tuple(y.shape)}")
    if need_labels and y is None:
        raise UsageError(f"{flag} {path} needs labels 'y' for evaluation")
    return x, y


def _check_fits(model: nn.Module, x: torch.Tensor, flag: str) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x[:2])
    except Exception as error:
        raise UsageError(f"{flag} images of shape {tuple(x.shape[1:])} do not fit the model: "
                         f"{str(error).splitlines()[0]}") from error
    finally:
        model.train(was_training)


def _method_options(method: str, options: Dict[str, object]):
    import bdfast
    fn = {"medic": bdfast.medic_clone, "bcu": bdfast.bcu_cleanse, "dde": bdfast.dde_prune,
          "mbns": bdfast.mbns_prune}[method]
    accepted = [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UsageError(f"unknown --option {unknown} for {method}; it accepts {accepted}")
    return fn


def _cmd_clean(args: argparse.Namespace) -> int:
    import bdfast
    from bdfast.data import tensor_loader
    from bdfast.metrics import evaluate

    options = dict(_parse_option(o) for o in args.option)
    fn = _method_options(args.method, options)
    model = _load_factory(args.arch)
    _load_weights(model, args.weights)
    x, y = _load_npz(args.data, "--data")
    _check_fits(model, x, "--data")
    evaluation = None
    if args.eval:
        if not args.attack:
            raise UsageError("--eval needs --attack NAME to measure the attack success rate")
        from bdfast import attacks
        if args.attack not in attacks.names():
            raise UsageError(f"unknown --attack {args.attack!r}; choose from {attacks.names()}")
        x_test, y_test = _load_npz(args.eval, "--eval", need_labels=True)
        _check_fits(model, x_test, "--eval")
        evaluation = (x_test, y_test, attacks.get(args.attack, target=args.target))
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UsageError(f"--out folder does not exist: {out_dir}")
    if args.device:
        model = model.to(args.device)
        options.setdefault("device", args.device)

    if evaluation:
        before = evaluate(model, evaluation[0], evaluation[1], attack=evaluation[2])
    # BCU ignores labels; MEDIC uses them when given; the pruning methods read images only.
    use_labels = args.method == "medic" and y is not None
    loader = tensor_loader(x, y if use_labels else None, batch_size=args.batch_size,
                           shuffle=args.method in ("medic", "bcu"), seed=0)
    start = time.perf_counter()
    result = fn(model, loader, **options)
    cleaned = result.model if hasattr(result, "model") else result
    seconds = time.perf_counter() - start
    payload = {"state_dict": {k: v.detach().cpu() for k, v in cleaned.state_dict().items()},
               "method": args.method, "options": {k: repr(v) for k, v in options.items()},
               "arch": args.arch, "bdfast_version": bdfast.__version__}
    if hasattr(result, "report"):
        payload["report"] = json.loads(json.dumps(result.report, default=_jsonable))
    # Write next to the target and rename, so a failure never leaves a partial checkpoint.
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"{args.method}: cleaned model written to {args.out} ({seconds:.1f}s)")
    if evaluation:
        after = evaluate(cleaned, evaluation[0], evaluation[1], attack=evaluation[2])
        for name, metrics in (("before", before), ("after", after)):
            print(f"  {name:>6}: acc {metrics['acc']:.3f}  asr {metrics['asr']:.3f}  "
                  f"ra {metrics['ra']:.3f}")
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
    return 0


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from bdfast.demo import ATTACKS, DEFENSES
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
                    "table and write report.json, report.md and chart.png. About 10 minutes on "
                    "2 CPU cores; --quick is a one-minute smoke run.")
    demo.add_argument("--out", default="bdfast-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--attacks", nargs="+", choices=ATTACKS, metavar="ATTACK",
                      help=f"attacks to run (default: all of {', '.join(ATTACKS)})")
    demo.add_argument("--defenses", nargs="+", choices=DEFENSES, metavar="DEFENSE",
                      help=f"defenses to run (default: all of {', '.join(DEFENSES)})")
    demo.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    demo.add_argument("--seed", type=int, default=0, help="seed of data split, poisoning and "
                      "training (default: %(default)s)")
    demo.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(run=_cmd_demo)

    clean = sub.add_parser(
        "clean", help="clean a model checkpoint with one defense",
        description="Load MODULE:FACTORY() with the weights of CKPT, run the chosen defense on "
                    "the images of DATA.npz and save the cleaned state_dict with metadata.",
        epilog="DATA.npz holds x (N,C,H,W; float in [0,1] or uint8) and optionally y. medic "
               "uses y when present (else the teacher's labels), bcu/mbns want clean images, "
               "dde wants the model's (possibly poisoned) training images. Example: bdfast "
               "clean --method mbns --arch bdfast.models:digits_cnn --weights model.pt --data "
               "clean.npz --out cleaned.pt --option u=3")
    clean.add_argument("--method", required=True, choices=METHODS)
    clean.add_argument("--arch", required=True, metavar="MODULE:FACTORY",
                       help="importable factory that builds the architecture")
    clean.add_argument("--weights", required=True, metavar="CKPT",
                       help="state_dict file (or a bdfast checkpoint)")
    clean.add_argument("--data", required=True, metavar="DATA.npz")
    clean.add_argument("--out", required=True, metavar="OUT.pt")
    clean.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="any keyword option of the method, e.g. epochs=20 (repeatable)")
    clean.add_argument("--eval", metavar="TEST.npz", help="labelled test set: report ACC/ASR "
                       "before and after")
    clean.add_argument("--attack", metavar="NAME", help="attack used with --eval")
    clean.add_argument("--target", type=int, default=0, help="attack target class (default 0)")
    clean.add_argument("--batch-size", type=int, default=64)
    clean.add_argument("--device", default=None)
    clean.set_defaults(run=_cmd_clean)

    bench = sub.add_parser("bench", help="run the speed benchmarks and print the ratio table",
                           description="Runs benchmarks/ with pytest-benchmark (source checkout "
                                       "only) and prints each variant's time relative to native.")
    bench.add_argument("-k", default=None, help="pytest -k expression to select cases")
    bench.set_defaults(run=_cmd_bench)

    info = sub.add_parser("info", help="which compiled backends are usable here, and why not")
    info.set_defaults(run=_cmd_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as error:
        print(f"bdfast {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bdfast: interrupted", file=sys.stderr)
        return 130


__all__: List[str] = ["main", "build_parser"]
