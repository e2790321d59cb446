"""Integrations with other libraries (imported explicitly; nothing here is imported by sphinx_kernels)."""
