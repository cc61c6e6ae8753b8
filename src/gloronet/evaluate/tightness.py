"""``gloronet tightness``: how much certified radius the sound bounds leave on the table.

Lipschitz constants. For every layer of the body, and for the whole body, an *empirical lower
bound*: power iteration on ``J(h)ᵀJ(h)`` (a float64 copy: difference quotients and autograd)
at the layer's inputs on data points — and, for the body, at as many uniform random inputs —
then the difference quotient ``‖m(h + t·v) − m(h)‖ / ‖t·v‖`` along the final direction, which
is a lower bound of the Lipschitz constant by definition. The sound bound (``lipschitz_bound``)
must lie above it; ``bound / lower`` is how loose it can at most be. For the body, the product of
the layer bounds against the body's lower bound shows what composing per-layer bounds costs.

Margins. At a data point with prediction ``j`` the certificate uses ``K_ji = L·‖w_j − w_i‖`` for
the margin ``m_i = z_j − z_i``; its local slope is ``‖∇_x m_i(x)‖ ≤ K_ji`` (checked: a larger
slope means ``K`` is not a bound). The ratio ``‖∇m_i‖ / K_ji`` (1 = tight) at the binding class
``i* = argmin_i m_i / K_ji``, and the first-order boundary distance ``min_i m_i / ‖∇m_i‖`` (not a
bound) against the certified ``min_i m_i / K_ji``, say how much radius a tighter ``K`` could give.
"""
from __future__ import annotations

import copy
import math
import time

import torch

from ..nn.base import body_steps, lipschitz_bound_of
from .common import Run, certify_points, steps

SLOPE_TOLERANCE = 1e-4  # relative slack for float32 gradients when checking ‖∇m‖ <= K


