"""The head's pairwise row-distance bounds (gloronet.head_distances): both evaluations are upper
bounds of the exact distance (computed in rational arithmetic) and tight, including near-identical
rows, tiny rows (underflow) and huge rows (overflow), float32 and float64 weights."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from gloronet.head_distances import pairwise_row_distances_bound


def exact_distance(w: torch.Tensor, i: int, j: int) -> float:
    """‖w_i − w_j‖ from exact rationals (the float sqrt of the exact square, scaled by a power of
    four: within 2 ulp of the truth, which the tests' factor 1 + 4u absorbs)."""
    sq = sum((Fraction(float(a)) - Fraction(float(b))) ** 2 for a, b in zip(w[i].tolist(), w[j].tolist()))
    if sq == 0:
        return 0.0
    k = (sq.numerator.bit_length() - sq.denominator.bit_length()) // 2  # sq / 4^k ~ 1: no under/overflow
    return math.ldexp(math.sqrt(float(sq / Fraction(4) ** k if k >= 0 else sq * Fraction(4) ** -k)), k)


def _cases():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 64, generator=g)
    near = base.clone()
    near[1] = near[0]
    near[1, 5] += 1e-6  # near-identical rows
    near[2] = near[0]  # identical rows
    yield "random f32", base
    yield "near f32", near
    yield "random f64", torch.randn(12, 64, generator=g, dtype=torch.float64)
    yield "tiny f64", torch.randn(12, 64, generator=g, dtype=torch.float64) * 1e-170
    yield "huge f64", torch.randn(12, 64, generator=g, dtype=torch.float64) * 1e300
    mixed = torch.randn(12, 64, generator=g, dtype=torch.float64)
    mixed[:, :8] *= 1e-310  # entries that become subnormal in the Gram scaling
    yield "mixed scales f64", mixed


@pytest.mark.parametrize("gram_work", [1 << 40, 0], ids=["differences", "gram"])
@pytest.mark.parametrize("name,w", list(_cases()), ids=[n for n, _ in _cases()])
def test_bound_is_sound_and_tight(name, w, gram_work):
    d = pairwise_row_distances_bound(w, gram_work=gram_work)
    assert d.dtype == torch.float64 and torch.equal(d.diagonal(), torch.zeros(len(w), dtype=torch.float64))
    norm = float(w.double().norm(dim=1).max())
    for i in range(len(w)):
        for j in range(len(w)):
            if i == j:
                continue
            true = exact_distance(w, i, j)
            assert d[i, j] >= true * (1 + 4 * 2.0**-53), (name, i, j, float(d[i, j]), true)
            slack = 1e-7 * true + 1e-300  # differences: GRAM_SLACK = 1e-8 relative on the square
            if gram_work == 0:  # Gram: near-identical rows lose ~√γ_D·‖w‖
                slack = 1e-9 * true + 1e-6 * norm
            assert d[i, j] <= true + slack, (name, i, j, float(d[i, j]), true)


def test_gram_is_used_for_large_heads_and_agrees():
    g = torch.Generator().manual_seed(1)
    w = torch.nn.functional.normalize(torch.randn(200, 512, generator=g), dim=1)  # an LLN head
    exact = pairwise_row_distances_bound(w, gram_work=1 << 40)
    gram = pairwise_row_distances_bound(w, gram_work=0)
    assert (gram >= exact * (1 - 1e-7)).all() and (gram <= exact + 1e-6).all()
