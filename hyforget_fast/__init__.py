"""hyforget_fast: machine unlearning with diffusion hypernetworks, with fused kernels.

Importing never needs a GPU; `hyforget_fast.backends()` tells which kernels loaded.
"""
from .backends import backends
from .ops import (ClassMetrics, class_metrics, class_outputs, csr_linear, csr_linear_sub_grad_, detokenize, permute,
                  sample_perms, tokenize, validate_perms)
from .spec import MLPSpec, ParamNorm, TokenLayout

__all__ = ["MLPSpec", "TokenLayout", "ParamNorm", "backends", "tokenize", "detokenize", "permute",
           "sample_perms", "validate_perms", "class_metrics", "class_outputs", "ClassMetrics", "csr_linear",
           "csr_linear_sub_grad_"]
__version__ = "0.1.0"

# Checkpoint collection (issue 4), loaded lazily so `import hyforget_fast` stays light.
_LAZY = {"CollectConfig": "collect", "preset": "collect", "CheckpointStore": "store",
         "PairDataset": "pairs", "load_digits": "data"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hyforget_fast' has no attribute {name!r}")
