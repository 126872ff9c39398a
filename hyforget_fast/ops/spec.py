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
#   RS, CS  destination strides: element (r, c) of the piece goes to DST + r*RS + c*CS
#
# A piece is *contiguous* when RS == COLS and CS == 1 (row-major, as in the flat vector): it owns
# the output range [DST, DST + DLEN), zero-padded after ROWS*COLS (the layer-wise layout). Any
# other piece is *strided*: it owns exactly its ROWS*COLS positions (DLEN == ROWS*COLS), either
# row-major (CS*COLS <= RS) or column-major (RS*ROWS <= CS), so that an output position decodes
# back to at most one (r, c). The neuron layout interleaves strided pieces: token j holds row j
# of W_0, b_0[j] and column j of W_1. Output positions that no piece owns are zero.
PIECE_COLUMNS = ("SRC", "DST", "ROWS", "COLS", "RPERM", "CPERM", "NORM", "DLEN", "RS", "CS")
TOKEN_KINDS = ("layer", "neuron")


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
            rows.append([off, off, r, c, rperm, -1 if is_bias else cperm, p, r * c, c, 1])
        return torch.tensor(rows, dtype=torch.int64)


@dataclass(frozen=True)
class TokenInfo:
    layer: int
    is_bias: bool
    offset: int  # first value of the piece this token holds
    length: int  # number of real values; the rest of the chunk is zero padding


def table_is_strided(table: torch.Tensor) -> bool:
    """Whether a piece table (n_pieces, len(PIECE_COLUMNS)) has a strided piece (see PIECE_COLUMNS)."""
    t = table.cpu()
    return bool(((t[:, 8] != t[:, 3]) | (t[:, 9] != 1)).any())


def table_footprint(table: torch.Tensor, width: int, padding: bool = True) -> torch.Tensor:
    """(width,) int64: the piece owning each output position (-1 = none), by the ownership rule of
    PIECE_COLUMNS; padding=False marks a contiguous piece's zero padding -1 too. ValueError when
    two pieces claim one position or a piece writes past `width`."""
    own = torch.full((width,), -1, dtype=torch.int64)
    for p, e in enumerate(table.tolist()):
        src, dst, rows, cols, _, _, _, dlen, rs, cs = e
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        pos = (dst + r * rs + c * cs).flatten()
        if rs == cols and cs == 1:
            pos = torch.arange(dst, dst + dlen)
        elif dlen != rows * cols or not (cs * cols <= rs or rs * rows <= cs):
            raise ValueError(f"strided piece {p} must have DLEN == ROWS*COLS and be row- or column-major")
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= width):
            raise ValueError(f"piece {p} writes outside an output row of {width}")
        if (own[pos] >= 0).any() or pos.unique().numel() != pos.numel():
            raise ValueError(f"piece {p} overlaps another piece")
        own[pos] = p
        if not padding and rs == cols and cs == 1:
            own[dst + rows * cols:dst + dlen] = -1
    return own


