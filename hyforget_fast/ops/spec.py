"""Metadata about main networks and their token layouts. No tensors of data live here.

Flat parameter order (the one documented order used everywhere in hyforget_fast): for each
layer l = 0..L-1, the weight W_l of shape (out_l, in_l) in row-major order, then the bias
b_l of shape (out_l,). A *piece* is one weight or one bias; piece 2l is W_l, piece 2l+1 is b_l.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch

# Columns of a piece table, the small int64 table every gather kernel reads.
#   SRC   offset of the piece in the flat parameter vector
#   DST   offset of the piece in the gathered output row
#   ROWS, COLS   piece shape (a bias has COLS == 1)
#   RPERM, CPERM offset of the permutation applied to rows / columns inside a perms row, -1 = none
#   NORM  index of the piece's (shift, scale) pair in a ParamNorm table
#   DLEN  number of output values the piece owns (ROWS*COLS plus zero padding)
PIECE_COLUMNS = ("SRC", "DST", "ROWS", "COLS", "RPERM", "CPERM", "NORM", "DLEN")


@dataclass(frozen=True)
class MLPSpec:
    """A ReLU MLP: layer_sizes = (in, hidden_1, ..., hidden_k, out), k >= 1."""

    layer_sizes: tuple[int, ...]

    def __init__(self, layer_sizes: Sequence[int]):
        sizes = tuple(int(s) for s in layer_sizes)
        if len(sizes) < 3:
            raise ValueError(f"MLPSpec needs input, at least one hidden and an output size, got {sizes}")
        if any(s <= 0 for s in sizes):
            raise ValueError(f"MLPSpec layer sizes must be positive, got {sizes}")
        object.__setattr__(self, "layer_sizes", sizes)

    @property
    def num_layers(self) -> int:
        return len(self.layer_sizes) - 1

    @property
    def in_features(self) -> int:
        return self.layer_sizes[0]

    @property
    def num_classes(self) -> int:
        return self.layer_sizes[-1]

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return self.layer_sizes[1:-1]

    @property
    def num_hidden_units(self) -> int:
        """Width of a perms row: all hidden layers' permutations side by side."""
        return sum(self.hidden_sizes)

    @cached_property
    def hidden_offsets(self) -> tuple[int, ...]:
        """Offset of hidden layer k's permutation inside a perms row."""
        offs, o = [], 0
        for h in self.hidden_sizes:
            offs.append(o)
            o += h
        return tuple(offs)

    @cached_property
    def pieces(self) -> tuple[tuple[int, int, int, int], ...]:
        """(layer, is_bias, rows, cols) of every piece in flat order."""
        out = []
        for l in range(self.num_layers):
            fan_in, fan_out = self.layer_sizes[l], self.layer_sizes[l + 1]
            out.append((l, 0, fan_out, fan_in))
            out.append((l, 1, fan_out, 1))
        return tuple(out)

    @cached_property
    def piece_offsets(self) -> tuple[int, ...]:
        offs, o = [], 0
        for _, _, r, c in self.pieces:
            offs.append(o)
            o += r * c
        return tuple(offs)

    @property
    def num_params(self) -> int:
        return sum(r * c for _, _, r, c in self.pieces)

    def layer_slices(self, l: int) -> tuple[slice, slice]:
        """Slices of W_l and b_l in a flat parameter vector."""
        w0, b0 = self.piece_offsets[2 * l], self.piece_offsets[2 * l + 1]
        r, c = self.layer_sizes[l + 1], self.layer_sizes[l]
        return slice(w0, w0 + r * c), slice(b0, b0 + r)

    def unflatten(self, params: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(B, P) -> [(W_l (B, out, in), b_l (B, out))], views into params."""
        out = []
        for l in range(self.num_layers):
            ws, bs = self.layer_slices(l)
            r, c = self.layer_sizes[l + 1], self.layer_sizes[l]
            out.append((params[:, ws].unflatten(1, (r, c)), params[:, bs]))  # (B, out, in), (B, out)
        return out

    def _perm_offsets(self, l: int) -> tuple[int, int]:
        """(row perm offset, column perm offset) for layer l's weight; -1 means identity."""
        rperm = self.hidden_offsets[l] if l < self.num_layers - 1 else -1
        cperm = self.hidden_offsets[l - 1] if l > 0 else -1
        return rperm, cperm

    @cached_property
    def flat_table(self) -> torch.Tensor:
        """Piece table (n_pieces, 8) for permuting flat vectors in place of layout."""
        rows = []
        for p, (l, is_bias, r, c) in enumerate(self.pieces):
            rperm, cperm = self._perm_offsets(l)
            off = self.piece_offsets[p]
            rows.append([off, off, r, c, rperm, -1 if is_bias else cperm, p, r * c])
        return torch.tensor(rows, dtype=torch.int64)


@dataclass(frozen=True)
class TokenInfo:
    layer: int
    is_bias: bool
    offset: int  # first value of the piece this token holds
    length: int  # number of real values; the rest of the chunk is zero padding


class TokenLayout:
    """Layer-wise tokenization of an MLPSpec's parameters (SPEC §3).

    Every piece (weight or bias) is flattened and cut into tokens of at most `chunk` values;
    the last token of a piece is zero-padded. Tokens are ordered piece by piece in flat order.
    """

    def __init__(self, spec: MLPSpec, chunk: int):
        if not isinstance(spec, MLPSpec):
            raise TypeError(f"TokenLayout needs an MLPSpec, got {type(spec).__name__}")
        if int(chunk) != chunk or chunk <= 0:
            raise ValueError(f"TokenLayout chunk must be a positive integer, got {chunk!r}")
        self.spec = spec
        self.chunk = int(chunk)
        tokens, table, t0 = [], [], 0
        for p, (l, is_bias, r, c) in enumerate(spec.pieces):
            n = r * c
            ntok = -(-n // self.chunk)
            for k in range(ntok):
                tokens.append(TokenInfo(l, bool(is_bias), k * self.chunk, min(self.chunk, n - k * self.chunk)))
            rperm, cperm = spec._perm_offsets(l)
            table.append([spec.piece_offsets[p], t0 * self.chunk, r, c, rperm,
                          -1 if is_bias else cperm, p, ntok * self.chunk])
            t0 += ntok
        self.tokens: tuple[TokenInfo, ...] = tuple(tokens)
        self.table = torch.tensor(table, dtype=torch.int64)  # (n_pieces, 8), see PIECE_COLUMNS

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def token_width(self) -> int:
        return self.chunk

    def __repr__(self) -> str:
        return f"TokenLayout({self.spec.layer_sizes}, chunk={self.chunk}, tokens={self.num_tokens})"

    def __eq__(self, other) -> bool:
        return isinstance(other, TokenLayout) and other.spec == self.spec and other.chunk == self.chunk

    def __hash__(self) -> int:
        return hash((self.spec, self.chunk))


class ParamNorm:
    """Per-piece affine normalization y = (x - shift) * scale, inverted as x = y / scale + shift.

    One (shift, scale) pair per piece (each layer's weight and bias), fitted on a dataset of
    flat parameter vectors so that normalized values have zero mean and unit variance, which
    lets the forward diffusion process destroy nearly all signal (SPEC §3).
    """

    def __init__(self, spec: MLPSpec, stats: torch.Tensor):
        stats = torch.as_tensor(stats, dtype=torch.float32)
        if stats.shape != (2 * spec.num_layers, 2):
            raise ValueError(f"ParamNorm stats must have shape {(2 * spec.num_layers, 2)}, got {tuple(stats.shape)}")
        if not torch.isfinite(stats).all() or (stats[:, 1] == 0).any():
            raise ValueError("ParamNorm stats must be finite with non-zero scales")
        self.spec = spec
        self.stats = stats.contiguous()  # (n_pieces, 2): shift, scale

    @classmethod
    def fit(cls, params: torch.Tensor, spec: MLPSpec, eps: float = 1e-8) -> "ParamNorm":
        """Fit per-piece mean / (1 / std) on params (B, P)."""
        if params.ndim != 2 or params.shape[1] != spec.num_params:
            raise ValueError(f"ParamNorm.fit expects (B, {spec.num_params}) params, got {tuple(params.shape)}")
        x = params.detach().double()
        stats = []
        for p in range(len(spec.pieces)):
            o = spec.piece_offsets[p]
            _, _, r, c = spec.pieces[p]
            v = x[:, o:o + r * c]
            stats.append([v.mean().item(), 1.0 / (v.std(unbiased=False).item() + eps)])
        return cls(spec, torch.tensor(stats, dtype=torch.float32))

    def to(self, device) -> "ParamNorm":
        return ParamNorm(self.spec, self.stats.to(device))

    def state_dict(self) -> dict:
        return {"layer_sizes": list(self.spec.layer_sizes), "stats": self.stats.cpu()}

    @classmethod
    def from_state_dict(cls, d: dict) -> "ParamNorm":
        return cls(MLPSpec(d["layer_sizes"]), d["stats"])
