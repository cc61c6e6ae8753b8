"""The fused eval pass (issue 18): ``net.eval()(x)`` and ``certify`` run one kernel call per sum,
yet predict exactly what the certified program (chunked sums, :mod:`gloronet.nn.accumulate`)
predicts, and every kernel call sums no more terms than the error model it is analysed with.

* near the decision boundary the fused and the chunked program disagree (the construction sees
  rounding), and the eval forward always returns the chunked program's class, strictly first;
* clear points run the fused kernels alone (no replay), unsure rows are replayed exactly;
* the kernel structure the error models assume, checked on every registered architecture by
  recording the kernel calls of each layer and the depths its error model was built with.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import gloronet
from gloronet import fp, kernels
from gloronet.nn import Flatten, LipLinear, MinMax, Sequential, accumulate
from gloronet.nn.base import body_steps, error_model_of

from conftest import half_scale_without_error_model


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _chunked(net, x: torch.Tensor) -> torch.Tensor:
    """The certified program: the eval layers with their chunked sums."""
    with torch.no_grad(), kernels.sound_kernels():
        return net.head(net.body(x))


def _fused(net, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), kernels.sound_kernels(), accumulate.fused():
        return net.head(net.body(x))


def _long_sums_net(seed: int = 0, n: int = 4096) -> gloronet.GloroNet:
    """4096-term sums in the first layer: the fused and chunked orders round differently."""
    torch.manual_seed(seed)
    net = gloronet.GloroNet(Sequential(Flatten(), LipLinear(n, 8), MinMax(), LipLinear(8, 8)), LipLinear(8, 3), 0.1)
    return net.eval()


def _boundary(net, a: torch.Tensor, b: torch.Tensor, bits: int):
    """``(a, b, lo, hi)`` (float64) for the pairs whose fused predictions differ: ``a + t(b − a)``
    keeps ``a``'s fused class at ``t = lo`` and not at ``hi = lo + 2^-bits`` (bisection)."""
    keep = _fused(net, a).argmax(1) != _fused(net, b).argmax(1)
    a, b = a[keep].double(), b[keep].double()
    pa = _fused(net, a.float()).argmax(1)
    lo, hi = torch.zeros(len(a), dtype=torch.float64), torch.ones(len(a), dtype=torch.float64)
    for _ in range(bits):
        mid = (lo + hi) / 2
        same = _fused(net, (a + mid[:, None] * (b - a)).float()).argmax(1) == pa
        lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
    return a, b, lo, hi


def _near_ties(net, n_pairs: int, seed: int, dim: int = 4096) -> torch.Tensor:
    """Points bisected (48 bits) onto the fused program's decision boundary between random pairs
    with different fused predictions, and ±1-ulp moves of random coordinates around them."""
    g = _gen(seed)
    a, b, lo, hi = _boundary(net, torch.rand(n_pairs, dim, generator=g), torch.rand(n_pairs, dim, generator=g), 48)
    base = torch.cat([(a + lo[:, None] * (b - a)).float(), (a + hi[:, None] * (b - a)).float()])
    moves = [base]
    for _ in range(6):
        mask = torch.rand(base.shape, generator=g) < 0.02
        up = torch.rand(base.shape, generator=g) < 0.5
        target = torch.where(up, torch.full_like(base, 2.0), torch.full_like(base, -1.0))
        moves.append(torch.where(mask, torch.nextafter(base, target), base))
    return torch.cat(moves)


def _clear_points(net, n: int, seed: int) -> torch.Tensor:
    """Random inputs whose top-two fused logits differ by more than 0.2."""
    x = torch.rand(16 * n, 4096, generator=_gen(seed))
    top2 = _fused(net, x).topk(2, dim=1).values
    x = x[top2[:, 0] - top2[:, 1] > 0.2][:n]
    assert len(x) == n
    return x


def test_eval_forward_predicts_the_certified_program_near_ties():
    net = _long_sums_net()
    x = torch.cat([_near_ties(net, 64, seed=1), _clear_points(net, 16, seed=2)])
    fused, chunked = _fused(net, x), _chunked(net, x)
    assert (fused.argmax(1) != chunked.argmax(1)).any(), "construction too weak: fused and chunked never disagree"
    with torch.no_grad():
        out = net(x)
    pred = chunked.argmax(1)
    assert torch.equal(out.argmax(1), pred)
    kept = (out == fused).all(1)  # rows the guard vouched for: the fused logits, the class strictly first
    others = out.scatter(1, pred[:, None], -torch.inf)
    assert (out.gather(1, pred[:, None])[:, 0] > others.amax(1))[kept].all()
    assert torch.equal(out[~kept], chunked[~kept])  # replayed rows hold the certified program's logits
    assert (~kept).any() and kept.any()


