"""Plain-PyTorch references of every op. Tests and benchmarks import these; the kernels must
equal them bit for bit (gathers) or within the stated tolerance (arithmetic).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import MLPSpec, ParamNorm, TokenLayout


def permute(params: torch.Tensor, spec: MLPSpec, perms: torch.Tensor) -> torch.Tensor:
    """Permute hidden units: W'_l[r, c] = W_l[pi_l[r], pi_{l-1}[c]], b'_l[r] = b_l[pi_l[r]].

    params (B, P), perms (B, H) int64 with H = spec.num_hidden_units -> (B, P).
    """
    out = []
    for l, (W, b) in enumerate(spec.unflatten(params)):  # (B, out, in), (B, out)
        rperm, cperm = spec._perm_offsets(l)
        if rperm >= 0:
            pr = perms[:, rperm:rperm + W.shape[1]]  # (B, out)
            W = W.gather(1, pr[:, :, None].expand_as(W))
            b = b.gather(1, pr)
        if cperm >= 0:
            pc = perms[:, cperm:cperm + W.shape[2]]  # (B, in)
            W = W.gather(2, pc[:, None, :].expand_as(W))
        out += [W.flatten(1), b]
    return torch.cat(out, 1)


def _pieces(params: torch.Tensor, spec: MLPSpec) -> list[torch.Tensor]:
    return [params[:, o:o + r * c] for o, (_, _, r, c) in zip(spec.piece_offsets, spec.pieces)]


def tokenize(params: torch.Tensor, layout: TokenLayout, perms: torch.Tensor | None = None,
             norm: ParamNorm | None = None) -> torch.Tensor:
    """(B, P) -> (B, T, chunk): permute, normalize per piece, cut pieces into zero-padded tokens."""
    spec, chunk = layout.spec, layout.chunk
    x = permute(params, spec, perms) if perms is not None else params
    out = []
    for p, piece in enumerate(_pieces(x, spec)):
        if norm is not None:
            shift, scale = norm.stats[p, 0].to(x.device), norm.stats[p, 1].to(x.device)
            piece = ((piece.float() - shift) * scale).to(x.dtype)
        n = piece.shape[1]
        out.append(F.pad(piece, (0, -(-n // chunk) * chunk - n)))  # zero padding of the last token
    return torch.cat(out, 1).view(x.shape[0], layout.num_tokens, chunk)  # (B, T, chunk)


def detokenize(tokens: torch.Tensor, layout: TokenLayout, norm: ParamNorm | None = None) -> torch.Tensor:
    """(B, T, chunk) -> (B, P): drop padding, undo normalization (x = y / scale + shift)."""
    flat = tokens.reshape(tokens.shape[0], -1)  # (B, T*chunk)
    out, t0 = [], 0
    for p, (_, _, r, c) in enumerate(layout.spec.pieces):
        piece = flat[:, t0 * layout.chunk:t0 * layout.chunk + r * c]
        if norm is not None:
            shift, scale = norm.stats[p, 0].to(flat.device), norm.stats[p, 1].to(flat.device)
            piece = (piece.float() / scale + shift).to(flat.dtype)
        out.append(piece)
        t0 += -(-r * c // layout.chunk)
    return torch.cat(out, 1)


def mlp_logits(params: torch.Tensor, spec: MLPSpec, X: torch.Tensor) -> torch.Tensor:
    """Batched forward of B MLPs on shared inputs, the batched-einsum way.

    params (B, P), X (N, D) -> logits (B, N, m). Materializes every (B, N, width) activation.
    """
    h = None
    for l, (W, b) in enumerate(spec.unflatten(params)):  # (B, out, in), (B, out)
        h = torch.einsum("nd,bhd->bnh", X, W) if h is None else torch.einsum("bnd,bhd->bnh", h, W)  # (B, N, out)
        h = h + b[:, None, :]
        if l < spec.num_layers - 1:
            h = torch.relu(h)
    return h


def class_sums(params: torch.Tensor, spec: MLPSpec, X: torch.Tensor, y: torch.Tensor,
               num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of cross-entropy and of correct predictions, each (B, m) float32.

    This is exactly what the native class_metrics op returns; dividing by the class counts
    gives the means. Predictions are torch.argmax of the logits (first maximum on ties).
    """
    logits = mlp_logits(params, spec, X)  # (B, N, m)
    logp = torch.log_softmax(logits, dim=-1)
    yb = y[None, :].expand(logits.shape[0], -1)  # (B, N)
    loss = -logp.gather(2, yb[:, :, None]).squeeze(2)  # (B, N)
    correct = (logits.argmax(dim=-1) == yb).to(loss.dtype)  # (B, N)
    loss_sum = loss.new_zeros(logits.shape[0], num_classes).index_add_(1, y, loss)
    correct_sum = loss.new_zeros(logits.shape[0], num_classes).index_add_(1, y, correct)
    return loss_sum.float(), correct_sum.float()


def class_outputs(params: torch.Tensor, spec: MLPSpec, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample softmax probabilities (B, N, m) and predictions (B, N) for a few models."""
    logits = mlp_logits(params, spec, X)
    return torch.softmax(logits, dim=-1), logits.argmax(dim=-1)


def _taken_rows(X: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Dense X[rows] (M, D) of X (N, D), sparse CSR or dense; all rows if rows is None."""
    Xd = X.to_dense() if X.layout == torch.sparse_csr else X
    return Xd if rows is None else Xd[rows]


def csr_linear(X: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None,
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """X[rows] @ weight_t + bias with X (N, D) sparse CSR or dense, weight_t (D, C) -> (M, C)."""
    out = _taken_rows(X, rows) @ weight_t               # (M, C)
    return out if bias is None else out + bias


def csr_linear_sub_grad(X: torch.Tensor, grad: torch.Tensor, weight_t: torch.Tensor,
                        rows: torch.Tensor | None = None) -> torch.Tensor:
    """weight_t - X[rows]^T @ grad, the first layer's SGD step with the learning rate in grad."""
    return weight_t - _taken_rows(X, rows).t() @ grad   # (D, C)
