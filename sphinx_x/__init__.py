"""SPHINX-X on sphinx-kernels: the thin model, data pipeline and one-stage trainer that use the kernels."""

__version__ = "0.1.0"
