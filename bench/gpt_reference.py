"""The "G.pt way" of computing a DiHyFo and of assembling its batches: the baseline of the benchmarks.

G.pt's public code (the design DiHyFo extends) has four weak spots that hyforget_fast replaces
(bench/RESULTS.md §5): per-token input/output linears run as a Python loop over token positions, attention is
computed by hand in fp32 (scores materialized, no fused kernel), and each sample is permuted,
normalized and tokenized on the CPU by one loader worker before the batch is stacked and copied to
the device. This module reproduces exactly those, on the SAME architecture and the SAME weights as
a given DiHyFo, so that a benchmark measures only the implementation, and a test can check that both
compute the same function.

- `GptStyleDiHyFo(model)`: shares (or, with copy=True, copies) every parameter of `model`.
- `gpt_style_batch(params, layout, perms, norm, device=...)`: the per-sample CPU loader.
"""
from __future__ import annotations

import copy as _copy
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hyforget_fast.hypernet.models import DiHyFo
from hyforget_fast.ops.spec import ParamNorm, TokenLayout


def _token_loop(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """G.pt's per-token linears: one small matmul per position. x (B, T, i), weight (T, i, o) -> (B, T, o)."""
    return torch.stack([x[:, k] @ weight[k].to(x.dtype) + bias[k].to(x.dtype) for k in range(x.shape[1])], 1)


def _manual_attention(blk, x: torch.Tensor) -> torch.Tensor:
    """Attention of a models.Block by hand, in fp32: softmax(q k^T / sqrt(d)) v, scores materialized."""
    B, N, D = x.shape
    H = blk.heads
    qkv = blk.qkv(blk.ln1(x)).view(B, N, 3, H, D // H)                      # (B, N, 3, H, Dh)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)                                     # 3 x (B, H, N, Dh)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D // H))              # (B, H, N, N)
    a = att.softmax(-1) @ v                                                  # (B, H, N, Dh)
    return blk.proj(a.transpose(1, 2).reshape(B, N, D))                      # (B, N, D)


class GptStyleDiHyFo(nn.Module):
    """A DiHyFo computed G.pt's way; same call signature and output as DiHyFo.forward.

    forward(x_t (B, T, C), t (B,), target_loss (B, m), theta (B, T, C) = None, loss (B, m) = None)
    -> x0 prediction (B, T, C) float32. No autocast: G.pt trains in fp32. With copy=False (default)
    the wrapped model's parameters are shared, so both see every update; copy=True deep-copies it
    (two independent models with equal initial weights, e.g. for two optimizers side by side).
    """

    def __init__(self, model: DiHyFo, copy: bool = False):
        super().__init__()
        if not isinstance(model, DiHyFo):
            raise TypeError(f"GptStyleDiHyFo wraps a DiHyFo, got {type(model).__name__}")
        self.model = _copy.deepcopy(model) if copy else model

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def layout(self) -> TokenLayout:
        return self.model.layout

    def num_flops_per_sample(self) -> int:
        return self.model.num_flops_per_sample()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, target_loss: torch.Tensor,
                theta: torch.Tensor | None = None, loss: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        m._check(x_t, t, target_loss, theta, loss)
        scal = [t.float()[:, None] / m.num_steps, target_loss]
        if m.conditional_on_theta:
            scal += [loss, target_loss - loss]
        s = _token_loop(m.encoder(torch.cat(scal, 1)), m.scalar_in.weight, m.scalar_in.bias)   # (B, S, W)
        p = _token_loop(x_t, m.x_in.weight, m.x_in.bias)                                        # (B, T, W)
        if m.conditional_on_theta:
            p = p + _token_loop(theta, m.theta_in.weight, m.theta_in.bias)
        h = torch.cat([s, p], 1) + m.pos                                                        # (B, S + T, W)
        for blk in m.blocks:
            h = h + _manual_attention(blk, h)
            h = h + blk.mlp(blk.ln2(h))
        T = m.layout.num_tokens
        delta = _token_loop(m.ln_f(h[:, -T:]), m.out.weight, m.out.bias).float() * m.token_mask  # (B, T, C)
        return theta.float() * m.token_mask + delta if m.conditional_on_theta else delta


def _permute_tokenize_one(row: torch.Tensor, layout: TokenLayout, perm: np.ndarray,
                          norm: ParamNorm | None) -> torch.Tensor:
    """One sample (P,) -> (T, chunk): per-layer slicing, numpy-index permutation, per-piece normalize, pad."""
    spec, chunk = layout.spec, layout.chunk
    pieces = []
    for l in range(spec.num_layers):
        ws, bs = spec.layer_slices(l)
        W = row[ws].view(spec.layer_sizes[l + 1], spec.layer_sizes[l])     # (out, in)
        b = row[bs]
        rperm, cperm = spec._perm_offsets(l)
        if rperm >= 0:
            idx = torch.from_numpy(perm[rperm:rperm + W.shape[0]])
            W, b = W[idx], b[idx]
        if cperm >= 0:
            W = W[:, torch.from_numpy(perm[cperm:cperm + W.shape[1]])]
        for p, piece in ((2 * l, W.reshape(-1)), (2 * l + 1, b)):
            if norm is not None:
                piece = ((piece.float() - norm.stats[p, 0]) * norm.stats[p, 1]).to(row.dtype)
            n = piece.numel()
            pieces.append(F.pad(piece, (0, -(-n // chunk) * chunk - n)).view(-1, chunk))
    return torch.cat(pieces)                                                 # (T, chunk)


def gpt_style_batch(params: torch.Tensor | Sequence[torch.Tensor], layout: TokenLayout,
                    perms: torch.Tensor | None = None, norm: ParamNorm | None = None, *,
                    device: torch.device | str = "cpu", seed: int | None = None):
    """G.pt's loader: per sample, on the CPU, permute + normalize + tokenize; then stack and copy.

    params: (B, P) CPU tensor, or a sequence of them (e.g. θ and θ*) that get the SAME permutation
    per sample. perms: (B, H) int64 hidden-unit permutations (as hf.sample_perms), or None to draw
    one per sample with numpy (rng seeded by `seed`), one layer at a time, as a loader worker does.
    Returns (B, T, chunk) on `device` (a tuple of them for a sequence input); for the same perms
    it equals hf.tokenize(params, layout, perms, norm) exactly.
    """
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
    single = isinstance(params, torch.Tensor)
    group = [params] if single else list(params)
    spec = layout.spec
    B = group[0].shape[0]
    for x in group:
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape != (B, spec.num_params):
            raise ValueError(f"params must be (B, {spec.num_params}) tensors of one batch size, got "
                             f"{[tuple(getattr(y, 'shape', ())) for y in group]}")
        if x.device.type != "cpu":
            raise ValueError(f"G.pt's loader runs on the CPU; params are on {x.device}")
    if perms is not None and tuple(perms.shape) != (B, spec.num_hidden_units):
        raise ValueError(f"perms must be ({B}, {spec.num_hidden_units}), got {tuple(perms.shape)}")
    perms_np = perms.cpu().numpy() if perms is not None else None
    rng = np.random.default_rng(seed)
    outs = [[] for _ in group]
    for b in range(B):
        if perms_np is not None:
            perm = perms_np[b]
        else:
            perm = np.concatenate([rng.permutation(h) for h in spec.hidden_sizes] or [np.zeros(0, np.int64)])
        for k, x in enumerate(group):
            outs[k].append(_permute_tokenize_one(x[b], layout, perm.astype(np.int64, copy=False), norm))
    res = tuple(torch.stack(o).to(device) for o in outs)                    # each (B, T, chunk)
    return res[0] if single else res
