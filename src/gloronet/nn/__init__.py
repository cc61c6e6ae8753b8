"""Lipschitz-aware layers: each knows a differentiable estimate and a provable bound."""
from .activation import MinMax
from .aol import AOLConv2d, AOLLinear
from .base import LipschitzModule, UnboundedLayerError, lipschitz_bound_of, lipschitz_estimate_of
from .bro import BROConv2d, BROLinear
from .conv import LipConv2d
from .head import LLNLinear
from .linear import LipLinear
from .normalize import Normalize
from .orthogonal import CholeskyOrthConv2d, CholeskyOrthLinear, ChordLinear, ChordMLP, cholesky_orth
from .reshape import Flatten, InvertibleDownsampling
from .residual import LiResBlock, LiResStack
from .sequential import Sequential
from .sll import SLLConv2d, SLLLinear

__all__ = [
    "AOLConv2d",
    "AOLLinear",
    "BROConv2d",
    "BROLinear",
    "SLLConv2d",
    "SLLLinear",
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
