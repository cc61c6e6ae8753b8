"""``gloronet overfit``: robust overfitting and attributions, against a non-robust twin.

Robust overfitting (Rice, Wong & Kolter, ICML 2020): training VRA keeps rising while test VRA
peaks and falls. A run trained with ``train_vra_subset: N`` logs the sound clean accuracy and VRA
of its first ``N`` (un-augmented) training images next to the test numbers at every eval epoch
(``log.csv``); this study plots both and their gaps over the epochs, and measures the gap of the
final model (and of the twin) on ``--limit`` training and test images now.

Attributions: integrated gradients and saliency (:mod:`.attributions`) of the true label's
logit, for the robust model and its non-robust twin on the same test images, as one picture grid,
with the concentration (top-10% share, Gini) and spatial coherence (neighbour correlation) of
each map, averaged over up to 200 test images.
"""
from __future__ import annotations

import csv
import time

import torch

from .attributions import gini, integrated_gradients, neighbour_correlation, saliency, top_share
from .common import Run, certify_points, pct, steps, vra

LOG_COLUMNS = ("train_subset_acc", "train_subset_vra", "test_acc", "test_vra")


def read_curves(run: Run) -> dict | None:
    """Per-epoch train-subset / test accuracy and VRA from ``log.csv`` (epochs where all four
    were measured); ``None`` when the log has no train-subset columns (trained without
    ``train_vra_subset``) or no such epoch."""
    path = run.path / "log.csv"
    if not path.exists():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows = [r for r in rows if all(r.get(c) not in (None, "") for c in LOG_COLUMNS)]
    if not rows:
        return None
    curves = {"epoch": [int(r["epoch"]) for r in rows]}
    curves.update({c: [float(r[c]) for r in rows] for c in LOG_COLUMNS})
    best = max(range(len(rows)), key=lambda i: curves["test_vra"][i])
    curves["summary"] = {
        "best_test_vra": curves["test_vra"][best], "best_epoch": curves["epoch"][best],
        "last_test_vra": curves["test_vra"][-1], "last_train_subset_vra": curves["train_subset_vra"][-1],
        "last_vra_gap": curves["train_subset_vra"][-1] - curves["test_vra"][-1],
        "max_vra_gap": max(a - b for a, b in zip(curves["train_subset_vra"], curves["test_vra"])),
    }
    return curves


def generalisation_gap(run: Run, n: int, progress: bool = False) -> dict:
    """Clean accuracy and VRA at the run's ε on its first ``n`` training and test images."""
    out = {}
    for split, (x, y) in (("train", run.training_set()), ("test", run.load("test"))):
        x, y = x[:n], y[:n]
        pred, radius = certify_points(run, x, progress=progress, desc=f"certify {split}")
        out[f"{split}_acc"] = float((pred == y).double().mean())
        out[f"{split}_vra"] = vra(pred == y, radius, run.epsilon)
    out["acc_gap"] = out["train_acc"] - out["test_acc"]
    out["vra_gap"] = out["train_vra"] - out["test_vra"]
    return out


