"""Export a GloRo net with its sound pairwise constants frozen in: ONNX or a ``torch.export``
program, and a model card (JSON) beside it.

The exported graph maps ``x`` (B, C, H, W) to ``(logits (B, N), bottom_logit_exact (B, 1))`` with

    bottom_logit_exact = max_{i ≠ j} (y_i + ε·K_ji),   j = argmax y   (masked by index)

where ``ε·K_ji`` is the product of ε and the sound float64 constants of
:meth:`GloroNet.lipschitz_constant`, rounded up to float32 and stored as a constant. A point is
certified by the export iff ``y_j > bottom_logit_exact`` strictly.

**What that promises** — it is the GloRo paper's *real-arithmetic* test on the logits the runtime
computed, i.e. ``net.certify(x, arithmetic="exact")``, but evaluated in the model's dtype: the
sum ``y_i + ε·K_ji`` is rounded to nearest (``certify`` rounds it up in float64), so on a near tie
the export may certify by an ulp what ``certify(..., arithmetic="exact")`` does not. It is NOT the floating-point-sound certificate of
``net.certify(x)`` (default ``arithmetic="float"``), whose margin allowance depends on the
activations at ``x`` and on the kernels, which another runtime does not promise to keep. A point
``certify(x)`` certifies has a margin that clears ``ε·K`` by more than the rounding allowance of
gloronet's own kernels, so the export certifies it too — expected for another runtime as well and
checked in the tests, but not proven there, since that runtime may round differently; the converse
does not hold. For sound certificates, certify with gloronet.
"""
from __future__ import annotations

import copy
import hashlib
import io
import logging
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from .version import __version__
from .gloro import GloroNet
from .nn.state import eval_caches
from .runs import RunError, load_model, read_model_meta, weights_hash, write_bytes, write_json

FORMATS = {"onnx": "model.onnx", "torch": "model.pt2"}
OPSET = 18
OUTPUTS = ("logits", "bottom_logit_exact")


class FrozenGloro(nn.Module):
    """``x -> (logits, bottom_logit_exact)`` with ``ε·K`` frozen as a float32 constant (rounded up).

    Every weight a layer derives for its eval forward (normalised, rescaled, orthogonalised weights;
    BRO's materialised circular kernel) is computed once here, bounded into ``ε·K``, and pinned
    (:meth:`gloronet.nn.state.EvalCache.pin`): the traced program stores it as a constant instead
    of re-deriving it with the runtime's own rounding (or with ops ONNX lacks: BRO's complex
    solves), so the exported model applies exactly the weights ``K`` bounds."""

    def __init__(self, net: GloroNet, epsilon: float | None = None):
        super().__init__()
        self.net = copy.deepcopy(net).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        eps = net.epsilon if epsilon is None else float(epsilon)
        # the copy's own bound: it derives (and caches) the very weights pinned below
        eps_k = self.net.lipschitz_constant() * eps  # float64; rounded up next, then to the model's dtype
        eps_k = torch.nextafter(eps_k, torch.full_like(eps_k, math.inf))
        dtype = next(net.parameters()).dtype
        frozen = eps_k.to(dtype)
        frozen = torch.where(frozen.double() < eps_k, torch.nextafter(frozen, torch.full_like(frozen, math.inf)), frozen)
        frozen.fill_diagonal_(0.0)
        self.register_buffer("eps_K", frozen.to(next(net.parameters()).device))
        self.epsilon = eps
        for cache in eval_caches(self.net):
            cache.pin()
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the plain layer forward (what GloroNet.forward runs in a trace); this module exists to be
        # traced: for logits in gloronet itself call the GloroNet (its eval mode sets sound kernels)
        logits = self.net.head(self.net.body(x))
        pred = logits.argmax(dim=1)
        shifted = logits + self.eps_K[pred]
        classes = torch.arange(logits.shape[1], device=logits.device)
        own = classes[None, :] == pred[:, None]
        bottom = shifted.masked_fill(own, -math.inf).amax(dim=1, keepdim=True)
        return logits, bottom


