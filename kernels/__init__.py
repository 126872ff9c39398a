"""Triton kernels of hyforget_fast, installed as hyforget_fast.kernels (never a top-level `kernels`)."""
from . import tokenize  # noqa: F401
from . import class_metrics  # noqa: F401
