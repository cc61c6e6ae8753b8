"""gloronet: globally-robust (GloRo) neural networks in PyTorch.

Lipschitz-bounded layers, provable operator-norm bounds, the GloRo bottom logit and sound,
deterministic L2 robustness certification (Leino, Wang & Fredrikson, ICML 2021).
"""
from . import bounds, fp, models, nn
from .gloro import Certificate, GloroNet
from .nn import UnboundedLayerError

__version__ = "0.1.0"
__all__ = ["Certificate", "GloroNet", "UnboundedLayerError", "bounds", "fp", "models", "nn", "__version__"]
