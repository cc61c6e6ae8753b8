"""Cross-check `gloronet attack` against AutoAttack on the same test points of a run.

AutoAttack (Croce & Hein, ICML 2020), standard L2 version: APGD-CE, APGD-T, FAB-T and Square.
It is not a gloronet dependency. This script needs an importable copy: the PyPI repackaging
`pyautoattack`, or upstream `autoattack` from its repository. Both attacks run at ε in [0, 1]
against the label. Printed: the empirical robust accuracy of each, the points only one of them
broke, and a soundness check (AutoAttack's adversarial points never break a certified point).

    GLORONET_DATA=../shared/data python benchmarks/attack_crosscheck.py runs/x --limit 500
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from gloronet.evaluate.attack import attack_points
from gloronet.evaluate.common import certify_points, open_run
from gloronet.evaluate.pgd import AttackConfig, margin_score


def autoattack(net, x, y, eps, batch_size):
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        from autoattack import AutoAttack
    adversary = AutoAttack(net, norm="L2", eps=eps, version="standard", seed=0)
    out = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    return out[0] if isinstance(out, tuple) else out  # pyautoattack returns (x_adv, y_adv)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=250)
    a = p.parse_args()
    run = open_run(a.run)
    eps = run.epsilon
    images, labels = run.load("test", a.limit)
    pred, radius = certify_points(run, images)
    certified = (pred == labels) & (radius > eps)

    t0 = time.perf_counter()
    _, m_ours, d_ours, _, _ = attack_points(run, images, labels, torch.full((len(images),), eps, dtype=torch.float64),
                                            AttackConfig(), (0.0, 1.0), a.batch_size, True, "gloronet attack")
    ours_s = time.perf_counter() - t0
    broken_ours = (m_ours >= 0) & (d_ours <= eps)

    x = run.inputs(images)
    t0 = time.perf_counter()
    x_aa = autoattack(run.net, x, labels.to(run.device), eps, a.batch_size)
    aa_s = time.perf_counter() - t0
    with torch.no_grad():
        m_aa = margin_score(run.net(x_aa), labels.to(run.device)).cpu()
    d_aa = (x_aa.double() - x.double()).flatten(1).norm(dim=1).cpu()
    broken_aa = (m_aa >= 0) & (d_aa <= eps * (1 + 1e-6))
    out = {
        "n": len(images), "epsilon": eps, "vra": float(certified.double().mean()),
        "robust_accuracy_gloronet": 1 - float(broken_ours.double().mean()),
        "robust_accuracy_autoattack": 1 - float(broken_aa.double().mean()),
        "broken_only_by_gloronet": int((broken_ours & ~broken_aa).sum()),
        "broken_only_by_autoattack": int((broken_aa & ~broken_ours).sum()),
        "certified_broken_by_autoattack": int((broken_aa & certified).sum()),
        "seconds_gloronet": ours_s, "seconds_autoattack": aa_s,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
