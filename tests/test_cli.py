"""The command line: a --quick demo end to end, clean round trips, and every bad-input path."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bdfast
from bdfast.cli import main
from bdfast.models import digits_cnn

ARCH = "bdfast.models:digits_cnn"


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):
    """A digits CNN checkpoint, clean data and a labelled test set as the CLI reads them."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = digits_cnn()
    bdfast.train(model, *digits.clean, epochs=2, seed=0, progress=False)
    paths = {"weights": root / "model.pt", "data": root / "clean.npz",
             "images": root / "images_uint8.npz", "test": root / "test.npz", "root": root}
    torch.save(model.state_dict(), paths["weights"])
    np.savez(paths["data"], x=digits.clean[0].numpy(), y=digits.clean[1].numpy())
    np.savez(paths["images"], x=(digits.clean[0].numpy() * 255).astype(np.uint8))
    np.savez(paths["test"], x=digits.test[0][:200].numpy(), y=digits.test[1][:200].numpy())
    return paths


def _clean(files, method, *extra, out=None):
    out = out or files["root"] / f"{method}.pt"
    argv = ["clean", "--method", method, "--arch", ARCH, "--weights", str(files["weights"]),
            "--data", str(files["data"]), "--out", str(out), *extra]
    return main(argv), out


@pytest.mark.parametrize("method,options", [
    ("medic", ["--option", "epochs=1"]),
    ("bcu", ["--option", "epochs=1"]),
    ("dde", ["--option", "u=3.0"]),
    ("mbns", []),
])
def test_clean_round_trip(files, method, options, capsys):
    code, out = _clean(files, method, *options, "--eval", str(files["test"]),
                       "--attack", "badnets")
    assert code == 0
    checkpoint = torch.load(out, weights_only=False)
    assert checkpoint["method"] == method
    assert checkpoint["bdfast_version"] == bdfast.__version__
    assert checkpoint["arch"] == ARCH
    restored = digits_cnn()
    restored.load_state_dict(checkpoint["state_dict"])  # the output fits the architecture
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed
    if method in ("dde", "mbns"):
        assert "report" in checkpoint


def test_clean_reads_uint8_images_without_labels(files):
    code, out = main(["clean", "--method", "mbns", "--arch", ARCH, "--weights",
                      str(files["weights"]), "--data", str(files["images"]), "--out",
                      str(files["root"] / "u8.pt")]), files["root"] / "u8.pt"
    assert code == 0 and out.exists()


def _expect_error(capsys, argv, fragment, out_path=None):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert fragment in err, err
    if out_path is not None:
        assert not os.path.exists(out_path)


def test_bad_inputs_exit_2_with_one_line(files, capsys, tmp_path):
    out = str(tmp_path / "never.pt")
    base = ["--out", out]
    w, d = str(files["weights"]), str(files["data"])
    _expect_error(capsys, ["clean", "--method", "mbns", "--arch", ARCH, "--weights",
                           str(tmp_path / "missing.pt"), "--data", d] + base, "not found", out)
    _expect_error(capsys, ["clean", "--method", "mbns", "--arch", ARCH, "--weights", w,
                           "--data", str(tmp_path / "missing.npz")] + base, "not found", out)
    _expect_error(capsys, ["clean", "--method", "mbns", "--arch", "no_such_module:f",
                           "--weights", w, "--data", d] + base, "cannot import", out)
    _expect_error(capsys, ["clean", "--method", "mbns", "--arch", "bdfast.models:nothing",
                           "--weights", w, "--data", d] + base, "no callable", out)
    _expect_error(capsys, ["clean", "--method", "mbns", "--arch", "bdfast.models",
                           "--weights", w, "--data", d] + base, "module:factory", out)
    # A checkpoint of another architecture.
    other = tmp_path / "other.pt"
    torch.save(bdfast.models.vgg_small().state_dict(), other)
    _expect_error(capsys, ["clean", "--method", "mbns", "--arch", ARCH, "--weights", str(other),
                           "--data", d] + base, "does not fit the architecture", out)
    # Images of the wrong shape for the model.
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((4, 3, 5, 5), np.float32))
    _expect_error(capsys, ["clean", "--method", "mbns", "--arch", ARCH, "--weights", w,
                           "--data", str(wrong)] + base, "do not fit the model", out)
    no_x = tmp_path / "nox.npz"
    np.savez(no_x, images=np.zeros((4, 1, 16, 16), np.float32))
    _expect_error(capsys, ["clean", "--method", "mbns", "--arch", ARCH, "--weights", w,
                           "--data", str(no_x)] + base, "no array 'x'", out)
    _expect_error(capsys, ["clean", "--method", "mbns", "--arch", ARCH, "--weights", w,
                           "--data", d, "--option", "nonsense=1"] + base, "unknown --option", out)
    _expect_error(capsys, ["clean", "--method", "mbns", "--arch", ARCH, "--weights", w,
                           "--data", d, "--option", "novalue"] + base, "key=value", out)
    _expect_error(capsys, ["clean", "--method", "mbns", "--arch", ARCH, "--weights", w,
                           "--data", d, "--eval", str(files["test"])] + base, "--attack", out)
    _expect_error(capsys, ["clean", "--method", "mbns", "--arch", ARCH, "--weights", w,
                           "--data", d, "--out", str(tmp_path / "no" / "dir.pt")],
                  "does not exist")


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--quick", "--no-progress", "--attacks", "badnets", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    rows = {(r["attack"], r["defense"]) for r in report["rows"]}
    assert rows == {("badnets", d) for d in ("none", "finetune", "medic", "bcu", "dde", "mbns")}
    for row in report["rows"]:
        for key in ("acc", "asr", "ra", "der"):
            assert 0.0 <= row[key] <= 1.0
        assert row["seconds"] >= 0
    assert "ASR" in report["definitions"]
    assert report["environment"]["torch"] == torch.__version__
    assert (out / "report.md").read_text().count("| badnets |") == 6
    assert (out / "chart.png").stat().st_size > 1000
    assert "Best defense per attack" in capsys.readouterr().out


def test_demo_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--attacks", "nothing"])
    assert exit_info.value.code == 2


def test_python_m_bdfast_is_the_same_command():
    result = subprocess.run([sys.executable, "-m", "bdfast", "--help"], capture_output=True,
                            text=True, check=True)
    assert "demo" in result.stdout and "clean" in result.stdout
