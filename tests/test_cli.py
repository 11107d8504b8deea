"""The command line: a --quick demo end to end, clean round trips, and every bad-input path."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bdfast
from bdfast import defenses
from bdfast.cli import main
from bdfast.lab.models import digits_cnn

ARCH = "bdfast.lab.models:digits_cnn"


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


@pytest.mark.parametrize("method,options,read", [
    ("mbns", [], "read 270 clean images from --data"),
    # DDE reads the model's own, possibly poisoned, training set: --data is that set here.
    ("dde", ["--option", "u=3.0"], "read 270 training images from --data"),
])
def test_the_success_line_names_the_data_the_defense_read(files, method, options, read, capsys):
    code, out = _clean(files, method, *options, "--option", "progress=False")
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{method}: cleaned model written to {out} (")
    assert line.endswith(f"; {read})"), line


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
    _expect_error(capsys, ["clean", "--method", "mbns", "--arch", "bdfast.lab.models:nothing",
                           "--weights", w, "--data", d] + base, "no callable", out)
    _expect_error(capsys, ["clean", "--method", "mbns", "--arch", "bdfast.lab.models",
                           "--weights", w, "--data", d] + base, "module:factory", out)
    # A checkpoint of another architecture.
    other = tmp_path / "other.pt"
    torch.save(bdfast.lab.models.vgg_small().state_dict(), other)
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


NO_BN_MODULE = """
from torch import nn


