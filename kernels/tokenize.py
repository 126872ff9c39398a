"""Triton stub: filled in below."""