def _cancelling_net(where: str, n: int = 2048) -> gloronet.GloroNet:
    """A ``2n``-term layer with weights ``[A, −A + 10⁻³B]`` — in the body (``where="body"``) or as
    the head — applied to inputs ``[u, u]``: the terms cancel, so the fused and the chunked sums
    round differently by far more than the outputs' size suggests."""
    torch.manual_seed(0)
    wide = LipLinear(2 * n, 8 if where == "body" else 3)
    body = Sequential(Flatten(), wide) if where == "body" else Sequential(Flatten())
    head = LipLinear(8, 3) if where == "body" else wide
    g = _gen(8)
    with torch.no_grad():
        a = torch.randn(wide.out_features, n, generator=g)
        wide.weight.copy_(torch.cat([a, -a + 1e-3 * torch.randn(wide.out_features, n, generator=g)], 1))
        wide.bias.zero_()
    return gloronet.GloroNet(body, head, 0.1).eval()


@pytest.mark.parametrize("where", ["body", "head"])
def test_the_guard_accounts_for_both_programs_rounding(where):
    """Near the fused decision boundary of a cancelling layer, fused and chunked predictions differ
    by the rounding of the body (the gap ``δ``) or of the head (``γ_F``): the eval forward must
    still return the chunked program's class. A guard without either term fails one of these."""
    net = _cancelling_net(where)
    g = _gen(9)
    u1, u2 = torch.rand(200, 2048, generator=g) * 100, torch.rand(200, 2048, generator=g) * 100
    a, b, lo, hi = _boundary(net, torch.cat([u1, u1], 1), torch.cat([u2, u2], 1), 40)
    x = torch.cat([(a + t.clamp(0, 1)[:, None] * (b - a)).float()
                   for k in range(4, 30, 2) for t in (lo - 2.0**-k, hi + 2.0**-k)])
    chunked = _chunked(net, x).argmax(1)
    assert (_fused(net, x).argmax(1) != chunked).sum() > 10, "construction too weak"
    with torch.no_grad():
        assert torch.equal(net(x).argmax(1), chunked)


class _KernelCalls(TorchFunctionMode):
    """Records every sum-of-products kernel call: ``(name, terms summed per output)``."""

    SUMS = {F.linear: "linear", F.conv2d: "conv2d"}
    OTHER = {torch.matmul, torch.mm, torch.bmm, torch.einsum, F.conv1d, F.conv3d, F.conv_transpose2d,
             torch.Tensor.matmul, torch.Tensor.__matmul__, torch.addmm, torch.baddbmm}

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    float64 = False  # the last sum ran in float64

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SUMS:
            w = args[1] if len(args) > 1 else kwargs["weight"]
            self.calls.append((self.SUMS[func], w[0].numel()))
            self.float64 = w.dtype == torch.float64
        elif func in self.OTHER or getattr(func, "__module__", "") == "torch._C._fft":
            self.calls.append((getattr(func, "__name__", str(func)), -1))
        return func(*args, **kwargs)


def test_clear_points_run_fused_kernels_only_and_unsure_rows_are_replayed():
    net = _long_sums_net()
    x = _clear_points(net, 16, seed=3)
    with torch.no_grad():
        net(x)  # bounds and profile cached
        with _KernelCalls() as rec:
            out = net(x)
    assert rec.calls == [("linear", 4096), ("linear", 8), ("linear", 8)]  # one call per layer: nothing replayed
    assert torch.equal(out.argmax(1), _chunked(net, x).argmax(1))
    tie = _near_ties(net, 64, seed=1)
    disagree = _fused(net, tie).argmax(1) != _chunked(net, tie).argmax(1)
    batch = torch.cat([x, tie[disagree][:1]])
    with torch.no_grad(), _KernelCalls() as rec:
        out = net(batch)
    assert len(rec.calls) > 3  # the near tie was computed again by the chunked program
    assert torch.equal(out[-1], _chunked(net, batch[-1:])[0])