def plain_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 10))
"""


@pytest.fixture(scope="module")
def bad_files(files, digits):
    """Inputs that each break one promise of ``bdfast clean``, next to the good ones."""
    root = files["root"]
    x, y = digits.clean[0].numpy(), digits.clean[1].numpy()
    paths = {}

    def save(name, **arrays):
        paths[name] = root / f"{name}.npz"
        np.savez(paths[name], **arrays)

    save("labels_too_big", x=x, y=np.full_like(y, 10))
    save("empty", x=np.zeros((0, 1, 16, 16), np.float32))
    save("one_image", x=x[:1], y=y[:1])
    nan = x.copy()
    nan[3, 0, 4, 4] = np.nan
    save("nan_images", x=nan, y=y)
    save("float_255", x=x * 255.0, y=y)
    save("float_labels", x=x, y=y.astype(np.float64) + 0.5)
    save("nhwc", x=x.transpose(0, 2, 3, 1), y=y)
    (root / "plain_arch.py").write_text(NO_BN_MODULE)
    torch.manual_seed(0)
    from torch import nn
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 10))
    paths["plain_weights"] = root / "plain.pt"
    torch.save(plain.state_dict(), paths["plain_weights"])
    return paths


# (case id, extra arguments as a function of (files, bad_files), text the error must contain)
BAD_CASES = [
    ("epochs=0", lambda f, b: ["--method", "medic", "--option", "epochs=0"], "epochs"),
    ("lr=-0.1", lambda f, b: ["--method", "bcu", "--option", "lr=-0.1"], "lr"),
    ("u=-1", lambda f, b: ["--method", "dde", "--option", "u=-1"], "u must"),
    ("epochs=ten", lambda f, b: ["--method", "medic", "--option", "epochs=ten"], "'ten'"),
    ("epochs=2.0", lambda f, b: ["--method", "bcu", "--option", "epochs=2.0"], "2.0"),
    ("option device=cuda", lambda f, b: ["--method", "medic", "--option", "device=cuda"],
     "--device"),
    ("--device cuda", lambda f, b: ["--method", "mbns", "--device", "cuda"], "--device"),
    ("--device nonsense", lambda f, b: ["--method", "mbns", "--device", "gpu0"], "--device"),
    ("labels >= classes in --data",
     lambda f, b: ["--method", "medic", "--data", str(b["labels_too_big"])], "below"),
    ("labels >= classes in --eval",
     lambda f, b: ["--method", "mbns", "--eval", str(b["labels_too_big"]), "--attack",
                   "badnets"], "below"),
    ("empty npz", lambda f, b: ["--method", "mbns", "--data", str(b["empty"])], "at least 2"),
    ("one-image npz", lambda f, b: ["--method", "medic", "--data", str(b["one_image"])],
     "at least 2"),
    ("NaN images", lambda f, b: ["--method", "medic", "--data", str(b["nan_images"])], "NaN"),
    ("no BatchNorm for dde",
     lambda f, b: ["--method", "dde", "--arch", "plain_arch:plain_cnn", "--weights",
                   str(b["plain_weights"])], "BatchNorm"),
    ("no BatchNorm for mbns",
     lambda f, b: ["--method", "mbns", "--arch", "plain_arch:plain_cnn", "--weights",
                   str(b["plain_weights"])], "BatchNorm"),
    ("--target 10 with 10 classes",
     lambda f, b: ["--method", "mbns", "--eval", str(f["test"]), "--attack", "badnets",
                   "--target", "10"], "--target"),
    ("--batch-size 0", lambda f, b: ["--method", "mbns", "--batch-size", "0"], "--batch-size"),
    ("float images in 0..255", lambda f, b: ["--method", "mbns", "--data", str(b["float_255"])],
     "divide by 255"),
    ("float images in 0..255 in --eval",
     lambda f, b: ["--method", "mbns", "--eval", str(b["float_255"]), "--attack", "badnets"],
     "divide by 255"),
    ("float labels", lambda f, b: ["--method", "medic", "--data", str(b["float_labels"])],
     "whole class numbers"),
    ("NHWC images", lambda f, b: ["--method", "mbns", "--data", str(b["nhwc"])], "transpose"),
    ("--option seed", lambda f, b: ["--method", "bcu", "--option", "seed=1"], "--seed"),
    # Python objects have no shell spelling: one line says so and what to use instead.
    ("--option eval_fn", lambda f, b: ["--method", "medic", "--option", "eval_fn=print"],
     "--option eval_fn is refused: it is a Python function"),
    ("--option student", lambda f, b: ["--method", "medic", "--option", "student=None"],
     "--option student is refused: it is a model object"),
    ("--option val_loader", lambda f, b: ["--method", "dde", "--option", "val_loader=x"],
     "--option val_loader is refused: it is a Python loader"),
    ("--option device=cpu", lambda f, b: ["--method", "mbns", "--option", "device=cpu"],
     "--option device is refused: give the device with --device"),
    ("dde step too small for the compat grid",
     lambda f, b: ["--method", "dde", "--option", "step=1e-9", "--option",
                   "reference_compat=True", "--option", "progress=False"], "larger step"),
]


@pytest.mark.parametrize("case,extra,fragment", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_one_sentence_and_exit_2(files, bad_files, case, extra, fragment, capsys,
                                              tmp_path, monkeypatch):
    monkeypatch.chdir(files["root"])  # where the no-BatchNorm architecture module lives
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    out = tmp_path / "never.pt"
    argv = dict(zip(["--arch", "--weights", "--data", "--out"],
                    [ARCH, str(files["weights"]), str(files["data"]), str(out)]))
    rest = extra(files, bad_files)
    for flag in list(argv):  # a case's own --arch/--weights/--data replace the defaults
        if flag in rest:
            del argv[flag]
    args = ["clean"] + [a for pair in argv.items() for a in pair] + rest
    _expect_error(capsys, args, fragment, out)


def test_out_directory_is_refused_before_the_defense_runs(files, capsys, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the defense ran although --out could never be written")

    monkeypatch.setattr(bdfast, "medic_clone", must_not_run)
    _expect_error(capsys, ["clean", "--method", "medic", "--arch", ARCH, "--weights",
                           str(files["weights"]), "--data", str(files["data"]), "--out",
                           str(files["root"])], "is a directory")


def test_float_labels_with_whole_values_are_read(files, tmp_path):
    data = np.load(files["data"])
    path = tmp_path / "float_whole_labels.npz"
    np.savez(path, x=data["x"], y=data["y"].astype(np.float32))
    out = tmp_path / "out.pt"
    assert main(["clean", "--method", "mbns", "--arch", ARCH, "--weights", str(files["weights"]),
                 "--data", str(path), "--out", str(out)]) == 0


def test_checkpoint_mode_follows_the_umask_and_no_temporary_file_is_left(files, tmp_path):
    old = os.umask(0o022)
    try:
        code, out = _clean(files, "mbns", out=tmp_path / "cleaned.pt")
    finally:
        os.umask(old)
    assert code == 0
    assert (os.stat(out).st_mode & 0o777) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["cleaned.pt"]


def test_checkpoint_is_fsynced_before_the_rename(files, tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace",
                        lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    code, _ = _clean(files, "mbns", out=tmp_path / "cleaned.pt")
    assert code == 0
    assert "fsync" in events and events.index("fsync") < events.index("replace")


INTERRUPTED_SAVE = """
import os, signal, sys, time
import torch
from bdfast.cli import main

real_save = torch.save


