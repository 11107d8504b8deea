"""The collapse guard of the training defenses (bdfast.defenses.distill.CollapseGuard): a student
that ends far below its teacher on the defense's own clean data gets one warning, recorded in the
result, and the check changes no weight and no RNG stream."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bdfast
from bdfast.defenses.bcu import COLLAPSE_AGREEMENT, bcu_fit
from bdfast.defenses.checkpoint import generators_of
from bdfast.loaders import tensor_loader
from bdfast.defenses.distill import COLLAPSE_SHARE, CollapseGuard, fit
from bdfast.defenses.medic import Medic
from bdfast.lab.models import digits_cnn


def _collapse_warnings(caught):
    return [str(w.message) for w in caught
            if issubclass(w.category, RuntimeWarning) and "collapsed" in str(w.message)]


def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def test_bcu_warns_once_and_records_a_collapsed_student(backdoored_model, digits):
    teacher = backdoored_model("badnets")
    loader = tensor_loader(digits.clean[0], batch_size=64, shuffle=True, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # SGD at lr 50 throws the student's weights far from anything the teacher predicts.
        result = bcu_fit(teacher, loader, lr=50.0, epochs=2, seed=0, progress=False, amp=False)
    found = _collapse_warnings(caught)
    # The retry at a fifth of the lr collapses too: one warning tells both runs.
    assert len(found) == 1 and result.collapse in found[0]
    assert result.retried_lr == pytest.approx(10.0) and result.first_collapse is not None
    assert "lr=50 collapsed" in found[0] and "lr=10, which collapsed too" in found[0]
    assert result.agreement_before == 1.0
    agree = float((result.model(digits.clean[0]).argmax(1)
                   == teacher(digits.clean[0]).argmax(1)).float().mean())
    assert result.agreement_after == pytest.approx(agree, abs=1e-6)
    assert result.agreement_after < COLLAPSE_AGREEMENT
    # The warning names both numbers, the data and what to try.
    assert f"{result.agreement_after:.3f}" in found[0] and "1.000" in found[0]
    assert f"{len(digits.clean[0])} clean images" in found[0]
    assert "teacher's predictions" in found[0] and "lr=0.01" in found[0]
    assert "\n" not in found[0]


def _same_weights(a, b):
    return all(torch.equal(value, b.state_dict()[key]) for key, value in a.state_dict().items())


def test_bcu_trains_a_collapsed_run_again_at_a_fifth_of_its_lr(backdoored_model, digits,
                                                               tmp_path):
    teacher = backdoored_model("badnets")
    x = digits.clean[0]

    def run(**options):
        loader = tensor_loader(x, batch_size=64, shuffle=True, seed=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # On this teacher four epochs at lr 0.4 collapse (agreement 0.10 at 1 and 2
            # threads, AVX-512), and at lr 0.08 do not (0.974-0.978).
            result = bcu_fit(teacher, loader, lr=0.4, epochs=4, seed=0, progress=False,
                             amp=False, **options)
        return result, _collapse_warnings(caught)

    result, found = run()
    assert result.retried_lr == pytest.approx(0.08) and result.first_collapse is not None
    assert result.collapse is None and result.agreement_after >= COLLAPSE_AGREEMENT
    agree = float((result.model(x).argmax(1) == teacher(x).argmax(1)).float().mean())
    assert result.agreement_after == pytest.approx(agree, abs=1e-6)
    assert len(found) == 1 and "\n" not in found[0]
    assert "lr=0.4 collapsed" in found[0] and "at lr=0.08, which matches them on" in found[0]
    # The first run's agreement and the share it fell below.
    first = float(result.first_collapse.split(" on only ")[1].split(" of ")[0])
    assert first < COLLAPSE_AGREEMENT and f"on {first:.3f} of the clean images" in found[0]
    assert f"below {COLLAPSE_AGREEMENT:.0%}" in found[0]
    assert f"{result.agreement_after:.3f}" in found[0]

    # Checkpoints of both runs, and a resume that loses the retry's newest one, end the same.
    folder = tmp_path / "ckpt"
    checkpointed, _ = run(checkpoint=str(folder))
    assert _same_weights(checkpointed.model, result.model)
    retry_files = sorted((folder / "retry").iterdir())
    assert retry_files and sorted(folder.glob("*.pt"))
    retry_files[-1].unlink()
    resumed, found = run(checkpoint=str(folder), resume=True)
    assert _same_weights(resumed.model, result.model) and resumed.retried_lr == result.retried_lr
    assert len(found) == 1


def test_medic_warns_on_labelled_data_below_half_the_teachers_accuracy(backdoored_model,
                                                                          digits):
    teacher = backdoored_model("badnets")
    loader = tensor_loader(*digits.clean, batch_size=64, shuffle=True, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # One epoch at a vanishing step leaves the student as freshly initialised.
        result = Medic(epochs=1, lr=1e-9, seed=0, progress=False).fit(teacher, loader)
    assert _collapse_warnings(caught) == [result.collapse]
    assert result.agreement_before == pytest.approx(_accuracy(teacher, *digits.clean),
                                                    abs=1e-6)
    assert result.agreement_after == pytest.approx(_accuracy(result.model, *digits.clean),
                                                   abs=1e-6)
    assert result.agreement_after < COLLAPSE_SHARE * result.agreement_before
    assert "matches the labels" in result.collapse and "medic:" in result.collapse


def test_a_healthy_medic_run_does_not_warn(backdoored_model, digits):
    teacher = backdoored_model("badnets")
    loader = tensor_loader(*digits.clean, batch_size=64, shuffle=True, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = Medic(epochs=10, seed=0, progress=False).fit(teacher, loader)
    assert _collapse_warnings(caught) == [] and result.collapse is None
    assert result.agreement_after == pytest.approx(_accuracy(result.model, *digits.clean),
                                                   abs=1e-6)
    assert result.agreement_after >= COLLAPSE_SHARE * result.agreement_before
    assert result.timings["guard"] < result.timings["train"] / 5


def test_the_guard_changes_no_weight_and_no_random_stream(digits):
    """The same training with and without the guard: equal weights, equal RNG states after, the
    loader's own generator included, so whatever runs next draws the same numbers."""
    x = digits.clean[0][:96]
    teacher = digits_cnn().eval().requires_grad_(False)
    ends = []
    for guard in (None, CollapseGuard(teacher, labels=False, defense="test", advice="nothing")):
        torch.manual_seed(0)
        student = digits_cnn()
        loader = tensor_loader(x, batch_size=32, shuffle=True, seed=0)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1)

        def step(net, xb, yb, epoch):
            # Dropout-like noise from the global RNG, so a stream that moved would show.
            noise = torch.rand_like(xb) * 0.01
            return F.kl_div(F.log_softmax(net(xb + noise), 1), F.log_softmax(teacher(xb), 1),
                            reduction="batchmean", log_target=True)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # this student may collapse
            result = fit(student, loader, step, optimizer, epochs=2,
                         device=torch.device("cpu"), amp=False, progress=False, guard=guard)
        (generator,) = generators_of(loader)  # the shuffling sampler's
        ends.append((student.state_dict(), torch.get_rng_state(), generator.get_state(), result))
    (plain, rng, gen, unguarded), (guarded_w, rng_g, gen_g, guarded) = ends
    assert all(torch.equal(plain[k], guarded_w[k]) for k in plain)
    assert torch.equal(rng, rng_g) and torch.equal(gen, gen_g)
    assert unguarded.agreement_after is None and guarded.agreement_after is not None