def test_certify_gives_the_certified_programs_class_and_loses_nothing_against_fast_false():
    """fast certify on near ties (which the guard cannot vouch for) and clear points just short of
    an ε: every class is the certified program's, every rechecked row is measured again by it,
    and no clear point certifies less far than with ``fast=False``."""
    net = _long_sums_net()
    ties, clear = _near_ties(net, 8, seed=9), _clear_points(net, 16, seed=10)
    x = torch.cat([ties, clear])
    exact = net.certify(x, epsilon=0.01, arithmetic="exact").radius
    at = [float(r) * (1 - 1e-5) for r in exact[len(ties):] if r > 0]  # every clear point just short of one
    assert len(at) == len(clear)
    replayed = []
    margin_pass = gloronet.GloroNet._margin_pass

    def spy(self, xs, arithmetic, fused=False, bounds=None):
        replayed.extend([] if fused else xs)
        return margin_pass(self, xs, arithmetic, fused, bounds)

    gloronet.GloroNet._margin_pass = spy
    try:
        cert = net.certify(x, epsilon=0.01, recheck_at=at)
    finally:
        gloronet.GloroNet._margin_pass = margin_pass
    unsure = _fused(net, ties).argmax(1) != _chunked(net, ties).argmax(1)
    assert unsure.any() and len(replayed) >= len(clear) + int(unsure.sum())
    assert torch.equal(cert.pred, _chunked(net, x).argmax(1))
    slow = net.certify(x[len(ties):], epsilon=0.01, fast=False, recheck_at=at)
    assert (cert.radius[len(ties):] >= slow.radius).all()


def test_a_net_without_error_models_runs_the_certified_program():
    net = gloronet.GloroNet(Sequential(Flatten(), LipLinear(512, 4), half_scale_without_error_model()), LipLinear(4, 3),
                            0.1).eval()
    x = torch.rand(5, 512, generator=_gen(4))
    with torch.no_grad():
        want = _chunked(net, x)
        assert torch.equal(net(x), want)
        with _KernelCalls() as rec:  # the next call knows: no fused pass first
            again = net(x)
    assert torch.equal(again, want)
    assert ("linear", 512) not in rec.calls and ("linear", 32) in rec.calls


# --------------------------------------------------------------------------- kernel structure
@contextlib.contextmanager
def _recorded_depths():
    """Rounding depths the error models are built with: every ``fp.gamma(d, float32)`` call (the
    dot-product models and the layers that assemble their own)."""
    depths: list[int] = []
    original = fp.gamma

    def spy(n, dtype):
        if dtype == torch.float32:
            depths.append(int(n))
        return original(n, dtype)

    fp.gamma = spy
    try:
        yield depths
    finally:
        fp.gamma = original


ARCHITECTURES = ["2c2f", "4c3f", "liresnet-6l32w", "chord-6l32w", "aol-mnist", "sll-mnist", "bro-mnist", "bronet-mnist"]


