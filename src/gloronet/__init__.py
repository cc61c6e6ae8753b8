"""gloronet: globally-robust (GloRo) neural networks in PyTorch.

Lipschitz-bounded layers, provable operator-norm bounds, the GloRo bottom logit and sound,
deterministic L2 robustness certification (Leino, Wang & Fredrikson, ICML 2021).
"""
from .version import __version__
from . import bounds, fp, models, nn  # noqa: E402
from .gloro import Certificate, GloroNet  # noqa: E402
from .nn import UnboundedLayerError  # noqa: E402
from . import certify, checkpoint, export, runs  # noqa: E402  (load_model, certify_dataset, export_model)

__all__ = ["Certificate", "GloroNet", "UnboundedLayerError", "bounds", "certify", "checkpoint", "export", "fp",
           "models", "nn", "runs", "__version__"]