def attribution_maps(run: Run, images, labels, ig_steps: int, batch_size: int, progress: bool) -> dict:
    """Integrated gradients and saliency of the true label's logit on every image, and the
    relative completeness error of IG (``|Σ IG − (z_c(x) − z_c(0))| / |z_c(x) − z_c(0)|``)."""
    out = {"ig": [], "saliency": [], "completeness_error": []}
    for i in steps(len(images), batch_size, "attributions", progress):
        x, c = run.inputs(images[i : i + batch_size]), labels[i : i + batch_size].to(run.device)
        ig = integrated_gradients(run.net, x, c, ig_steps)
        with torch.no_grad():
            delta = run.net(x).gather(1, c[:, None])[:, 0] - run.net(torch.zeros_like(x)).gather(1, c[:, None])[:, 0]
        out["completeness_error"].append(((ig.flatten(1).sum(1) - delta).abs() / delta.abs().clamp_min(1e-12)).cpu())
        out["ig"].append(ig.cpu())
        out["saliency"].append(saliency(run.net, x, c).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def summarise(maps: dict) -> dict:
    """Mean concentration and coherence of each kind of map; median IG completeness error."""
    out = {f"{kind}_{name}": float(fn(maps[kind]).mean()) for kind in ("ig", "saliency")
           for name, fn in (("top10_share", top_share), ("gini", gini), ("neighbour_corr", neighbour_correlation))}
    out["ig_completeness_error_median"] = float(maps["completeness_error"].double().median())
    return out


def run_overfit(run: Run, twin: Run | None, limit: int | None, n_images: int = 8, ig_steps: int = 32,
                batch_size: int = 128, progress: bool = False) -> dict:
    """The report of ``gloronet overfit`` (``_grid``: images and maps for the picture)."""
    start = time.perf_counter()
    n = limit or 1000
    models = {"robust": run, **({"twin": twin} if twin is not None else {})}
    x, y = run.load("test", max(n_images, min(n, 200)))
    final, attrib, maps = {}, {}, {}
    for name, r in models.items():
        final[name] = generalisation_gap(r, n, progress)
        maps[name] = attribution_maps(r, x, y, ig_steps, batch_size, progress)
        attrib[name] = summarise(maps[name])
    return {
        "epsilon": run.epsilon, "dataset": run.dataset, "n": n, "twin_run": str(twin.path) if twin else None,
        "curves": read_curves(run), "twin_curves": read_curves(twin) if twin is not None else None,
        "final": final,
        "attributions": {"method": f"integrated gradients ({ig_steps} midpoint steps, black baseline) and saliency "
                                   "of the true label's logit", "n_images": len(x), **attrib},
        "seconds": time.perf_counter() - start,
        "_grid": {"images": x[:n_images].float().div(255), "labels": y[:n_images], "class_names": run.class_names,
                  "maps": {f"{name} {label}": m[kind][:n_images] for kind, label in (("ig", "IG"), ("saliency", "saliency"))
                           for name, m in maps.items()}},
    }


def markdown(report: dict, title: str) -> str:
    lines = [f"### {title}", ""]
    c = report["curves"]
    if c is None:
        lines += ["The run's log.csv has no train-subset VRA (train with `--train_vra_subset=N` to log it every "
                  "`eval_every` epochs); only the final model's gap is shown.", ""]
    else:
        s = c["summary"]
        lines += [f"From log.csv ({len(c['epoch'])} evaluated epochs): best test VRA {pct(s['best_test_vra'])} at epoch "
                  f"{s['best_epoch']}, last {pct(s['last_test_vra'])}; train-subset VRA at the end "
                  f"{pct(s['last_train_subset_vra'])}; VRA gap (train − test) last {100 * s['last_vra_gap']:.2f} points, "
                  f"largest {100 * s['max_vra_gap']:.2f} points.", ""]
    lines += [f"Final model, first {report['n']} training and test images, ε = {report['epsilon']:g}:", "",
              "| model | train acc | test acc | acc gap | train VRA | test VRA | VRA gap |", "|---|---:|---:|---:|---:|---:|---:|"]
    for m, f in report["final"].items():
        lines.append(f"| {m} | {pct(f['train_acc'])} | {pct(f['test_acc'])} | {100 * f['acc_gap']:.2f} | "
                     f"{pct(f['train_vra'])} | {pct(f['test_vra'])} | {100 * f['vra_gap']:.2f} |")
    a = report["attributions"]
    lines += ["", f"Attributions ({a['method']}; means over {a['n_images']} test images): share of the attribution "
                  "mass in the top 10% of pixels, Gini coefficient, correlation between neighbouring pixels.", "",
              "| model | map | top-10% share | Gini | neighbour correlation |", "|---|---|---:|---:|---:|"]
    for m in report["final"]:
        for kind, label in (("ig", "integrated gradients"), ("saliency", "saliency")):
            lines.append(f"| {m} | {label} | {pct(a[m][f'{kind}_top10_share'])} | {a[m][f'{kind}_gini']:.3f} | "
                         f"{a[m][f'{kind}_neighbour_corr']:.3f} |")
    lines += ["", "IG completeness error (median, relative): " + ", ".join(
        f"{m} {a[m]['ig_completeness_error_median']:.1e}" for m in report["final"])]
    return "\n".join(lines) + "\n"
