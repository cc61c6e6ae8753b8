"""The model and training-state files of a run (kept import path: they live in :mod:`gloronet.runs`)."""
from .runs import atomic_write, load_model, load_state, save_model, save_state, weights_hash, write_json

__all__ = ["atomic_write", "load_model", "load_state", "save_model", "save_state", "weights_hash", "write_json"]
