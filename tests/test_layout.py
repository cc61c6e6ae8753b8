"""Issue 8, item 10: one registry and one ``create``; families import the registry, never the
reverse; the run-directory logic and the device rule each live in one module."""
from __future__ import annotations

import ast
import inspect

import gloronet
import gloronet.liresnet
import gloronet.cli
import gloronet.evaluate.common
from gloronet import models, runs, train
from gloronet.models import registry


def _imports(module) -> set[str]:
    tree = ast.parse(inspect.getsource(module))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_models_is_a_package_with_one_create():
    assert hasattr(models, "__path__") and models.create is registry.create
    assert models.liresnet.create is models.create and gloronet.liresnet is models.liresnet
    assert not {"convnets", "liresnet", ".convnets", ".liresnet"} & _imports(registry)
    for family in (models.convnets, models.liresnet):
        assert ".registry" in _imports(family)
    assert {"2c2f", "liresnet", "chord-12l512w"} <= set(models.list_models())


def test_run_logic_and_device_rule_live_in_one_place():
    assert "resolve_device" not in vars(train) or train.resolve_device.__module__ == "gloronet.device"
    assert gloronet.checkpoint.load_model is runs.load_model
    src = inspect.getsource(gloronet.evaluate.common) + inspect.getsource(gloronet.cli)
    assert "def open_run" not in src and "yaml.safe_load" not in src
