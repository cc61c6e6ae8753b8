"""Lipschitz-aware layers: each knows a differentiable estimate and a provable bound."""
from .activation import MinMax
from .base import LipschitzModule, UnboundedLayerError, lipschitz_bound_of, lipschitz_estimate_of
from .conv import LipConv2d
from .head import LLNLinear
from .linear import LipLinear
from .normalize import Normalize
from .orthogonal import CholeskyOrthConv2d, CholeskyOrthLinear, ChordLinear, ChordMLP, cholesky_orth
from .reshape import Flatten, InvertibleDownsampling
from .residual import LiResBlock, LiResStack
from .sequential import Sequential

__all__ = [
    "CholeskyOrthConv2d",
    "CholeskyOrthLinear",
    "ChordLinear",
    "ChordMLP",
    "LiResBlock",
    "LiResStack",
    "cholesky_orth",
    "Flatten",
    "InvertibleDownsampling",
    "LLNLinear",
    "LipConv2d",
    "LipLinear",
    "LipschitzModule",
    "MinMax",
    "Normalize",
    "Sequential",
    "UnboundedLayerError",
    "lipschitz_bound_of",
    "lipschitz_estimate_of",
]