def certified(logits: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    """The export's certificate from its two outputs: ``y_j > bottom_logit_exact`` (strict)."""
    return logits.max(dim=1).values > bottom[:, 0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_card(net: GloroNet, fmt: str, path: Path, training: dict | None = None) -> dict:
    """ε, the bound, the input range, the weights hash, the training recipe and what the outputs promise."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return {
        "format": fmt, "file": path.name, "file_sha256": _sha256(path), "gloronet_version": __version__,
        "model": net.config, "epsilon": net.epsilon, "lipschitz_bound": net.lipschitz_bound(),
        "K_max": float(net.lipschitz_constant().max()), "input_range": list(net.input_range) if net.input_range else None,
        "input_shape": ["batch", *(net.config or {}).get("in_shape", [])], "weights_sha256": weights_hash(state),
        "outputs": {"logits": "(B, classes) the network's logits",
                    "bottom_logit_exact": "(B, 1) max over i != j of y_i + eps*K_ji, j = argmax(logits); eps*K frozen, "
                                          "rounded up"},
        "certificate": "certified iff max(logits) > bottom_logit_exact: the GloRo real-arithmetic test on the logits the "
                       "runtime computed (gloronet certify --arithmetic exact), with y_i + eps*K_ji rounded to nearest in the "
                       "model's dtype, NOT the floating-point-sound certificate "
                       "of gloronet certify (stricter: what it certifies, this test certifies too, up to the runtime's "
                       "rounding)",
        **({"opset": OPSET} if fmt == "onnx" else {}),
        "training": training,
    }


def export_model(net: GloroNet, path: str | Path, fmt: str = "onnx", training: dict | None = None) -> tuple[Path, Path]:
    """Write ``net`` with frozen constants to ``path`` (``fmt``: ``onnx`` or ``torch``) and the model
    card to ``<path>.card.json``; returns both paths. ONNX needs ``pip install 'gloronet[export]'``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    path = Path(path)
    suffix = Path(FORMATS[fmt]).suffix
    if path.suffix != suffix:
        raise ValueError(f"{path}: {'an ONNX' if fmt == 'onnx' else 'a torch'} export is written to a {suffix} file "
                         f"(name it {path.stem}{suffix})")
    if net.config is None:
        raise ValueError("export needs a GloroNet built by gloronet.models.create (its input shape is in net.config)")
    frozen = FrozenGloro(net)
    example = torch.rand(2, *net.config["in_shape"], dtype=next(net.parameters()).dtype,
                         device=next(net.parameters()).device)
    with torch.no_grad():
        frozen.net(example)  # fills (and so pins) any eval cache the bound did not read
    batch = torch.export.Dim("batch", min=1)
    if fmt == "torch":
        buf = io.BytesIO()
        torch.export.save(torch.export.export(frozen, (example,), dynamic_shapes=({0: batch},)), buf)
        data = buf.getvalue()
    else:
        for module in ("onnx", "onnxscript"):
            try:
                __import__(module)
            except ImportError:
                raise RunError(f"ONNX export needs the {module} package: pip install 'gloronet[export]'") from None
        quiet = logging.getLogger("torch.onnx")  # the exporter's notes about torchvision ops we never use
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():  # deprecations inside torch's own exporter
                warnings.simplefilter("ignore", FutureWarning)
                program = torch.onnx.export(frozen, (example,), input_names=["x"], output_names=list(OUTPUTS),
                                            opset_version=OPSET, dynamic_shapes=({0: batch},), dynamo=True,
                                            verbose=False)
        finally:
            quiet.setLevel(level)
        data = program.model_proto.SerializeToString()
    write_bytes(path, data)
    card = path.with_name(path.name + ".card.json")
    write_json(card, model_card(net, fmt, path, training))
    return path, card


def format_of(path: str | Path) -> str | None:
    """The export format a file name asks for (``.onnx`` / ``.pt2``), or None."""
    return next((fmt for fmt, name in FORMATS.items() if Path(path).suffix == Path(name).suffix), None)


def export_run(run_dir: str | Path, fmt: str | None = None, out: str | Path | None = None) -> tuple[Path, Path]:
    """Export the model of a run directory, or of a shipped model named ``run_dir``. ``fmt``
    defaults to the one ``out``'s suffix names, else ONNX; ``out`` defaults to ``<run>/model.onnx``
    / ``<run>/model.pt2`` (``./<name>/…`` for a shipped model: never into the package)."""
    from .config import read_yaml
    from .runs import locate_run

    run_dir, shipped = locate_run(run_dir)
    fmt = fmt or (format_of(out) if out else None) or "onnx"
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    read_model_meta(run_dir)
    net = load_model(run_dir)
    cfg_path = run_dir / "config.yaml"
    training = read_yaml(cfg_path) if cfg_path.is_file() else None
    default = (Path(shipped) if shipped else run_dir) / FORMATS[fmt]
    return export_model(net, Path(out) if out else default, fmt, training)