class _Threshold(torch.nn.Module):
    """Two logits that favour class 1 where the image's mean pixel exceeds ``cut``."""

    def __init__(self, cut: float) -> None:
        super().__init__()
        self.cut = cut
        self.unused = torch.nn.Parameter(torch.zeros(()))  # an optimizer needs a parameter

    def forward(self, x):
        score = x.mean((1, 2, 3)) - self.cut + 0 * self.unused
        return torch.stack([-score, score], 1)


@pytest.mark.parametrize("share, collapsed", [(COLLAPSE_SHARE, False), (COLLAPSE_AGREEMENT, True)])
def test_the_guard_compares_with_its_own_share(share, collapsed):
    """A student that agrees with its teacher on 0.6 of the images: above half (the labelled
    defenses' share), below BCU's COLLAPSE_AGREEMENT."""
    x = torch.linspace(0.0, 1.0, 100).view(100, 1, 1, 1).expand(100, 1, 2, 2).contiguous()
    teacher, student = _Threshold(0.2).eval(), _Threshold(0.6)  # they differ on (0.2, 0.6]
    loader = tensor_loader(x, batch_size=32)
    guard = CollapseGuard(teacher, labels=False, defense="test", advice="nothing", share=share)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(student, loader, lambda net, xb, yb, epoch: net(xb).sum() * 0.0,
                     torch.optim.SGD(student.parameters(), lr=0.0), epochs=1,
                     device=torch.device("cpu"), amp=False, progress=False, guard=guard)
    assert result.agreement_before == 1.0 and result.agreement_after == pytest.approx(0.6)
    assert (result.collapse is not None) == collapsed
    assert _collapse_warnings(caught) == ([result.collapse] if collapsed else [])
    if collapsed:
        assert "0.600 of its 100 clean images" in result.collapse
        assert f"below {share:.0%} of it" in result.collapse


def test_cli_prints_the_collapse_warning_on_one_line(digits, tmp_path):
    torch.manual_seed(0)
    teacher = digits_cnn()
    bdfast.train(teacher, *digits.clean, epochs=2, seed=0, progress=False)
    torch.save(teacher.state_dict(), tmp_path / "model.pt")
    np.savez(tmp_path / "clean.npz", x=digits.clean[0].numpy())
    argv = [sys.executable, "-m", "bdfast", "clean", "--method", "bcu", "--arch",
            "bdfast.lab.models:digits_cnn", "--weights", str(tmp_path / "model.pt"), "--data",
            str(tmp_path / "clean.npz"), "--out", str(tmp_path / "out.pt"), "--option",
            "lr=50", "--option", "epochs=2", "--option", "progress=False"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "collapsed" in line]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("bdfast: RuntimeWarning: bcu: the training at lr=50 collapsed")
