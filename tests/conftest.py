"""Shared oracles for the bound / layer / GloroNet tests.

Every oracle here is independent of ``gloronet.bounds``: operators are materialised by feeding
impulses through the layer's own ``forward`` (in a float64 copy, bias removed by subtracting the
response to zero), norms come from a full SVD (``torch.linalg.matrix_norm(A, 2)``), and
adjoints come from autograd, never from ``bounds.conv2d_adjoint``. :func:`train_briefly` is the
small GloRo training loop the attack tests share; :func:`train_tiny_run` and :func:`one_line_error`
serve the tests of the command line.
"""
from __future__ import annotations

import copy

import pytest

import torch


def f64_copy(layer: torch.nn.Module) -> torch.nn.Module:
    """A float64 deep copy (float32 -> float64 is exact, so it is the same linear map)."""
    return copy.deepcopy(layer).double()


def impulse_matrix(layer: torch.nn.Module, in_shape) -> torch.Tensor:
    """Explicit (d_out, d_in) float64 matrix of the linear part of ``layer`` on inputs ``in_shape``.

    Built from the layer's actual forward on the identity batch; the bias is removed by
    subtracting ``layer(0)``.
    """
    lay = f64_copy(layer)
    d_in = 1
    for s in in_shape:
        d_in *= int(s)
    with torch.no_grad():
        eye = torch.eye(d_in, dtype=torch.float64).view(d_in, *in_shape)
        out = lay(eye) - lay(torch.zeros(1, *in_shape, dtype=torch.float64))
    return out.reshape(d_in, -1).t().contiguous()


def exact_norm(a: torch.Tensor) -> float:
    """Spectral norm by full SVD in float64."""
    return float(torch.linalg.matrix_norm(a.to(torch.float64), 2))


def power_norm(layer: torch.nn.Module, in_shape, iters: int = 300, seed: int = 0, dtype=torch.float64) -> float:
    """Lower bound of the operator norm of the linear part of ``layer`` (float64 power iteration).

    The adjoint is obtained by autograd (vector-Jacobian product) of the layer's own forward, so
    it is independent of ``bounds.conv2d_adjoint``. ``‖A v‖`` with ``‖v‖ = 1`` never exceeds the
    true norm, so ``bound / power_norm <= 1.05`` proves a bound is within 5% of the truth.
    The iterations may run in float32 (speed); the final ``‖A v‖/‖v‖`` is evaluated in float64.
    """
    lay64 = f64_copy(layer)
    lay = lay64 if dtype == torch.float64 else copy.deepcopy(layer).to(dtype)
    for m in (lay, lay64):
        for p in m.parameters():
            p.requires_grad_(False)

    def apply(m, v):
        return m(v) - m(torch.zeros_like(v[:1]))

    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, *in_shape, dtype=torch.float64, generator=g).to(dtype)
    v = v / v.norm()
    for _ in range(iters):
        v = v.detach().requires_grad_(True)
        u = apply(lay, v)
        (w,) = torch.autograd.grad(u, v, grad_outputs=u.detach())  # A^T A v
        v = w / w.norm()
    with torch.no_grad():
        v = v.detach().to(torch.float64)
        return float(apply(lay64, v).norm() / v.norm())


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests on one intra-op thread (restored afterwards).

    The suite runs on 2 cores shared with other jobs; with 2 OpenMP threads on an oversubscribed
    machine the spin-waits at every parallel region made these tiny-tensor tests ~30x slower.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def train_briefly(net, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float, gen: torch.Generator):
    """``steps`` Adam steps of the GloRo cross-entropy on random minibatches of ``(x, y)`` (indices
    drawn from ``gen``); returns ``net`` in eval mode."""
    from gloronet.losses import gloro_cross_entropy

    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(steps):
        i = torch.randint(0, x.shape[0], (batch,), generator=gen)
        loss = gloro_cross_entropy(net.bottom_logits(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def train_tiny_run(out, data_dir, *extra: str):
    """A one-epoch run on 128 training and 32 test images, trained through the CLI: the model that
    tests of the commands reading a run start from. Returns ``out``."""
    from gloronet import cli

    assert cli.main(["train", "--out", str(out), f"--data_dir={data_dir}", "--epochs=1", "--train_limit=128",
                     "--test_limit=32", "--batch_size=64", "-q", *extra]) == 0
    return out


def one_line_error(capsys, *words: str) -> str:
    """The command's stderr is one line holding every one of ``words``; returns it."""
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    for w in words:
        assert w in err, err
    return err


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as module ``name`` (once per session: a second load
    returns the first, so scripts importing each other share one module)."""
    import importlib.util
    import sys
    from pathlib import Path

    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules.setdefault(name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


def half_scale_without_error_model():
    """``x ↦ x/2`` with a proven Lipschitz bound but no floating-point error model: a net holding it
    certifies in exact arithmetic only."""
    import gloronet

    class Scale(gloronet.nn.LipschitzModule):
        def forward(self, x):
            return 0.5 * x

        def lipschitz(self):
            return torch.tensor(0.5)

        def lipschitz_bound(self):
            return 0.5

    return Scale()
