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


def _normalize(piece: torch.Tensor, norm: ParamNorm | None, p: int, inverse: bool = False) -> torch.Tensor:
    """Piece p's affine map in float32, back to the piece's dtype: (x - shift) * scale, or its inverse."""
    if norm is None:
        return piece
    shift, scale = norm.stats[p, 0].to(piece.device), norm.stats[p, 1].to(piece.device)
    y = piece.float() / scale + shift if inverse else (piece.float() - shift) * scale
    return y.to(piece.dtype)


def tokenize(params: torch.Tensor, layout: TokenLayout, perms: torch.Tensor | None = None,
             norm: ParamNorm | None = None) -> torch.Tensor:
    """(B, P) -> (B, T, C): permute, normalize per piece, arrange the pieces into tokens.

    Layer-wise: each piece cut into zero-padded tokens of `chunk` values. Neuron: token j =
    [W_0[j, :], b_0[j], W_1[:, j]], token h = [b_1, zero padding] (see TokenLayout).
    """
    spec, chunk = layout.spec, layout.chunk
    x = permute(params, spec, perms) if perms is not None else params
    pieces = [_normalize(piece, norm, p) for p, piece in enumerate(_pieces(x, spec))]
    B = x.shape[0]
    if layout.kind == "neuron":
        d, h, m = spec.layer_sizes
        W0, b0, W1, b1 = pieces
        units = torch.cat([W0.view(B, h, d), b0.view(B, h, 1), W1.view(B, m, h).transpose(1, 2)], 2)  # (B, h, C)
        return torch.cat([units, F.pad(b1, (0, chunk - m))[:, None]], 1)                              # (B, h+1, C)
    out = []
    for piece in pieces:
        n = piece.shape[1]
        out.append(F.pad(piece, (0, -(-n // chunk) * chunk - n)))  # zero padding of the last token
    return torch.cat(out, 1).view(B, layout.num_tokens, chunk)  # (B, T, chunk)


def detokenize(tokens: torch.Tensor, layout: TokenLayout, norm: ParamNorm | None = None) -> torch.Tensor:
    """(B, T, C) -> (B, P): drop padding, undo normalization (x = y / scale + shift)."""
    spec = layout.spec
    if layout.kind == "neuron":
        d, h, m = spec.layer_sizes
        units = tokens[:, :h]                                                     # (B, h, C)
        pieces = [units[:, :, :d].flatten(1), units[:, :, d], units[:, :, d + 1:].transpose(1, 2).flatten(1),
                  tokens[:, h, :m]]
        return torch.cat([_normalize(piece, norm, p, inverse=True) for p, piece in enumerate(pieces)], 1)
    flat = tokens.reshape(tokens.shape[0], -1)  # (B, T*chunk)
    out, t0 = [], 0
    for p, (_, _, r, c) in enumerate(spec.pieces):
        piece = flat[:, t0 * layout.chunk:t0 * layout.chunk + r * c]
        out.append(_normalize(piece, norm, p, inverse=True))
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
