"""Triton gather_pieces / scatter_pieces: fused permute + normalize + tokenize and its inverse.

Mirrors hyforget_fast.ops.reference.tokenize / detokenize (and the C++ and CUDA kernels) bit for
bit: normalization is (x - shift) * scale and its inverse y / scale + shift with
correctly-rounded division, computed in float32. The piece table (see hyforget_fast.ops.spec) is
read per program; the number of pieces is a compile-time constant, so the piece lookup
unrolls into a few compares. Tables with strided pieces (the neuron layout; ownership rule in
hyforget_fast/ops/spec.py PIECE_COLUMNS) compile a STRIDED variant that decodes each output
position against every piece; the layer-wise layout keeps the cheaper sorted lookup.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_GRID_Y = 65535
_NCOLS = 10  # len(PIECE_COLUMNS)


@triton.jit
def _from_f32(v, DTYPE: tl.constexpr):
    """float32 -> DTYPE rounded to nearest-even, like torch's .to(). bfloat16 rounds by hand:
    the Triton interpreter truncates float32 -> bfloat16, and the result must not depend on it."""
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000  # exact bf16 value held in float32
        r = bits.to(tl.float32, bitcast=True)
        return tl.where(v != v, v, r).to(tl.bfloat16)  # NaN stays NaN
    else:
        return v.to(DTYPE)


@triton.jit
def _piece_fields(table_ptr, d, NPIECES: tl.constexpr, KEY: tl.constexpr):
    """For each output column d, the fields of the piece owning it (key column KEY: 1=DST, 0=SRC)."""
    src = tl.zeros_like(d)
    dst = tl.zeros_like(d)
    rows = tl.zeros_like(d)
    cols = tl.zeros_like(d) + 1
    rperm = tl.zeros_like(d) - 1
    cperm = tl.zeros_like(d) - 1
    nidx = tl.zeros_like(d)
    rs = tl.zeros_like(d) + 1
    cs = tl.zeros_like(d) + 1
    for p in tl.static_range(NPIECES):
        start = tl.load(table_ptr + p * 10 + KEY)
        hit = d >= start  # pieces are sorted by KEY: the last piece starting at or before d owns it
        src = tl.where(hit, tl.load(table_ptr + p * 10 + 0), src)
        dst = tl.where(hit, tl.load(table_ptr + p * 10 + 1), dst)
        rows = tl.where(hit, tl.load(table_ptr + p * 10 + 2), rows)
        cols = tl.where(hit, tl.load(table_ptr + p * 10 + 3), cols)
        rperm = tl.where(hit, tl.load(table_ptr + p * 10 + 4), rperm)
        cperm = tl.where(hit, tl.load(table_ptr + p * 10 + 5), cperm)
        nidx = tl.where(hit, tl.load(table_ptr + p * 10 + 6), nidx)
        rs = tl.where(hit, tl.load(table_ptr + p * 10 + 8), rs)
        cs = tl.where(hit, tl.load(table_ptr + p * 10 + 9), cs)
    return src, dst, rows, cols, rperm, cperm, nidx, rs, cs


@triton.jit
def _owner_fields(table_ptr, d, NPIECES: tl.constexpr):
    """Strided tables: for each output column d, the owning piece's fields, the element (r, c) it
    holds and whether it is a real value (False on padding and on positions no piece owns)."""
    found = d < 0
    real = d < 0
    src = tl.zeros_like(d)
    cols = tl.zeros_like(d) + 1
    rows = tl.zeros_like(d)
    rperm = tl.zeros_like(d) - 1
    cperm = tl.zeros_like(d) - 1
    nidx = tl.zeros_like(d)
    r = tl.zeros_like(d)
    c = tl.zeros_like(d)
    for p in tl.static_range(NPIECES):
        p_dst = tl.load(table_ptr + p * 10 + 1)
        p_rows = tl.load(table_ptr + p * 10 + 2)
        p_cols = tl.load(table_ptr + p * 10 + 3)
        p_dlen = tl.load(table_ptr + p * 10 + 7)
        p_rs = tl.load(table_ptr + p * 10 + 8)
        p_cs = tl.load(table_ptr + p * 10 + 9)
        contiguous = (p_rs == p_cols) & (p_cs == 1)
        row_major = p_cs * p_cols <= p_rs  # contiguous pieces are row-major too
        pos = tl.maximum(d - p_dst, 0)
        inside = d >= p_dst
        big_s = tl.where(row_major, p_rs, p_cs)    # the major stride and its extent
        small_s = tl.where(row_major, p_cs, p_rs)
        big_n = tl.where(row_major, p_rows, p_cols)
        small_n = tl.where(row_major, p_cols, p_rows)
        major = pos // big_s
        rem = pos - major * big_s
        minor = rem // small_s
        p_real = inside & (major < big_n) & (minor < small_n) & (rem == minor * small_s)
        p_owns = p_real | (contiguous & inside & (pos < p_dlen))
        take = p_owns & (~found)
        found = found | p_owns
        real = tl.where(take, p_real, real)
        r = tl.where(take, tl.where(row_major, major, minor), r)
        c = tl.where(take, tl.where(row_major, minor, major), c)
        src = tl.where(take, tl.load(table_ptr + p * 10 + 0), src)
        rows = tl.where(take, p_rows, rows)
        cols = tl.where(take, p_cols, cols)
        rperm = tl.where(take, tl.load(table_ptr + p * 10 + 4), rperm)
        cperm = tl.where(take, tl.load(table_ptr + p * 10 + 5), cperm)
        nidx = tl.where(take, tl.load(table_ptr + p * 10 + 6), nidx)
    return real, r, c, src, rows, cols, rperm, cperm, nidx


@triton.jit
def _gather_pieces_kernel(src_ptr, dst_ptr, table_ptr, perm_ptr, norm_ptr, P, W, PW,
                          NPIECES: tl.constexpr, HAS_PERM: tl.constexpr, HAS_NORM: tl.constexpr,
                          BLOCK: tl.constexpr, STRIDED: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    d = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # output columns
    in_row = d < W
    if STRIDED:
        real, r, c, src, rows, cols, rperm, cperm, nidx = _owner_fields(table_ptr, d, NPIECES)
        real = in_row & real
    else:
        src, dst, rows, cols, rperm, cperm, nidx, rs, cs = _piece_fields(table_ptr, d, NPIECES, 1)
        pos = d - dst
        real = in_row & (pos < rows * cols)  # False on zero padding
        r = pos // cols
        c = pos - r * cols
    if HAS_PERM:
        r = tl.where(rperm >= 0, tl.load(perm_ptr + b * PW + rperm + r, mask=real & (rperm >= 0), other=0), r)
        c = tl.where(cperm >= 0, tl.load(perm_ptr + b * PW + cperm + c, mask=real & (cperm >= 0), other=0), c)
        # validate=False with a broken permutation gives unspecified values, never a wild read.
        r = tl.where((r >= 0) & (r < rows), r, 0)
        c = tl.where((c >= 0) & (c < cols), c, 0)
    v = tl.load(src_ptr + b * P + src + r * cols + c, mask=real, other=0.0)
    if HAS_NORM:
        shift = tl.load(norm_ptr + 2 * nidx, mask=real, other=0.0)
        scale = tl.load(norm_ptr + 2 * nidx + 1, mask=real, other=1.0)
        v = _from_f32((v.to(tl.float32) - shift) * scale, dst_ptr.dtype.element_ty)
    v = tl.where(real, v, 0.0)
    tl.store(dst_ptr + b * W + d, v.to(dst_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _scatter_pieces_kernel(src_ptr, dst_ptr, table_ptr, norm_ptr, W, P,
                           NPIECES: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK: tl.constexpr,
                           STRIDED: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # flat param index
    ok = i < P
    src, dst, rows, cols, rperm, cperm, nidx, rs, cs = _piece_fields(table_ptr, i, NPIECES, 0)
    off = i - src
    if STRIDED:  # element (r, c) of its piece sits at r*RS + c*CS
        r = off // cols
        off = r * rs + (off - r * cols) * cs
    v = tl.load(src_ptr + b * W + dst + off, mask=ok, other=0.0)
    if HAS_NORM:
        shift = tl.load(norm_ptr + 2 * nidx, mask=ok, other=0.0)
        scale = tl.load(norm_ptr + 2 * nidx + 1, mask=ok, other=1.0)
        v = _from_f32(tl.math.div_rn(v.to(tl.float32), scale) + shift, dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + b * P + i, v, mask=ok)


def _check(x: torch.Tensor, table: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"triton gather kernels support float32/float16/bfloat16, got {x.dtype}")
    if table.dtype != torch.int64 or table.ndim != 2 or table.shape[1] != _NCOLS or table.device != x.device:
        raise ValueError(f"piece table must be int64 (n_pieces, {_NCOLS}) on the data's device")


def _strided(table: torch.Tensor, strided: bool | None) -> bool:
    """The caller's knowledge (TokenLayout.strided), else read from the table (a device sync on CUDA)."""
    if strided is not None:
        return bool(strided)
    t = table.cpu()
    return bool(((t[:, 8] != t[:, 3]) | (t[:, 9] != 1)).any())


