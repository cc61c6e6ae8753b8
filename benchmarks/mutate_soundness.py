"""Mutation testing of the soundness formulas: would the tests notice a wrong formula?

Each mutant weakens ONE thing the certificate rests on — a dropped term, a constant, a rounding
direction, a comparison — in ``rounding.py``, ``fp.py``, ``radius.py``, ``relaxed.py``,
``gloro.py``, ``head_distances.py``, ``bounds/`` or a layer's error model (the operator list is :data:`MUTANTS`, aimed
at the formulas; no random mutations). For every mutant the source tree is copied, the one edit
applied, and only the soundness test files (:data:`TESTS`, fastest first, ``-x``) run against
the copy; a mutant is *killed* when they fail (or time out), *survived* when they pass. The
attack tests (tests/test_fp_attacks.py, ~8 min) and the tightness tests of tests/test_bounds.py
(~50 s) are left out to fit the budget.

NOT part of ``make test``. One thread, progress written line by line (JSON) as it goes::

    OMP_NUM_THREADS=1 python benchmarks/mutate_soundness.py --out benchmarks/results/mutants.jsonl --budget-min 50
    python benchmarks/mutate_soundness.py --list
    OMP_NUM_THREADS=1 python benchmarks/mutate_soundness.py --only 77 78 --out /tmp/m.jsonl   # some mutants

The survivors of the last run and why each is harmless are in BENCHMARKS.md ("Mutation testing").
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = [  # the formula references first; tests/test_bounds.py (tightness, ~50 s) and the attack tests left out
    "tests/test_aol_sll.py", "tests/test_sll_rounding.py", "tests/test_bro_conv.py", "tests/test_reference.py", "tests/test_proofs.py", "tests/test_fp.py", "tests/test_certify_holes.py",
    "tests/test_relaxed.py", "tests/test_certified_bounds.py", "tests/test_fused_pass.py", "tests/test_centre64.py",
    "tests/test_norm_propagation.py", "tests/test_error_plan.py",
]
DESELECT: list[str] = ["tests/test_fused_pass.py::test_the_gpu_price_benchmark_runs_end_to_end_on_the_cpu"]  # needs benchmarks/, not a formula

R, FP, RA, RE, GL = "src/gloronet/rounding.py", "src/gloronet/fp.py", "src/gloronet/radius.py", "src/gloronet/relaxed.py", "src/gloronet/gloro.py"
HD = "src/gloronet/head_distances.py"
EIG, NONNEG, DENSE, CIRC, CEXP = (f"src/gloronet/bounds/{m}.py" for m in ("eigen", "nonneg", "dense", "circular", "conv_explicit"))
RES = "src/gloronet/nn/residual.py"
C64 = "src/gloronet/centre64.py"
EP = "src/gloronet/error_plan.py"
LSM = "src/gloronet/models/liresnet.py"
SLL, BRO, CONV, LIN, ACC = (f"src/gloronet/nn/{m}.py" for m in ("sll", "bro", "conv", "linear", "accumulate"))

# (file, exact text, replacement, what it breaks)
MUTANTS = [
    # ---- rounding.py: the arithmetic model
    (R, "INFLATE = 1.0 + 2.0**-30", "INFLATE = 1.0", "no inflation of evaluated error polynomials"),
    (R, "return math.nextafter(math.nextafter(nu / (1.0 - nu), math.inf) * INFLATE, math.inf)",
     "return math.nextafter(math.nextafter(nu / (1.0 + nu), math.inf) * INFLATE, math.inf)", "γ_n = nu/(1+nu)"),
    (R, "return math.nextafter(math.nextafter(nu / (1.0 - nu), math.inf) * INFLATE, math.inf)", "return nu", "γ_n = n·u"),
    (R, "        return 2.0**-24\n", "        return 2.0**-25\n", "float32 unit roundoff halved"),
    (R, "    return float(torch.finfo(dtype).tiny)", "    return 0.0", "no flushed-subnormal allowance (λ = 0)"),
    (R, "    return math.nextafter(float(x) * INFLATE, math.inf)\n\n\ndef round_up",
     "    return float(x) * INFLATE\n\n\ndef round_up", "up(): no final upward step"),
    (R, "    return math.nextafter(float(x), math.inf)", "    return float(x)", "round_up() rounds to nearest"),
    (R, "        out = round_up(out * f)", "        out = out * f", "mul_up() rounds to nearest"),
    (R, "(1 + 2 * gamma(d + 2, dtype))", "(1 + gamma(d + 2, dtype))", "norm bound: γ instead of 2γ"),
    (R, " + 2 * math.sqrt(d * smallest_normal(dtype))", "", "norm bound: no underflow term"),
    # ---- fp.py: per-layer error models and their composition
    (FP, "rel=up(g * abs_weight_norm + (1 + g) * lam * sqrt_m * math.sqrt(n_terms)),", "rel=up(g * abs_weight_norm),",
     "dot product: no flush term in rel"),
    (FP, "rel=up(g * abs_weight_norm + (1 + g) * lam * sqrt_m * math.sqrt(n_terms)),",
     "rel=up((1 + g) * lam * sqrt_m * math.sqrt(n_terms)),", "dot product: no γ‖|W|‖ term"),
    (FP, "abs=up(g * bias_norm + (1 + g) * lam * sqrt_m * (row_abs_sum + 2 * n_terms)),",
     "abs=up((1 + g) * lam * sqrt_m * (row_abs_sum + 2 * n_terms)),", "dot product: no bias rounding"),
    (FP, "abs=up(g * bias_norm + (1 + g) * lam * sqrt_m * (row_abs_sum + 2 * n_terms)),",
     "abs=up(g * bias_norm + (1 + g) * lam * sqrt_m * (row_abs_sum + n_terms)),", "dot product: 2n → n in abs"),
    (FP, "        offset=up(bias_norm),\n        peak_rel", "        offset=0.0,\n        peak_rel", "dot product: offset 0"),
    (FP, "peak_rel=up((1 + g) * abs_weight_norm),", "peak_rel=up(abs_weight_norm),", "dot product: peak without 1+γ"),
    (FP, "peak_abs=up((1 + g) * (bias_max + lam * (row_abs_sum + 2 * n_terms))),", "peak_abs=up((1 + g) * bias_max),",
     "dot product: peak without flush"),
    (FP, "rel=up(nxt.lip * self.rel + nxt.rel * (self.lip + self.rel)),", "rel=up(nxt.lip * self.rel + nxt.rel * self.lip),",
     "then(): rel·rel cross term dropped"),
    (FP, "abs=up(nxt.lip * self.abs + nxt.rel * (self.offset + self.abs) + nxt.abs),",
     "abs=up(nxt.lip * self.abs + nxt.rel * self.abs + nxt.abs),", "then(): offset not amplified by next rel"),
    (FP, "offset=up(nxt.offset + nxt.lip * self.offset),", "offset=up(nxt.offset),", "then(): offset not propagated"),
    (FP, "peak_abs=up(self.peak_abs + nxt.peak_rel * (self.offset + self.abs) + nxt.peak_abs),",
     "peak_abs=up(self.peak_abs + nxt.peak_rel * (self.offset + self.abs)),", "then(): next peak_abs dropped"),
    (FP, "lip=up(self.lip * nxt.lip),", "lip=up(max(self.lip, nxt.lip)),", "then(): lip max instead of product"),
    (FP, "return ErrorModel(lip=lip, abs=up(smallest_normal(dtype) * math.sqrt(numel)))", "return ErrorModel(lip=lip)",
     "elementwise: no flush allowance"),
    (FP, "n_terms = w.shape[1] + (b is not None)", "n_terms = w.shape[1]", "affine: bias not counted as a term"),
    (FP, "float(b.norm()) * math.sqrt(positions)", "float(b.norm())", "affine: bias counted at one position"),
    (FP, "out_numel=w.shape[0] * positions,", "out_numel=w.shape[0],", "affine: outputs at one position"),
    (FP, "    return torch.nextafter(bound * INFLATE, torch.full_like(bound, math.inf))", "    return bound",
     "norm_upper: no final inflation"),
    # ---- radius.py: propagation, head, margins, radii
    (RA, "    return torch.nextafter(t * fp.INFLATE, torch.full_like(t, math.inf))", "    return t", "radius _up() is identity"),
    (RA, "    return torch.nextafter(t, torch.full_like(t, -math.inf))", "    return t", "radius _down() is identity"),
    (RA, "row_norm = _up((w / scale[:, None]).norm(dim=1) * scale)", "row_norm = (w / scale[:, None]).norm(dim=1) * scale",
     "head row norms rounded to nearest"),
    (RA, "g_c = fp.gamma(n + 1, torch.float64)  #", "g_c = fp.gamma(1, torch.float64)  #",
     "head re-evaluation charged γ₁"),
    (RA, "y_centre = h @ w.t() + b if hd.reevaluate else y", "y_centre = y",
     "float32 logits used at x while charging float64 error"),
    (RA, "q.append(fp.up(m.lip * q[-1] + m.rel * (prefix[-1] + q[-1])))", "q.append(fp.up(m.lip * q[-1] + m.rel * prefix[-1]))",
     "Q recursion: rel·Q dropped"),
    (RA, "prefix.append(math.nextafter(prefix[-1] * m.lip, math.inf))", "prefix.append(prefix[-1])", "prefix Lipschitz not multiplied"),
    (EP, "        pc = _comb([(c.lip, pc), (c.rel, rho)], c.abs)",
     "        pc = _comb([(c.lip, pc), (c.rel, rho)])", "centre error: abs dropped"),
    (EP, "        p = _comb([(m.lip, p), (m.rel, ball)], m.abs)",
     "        p = _comb([(m.lip, p), (m.rel, rho)], m.abs)", "ball error: measured at ρ, not the ball"),
    (RA, "grow = profile.prefix_lip[-1] + profile.q[-1]", "grow = profile.prefix_lip[-1]", "growth of the head input: Q dropped"),
    (RA, "e_centre = hd.centre_gamma * reach + hd.centre_lam_rel", "e_centre = hd.centre_lam_rel", "head centre: γ·reach dropped"),
    (RA, "e_ball = hd.gamma * (reach + row * delta[:, None])", "e_ball = hd.gamma * reach", "head ball: body error not amplified"),
    (RA, "err=_up(e_centre + e_ball)", "err=_up(e_ball)", "head centre error dropped"),
    (RA, "low = _down(margins - _up(Da * self.body_err[:, None] + pair(self.err)))", "low = _down(margins - _up(pair(self.err)))",
     "margin: body error dropped"),
    (RA, "slope = _up(Ka + Da * self.body_slope + pair(", "slope = _up(Ka + pair(", "slope: body Q term dropped"),
    (RA, "[None, :].expand_as(y)) * self.grow)", "[None, :].expand_as(y)))", "slope: head terms not grown"),
    (RA, "_down(low / slope).nan_to_num(", "torch.nextafter(low / slope, torch.full_like(low, math.inf)).nan_to_num(",
     "radius rounded up"),
    (RA, "        slope > 0,\n", "        slope >= 0,\n", "radius: slope ≥ 0 divides by zero slope"),
    (RA, "    return torch.minimum(radius, bounds.cap)", "    return radius", "GloRo radius: no overflow cap"),
    (RA, "growth = tuple(fp.up(r * fp.up(lip + qq)) for", "growth = tuple(fp.up(lip + qq) for", "overflow: peak_rel not on growth"),
    (RA, "    return torch.where(room > 0, r, 0.0).amin(dim=1)",
     "    return torch.where(room >= 0, r, 0.0).amin(dim=1)", "overflow: no room still certifies"),
    (EP, "    loads = [_comb([(r, ball)], a) for r, a, ball in", "    loads = [_comb([(r, ball)]) for r, a, ball in",
     "overflow: peak_abs dropped"),
    # ---- relaxed.py
    (RE, "    ok = radii > epsilon", "    ok = radii >= epsilon", "relaxed: a radius equal to ε certifies"),
    (RE, "suffix = by_rank.flip(2).cummin(dim=2).values.flip(2)", "suffix = by_rank.flip(2).cummax(dim=2).values.flip(2)",
     "relaxed: max over the outside classes"),
    (RE, "torch.full_like(suffix[..., :1], math.inf)], dim=2)[:, :, 1 : Kmax + 1]",
     "torch.full_like(suffix[..., :1], math.inf)], dim=2)[:, :, 2 : Kmax + 2]", "relaxed: S_k's boundary class skipped"),
    (RE, "    radii = torch.minimum(radii, bounds.cap[:, None])", "", "relaxed: no overflow cap"),
    # ---- gloro.py
    (GL, "certified=radius > eps,", "certified=radius >= eps,", "GloRo: a radius equal to ε certifies"),
    (HD, ".mul(1 + GRAM_SLACK)", "", "head distances: no rounding allowance"),
    (GL, "K = torch.nextafter(D * L, torch.full_like(D, math.inf))", "K = D * L", "K rounded to nearest"),
    # ---- bounds: certified eigenvalues
    (EIG, " + g_c * fro_l2 + 4 * n * n * lam)", " + 4 * n * n * lam)", "residual: product rounding dropped"),
    (EIG, "_up(math.sqrt(2) * (1 + gamma64(1)) * fro_e", "_up((1 + gamma64(1)) * fro_e", "residual: lower triangle only (no √2)"),
    (EIG, "allowance = _up(residual_bound(m, factor) + U * (mu.abs() + dmax) + err)", "allowance = _up(residual_bound(m, factor) + err)",
     "Cholesky: diagonal rounding of μI − G dropped"),
    (EIG, "allowance = _up(residual_bound(m, factor) + U * (mu.abs() + dmax) + err)",
     "allowance = _up(residual_bound(m, factor) + U * (mu.abs() + dmax))", "Cholesky: the Gram allowance err dropped"),
    (EIG, "allowance = _up(residual_bound(m, factor) + U * (mu.abs() + dmax) + err)", "allowance = _up(U * (mu.abs() + dmax) + err)",
     "Cholesky: residual not measured (trusts the factorisation)"),
    (EIG, "radius = (lower.sum(dim=-1) + lower.sum(dim=-2))", "radius = lower.sum(dim=-1)", "Gershgorin: half the row"),
    (EIG, "    m = torch.neg(g)\n", "    m = g.clone()\n", "shift: μI + G instead of μI − G"),
    (EIG, "mu = t + s * (n + 2) * U * (t.abs() + dmax[pending])", "mu = t", "eigensolver candidates with no slack"),
    (EIG, "fro_l2 = diag.sum(dim=-1) * (1 + 4 * gamma64(n)) + ", "fro_l2 = diag.sum(dim=-1) + ", "‖L‖_F² rounded to nearest"),
    (EIG, "        e.diagonal(dim1=-2, dim2=-1).imag.zero_()\n", "        pass\n", "complex residual: imaginary diagonal kept"),
    # ---- bounds: allowances of forming Gram matrices, |W| norms
    (NONNEG, "round_up(1 + gamma64(t))", "1.0", "|A| tap sum: no 1 + γ_taps"),
    (NONNEG, "rel = 2.0 ** -52 * (a.shape[0] + a.shape[1] + 8)", "rel = 0.0", "Collatz–Wielandt: no rounding allowance"),
    (DENSE, "err = up(2 * gamma64(a.shape[-1] + 64) * fro)", "err = 0.0", "dense Gram: no rounding allowance"),
    (DENSE, "err = up(2 * gamma64(a.shape[-1] + 64) * fro)", "err = up(gamma64(a.shape[-1]) * fro)", "dense Gram: γ_q (slack removed)"),
    (CIRC, "err = up(4 * gamma64(m + taps + offsets + 64) * taps * fro)", "err = 0.0", "circular Gram: no rounding allowance"),
    (CIRC, "    return max(first_bound, *parts)", "    return max([0.0, *parts])", "circular: the first frequency unproved"),
    (CIRC, 'mu = state["theta"] * (1 + TAU)', 'mu = state["theta"]', "frequency candidates with no margin"),
    (CEXP, "err = up(gamma64(depth) * row * col * (1 + 2 * gamma64(w.numel())))", "err = 0.0", "explicit conv Gram: no allowance"),
    # ---- a layer's error model
    (RES, "float(as_float64(r).abs().flatten(1).sum(dim=1).max())", "float(r.detach().abs().flatten(1).sum(dim=1).max())",
     "LiResBlock: row_abs summed in float32"),
    (RES, "return round_up(exact_part + 2.0**-52 * (1.0 + float(centre)))", "return round_up(exact_part)",
     "LiResBlock: forming I + R in float64 unaccounted"),
    (RES, "rel=fp.up(g_n * a_r + g2 + (1 + g_n)", "rel=fp.up(g_n * a_r + (1 + g_n)", "LiResBlock: the skip's two roundings dropped"),
    # ---- issue 20: AOL / SLL / BRO layers and the error models of the SLL residual
    (SLL, "    return max(1.0, round_up(mu - 1.0))", "    return 1.0", "SLL: bound 1 whatever μ"),
    (SLL, "    return max(1.0, round_up(mu - 1.0))", "    return round_up(mu - 1.0)", "SLL: no max with 1 (μ − 1 < 1)"),
    (SLL, "    mu = mul_up(norm_b, norm_b)", "    mu = norm_b", "SLL: μ = ‖B‖ instead of ‖B‖²"),
    (SLL, "    return up(g / (1.0 - g))", "    return 0.0", "SLL: forming B = √c·W in float64 unaccounted"),
    (FP, "rel=up(u * scale_max + lam),", "rel=up(lam),", "scale_model: no product rounding"),
    (FP, "        abs=up(lam * math.sqrt(numel)),\n        peak_rel=up((1 + u) * scale_max),",
     "        abs=0.0,\n        peak_rel=up((1 + u) * scale_max),", "scale_model: no flush allowance"),
    (FP, "peak_rel=up((1 + u) * scale_max),", "peak_rel=scale_max,", "scale_model: peak without 1 + u"),
    (FP, "    grow = branch.lip + branch.rel\n", "    grow = branch.lip\n", "residual_model: the branch's rel not in its growth"),
    (FP, "rel=up(branch.rel + u * (1 + grow)),", "rel=up(branch.rel),", "residual_model: the sum's rounding dropped"),
    (FP, "abs=up(branch.abs + u * (branch.offset + branch.abs) + lam * math.sqrt(numel)),",
     "abs=up(branch.abs + lam * math.sqrt(numel)),", "residual_model: u·(offset + abs) dropped"),
    (FP, "peak_rel=up(branch.peak_rel + (1 + u) * (1 + grow)),", "peak_rel=up(branch.peak_rel + 1 + grow),",
     "residual_model: peak without 1 + u"),
    (FP, "peak_abs=up(branch.peak_abs + (1 + u) * (branch.offset + branch.abs) + lam),",
     "peak_abs=up(branch.peak_abs + (1 + u) * branch.abs + lam),", "residual_model: peak without the offset"),
    (CONV, "return conv2d_norm_bound(self._applied_weight(), hw,", "return conv2d_norm_bound(self.weight.detach(), hw,",
     "conv bound of the raw weight (AOL's derived kernel bypassed)"),
    (LIN, "        return dense_norm_bound(self._applied_weight())",
     "        return dense_norm_bound(getattr(self, 'weight', self._applied_weight()).detach())",
     "dense bound of the raw weight (AOL's derived weight bypassed)"),
    (BRO, "lambda: circular_conv_bound(k, self.canvas_hw))",
     "lambda: circular_conv_bound(spatial_kernel(bro_spectrum(self.reflector.detach().double(), self.canvas_hw, "
     "self.out_channels, self.in_channels), self.canvas_hw), self.canvas_hw))", "BRO conv: bound of the unrounded float64 kernel"),
    (BRO, "lambda: circular_conv_bound(k, self.canvas_hw))", "lambda: 1.0)", "BRO conv: bound 1 by construction"),
    # ---- issue 18: the fused eval pass and its guard
    (GL, "radius_mod.body_errors(profile, norms, fused_centre=fused)", "radius_mod.body_errors(profile, norms, fused_centre=False)",
     "fused centre analysed with the chunked models"),
    (RA, "    return ~(sure.all(dim=1) & torch.isfinite(y).all(dim=1) & torch.isfinite(delta))",
     "    return torch.zeros_like(pred, dtype=torch.bool)", "guard: the fused prediction always trusted"),
    (RA, "        both = fp.up(g_f + g)  #", "        both = g  #", "guard: the fused head's rounding dropped"),
    (RA, "    need = _up(torch.addcmul(err.gather(1, idx) + err, D.to(dev)[pred], delta[:, None]))",
     "    need = _up(err.gather(1, idx) + err)", "guard: the two bodies' gap dropped"),
    (ACC, "    m = chunk_count(n_terms, splittable)\n    per_slice",
     "    m = max(1, min(MAX_CHUNKS, splittable, math.ceil(n_terms / MIN_CHUNK)))\n    per_slice",
     "fused(): the chunked depth reported for fused kernels"),
    # ---- SLL blocks' scaled-coordinate error model; subnormal scales (DAZ)
    (FP, "rel=up(u * scale_max + lam),", "rel=up(u * scale_max),", "scale_model: a subnormal scale read as 0 (DAZ) unaccounted"),
    (SLL, "e1 = (up(g1 * Na + sp * l1 * math.sqrt(n1))", "e1 = (up(sp * l1 * math.sqrt(n1))", "SLL scaled model: the first sum's rounding dropped"),
    (SLL, "up(g1 * sb + sp * l1 * (sc[\"R1\"] + 2 * n1)))", "up(g1 * sb + l1 * (sc[\"R1\"] + 2 * n1)))",
     "SLL scaled model: the first sum's flushes not scaled by max √c"),
    (SLL, "rel=up(g2 * Na * z[0] + N * e2[0] + lam2[0]),", "rel=up(N * e2[0] + lam2[0]),", "SLL scaled model: the second sum's rounding dropped"),
    # ---- the float64 centre of re-measured rows (gloronet.centre64)
    (GL, "radius_mod.make_profile(chunked.models, bounds.head, bounds.dtype, models64)",
     "radius_mod.make_profile(models64, bounds.head, bounds.dtype, models64)", "float64 centre: the ball's error from the float64 models"),
    (C64, 'if "float64_map" in vars(t) else None', 'if hasattr(m, "float64_map") else None', "float64 centre: subclasses accepted"),
    # ---- the norms the fused pass propagates instead of measuring
    (EP, "fp.up(model.lip + model.rel), fp.up(model.offset + model.abs)", "fp.up(model.lip + model.rel), fp.up(model.abs)",
     "propagated norms: the bias (offset) dropped"),
    (EP, "fp.up(model.lip + model.rel), fp.up(model.offset + model.abs)", "fp.up(model.lip), fp.up(model.offset + model.abs)",
     "propagated norms: the step's own rounding (rel) dropped"),
    (EP, "    index, rhos = _norm_forms(centre_models, measured)", "    index, rhos = _norm_forms(models, measured)", "propagated norms: the certified program's models for the fused pass"),
    (RA, " & torch.isfinite(delta)) | _may_overflow(profile, errors)", " & torch.isfinite(delta))",
     "guard: rows that may overflow at x vouched for"),
    # ---- the float64 maps of LiResNet's steps
    (RES, "        shift = self.shift().detach().to(torch.float64)\n", "        shift = self.bias.detach().to(torch.float64)\n",
     "float64 centre: LiResNet block without its running mean"),
    (LSM, "        return lambda h: h + s32\n", "        return lambda h: h + self.shift\n",
     "float64 centre: the input shift not rounded to float32 as the float32 forward adds it"),
    # ---- the body's error recursion as one affine map (gloronet.error_plan)
    (EP, "out * fp.INFLATE + tiny, out.new_tensor(math.inf))", "out, out.new_tensor(math.inf))",
     "error plan: the product of the norms and coefficients not inflated"),
    (EP, ".nan_to_num_(nan=math.inf, posinf=math.inf)", ".nan_to_num_(nan=0.0, posinf=math.inf)", "error plan: NaN (0·∞) read as 0"),
    (EP, ".nan_to_num_(nan=math.inf, posinf=math.inf)", ".nan_to_num_(nan=math.inf)", "error plan: ∞ clipped to the largest float"),
    (EP, "    delta = _comb([(1.0, pc), (1.0, p)])", "    delta = p", "error plan: the centre's error left out of delta"),
    # ---- deferred norms (gloronet.gloro._Deferred)
    (GL, "            if a._version == version:\n", "            if True:\n", "deferred norms: an activation changed in place measured anyway"),
    (GL, "deferred.append(([len(norms)], a, a._version))", "deferred.append(([len(norms) - 1], a, a._version))",
     "deferred norms: a measurement filed at the step before"),
]


def _apply(tree: Path, path: str, before: str, after: str) -> str:
    text = (ROOT / path).read_text()
    count = text.count(before)
    if count != 1:
        raise SystemExit(f"mutate_soundness: {path}: the text to mutate occurs {count} times: {before!r}")
    (tree / path).write_text(text.replace(before, after))
    return text


def _run_tests(tree: Path, timeout: float) -> tuple[str, float, str]:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS,
           *[a for d in DESELECT for a in ("--deselect", d)]]
    t = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed (timeout)", time.perf_counter() - t, ""
    seconds = time.perf_counter() - t
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in out.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return ("survived" if out.returncode == 0 else "killed"), seconds, (failed[0] if failed else out.stdout[-300:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mutants.jsonl")
    ap.add_argument("--budget-min", type=float, default=50.0, help="stop starting mutants after this many minutes")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant's test run")
    ap.add_argument("--only", type=int, nargs="*", help="mutant numbers to run")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for i, (path, _, _, what) in enumerate(MUTANTS):
            print(f"{i:3d} {path.removeprefix('src/gloronet/')}: {what}")
        return 0
    start = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gloronet-mutants-") as tmp, open(args.out, "w") as log:
        tree = Path(tmp)
        shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        shutil.copytree(ROOT / "tests", tree / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
        status, seconds, detail = _run_tests(tree, args.timeout)
        log.write(json.dumps({"mutant": "baseline", "status": status, "seconds": round(seconds, 1), "detail": detail}) + "\n")
        log.flush()
        if status != "survived":
            print(f"mutate_soundness: the tests fail without any mutation: {detail}", file=sys.stderr)
            return 2
        for i, (path, before, after, what) in enumerate(MUTANTS):
            if args.only is not None and i not in args.only:
                continue
            if time.perf_counter() - start > 60 * args.budget_min:
                log.write(json.dumps({"mutant": i, "status": "not run (budget)", "file": path, "what": what}) + "\n")
                continue
            original = _apply(tree, path, before, after)
            try:
                status, seconds, detail = _run_tests(tree, args.timeout)
            finally:
                (tree / path).write_text(original)
            row = {"mutant": i, "file": path.removeprefix("src/gloronet/"), "what": what, "status": status,
                   "seconds": round(seconds, 1), "detail": detail}
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"{i:3d} {status:9s} {seconds:6.1f}s  {row['file']}: {what}  {detail if status.startswith('killed') else ''}",
                  flush=True)
    print(f"mutate_soundness: {time.perf_counter() - start:.0f} s; progress and results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
