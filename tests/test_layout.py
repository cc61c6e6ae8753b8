"""Issue 8, item 10: one registry and one ``create``; families import the registry, never the
reverse; the run-directory logic and the device rule each live in one module."""
from __future__ import annotations

import ast
import inspect

import gloronet
import gloronet.liresnet
import gloronet.cli
import gloronet.evaluate.common
import gloronet.rounding
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


# Every public name of the single-file bounds.py before it became a package (issue 19, item 6), except
# REL_SLACK: the eigensolver's trusted error factor, replaced by a proof (item 4).
_BOUNDS_NAMES = (
    "GRAM_SLACK EXACT_MAX_DIM EXACT_MAX_ENTRIES SMALL_MAP U EIGH_WORK TAU TAUS LANCZOS_STEPS CHUNK "
    "Padding round_up mul_up compute_device as_float64 same_padding conv_output_size conv2d_apply conv2d_adjoint "
    "power_iteration_dense power_iteration_conv2d lanczos_max pow2_scales max_abs pow2_scale one_thread "
    "hermitian_max_bound gram_norm_bound dense_norm_bound conv2d_explicit_gram gram_kernel frequency_grams "
    "circular_conv_bound conv2d_fft_bound conv2d_norm_bound nonneg_norm_bound abs_conv2d_norm_bound"
).split()


def test_bounds_is_a_package_that_never_imports_fp():
    """``from gloronet.bounds import X`` keeps working for every old name, and no module of the
    package imports gloronet.fp (fp builds on bounds; the rounding model is gloronet.rounding)."""
    import importlib
    import pkgutil

    from gloronet import bounds

    assert hasattr(bounds, "__path__")
    missing = [n for n in _BOUNDS_NAMES if not hasattr(bounds, n)]
    assert not missing
    for info in pkgutil.iter_modules(bounds.__path__):
        module = importlib.import_module(f"gloronet.bounds.{info.name}")
        imported = _imports(module)
        assert not {"fp", "..fp", "gloronet.fp", "radius", "..radius"} & imported, info.name
    assert not {"fp", ".fp"} & _imports(gloronet.rounding) and not {".bounds", "bounds"} & _imports(gloronet.rounding)
