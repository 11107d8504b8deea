"""The README's code runs as written: every ```python block, in order, in one namespace, and
the `bdfast demo --save-model` and `bdfast clean` blocks, on the digits lab.

The README makes suspicious.pt with its ``bdfast demo --save-model`` block, run here as written;
the model it trains is the lab's default badnets digits CNN, which the session's
``backdoored_model`` fixture has trained already, so that one is handed to it. The other files
(clean.npz, test.npz and the module behind ``--arch mypackage.models:my_net``) are made from the
lab in a temporary working directory. Shell blocks other than these (``torchrun ...``) need a
launcher and several GPUs; they are not run.
"""
from __future__ import annotations

import inspect
import os
import re
import shlex

import numpy as np

import bdfast.lab.demo
from bdfast import lab
from bdfast.cli import main

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
FENCE = re.compile(r"^( *)```(\S*)[^\n]*\n(.*?)^\1```", re.S | re.M)


def readme_blocks():
    """(language, code) of every fenced block, in document order, de-indented."""
    with open(README) as f:
        text = f.read()
    blocks = []
    for match in FENCE.finditer(text):
        indent, language, body = match.groups()
        code = "\n".join(line[len(indent):] for line in body.splitlines())
        blocks.append((language, code))
    return blocks


def test_readme_has_python_and_cli_blocks():
    languages = [language for language, _ in readme_blocks()]
    assert languages.count("python") >= 2
    assert any(code.startswith("bdfast clean") for _, code in readme_blocks())
    assert any(code.startswith("bdfast demo --save-model") for _, code in readme_blocks())


def test_readme_code_runs_as_written(tmp_path, monkeypatch, digits, backdoored_model):
    monkeypatch.chdir(tmp_path)
    lab_defaults = inspect.signature(lab.backdoored).parameters
    train_defaults = inspect.signature(bdfast.train).parameters

    def trained_by_the_fixture(data, arch, attack, seed, *, rate, epochs, device, progress):
        # The README's command asks for the lab's default model, so the fixture's is the same.
        assert (data, arch, attack, seed, rate, epochs, device.type) == (
            "digits", "digits_cnn", "badnets", 0, lab_defaults["rate"].default,
            train_defaults["epochs"].default, "cpu")
        return backdoored_model.lab_model("badnets")

    monkeypatch.setattr(bdfast.lab.demo, "backdoored", trained_by_the_fixture)
    np.savez("clean.npz", x=digits.clean[0].numpy(), y=digits.clean[1].numpy())
    np.savez("test.npz", x=digits.test[0].numpy(), y=digits.test[1].numpy())
    (tmp_path / "mypackage").mkdir()
    (tmp_path / "mypackage" / "__init__.py").write_text("")
    (tmp_path / "mypackage" / "models.py").write_text(
        "from bdfast.lab.models import digits_cnn as my_net\n")

    namespace: dict = {"__name__": "readme"}
    ran_python = ran_cli = 0
    for language, code in readme_blocks():
        if language == "python":
            exec(compile(code, f"README.md block {ran_python + 1}", "exec"), namespace)
            ran_python += 1
        elif code.startswith(("bdfast clean", "bdfast demo --save-model")):
            argv = shlex.split(code.replace("\\\n", " "))
            assert main(argv[1:]) == 0
            ran_cli += 1
    assert ran_python >= 2 and ran_cli == 2
    assert os.path.exists("suspicious.pt")
    assert os.path.exists("cloned.pt") and os.path.exists("cleaned.pt")
    assert namespace["checkpoint"]["method"] == "medic"