def save_then_get_killed(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # the signal arrives here


torch.save = save_then_get_killed
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_saving_leaves_no_temporary_file(files, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["clean", "--method", "mbns", "--arch", ARCH, "--weights", str(files["weights"]),
            "--data", str(files["data"]), "--out", str(out_dir / "cleaned.pt")]
    result = subprocess.run([sys.executable, "-c", INTERRUPTED_SAVE, *argv], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 130, result.stderr
    assert os.listdir(out_dir) == []


def test_seed_and_typed_options_are_stored(files, tmp_path):
    code, out = _clean(files, "bcu", "--option", "epochs=1", "--option", "lr=0.02",
                       "--seed", "7", out=tmp_path / "bcu.pt")
    assert code == 0
    checkpoint = torch.load(out, weights_only=True)  # plain values: no pickled code needed
    assert checkpoint["options"] == {"epochs": 1, "lr": 0.02, "seed": 7}
    assert checkpoint["seed"] == 7
    # The same seed and options give the same cleaned model.
    code, again = _clean(files, "bcu", "--option", "epochs=1", "--option", "lr=0.02",
                         "--seed", "7", out=tmp_path / "bcu_again.pt")
    assert code == 0
    repeated = torch.load(again, weights_only=True)["state_dict"]
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(value, repeated[key]), key


def test_quick_demo_end_to_end(tmp_path, capsys, monkeypatch):
    from tqdm.auto import tqdm
    written = []
    real_write = tqdm.write
    # Log lines go through tqdm.write, so that they are not glued to a progress bar.
    monkeypatch.setattr(tqdm, "write", lambda line, *a, **k: (written.append(line),
                                                               real_write(line, *a, **k))[1])
    out = tmp_path / "demo"
    code = main(["demo", "--quick", "--no-progress", "--attacks", "badnets", "--out", str(out)])
    assert code == 0
    assert any(line.startswith("[badnets] backdoored model") for line in written)
    assert sum(line.startswith("[badnets] ") for line in written) == 7
    report = json.loads((out / "report.json").read_text())
    rows = {(r["attack"], r["defense"]) for r in report["rows"]}
    assert rows == {("badnets", d) for d in ("none", "finetune", "medic", "bcu", "dde", "mbns")}
    for row in report["rows"]:
        for key in ("acc", "asr", "ra", "der", "acc_before", "asr_before"):
            assert 0.0 <= row[key] <= 1.0
        assert row["seconds"] >= 0
    assert "ASR" in report["definitions"]
    assert report["environment"]["torch"] == torch.__version__
    # A smoke run says so in all three outputs.
    assert report["quick"] is True and report["complete"] is True
    markdown = (out / "report.md").read_text()
    assert markdown.count("| badnets |") == 6
    assert "--quick smoke run" in markdown
    assert (out / "chart.png").stat().st_size > 1000
    from PIL import Image
    with Image.open(out / "chart.png") as chart:
        assert "--quick smoke run" in chart.info["Description"]
    printed = capsys.readouterr().out
    assert "Best defense per attack" in printed and "Quick smoke run" in printed


def test_interrupted_demo_keeps_the_rows_it_measured(tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(defenses.DEFENSES, "bcu",
                        dataclasses.replace(defenses.get("bcu"), run=interrupt))
    out = tmp_path / "demo"
    code = main(["demo", "--quick", "--no-progress", "--attacks", "badnets", "--defenses",
                 "none", "dde", "bcu", "mbns", "--out", str(out)])
    assert code == 130
    report = json.loads((out / "report.json").read_text())
    assert [r["defense"] for r in report["rows"]] == ["none", "dde"]
    assert report["complete"] is False
    assert "Partial report" in (out / "report.md").read_text()


def test_no_best_defense_is_named_for_an_attack_that_did_not_implant(tmp_path):
    from bdfast.lab.demo import IMPLANTED_ASR, DemoRow, best_per_attack, rows_as_dicts
    from bdfast.lab.report import write_report

    def row(attack, defense, asr, asr_before, der):
        return DemoRow(attack, defense, acc=0.99, asr=asr, ra=0.9, der=der, seconds=1.0,
                       acc_before=0.99, asr_before=asr_before)

    rows = [row("badnets", "none", 1.0, 1.0, 0.5), row("badnets", "medic", 0.01, 1.0, 0.99),
            row("sig", "none", 0.02, 0.02, 0.5), row("sig", "mbns", 0.0, 0.02, 0.51)]
    best = best_per_attack(rows)
    assert set(best) == {"badnets"} and best["badnets"].defense == "medic"
    paths = write_report(str(tmp_path), rows_as_dicts(rows), {"quick": False}, {},
                         {a: r.__dict__ for a, r in best.items()}, implanted_asr=IMPLANTED_ASR)
    with open(paths["json"]) as f:
        report = json.load(f)
    assert report["best"] == {"badnets": "medic"}
    assert report["not_implanted"] == {"sig": 0.02}
    with open(paths["markdown"]) as f:
        assert "sig: none named" in f.read()


def test_demo_save_model_writes_the_backdoored_model_the_demo_trains(tmp_path, capsys,
                                                                     monkeypatch):
    import bdfast.lab.demo
    from bdfast.lab.demo import IMPLANTED_ASR
    from bdfast.lab.metrics import evaluate

    trained = []
    real_teacher = bdfast.lab.demo.backdoored_teacher

    def remember(*args, **kwargs):
        trained.append(real_teacher(*args, **kwargs))
        return trained[-1]

    monkeypatch.setattr(bdfast.lab.demo, "backdoored_teacher", remember)
    path = tmp_path / "suspicious.pt"
    assert main(["demo", "--save-model", str(path), "--quick", "--no-progress"]) == 0
    assert "bdfast.lab.models.digits_cnn()" in capsys.readouterr().out
    assert len(trained) == 1 and not (tmp_path / "bdfast-demo").exists()  # no defense ran
    teacher = trained[0]
    # A plain state_dict, as the README's quick start loads it, of the named architecture.
    model = digits_cnn()
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    x_test, y_test = teacher.data.test
    with torch.no_grad():
        assert torch.equal(model(x_test).argmax(1), teacher.model(x_test).argmax(1))
    # The badnets teacher, and backdoored: its trigger sends most test images to the target.
    assert teacher.attack.name == "badnets"
    assert evaluate(model, x_test, y_test, attack=teacher.attack)["asr"] >= IMPLANTED_ASR


@pytest.mark.parametrize("extra,fragment", [
    (["--defenses", "medic"], "takes no --defenses"),
    (["--out", "report"], "takes no --out"),
    (["--attacks", "badnets", "sig"], "give one attack with --attacks, got 2"),
])
def test_demo_save_model_refuses_what_it_would_ignore(extra, fragment, tmp_path, capsys):
    _expect_error(capsys, ["demo", "--save-model", str(tmp_path / "m.pt"), *extra], fragment,
                  tmp_path / "m.pt")


def test_demo_save_model_refuses_a_folder(tmp_path, capsys):
    _expect_error(capsys, ["demo", "--save-model", str(tmp_path)], "is a directory")


def test_demo_run_times_are_the_same_in_the_readme_and_the_help():
    from bdfast.cli import build_parser
    from bdfast.lab.demo import FULL_RUN_SECONDS, QUICK_RUN_SECONDS
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md")) as f:
        readme = f.read()
    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    help_text = " ".join(demo.format_help().split())
    for seconds in (FULL_RUN_SECONDS, QUICK_RUN_SECONDS):
        assert f"{seconds} s" in help_text
        assert f"{seconds} s" in " ".join(readme.split())
    assert "10 minutes" not in help_text


def test_demo_refuses_a_missing_gpu_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _expect_error(capsys, ["demo", "--quick", "--device", "cuda"], "no CUDA device")


def test_demo_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--attacks", "nothing"])
    assert exit_info.value.code == 2


def test_python_m_bdfast_is_the_same_command():
    result = subprocess.run([sys.executable, "-m", "bdfast", "--help"], capture_output=True,
                            text=True, check=True)
    assert "demo" in result.stdout and "clean" in result.stdout


def test_a_failing_defense_is_one_line_not_a_traceback(files, capsys, monkeypatch, tmp_path):
    def broken(model, loader):
        raise RuntimeError("CUDA error: an illegal memory access\nwas encountered")

    monkeypatch.setitem(defenses.DEFENSES, "mbns",
                        dataclasses.replace(defenses.get("mbns"), run=broken))
    out = tmp_path / "never.pt"
    code, _ = _clean(files, "mbns", out=out)
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert ("bdfast clean: failed: RuntimeError: CUDA error: an illegal memory access was "
            "encountered (set BDFAST_TRACEBACK=1") in err
    assert not out.exists()
    monkeypatch.setenv("BDFAST_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _clean(files, "mbns", out=out)



WARNS = """
import warnings
from bdfast.cli import _warnings_on_one_line
with _warnings_on_one_line():
    warnings.warn("two\\n words", UserWarning)
warnings.warn("after", UserWarning)
"""


def test_a_warning_is_one_line_from_the_command():
    """Python shows a warning on two lines, the second the library's source line; `bdfast`
    shows one, and only while it runs a command."""
    result = subprocess.run([sys.executable, "-c", WARNS], capture_output=True, text=True,
                            timeout=120)
    lines = result.stderr.splitlines()
    assert result.returncode == 0 and lines[0] == "bdfast: UserWarning: two words"
    assert lines[1:] == ["<string>:6: UserWarning: after"]  # restored afterwards