def gather_pieces(params: torch.Tensor, table: torch.Tensor, perms: torch.Tensor | None,
                  norm: torch.Tensor | None, out_width: int, block: int = 1024,
                  out: torch.Tensor | None = None, strided: bool | None = None) -> torch.Tensor:
    """(B, P) -> (B, out_width): out[b, DST + r*RS + c*CS] = norm(params[b, SRC + perm(r, c)]), zero padding.
    strided: whether the table has strided pieces (None: read it from the table)."""
    _check(params, table)
    strided = _strided(table, strided)
    x = params.contiguous()
    B, P = x.shape
    if out is None:
        out = torch.empty(B, out_width, dtype=x.dtype, device=x.device)
    pc = perms.contiguous() if perms is not None else x  # dummy pointer when unused
    nc = norm.contiguous() if norm is not None else x
    for b0 in range(0, B, _MAX_GRID_Y):  # grid axis 1 is limited to 65535
        b1 = min(B, b0 + _MAX_GRID_Y)
        grid = (triton.cdiv(out_width, block), b1 - b0)
        _gather_pieces_kernel[grid](x[b0:b1], out[b0:b1], table, pc[b0:b1] if perms is not None else pc, nc,
                                    P, out_width, pc.shape[1] if perms is not None else 0,
                                    NPIECES=table.shape[0], HAS_PERM=perms is not None,
                                    HAS_NORM=norm is not None, BLOCK=block, STRIDED=strided)
    return out


def scatter_pieces(tokens: torch.Tensor, table: torch.Tensor, norm: torch.Tensor | None, out_width: int,
                   block: int = 1024, strided: bool | None = None) -> torch.Tensor:
    """(B, T*C) -> (B, out_width = P): inverse of gather_pieces without permutation."""
    _check(tokens, table)
    strided = _strided(table, strided)
    x = tokens.contiguous()
    B, W = x.shape
    out = torch.empty(B, out_width, dtype=x.dtype, device=x.device)
    nc = norm.contiguous() if norm is not None else x
    for b0 in range(0, B, _MAX_GRID_Y):
        b1 = min(B, b0 + _MAX_GRID_Y)
        grid = (triton.cdiv(out_width, block), b1 - b0)
        _scatter_pieces_kernel[grid](x[b0:b1], out[b0:b1], table, nc, W, out_width,
                                     NPIECES=table.shape[0], HAS_NORM=norm is not None, BLOCK=block,
                                     STRIDED=strided)
    return out