class TokenLayout:
    """How an MLPSpec's flat parameters become tokens (B, T, C): one gather pattern (piece table).

    kind "layer" (G.pt, Peebles et al. 2022; the dissertation's DiHyFo): every piece (weight or
    bias) is flattened and cut into tokens of at most `chunk` values; the last token of a piece is
    zero-padded; tokens follow the flat order. C = chunk.

    kind "neuron" (neurons as tokens, as in the weight-space literature: DWSNets, Navon et al.
    2023; Neural Graphs, Kofinas et al. 2024): for a one-hidden-layer MLP (in, h, out), token j
    (j < h) holds hidden unit j's incoming weights W_0[j, :], its bias b_0[j] and its outgoing
    weights W_1[:, j]: C = in + 1 + out values; token h holds the output bias b_1, zero-padded.
    T = h + 1. Permuting the hidden units permutes tokens 0..h-1 and nothing else, so a model
    that treats those tokens alike is exactly permutation-equivariant. MLPs with more hidden
    layers are refused: a unit of a middle layer has its outgoing weights in the next layer's
    units' incoming weights, so "incoming + bias + outgoing" tokens would hold those weights
    twice, and there is no single token set whose permutations are all the symmetries (use the
    layer-wise layout and permutation augmentation there).

    table (n_pieces, len(PIECE_COLUMNS)) int64 drives every backend's kernels; token_mask()
    (T, C) marks real values, piece_map() (T, C) the piece each value belongs to.
    """

    def __init__(self, spec: MLPSpec, chunk: int | None = None, kind: str = "layer"):
        if not isinstance(spec, MLPSpec):
            raise TypeError(f"TokenLayout needs an MLPSpec, got {type(spec).__name__}")
        if kind not in TOKEN_KINDS:
            raise ValueError(f"TokenLayout kind must be one of {TOKEN_KINDS}, got {kind!r}")
        self.spec, self.kind = spec, kind
        if kind == "neuron":
            self._init_neuron(spec, chunk)
            return
        if chunk is None or isinstance(chunk, bool) or int(chunk) != chunk or chunk <= 0:
            raise ValueError(f"TokenLayout chunk must be a positive integer, got {chunk!r}")
        self.chunk = int(chunk)
        tokens, table, t0 = [], [], 0
        for p, (l, is_bias, r, c) in enumerate(spec.pieces):
            n = r * c
            ntok = -(-n // self.chunk)
            for k in range(ntok):
                tokens.append(TokenInfo(l, bool(is_bias), k * self.chunk, min(self.chunk, n - k * self.chunk)))
            rperm, cperm = spec._perm_offsets(l)
            table.append([spec.piece_offsets[p], t0 * self.chunk, r, c, rperm,
                          -1 if is_bias else cperm, p, ntok * self.chunk, c, 1])
            t0 += ntok
        self._tokens: tuple[TokenInfo, ...] | None = tuple(tokens)
        self._num_tokens = len(tokens)
        self.table = torch.tensor(table, dtype=torch.int64)  # (n_pieces, 10), see PIECE_COLUMNS

    def _init_neuron(self, spec: MLPSpec, chunk) -> None:
        if spec.num_layers != 2:
            raise ValueError(f"neuron tokens need an MLP with exactly one hidden layer, got MLPSpec"
                             f"{spec.layer_sizes} with {spec.num_layers - 1}; deeper MLPs have no token set whose "
                             "permutations are their symmetries (use kind='layer' with permutation augmentation)")
        d, h, m = spec.layer_sizes
        C = d + 1 + m
        if chunk is not None and chunk != C:
            raise ValueError(f"neuron tokens of MLPSpec{spec.layer_sizes} are {C} values wide (in + 1 + out); "
                             f"chunk {chunk!r} cannot change that (pass chunk=None)")
        self.chunk = C
        o = spec.piece_offsets
        self.table = torch.tensor([
            # SRC  DST     ROWS COLS RPERM CPERM NORM DLEN   RS CS
            [o[0], 0,      h,   d,   0,    -1,   0,   h * d, C, 1],    # W_0 row j -> token j [0, d)
            [o[1], d,      h,   1,   0,    -1,   1,   h,     C, 1],    # b_0[j]    -> token j [d]
            [o[2], d + 1,  m,   h,   -1,   0,    2,   m * h, 1, C],    # W_1[:, j] -> token j [d+1, C)
            [o[3], h * C,  m,   1,   -1,   -1,   3,   C,     1, 1],    # b_1 -> token h, zero-padded
        ], dtype=torch.int64)
        self._tokens = None
        self._num_tokens = h + 1

    @property
    def tokens(self) -> tuple[TokenInfo, ...]:
        """Layer-wise layout: what each token holds (layer, is_bias, offset, length)."""
        if self._tokens is None:
            raise TypeError("a neuron TokenLayout's tokens mix pieces; use token_mask() / piece_map()")
        return self._tokens

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def token_width(self) -> int:
        return self.chunk

    @property
    def num_unit_tokens(self) -> int:
        """Neuron layout: the h hidden-unit tokens come first (the output-bias token last); 0 for "layer"."""
        return self._num_tokens - 1 if self.kind == "neuron" else 0

    @cached_property
    def strided(self) -> bool:
        """Whether the table has strided pieces (kernels then take their general path)."""
        return table_is_strided(self.table)

    def piece_map(self) -> torch.Tensor:
        """(T, C) int64: index of the piece (flat order) each token value belongs to, -1 = padding."""
        own = table_footprint(self.table, self._num_tokens * self.chunk, padding=False)
        return own.view(self._num_tokens, self.chunk)

    def token_mask(self) -> torch.Tensor:
        """(T, C) float32: 1 at real values, 0 at zero padding."""
        return (self.piece_map() >= 0).float()

    def __repr__(self) -> str:
        if self.kind == "neuron":
            return f"TokenLayout({self.spec.layer_sizes}, kind='neuron', tokens={self.num_tokens} of {self.chunk})"
        return f"TokenLayout({self.spec.layer_sizes}, chunk={self.chunk}, tokens={self.num_tokens})"

    def __eq__(self, other) -> bool:
        return (isinstance(other, TokenLayout) and other.spec == self.spec and other.chunk == self.chunk
                and other.kind == self.kind)

    def __hash__(self) -> int:
        return hash((self.spec, self.chunk, self.kind))


class ParamNorm:
    """Per-piece affine normalization y = (x - shift) * scale, inverted as x = y / scale + shift.

    One (shift, scale) pair per piece (each layer's weight and bias), fitted on a dataset of
    flat parameter vectors so that normalized values have zero mean and unit variance, which
    lets the forward diffusion process destroy nearly all signal (G.pt, Peebles et al. 2022).
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