def _float64_copy(module: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(module).double().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def power_lower_bound(module: torch.nn.Module, h: torch.Tensor, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """(B,) lower bounds of the Lipschitz constant of ``module`` (float64) near each input of
    ``h``: power iteration ``v ← Jᵀ(Jv)`` at ``h`` — ``Jv`` as a difference quotient (exact for
    affine layers, and for piecewise-linear ones between kinks), ``Jᵀ`` by autograd — then the
    difference quotient ``‖m(h + t·v) − m(h)‖ / ‖t·v‖`` along the result (a lower bound by
    definition)."""
    h = h.double().detach()
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(h.shape, generator=gen, dtype=torch.float64).to(h.device)
    t = 1e-4 * _norm(h).clamp_min(1.0)
    with torch.no_grad():
        base = module(h)

    def quotient(v):
        v = v / _norm(v).clamp_min(1e-300)
        with torch.no_grad():
            diff = module(h + t * v) - base
        return v, diff / t.view(-1, *([1] * (diff.dim() - 1)))

    for _ in range(iters):
        v, jv = quotient(v)
        x = h.clone().requires_grad_(True)
        with torch.enable_grad():
            (v,) = torch.autograd.grad(module(x), x, grad_outputs=jv)
    v, jv = quotient(v)
    return jv.flatten(1).norm(dim=1).cpu()


def layer_table(run: Run, x: torch.Tensor, iters: int) -> tuple[list[dict], dict]:
    """Per body step: sound bound vs empirical lower bound at the step's inputs on ``x``; and the
    same for the whole body at ``x`` and at as many uniform random inputs."""
    net = run.net
    body = _float64_copy(net.body)
    layers = body_steps(body)
    h, rows = x.double(), []
    for k, (m, m32) in enumerate(zip(layers, body_steps(net.body))):
        bound = lipschitz_bound_of(m32)
        lower = float(power_lower_bound(m, h, iters).max())
        rows.append({"layer": k, "type": type(m).__name__, "in_shape": list(h.shape[1:]), "bound": bound, "lower": lower,
                     "ratio": bound / lower if lower > 0 else math.inf})
        with torch.no_grad():
            h = m(h)
    gen = torch.Generator().manual_seed(1)
    noise = torch.rand(x.shape, generator=gen, dtype=torch.float64).to(x.device)
    lower_data = float(power_lower_bound(body, x, iters).max())
    lower_noise = float(power_lower_bound(body, noise, iters).max())
    L = net.lipschitz_bound()
    lower = max(lower_data, lower_noise)
    return rows, {"bound": L, "lower": lower, "lower_data": lower_data, "lower_random": lower_noise,
                  "ratio": L / lower if lower > 0 else math.inf,
                  "product_of_layer_lowers": math.prod(r["lower"] for r in rows)}


def margin_slopes(run: Run, images: torch.Tensor, batch_size: int, progress: bool) -> dict:
    """Per point: ``‖∇m_i‖ / K_ji`` for every ``i ≠ j`` and the binding class, exact-arithmetic
    certified radius ``min m_i/K_ji`` and first-order distance ``min m_i/‖∇m_i‖``."""
    net, K = run.net, run.net.lipschitz_constant()
    ratios, binding, r_cert, r_lin = [], [], [], []
    for s in steps(len(images), batch_size, "margin gradients", progress):
        x = run.inputs(images[s : s + batch_size]).requires_grad_(True)
        with torch.enable_grad():
            z = net(x)
            j = z.detach().argmax(1)
            grads = []
            for i in range(z.shape[1]):
                (g,) = torch.autograd.grad((z.gather(1, j[:, None])[:, 0] - z[:, i]).sum(), x, retain_graph=True)
                grads.append(g.flatten(1).double().norm(dim=1))
        slope = torch.stack(grads, 1).cpu()  # (B, C); 0 on i = j
        Kj = K[j.cpu()]
        m = (z.detach().gather(1, j[:, None]) - z.detach()).double().cpu()
        own = torch.nn.functional.one_hot(j.cpu(), z.shape[1]).bool()
        rc = (m / Kj).masked_fill(own, math.inf)
        rl = (m / slope).masked_fill(own, math.inf)
        istar = rc.argmin(1)
        ratios.append((slope / Kj).masked_fill(own, math.nan))
        binding.append((slope / Kj).gather(1, istar[:, None])[:, 0])
        r_cert.append(rc.amin(1))
        r_lin.append(rl.amin(1))
    ratios_t = torch.cat(ratios)
    return {"all": ratios_t[~torch.isnan(ratios_t)], "binding": torch.cat(binding),
            "r_cert": torch.cat(r_cert), "r_lin": torch.cat(r_lin)}


def _median(t: torch.Tensor) -> float:
    t = t[torch.isfinite(t)]
    return float(t.median()) if len(t) else math.nan


def run_tightness(run: Run, images: torch.Tensor, iters: int = 50, batch_size: int = 256, progress: bool = False) -> dict:
    """The report of ``gloronet tightness`` on uint8 ``images`` (``_slopes``: per-point ratios for
    the plot)."""
    start = time.perf_counter()
    x = run.inputs(images[: min(len(images), 256)])
    rows, body = layer_table(run, x, iters)
    sl = margin_slopes(run, images, batch_size, progress)
    _, radius = certify_points(run, images)
    pos = sl["r_cert"] > 0
    violations = int((sl["all"] > 1 + SLOPE_TOLERANCE).sum())
    return {
        "n": len(images), "power_iterations": iters, "points_for_layers": len(x), "epsilon": run.epsilon,
        "dataset": run.dataset, "model": run.net.config,
        "layers": rows, "body": body,
        "margin": {
            "ratio_binding_median": _median(sl["binding"]),
            "ratio_all_pairs_median": _median(sl["all"]),
            "ratio_max": float(sl["all"].max()),
            "slope_violations": violations,
            "first_order_over_certified_radius_median": _median(sl["r_lin"][pos] / sl["r_cert"][pos]),
            "sound_over_exact_radius_median": _median(radius[pos] / sl["r_cert"][pos]),
            "certified_radius_median": _median(sl["r_cert"][pos]),
            "first_order_distance_median": _median(sl["r_lin"][pos]),
        },
        "seconds": time.perf_counter() - start,
        "_slopes": sl,
    }


def markdown(report: dict, title: str) -> str:
    b, m = report["body"], report["margin"]
    lines = [f"### {title}", "",
             f"Lipschitz constants: sound bound vs empirical lower bound (power iteration, {report['power_iterations']} "
             f"iterations, at {report['points_for_layers']} test points' activations; the body also at as many random inputs).", "",
             "| layer | type | input shape | sound bound | empirical lower bound | bound / lower |", "|---:|---|---|---:|---:|---:|"]
    for r in report["layers"]:
        lines.append(f"| {r['layer']} | {r['type']} | {'×'.join(map(str, r['in_shape']))} | {r['bound']:.5g} | "
                     f"{r['lower']:.5g} | {r['ratio']:.4f} |")
    lines += [f"| body | product of bounds | | {b['bound']:.5g} | {b['lower']:.5g} | **{b['ratio']:.3f}** |", "",
              f"Margins at {report['n']} test points (pred j, every i ≠ j): ‖∇(f_j − f_i)‖ / K_ji — median at the binding class "
              f"{m['ratio_binding_median']:.3f}, over all pairs {m['ratio_all_pairs_median']:.3f}, max {m['ratio_max']:.3f} "
              f"(> 1 would mean K is not a bound: {m['slope_violations']} such pairs).", "",
              f"Certified radius (exact arithmetic, median {m['certified_radius_median']:.4g}) vs first-order distance to the "
              f"boundary min_i m_i/‖∇m_i‖ (median {m['first_order_distance_median']:.4g}): the local linearisation is "
              f"{m['first_order_over_certified_radius_median']:.2f}x the certified radius (median); the floating-point-sound "
              f"radius is {m['sound_over_exact_radius_median']:.4f}x the exact-arithmetic one."]
    if m["slope_violations"]:
        lines += ["", "**SOUNDNESS BUG: a margin is steeper than its certified Lipschitz constant.**"]
    return "\n".join(lines) + "\n"
