"""The defense registry is the one list of defenses: the CLI, the demo and the README agree
with it, and each entry's description matches its function."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import bdfast
from bdfast import cli, defenses, demo

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_defense_is_registered_once():
    public = {bdfast.medic_clone, bdfast.bcu_cleanse, bdfast.dde_prune, bdfast.mbns_prune}
    assert {d.run for d in defenses.DEFENSES.values()} == public
    assert len(defenses.DEFENSES) == len(public)


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
    assert set(demo.DEFENSE_RUNNERS) == set(demo.DEMO_DEFENSES)
    readme = (ROOT / "README.md").read_text()
    for defense in defenses.DEFENSES.values():
        assert f"`bdfast.{defense.run.__name__}(model, loader)`" in readme


def test_unknown_defense_names_the_known_ones():
    with pytest.raises(ValueError, match="choose from"):
        defenses.get("fine-prune")
