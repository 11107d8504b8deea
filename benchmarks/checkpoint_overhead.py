"""What ``checkpoint=`` costs on the lab's MEDIC run (docs/long-runs.md, issue 33: <= 5 %).

    python benchmarks/checkpoint_overhead.py [--repeats 3] [--threads 2] [--epochs 60]

MEDIC with its defaults on the lab's BadNets digits CNN (seed 0) and the clean split, through
:func:`bdfast.defenses.run` as the CLI runs it; runs without and with ``checkpoint=`` (a fresh
folder each time) alternate, so that a change in the machine's load hits both. Prints each
run's wall time and CPU time (of this process: less sensitive to other processes' load, but
blind to waiting for the disk), the medians and their ratios, and checks that both give the
same bytes.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from bdfast import defenses, lab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = lab.backdoored("digits", "digits_cnn", "badnets", 0, cache=".cache/lab").model
    clean = lab.lab_data("digits").clean
    times = {False: [], True: []}
    cpu = {False: [], True: []}
    results = {}
    for repeat in range(args.repeats):
        for with_checkpoint in (False, True):
            with tempfile.TemporaryDirectory() as folder:
                options = {"checkpoint": folder} if with_checkpoint else {}
                start, start_cpu = time.perf_counter(), time.process_time()
                outcome = defenses.run("medic", model, clean=clean, seed=0, progress=False,
                                       epochs=args.epochs, **options)
                seconds = time.perf_counter() - start
                cpu_seconds = time.process_time() - start_cpu
            times[with_checkpoint].append(seconds)
            cpu[with_checkpoint].append(cpu_seconds)
            results[with_checkpoint] = outcome.model.state_dict()
            print(f"repeat {repeat}: checkpoint={with_checkpoint}: {seconds:.2f} s wall, "
                  f"{cpu_seconds:.2f} s CPU", flush=True)
    same = all(torch.equal(value, results[True][key]) for key, value in results[False].items())
    for name, measured in (("wall", times), ("CPU", cpu)):
        without, with_ = (statistics.median(measured[flag]) for flag in (False, True))
        print(f"median {name} time without {without:.2f} s, with {with_:.2f} s: ratio "
              f"{with_ / without:.3f}")
    print(f"({args.epochs} epochs, {args.threads} threads); same bytes: {same}")


if __name__ == "__main__":
    main()
