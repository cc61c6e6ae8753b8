"""GloRo architectures: the registry (:mod:`.registry`: ``create``, ``register``, ``list_models``)
and one module per family, each registering itself on import."""
from . import bronet, convnets, families, liresnet  # noqa: F401  (register 2c2f..8c2f, aol-*, sll-*, bro-*, liresnet-*, chord-*, bronet-*)
from .convnets import CONV_NETS, conv_net
from .registry import create, list_models, register, register_resolver

__all__ = ["CONV_NETS", "bronet", "conv_net", "convnets", "create", "families", "list_models", "liresnet", "register", "register_resolver"]
