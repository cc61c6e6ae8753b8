"""What a shipped model's card records, measured one way for the card and for its test.

:func:`measure` certifies the full test split twice — floating-point sound (``certify``'s default)
and in exact arithmetic (the GloRo paper's test) — and counts, besides clean accuracy and VRA, the
**borderline** points whose counts could move on another CPU: certification is deterministic on
one machine, but another CPU's kernels (oneDNN picks per ISA) may sum in another order. Both
machines' logits lie within the proven forward-error bound ``E`` of the exact network's, so
their margins differ by at most ``2E`` plus the difference of their ``E`` (≤ ``E``); the per-point
allowance ``r_exact − r_float`` is at least ``E``'s share of the radius. A point's certified
status at ε can therefore differ between CPUs only if ``|r_float − ε| ≤ 4·(r_exact − r_float)``,
and its clean prediction only if its float radius is ≤ that allowance (the top-two logits lie
within rounding of a tie). The card records these counts; the test demands exact equality on
the CPU kind the card was measured on and a difference within the borderline count elsewhere.
"""
from __future__ import annotations

import platform

import torch

BAND = 4.0  # the factor of the per-point allowance derived in the module docstring


def machine() -> dict:
    """The facts that decide which kernels certify runs (compared before demanding equal counts)."""
    return {"machine": platform.machine(), "torch": torch.__version__.split("+")[0],
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


@torch.no_grad()
def measure(net, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> dict:
    """Counts on ``(images uint8, labels)``: ``n``, ``correct``, ``certified_correct`` (fp-sound
    VRA count at the model's ε), ``certified_correct_exact`` and the borderline counts of the
    module docstring (``vra_borderline``, ``clean_borderline``), plus the rates."""
    eps = float(net.epsilon)
    radius, pred, r_exact = [], [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float().div_(255)
        fp, ex = net.certify(x), net.certify(x, arithmetic="exact")
        radius.append(fp.radius.double())
        pred.append(fp.pred)
        r_exact.append(ex.radius.double())
    radius, pred, r_exact = torch.cat(radius), torch.cat(pred), torch.cat(r_exact)
    correct = pred == labels
    allowance = (r_exact - radius).clamp_min(0)
    n = len(labels)
    counts = {
        "n": n,
        "correct": int(correct.sum()),
        "certified_correct": int((correct & (radius > eps)).sum()),
        "certified_correct_exact": int((correct & (r_exact > eps)).sum()),
        "vra_borderline": int(((radius - eps).abs() <= BAND * allowance).sum()),
        "clean_borderline": int((radius <= BAND * allowance).sum()),
    }
    counts.update(clean_accuracy=counts["correct"] / n, vra=counts["certified_correct"] / n,
                  vra_exact=counts["certified_correct_exact"] / n)
    return counts

