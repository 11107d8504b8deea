"""The defense registry is the one list of defenses: the CLI, the demo and the README agree
with it, each entry's description matches its function, and ``defenses.run`` hands each
defense the data it declares."""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

import bdfast
from bdfast import cli, defenses
from bdfast.defenses import registry
from bdfast.lab import demo
from bdfast.loaders import tensor_loader
from bdfast.lab.models import digits_cnn

ROOT = Path(__file__).resolve().parents[2]


def test_every_public_defense_is_registered_once():
    public = {bdfast.medic_clone, bdfast.bcu_cleanse, bdfast.dde_prune, bdfast.mbns_prune}
    library = [defenses.get(name) for name in defenses.names()]
    assert {d.run for d in library} == public and len(library) == len(public)
    assert defenses.names(baselines=True) == defenses.names() + ("none", "finetune")


@pytest.mark.parametrize("name", defenses.names())
def test_entry_matches_its_function(name):
    defense = defenses.get(name)
    returns = inspect.signature(defense.run).return_annotation
    assert ("PruneResult" in str(returns)) == (defense.returns == "prune")
    options = defense.options()
    assert ("epochs" in options and "seed" in options) == defense.trains
    assert defense.data in ("clean", "training")


def test_cli_demo_and_readme_use_the_registry():
    subcommands = cli.build_parser()._subparsers._group_actions[0].choices
    clean = next(a for a in subcommands["clean"]._actions if a.dest == "method")
    assert tuple(clean.choices) == defenses.names()
    registered = ("none", "finetune") + defenses.names()
    assert registered == demo.DEMO_DEFENSES
    readme = (ROOT / "README.md").read_text()
    for defense in map(defenses.get, defenses.names()):
        assert f"`bdfast.{defense.run.__name__}(model, loader)`" in readme


def test_unknown_defense_names_the_known_ones():
    with pytest.raises(ValueError, match="choose from"):
        defenses.get("fine-prune")


# --- defenses.run ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(digits):
    torch.manual_seed(0)
    return digits_cnn().eval(), digits.clean[0][:64], digits.clean[1][:64]


def spy(monkeypatch, name):
    """Replaces ``name``'s function by one that records its arguments and returns the model."""
    calls = []

    def record(model, *data, **options):
        calls.append((data, options))
        return model

    # The registry reads a defense's options from its signature: keep the real one.
    record.__signature__ = inspect.signature(defenses.get(name).run)
    entry = dataclasses.replace(defenses.get(name), run=record, returns="model")
    monkeypatch.setitem(defenses.DEFENSES, name, entry)
    return calls


@pytest.mark.parametrize("name", defenses.names())
def test_run_gives_each_defense_its_declared_data(monkeypatch, small, name):
    model, x, y = small
    calls = spy(monkeypatch, name)
    x_train = x.flip(0)
    defenses.run(name, model, clean=(x, y), train=x_train, seed=3)
    (loader,), options = calls[0]
    batches = list(loader)
    declared = defenses.get(name)
    images = torch.cat([b[0] if isinstance(b, (list, tuple)) else b for b in batches])
    wanted = x if declared.data == "clean" else x_train
    # Shuffled for a training defense (the same images), in order for a statistics pass.
    assert torch.equal(images.sum(0), wanted.sum(0))
    assert torch.equal(images, wanted) != declared.trains
    assert isinstance(batches[0], (list, tuple)) == (declared.uses_labels and declared.data
                                                    == "clean")
    assert len(batches[0][0] if isinstance(batches[0], (list, tuple)) else batches[0]) == (
        registry.TRAIN_BATCH if declared.trains else registry.STATISTICS_BATCH if len(x) >
        registry.STATISTICS_BATCH else len(x))
    assert ("seed" in options) == declared.trains and options.get("seed", 3) == 3
    # DDE validates u="auto" on the clean set when one is given.
    assert ("val_loader" in options) == (declared.data == "training")


def test_run_shuffles_the_same_way_for_the_same_seed(monkeypatch, small):
    model, x, y = small
    calls = spy(monkeypatch, "medic")
    for seed in (1, 1, 2):
        defenses.run("medic", model, clean=(x, y), seed=seed)
    first, again, other = [[b[1] for b in data[0]] for data, _ in calls]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("name", defenses.names())
def test_defense_loader_is_the_loader_run_hands_the_defense(monkeypatch, small, name):
    """Scripts that call a defense's own function (e.g. ``bcu_fit``) feed it what ``run`` would."""
    model, x, y = small
    calls = spy(monkeypatch, name)
    defenses.run(name, model, clean=(x, y), train=(x, y), seed=5)
    (handed,), _ = calls[0]

    def tensors(loader):
        return [list(b) if isinstance(b, (list, tuple)) else [b] for b in loader]

    # The first pass of each: a shuffled loader draws a new order every pass.
    built, given = tensors(registry.defense_loader(name, (x, y), seed=5)), tensors(handed)
    assert len(built) == len(given) > 0
    for ours, theirs in zip(built, given):
        assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_run_passes_a_loader_through_and_options_on(monkeypatch, small):
    model, x, y = small
    calls = spy(monkeypatch, "bcu")
    loader = tensor_loader(x, batch_size=8)
    outcome = defenses.run("bcu", model, clean=loader, seed=0, epochs=7, progress=False)
    (given,), options = calls[0]
    assert given is loader and options == {"seed": 0, "epochs": 7, "progress": False}
    assert outcome.model is model and outcome.report is None and outcome.options == options


def test_run_returns_a_pruning_report_and_leaves_the_model_alone(small):
    model, x, y = small
    state = {k: v.clone() for k, v in model.state_dict().items()}
    outcome = defenses.run("mbns", model, clean=x, progress=False)
    assert outcome.report["method"] == "mbns" and outcome.model is not model
    assert outcome.seconds >= 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    direct = bdfast.mbns_prune(model, tensor_loader(x, batch_size=256), progress=False)
    assert [layer["pruned"] for layer in direct.report["layers"]] == [
        layer["pruned"] for layer in outcome.report["layers"]]


@pytest.mark.parametrize("name, flag", [("medic", "clean"), ("dde", "train")])
def test_run_names_the_missing_data(small, name, flag):
    model, x, _ = small
    other = {"train": x} if flag == "clean" else {"clean": x}
    with pytest.raises(ValueError, match=f"{name} needs {flag}="):
        defenses.run(name, model, **other)


def test_the_baselines(small):
    model, x, y = small
    assert defenses.run("none", model, progress=False).model is model
    tuned = defenses.run("finetune", model, clean=(x, y), seed=0, epochs=1,
                         progress=False).model
    assert tuned is not model
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), model.parameters()))
    with pytest.raises(ValueError, match=r"finetune needs clean=\(x, y\)"):
        defenses.run("finetune", model, clean=x)