@pytest.mark.parametrize("mode", ["chunked", "fused"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_kernel_call_sums_within_the_depth_its_error_model_assumes(name, mode):
    """Per layer, in eval mode: every kernel call is a dense or conv sum (no FFT, no bare matmul),
    and sums at most as many terms per output as the depth of the layer's error model — built
    under the same mode. A fused kernel analysed with the chunked depth (``≈ n/8``) fails this."""
    torch.manual_seed(0)
    net = gloronet.models.create(name, (1, 28, 28), 10, 0.3).eval()
    ctx = accumulate.fused if mode == "fused" else contextlib.nullcontext
    h = torch.rand(2, 1, 28, 28, generator=_gen(5))
    checked = 0
    for step in [*body_steps(net.body), net.head]:
        with torch.no_grad(), ctx(), kernels.sound_kernels():
            step(h)  # derived weights are computed (and cached) on the first eval call
            with _KernelCalls() as rec:
                out = step(h)
        if rec.calls:
            assert all(terms > 0 for _, terms in rec.calls), f"{type(step).__name__}: {rec.calls}"
            with ctx(), _recorded_depths() as depths:
                if step is net.head:
                    depths.append(gloronet.gloro.applied_head(step)[2])
                else:
                    error_model_of(step, tuple(h.shape[1:]), torch.float32, 1.0)
            assert depths, f"{type(step).__name__} runs sums but its error model has no dot-product depth"
            assert max(t for _, t in rec.calls) <= max(depths), f"{type(step).__name__} ({mode}): {rec.calls} vs {depths}"
            checked += 1
        h = out
    assert checked >= 2


@pytest.mark.parametrize("fast", [True, False])
def test_the_centre_is_analysed_with_the_models_of_the_kernels_that_computed_it(monkeypatch, fast):
    """Every float certificate (and the guard) takes its centre error (:func:`radius.body_errors`,
    where the centre's models are chosen) from the error models of the kernels the pass at ``x``
    actually ran: fused (one 4096-term call) or chunked."""
    net = _long_sums_net()
    x = torch.cat([_near_ties(net, 8, seed=6), _clear_points(net, 8, seed=7)])
    seen = []
    original = gloronet.radius.body_errors
    rec = _KernelCalls()

    def spy(profile, norms, fused_centre):
        widest = max((t for name, t in rec.calls if name in ("linear", "conv2d")), default=0)
        seen.append((fused_centre, widest))
        centre = profile.fused if fused_centre else profile.models
        float64.append(rec.float64 and norms[0].dtype == torch.float64)  # the pass at x ran in float64
        ratios.append(max(c.rel / m.rel for c, m in zip(centre, profile.models) if m.rel > 0))
        rec.calls.clear()
        return original(profile, norms, fused_centre)

    float64, ratios = [], []
    exact = net.certify(x, epsilon=0.01, arithmetic="exact").radius
    just_below = [float(r) * (1 - 1e-5) for r in exact if r > 0]  # ε that the fp-sound radii fall short of
    monkeypatch.setattr(gloronet.radius, "body_errors", spy)
    with rec:
        cert = net.certify(x, epsilon=0.01, fast=fast, recheck_at=just_below)
    assert seen and all(f == (w == 4096) for f, w in seen), seen
    assert any(f for f, _ in seen) == fast
    # fast: the fused pass, the near ties measured again by the certified program, and around a
    # float64 centre (gloronet.centre64) — whose centre models are float64 ones (rel ~2⁻²⁹ smaller)
    assert len(seen) == (3 if fast else 1)
    assert [r < 1e-6 for r in ratios] == float64 == ([False, False, True] if fast else [False])
    assert cert.radius.shape == (len(x),)


def test_the_gpu_price_benchmark_runs_end_to_end_on_the_cpu(capsys):
    from conftest import load_benchmark

    load_benchmark("certify_price_cuda").main(["--device", "cpu", "--model", "2c2f", "--in-shape", "1x28x28",
                                               "--batch", "8", "--batches", "1", "--repeats", "1", "--train-steps", "1"])
    table = capsys.readouterr().out
    for row in ("plain fp32 (cuDNN, TF32)", "plain fp32 IEEE, no cuDNN", "net(x)", "certify fast=False"):
        assert f"| {row} |" in table


@pytest.mark.parametrize("change", ["max_chunks", "fused_context"])
def test_cached_bounds_follow_the_chunking_of_the_certified_program(monkeypatch, change):
    """The head's depth and the profiles are cached with the bounds; changing what decides the
    chunks (``accumulate.MAX_CHUNKS``, or certifying inside ``accumulate.fused()``, where the eval
    forward itself runs fused) must rebuild them: a certificate analysed with the old, shorter
    depth would be too large."""
    net = _long_sums_net()
    x = _clear_points(net, 4, seed=10)
    net.certify(x)
    before = net._sound_bounds()
    ctx = contextlib.nullcontext()
    if change == "max_chunks":
        monkeypatch.setattr(accumulate, "MAX_CHUNKS", 1)
    else:
        ctx = accumulate.fused()
    with ctx:
        net.certify(x)
        after = net._sound_bounds()
        profile = next(iter(after.profiles.values()))
    assert after is not before and after.chunking != before.chunking
    assert profile.models[1].rel == profile.fused[1].rel  # the certified program is the fused one now
    assert after.head.gamma == after.head.fused_gamma


def test_the_ab_benchmark_runs_a_shipped_model_and_adapts_an_older_certify(monkeypatch, capsys):
    """``benchmarks/certify_ab.py`` times plain twin, ``net(x)`` and ``certify`` of a shipped model;
    ``certify_price.tree_agnostic`` lets a ``certify`` without ``fast`` (a tree before issue 18)
    take ``fast=False`` and passes everything else through unchanged."""
    from conftest import load_benchmark

    price = load_benchmark("certify_price")

    class Old:
        def certify(self, b, epsilon=None):
            return ("old", b, epsilon)

    old = Old()
    price.tree_agnostic(old)
    assert old.certify("b", fast=False, epsilon=0.5) == ("old", "b", 0.5)
    new = _long_sums_net()
    bound = new.certify
    price.tree_agnostic(new)
    assert new.certify == bound  # a certify with `fast` is left alone

    ab = load_benchmark("certify_ab")
    images = torch.rand(6, 1, 28, 28)
    monkeypatch.setattr(price, "load_dataset", lambda name, split, limit: (images[:limit], torch.zeros(limit, dtype=torch.long)))
    monkeypatch.setattr(ab, "reuse_freed_memory", lambda: False)  # no process-wide malloc tuning inside the suite
    ab.main(["mnist-2c2f-eps0.3", "6", "1", "--batch", "4"])
    line = capsys.readouterr().out
    assert line.startswith("mnist-2c2f-eps0.3 ") and all(f"{k} " in line for k in ("plain", "net(x)", "certify"))
