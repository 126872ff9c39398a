"""Triton class_metrics: per-class loss / correct sums of B ReLU MLPs on shared inputs, fused.

Mirrors hyforget_fast.ops.reference.class_sums (batched einsum forward, log_softmax, CE =
logsumexp - logit[y], torch.argmax with the first maximum on ties, index_add per class).

One program owns a tile of BLOCK_N input rows and a group of G networks:
  * first layer: tl.dot of the X tile (BLOCK_N, BLOCK_D) with the group's packed W1^T
    (BLOCK_D, COLS1), looping over D. Column j of the packed tile is hidden unit j % H1 of
    network j // H1, so small hidden widths (h = 2, 7, 10) do not each pad to 16 columns.
  * later layers: one tl.dot with a block-diagonal (in cols, G*WP) weight tile per layer;
    the output of network g sits in columns g*WP .. g*WP+WP-1.
  * logits reshaped to (BLOCK_N, G, WP): log-softmax, CE, first-max argmax per (row, network).
  * per-class sums via one-hot masks, then tl.atomic_add into the (B, num_classes) outputs.
No (B, N, hidden) or (B, N, m) tensor is ever written to memory.

Non-finite values: a block-diagonal dot multiplies one network's hidden units by the zeros
of its neighbours' blocks, and NaN * 0 = NaN. So non-finite hidden values are replaced by 0
before each dot and tracked in a per-(row, network) flag instead; flagged rows get a NaN loss
and a correct count of 0 (finite), so a broken network never poisons its neighbours.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

MAX_WIDTH = 64  # hidden widths and classes; the epilogue holds a row's activations in registers


@triton.jit
def _class_sums_kernel(X, PARAMS, Y, LOSS, CORR, META, N, D, B, PSTRIDE, NUMC, M,
                       H1: tl.constexpr, G: tl.constexpr, COLS1: tl.constexpr, WP: tl.constexpr,
                       NUM_LAYERS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """X (N, D), PARAMS (B, PSTRIDE), Y (N,) int64 -> atomically adds into LOSS, CORR (B, NUMC) f32.

    META (NUM_LAYERS, 4) int64: weight offset, bias offset, fan in, fan out of each layer.
    Grid: (cdiv(B, G), cdiv(N, BLOCK_N)).
    """
    pid_g = tl.program_id(0)
    pid_n = tl.program_id(1)
    b0 = pid_g * G
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N

    # ---- first layer: (BLOCK_N, D) @ packed W1^T (D, COLS1), fp32 accumulate
    j = tl.arange(0, COLS1)
    jg = j // H1
    jk = j % H1
    jnet = (b0 + jg).to(tl.int64)
    jmask = (jg < G) & (jnet < B)
    wrow = jnet * PSTRIDE + jk * D  # W1 is the first piece of a flat vector
    acc = tl.zeros((BLOCK_N, COLS1), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        x = tl.load(X + rows[:, None].to(tl.int64) * D + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        w = tl.load(PARAMS + wrow[None, :] + dd[:, None], mask=jmask[None, :] & dmask[:, None], other=0.0)
        if UPCAST:  # triton 3.8's interpreter multiplies bfloat16 dot operands as raw bits
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    b1 = tl.load(PARAMS + jnet * PSTRIDE + H1 * D + jk, mask=jmask, other=0.0).to(tl.float32)
    z = acc + b1[None, :]
    badz = ~(tl.abs(z) < float("inf"))  # NaN or +-Inf
    h = tl.where(badz | (z <= 0.0), 0.0, z)  # ReLU on sanitized values
    bad_in = tl.where(badz, 1.0, 0.0)

    # ---- later layers: block-diagonal dots; output of network g in columns g*WP + c
    o = tl.arange(0, G * WP)
    og = o // WP
    oc = o % WP
    onet = (b0 + og).to(tl.int64)
    omask = onet < B
    for l in tl.static_range(1, NUM_LAYERS):
        woff = tl.load(META + 4 * l)
        boff = tl.load(META + 4 * l + 1)
        fin = tl.load(META + 4 * l + 2)
        fout = tl.load(META + 4 * l + 3)
        if l == 1:
            ig = jg
            ik = jk
            inet = jnet
            ivalid = jmask
        else:
            ig = og
            ik = oc
            inet = onet
            ivalid = omask & (oc < fin)
        same = (ig[:, None] == og[None, :]) & ivalid[:, None]  # (in cols, G*WP) block diagonal
        wmask = same & (oc[None, :] < fout)
        w = tl.load(PARAMS + inet[:, None] * PSTRIDE + woff + oc[None, :] * fin + ik[:, None], mask=wmask,
                    other=0.0).to(tl.float32)
        # counts the non-finite inputs of each (row, network), spread over that network's columns
        badcnt = tl.dot(bad_in, tl.where(same, 1.0, 0.0), input_precision="ieee")
        bo = tl.load(PARAMS + onet * PSTRIDE + boff + oc, mask=omask & (oc < fout), other=0.0).to(tl.float32)
        z = tl.dot(h, w, input_precision="ieee") + bo[None, :]
        badz = ~(tl.abs(z) < float("inf")) & (oc[None, :] < fout)
        bad_in = tl.where(badz | (badcnt > 0.0), 1.0, 0.0)
        h = tl.where(badz | (z <= 0.0), 0.0, z)

    # ---- log-softmax, CE, argmax per (row, network); z holds the logits
    c3 = tl.reshape(oc, (1, G, WP))
    logits = tl.where(c3 < M, tl.reshape(z, (BLOCK_N, G, WP)), float("-inf"))
    bad = tl.max(tl.reshape(bad_in, (BLOCK_N, G, WP)), axis=2) > 0.0  # (BLOCK_N, G)
    logits = tl.where(bad[:, :, None] & (c3 < M), 0.0, logits)  # keep the math finite; loss set below
    mx = tl.max(logits, axis=2)
    lse = mx + tl.log(tl.sum(tl.exp(logits - mx[:, :, None]), axis=2))
    yv = tl.load(Y + rows, mask=rmask, other=0).to(tl.int32)
    ylogit = tl.sum(tl.where(c3 == yv[:, None, None], logits, 0.0), axis=2)
    loss = tl.where(bad, float("nan"), lse - ylogit)
    first = tl.min(tl.where(logits == mx[:, :, None], c3, WP), axis=2)  # first max, like torch.argmax
    corr = tl.where(bad | (first != yv[:, None]), 0.0, 1.0)

    # ---- per-class sums over this tile's rows, then one atomic per (network, class)
    cls = tl.arange(0, WP)
    sel = rmask[:, None] & (yv[:, None] == cls[None, :]) & (yv[:, None] < M)  # (BLOCK_N, WP) one-hot
    lsum = tl.sum(tl.where(sel[:, None, :], loss[:, :, None], 0.0), axis=0)  # (G, WP); where, not *: NaN * 0
    csum = tl.sum(tl.where(sel[:, None, :], corr[:, :, None], 0.0), axis=0)
    gi = tl.arange(0, G)
    out = (b0 + gi[:, None]).to(tl.int64) * NUMC + cls[None, :]
    omask2 = ((b0 + gi[:, None]) < B) & (cls[None, :] < NUMC) & (cls[None, :] < M)
    tl.atomic_add(LOSS + out, lsum, mask=omask2)
    tl.atomic_add(CORR + out, csum, mask=omask2)


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def plan(layer_sizes: Sequence[int], B: int, cols: int = 64, max_out: int = 64) -> tuple[int, int, int]:
    """(G, COLS1, WP): networks per program, packed first-layer columns, padded later width.

    G is a power of two (the logits are reshaped to (BLOCK_N, G, WP)) with G * H1 <= cols
    where possible; tl.dot needs every dimension >= 16.
    """
    h1 = layer_sizes[1]
    wp = _pow2(max(layer_sizes[2:]))
    g = 1
    while 2 * g * h1 <= cols and 2 * g <= _pow2(B) and 2 * g * wp <= max_out:
        g *= 2
    wp = max(wp, 16 // g)
    return g, max(16, _pow2(g * h1)), wp


def layer_meta(layer_sizes: Sequence[int]) -> torch.Tensor:
    """(L, 4) int64: weight offset, bias offset, fan in, fan out of each layer (flat order)."""
    rows, off = [], 0
    for fin, fout in zip(layer_sizes[:-1], layer_sizes[1:]):
        rows.append([off, off + fin * fout, fin, fout])
        off += fin * fout + fout
    return torch.tensor(rows, dtype=torch.int64)


def class_sums(params: torch.Tensor, layer_sizes: Sequence[int], X: torch.Tensor, y: torch.Tensor,
               num_classes: int, *, block_n: int | None = None, block_d: int | None = None,
               input_precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of cross-entropy and of correct predictions, each (B, num_classes) float32.

    params (B, P) with P = MLPSpec(layer_sizes).num_params, X (N, D), same float dtype
    (float32 / float16 / bfloat16) and device; y (N,) integer labels in [0, num_classes).
    input_precision applies to float32 first-layer dots: "ieee" (default, full fp32 like
    PyTorch's default matmul) or "tf32" (faster on tensor cores, ~1e-3 relative error).
    Labels outside [0, min(num_classes, m)) are not counted (the public op rejects them).
    """
    sizes = tuple(int(s) for s in layer_sizes)
    if len(sizes) < 3:
        raise ValueError(f"class_sums needs (in, hidden..., out) layer sizes, got {sizes}")
    if max(sizes[1:]) > MAX_WIDTH:
        raise ValueError(f"triton class_sums supports hidden widths and classes <= {MAX_WIDTH}, got {sizes}")
    if params.dim() != 2 or X.dim() != 2 or y.dim() != 1:
        raise ValueError("class_sums expects params (B, P), X (N, D), y (N,)")
    meta = layer_meta(sizes)
    P = int(meta[-1, 1] + meta[-1, 3])
    if params.shape[1] != P:
        raise ValueError(f"params must be (B, {P}) for layer sizes {sizes}, got {tuple(params.shape)}")
    if X.shape[1] != sizes[0]:
        raise ValueError(f"X must be (N, {sizes[0]}), got {tuple(X.shape)}")
    if y.shape[0] != X.shape[0]:
        raise ValueError(f"y must be ({X.shape[0]},), got {tuple(y.shape)}")
    if params.dtype not in (torch.float32, torch.float16, torch.bfloat16) or X.dtype != params.dtype:
        raise TypeError(f"params and X must share a float32/float16/bfloat16 dtype, got {params.dtype}, {X.dtype}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer labels, got {y.dtype}")
    if not (params.device == X.device == y.device):
        raise ValueError(f"params, X, y must be on one device, got {params.device}, {X.device}, {y.device}")
    B, N, D = params.shape[0], X.shape[0], X.shape[1]
    loss = torch.zeros(B, num_classes, dtype=torch.float32, device=X.device)
    corr = torch.zeros(B, num_classes, dtype=torch.float32, device=X.device)
    if B == 0 or N == 0 or num_classes == 0:
        return loss, corr
    G, cols1, wp = plan(sizes, B)
    interp = bool(triton.knobs.runtime.interpret)
    bn = block_n or (16 if interp else 64)
    bd = block_d or (16 if interp else 32)
    grid = (triton.cdiv(B, G), triton.cdiv(N, bn))
    if grid[1] > 65535:
        raise ValueError(f"N = {N} is too large for block_n = {bn}; raise block_n")
    _class_sums_kernel[grid](X.contiguous(), params.contiguous(), y.contiguous().long(), loss, corr, meta.to(X.device),
                             N, D, B, P, num_classes, sizes[-1],
                             H1=sizes[1], G=G, COLS1=cols1, WP=wp, NUM_LAYERS=len(sizes) - 1, BLOCK_N=bn,
                             BLOCK_D=bd, PRECISION=input_precision, UPCAST=interp and X.dtype == torch.bfloat16,
                             num_warps=4)
    return loss, corr
