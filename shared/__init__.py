"""Code shared by the manager and the checker: config, models, Redis store, Docker backend."""

__version__ = "0.3.0"
