"""Triton kernels (optional; imported lazily)."""
