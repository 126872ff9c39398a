"""Flat parameter vectors <-> ordinary torch modules, and a differentiable batched forward.

Flat order is the package's one order (hyforget_fast.ops.spec): for each layer, W (out, in)
row-major, then b. Unlearning methods that need gradients (fine-tuning, NegGrad+, SSD,
the anamnesis relearning) train B networks at once through `batched_logits`, which is the
plain-PyTorch reference forward `ops.reference.mlp_logits` (one definition).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.reference import mlp_logits as batched_logits  # noqa: F401  (B, P), (N, D) -> (B, N, m)
from ..ops.spec import MLPSpec


def check_flat(params: torch.Tensor, spec: MLPSpec, what: str = "params") -> torch.Tensor:
    """(P,) or (B, P) -> (B, P); refuses a wrong width or non-finite values with a clear error."""
    if not isinstance(params, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(params).__name__}")
    p = params.unsqueeze(0) if params.ndim == 1 else params
    if p.ndim != 2 or p.shape[1] != spec.num_params:
        raise ValueError(f"{what} must have shape (P,) or (B, P) with P = {spec.num_params} for spec "
                         f"{spec.layer_sizes}, got {tuple(params.shape)}")
    if not p.is_floating_point():
        raise TypeError(f"{what} must be floating point, got {p.dtype}")
    if not torch.isfinite(p).all():
        raise ValueError(f"{what} holds NaN or Inf values")
    return p


def as_module(params: torch.Tensor, spec: MLPSpec) -> nn.Sequential:
    """(P,) flat parameters -> nn.Sequential(Linear, ReLU, ..., Linear) holding a copy of them."""
    p = check_flat(params, spec)
    if p.shape[0] != 1:
        raise ValueError(f"as_module builds one network; got {p.shape[0]} parameter rows")
    layers: list[nn.Module] = []
    for l, (W, b) in enumerate(spec.unflatten(p.detach().float().cpu())):
        lin = nn.Linear(W.shape[2], W.shape[1])
        with torch.no_grad():
            lin.weight.copy_(W[0])
            lin.bias.copy_(b[0])
        layers.append(lin)
        if l < spec.num_layers - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def module_spec(module: nn.Module) -> MLPSpec:
    """The MLPSpec of a ReLU MLP module (its nn.Linear layers in order)."""
    lins = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not lins:
        raise ValueError("module holds no nn.Linear layers; expected a ReLU MLP")
    for a, b in zip(lins, lins[1:]):
        if a.out_features != b.in_features:
            raise ValueError(f"module's Linear layers do not chain: {a.out_features} -> {b.in_features}")
    return MLPSpec([lins[0].in_features, *[l.out_features for l in lins]])


def flat_params(module: nn.Module, spec: MLPSpec | None = None) -> torch.Tensor:
    """ReLU MLP module -> (P,) float32 flat parameters; with `spec`, refuses a module of another shape,
    and refuses NaN / inf parameters naming the tensor (as `check_flat` does for flat parameters)."""
    got = module_spec(module)
    if spec is not None and got != spec:
        raise ValueError(f"model has layer sizes {got.layer_sizes}, expected {spec.layer_sizes}")
    lins = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if any(l.bias is None for l in lins):
        raise ValueError("every nn.Linear of the model needs a bias")
    names = {id(t): n for n, t in module.named_parameters()}
    for l in lins:
        for t in (l.weight, l.bias):
            bad = ~torch.isfinite(t.detach())
            if bad.any():
                raise ValueError(f"model parameter {names.get(id(t), 'of an nn.Linear')} {tuple(t.shape)} holds "
                                 f"{int(bad.sum())} non-finite value(s) (NaN or inf), the first at index "
                                 f"{tuple(int(i) for i in bad.nonzero()[0])}")
    return torch.cat([t.detach().float().reshape(-1).cpu() for l in lins for t in (l.weight, l.bias)])

