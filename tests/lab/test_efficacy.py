"""Efficacy acceptance: every case of :mod:`bdfast.lab.acceptance` on the lab's models, seed 0.

The same cases run over seeds 0-2, 1/2/4 threads and AVX2 / AVX-512 in
``scripts/efficacy_margin.py`` (``make margin``); a case is listed only if it holds there with
margin, so this run passes on any x86-64 machine, not only the one it was measured on.
"""
from __future__ import annotations

import os
import time

import pytest

from bdfast.lab.acceptance import CASES, Case, assert_case
from bdfast.lab.data import FASHION_MNIST_ROOT

FASHION_IMAGES = os.path.join(FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_case(case: Case, backdoored_model, capsys):
    if case.data == "fmnist" and not os.path.isfile(FASHION_IMAGES):
        pytest.skip("Fashion-MNIST is not installed (`make data`, which CI runs, installs it)")
    lab_model = backdoored_model.lab_model(case.attack, case.arch, case.data)
    start = time.perf_counter()
    before, after = case.run(lab_model, seed=0)
    with capsys.disabled():
        print(f"\n[efficacy] {case.name}: ACC {before['acc']:.3f} -> {after['acc']:.3f}, "
              f"ASR {before['asr']:.3f} -> {after['asr']:.3f}, margin "
              f"{case.margin(before, after):+.3f}, {time.perf_counter() - start:.1f} s", end="")
    assert_case(case, before, after)
