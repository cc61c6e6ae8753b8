"""The package version (one place: ``gloronet.__version__`` re-exports it; pyproject.toml repeats it
and ``tests/test_cli_docs.py`` checks that they agree)."""
__version__ = "0.1.0"
