"""Progress: a tqdm bar on a terminal; in a log (stderr not a terminal) a line per finished
epoch, or one line at the end of any other loop; nothing at all when disabled."""
from __future__ import annotations

import re
import sys

import pytest
import torch

import bdfast
from bdfast._utils import LineProgress, progress
from bdfast.lab.models import digits_cnn


@pytest.fixture
def terminal(monkeypatch):
    """``terminal(True)`` makes sys.stderr (pytest's capture) claim to be a terminal."""
    def claim(is_terminal: bool) -> None:
        monkeypatch.setattr(sys.stderr, "isatty", lambda: is_terminal)
    return claim


def test_a_log_gets_one_line_per_epoch_with_the_loss(terminal, capsys, digits):
    terminal(False)
    torch.manual_seed(0)
    x, y = digits.clean
    bdfast.train(digits_cnn(), x[:64], y[:64], epochs=3, seed=0, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    for epoch, line in enumerate(lines, start=1):
        assert re.fullmatch(rf"train: epoch {epoch}/3, loss=\d+\.\d{{4}} \(\d+\.\ds\)", line), line


def test_a_resumed_loop_counts_from_where_it_resumed(terminal, capsys):
    terminal(False)
    bar = progress(range(3, 5), desc="medic", unit="epoch", initial=3, total=5)
    for epoch in bar:
        bar.set_postfix(loss=f"{epoch / 10:.4f}", samples_s="12")
    lines = [line.rsplit(" (", 1)[0] for line in capsys.readouterr().err.splitlines()]
    assert lines == ["medic: epoch 4/5, loss=0.3000, samples_s=12",
                     "medic: epoch 5/5, loss=0.4000, samples_s=12"]


def test_a_loop_of_batches_gets_one_line_when_it_ends(terminal, capsys):
    terminal(False)
    seen = [batch for batch in progress(iter(range(3)), desc="dde statistics", unit="batch")]
    assert seen == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dde statistics: 3 batches in "), lines


def test_a_terminal_gets_a_tqdm_bar_and_no_lines(terminal, capsys):
    from tqdm.auto import tqdm
    terminal(True)
    bar = progress(range(2), desc="train", unit="epoch")
    assert isinstance(bar, tqdm) and not isinstance(bar, LineProgress)
    for _ in bar:
        bar.set_postfix(loss="0.5000")
    assert "train: epoch" not in capsys.readouterr().err


@pytest.mark.parametrize("is_terminal", [True, False])
def test_disabled_progress_is_silent_and_the_iterable_itself(terminal, capsys, is_terminal):
    terminal(is_terminal)
    items = [1, 2]
    assert progress(items, enabled=False, desc="train", unit="epoch") is items
    assert capsys.readouterr().err == ""
