"""Stage 1, the kernel ops: parameter metadata (spec), the public ops (validate, then dispatch to
the fastest backend for the tensors' device), the backends' status and the plain-PyTorch
reference of every op."""
from .backends import backends
from .functional import (ClassMetrics, canonical_perms, class_metrics, class_outputs, csr_linear, csr_linear_sub_grad_, detokenize,
                         permute, sample_perms, tokenize, validate_perms)
from .spec import MLPSpec, ParamNorm, TokenLayout

__all__ = ["MLPSpec", "TokenLayout", "ParamNorm", "backends", "tokenize", "detokenize", "permute",
           "sample_perms", "canonical_perms", "validate_perms", "class_metrics", "class_outputs", "ClassMetrics", "csr_linear",
           "csr_linear_sub_grad_"]
