"""hyforget_fast: machine unlearning with diffusion hypernetworks, with fused kernels.

Importing never needs a GPU; `hyforget_fast.backends()` tells which kernels loaded.
"""
from .backends import backends
from .ops import ClassMetrics, class_metrics, class_outputs, detokenize, permute, sample_perms, tokenize, validate_perms
from .spec import MLPSpec, ParamNorm, TokenLayout

__all__ = ["MLPSpec", "TokenLayout", "ParamNorm", "backends", "tokenize", "detokenize", "permute",
           "sample_perms", "validate_perms", "class_metrics", "class_outputs", "ClassMetrics"]
__version__ = "0.1.0"
