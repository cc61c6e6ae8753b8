"""Kept import path: the LiResNet / CHORD family lives in :mod:`gloronet.models.liresnet`."""
import sys

from .models import liresnet as _family

sys.modules[__name__] = _family
