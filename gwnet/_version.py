"""The package version, in one place: ``gwnet.__version__``, checkpoints and ``setup.py`` read it."""
__version__ = "0.2.0"
