"""Reference MLOps pipeline for music genre classification on GTZAN."""

__version__ = "0.1.0"
