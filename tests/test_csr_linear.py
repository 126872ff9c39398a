"""Sparse-input ops: csr_linear, csr_linear_sub_grad_ and class_metrics on a CSR X.

Arithmetic is checked flash-attention style: the kernel's largest error against the exact
result on the very same (rounded) inputs may be at most 2x the error of same-precision
PyTorch, plus an absolute floor of a few ulps of the output's magnitude (sum |x| |w|), which
covers outputs that PyTorch happens to get exactly right. "Exact" is numpy's x87 long double
(64-bit mantissa), so that float64 kernels are measured against something more precise than
themselves; class_metrics reuses test_class_metrics' float64-reference check. The C++ kernels
hold 64 floats / 32 doubles of a row in registers, with 1..3-vector tails and a scalar tail,
so the column counts below straddle every one of those cases.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hyforget_fast as hf
from hyforget_fast.ops import functional as ops
from hyforget_fast.ops import reference as ref

from conftest import ODD_WIDTHS
from test_class_metrics import _assert_matches_float64, _random_params

torch.set_num_threads(1)

CI = settings.get_profile("ci")  # derandomized whatever profile the session loaded
DTYPES = (torch.float32, torch.float64)
# Output widths around the kernels' tiles: 16 floats / 8 doubles per vector, 4 vectors per tile.
WIDTHS = (1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 130)
BLANK_COL = 1  # a column with no nonzero in any row (when D > 2)


# ----------------------------------------------------------------------------- inputs
def _sparse_dense(g: torch.Generator, n: int, d: int, zero_frac: float) -> torch.Tensor:
    """(n, d) float64 with ~zero_frac zeros, ~1/5 of the rows all zero and one blank column."""
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X[torch.rand(n, d, generator=g) < zero_frac] = 0
    X[torch.rand(n, generator=g) < 0.2] = 0
    if d > 2:
        X[:, BLANK_COL] = 0
    return X


def _to_csr(Xd: torch.Tensor, g: torch.Generator, *, explicit_zeros: bool = False, shuffle: bool = False,
            int32: bool = False) -> torch.Tensor:
    """Xd as a sparse CSR tensor. explicit_zeros also stores ~10% of the zeros; shuffle puts each
    row's entries in random column order (valid CSR, not canonical); int32 uses int32 indices."""
    mask = Xd != 0
    if explicit_zeros:
        mask |= torch.rand(Xd.shape, generator=g) < 0.1
    rows, col = mask.nonzero(as_tuple=True)
    val = Xd[rows, col]
    if shuffle and col.numel():
        order = torch.argsort(rows.double() + torch.rand(col.numel(), generator=g, dtype=torch.float64))
        col, val = col[order], val[order]
    crow = torch.zeros(Xd.shape[0] + 1, dtype=torch.int64)
    crow[1:] = mask.sum(1).cumsum(0)
    idx = torch.int32 if int32 else torch.int64
    return torch.sparse_csr_tensor(crow.to(idx), col.to(idx), val, Xd.shape)


def _csr_arrays(X: torch.Tensor):
    return X.crow_indices().long().contiguous(), X.col_indices().long().contiguous(), X.values().contiguous()


def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def _ld(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy().astype(np.longdouble)


def _exact_linear(Xd, weight_t, bias, rows) -> np.ndarray:
    """X[rows] @ weight_t + bias in long double."""
    Xl = _ld(Xd if rows is None else Xd[rows])
    out = Xl @ _ld(weight_t)
    return out if bias is None else out + _ld(bias)


def _exact_sub_grad(Xd, grad, weight_t, rows) -> np.ndarray:
    """weight_t - X[rows]^T @ grad in long double."""
    Xl = _ld(Xd if rows is None else Xd[rows])
    return _ld(weight_t) - Xl.T @ _ld(grad)


def _assert_flash_bound(got: torch.Tensor, same: torch.Tensor, exact: np.ndarray, scale: float,
                        dtype: torch.dtype, what: str) -> None:
    """max |got - exact| <= 2 max |same - exact| + 4 eps (1 + scale)."""
    assert tuple(got.shape) == exact.shape and got.dtype == dtype, (got.shape, got.dtype)

    def err(t):
        return float(np.abs(_ld(t) - exact).max()) if exact.size else 0.0

    e, e_same = err(got), err(same)
    floor = 4 * torch.finfo(dtype).eps * (1 + scale)
    assert e <= 2 * e_same + floor, f"{what}: error {e:.3g} vs same-precision torch {e_same:.3g} (floor {floor:.3g})"


@st.composite
def linear_cases(draw, dtype: torch.dtype, c: int):
    """A sparse X (N, D), D odd; weight_t (D, c) that may be a column slice of a wider matrix;
    bias or None; rows None (all), (M,) in any order with repeats, or empty."""
    n = draw(st.one_of(st.sampled_from([1, 2, 5, 65, 150]), st.integers(1, 150)), label="N")
    d = 2 * draw(st.integers(0, 20), label="D // 2") + 1  # odd
    pad = draw(st.sampled_from([0, 0, 3, 16]), label="extra columns of the parent matrix")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    Xd = _sparse_dense(g, n, d, draw(st.floats(0.2, 0.8), label="zero fraction")).to(dtype)
    X = _to_csr(Xd, g, explicit_zeros=draw(st.booleans()), shuffle=draw(st.booleans()),
                int32=draw(st.booleans()))
    parent = torch.randn(d, c + pad, generator=g, dtype=torch.float64).to(dtype)
    off = int(torch.randint(0, pad + 1, (), generator=g))
    weight_t = parent[:, off:off + c]  # row stride c + pad, unit column stride
    bias = torch.randn(c, generator=g, dtype=torch.float64).to(dtype) if draw(st.booleans(), label="bias") else None
    how = draw(st.sampled_from(["all", "repeated", "repeated", "empty"]), label="rows")
    rows = None
    if how == "repeated":  # any order, with repeats, possibly more rows than X has
        m = draw(st.integers(1, 150), label="M")
        rows = torch.randint(0, n, (m,), generator=g)
        rows[0] = rows[-1]
    elif how == "empty":
        rows = torch.zeros(0, dtype=torch.int64)
    return X, Xd, parent, off, weight_t, bias, rows, g


# ----------------------------------------------------------------------------- csr_linear
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,c", [("cpp", c) for c in WIDTHS] + [("reference", 17), ("reference", 130)])
@settings(CI, max_examples=10)
@given(data=st.data())
def test_csr_linear_matches_float64(backend, c, dtype, data):
    case = data.draw(linear_cases(dtype, c))
    X, Xd, _, _, weight_t, bias, rows, _ = case
    got = ops.csr_linear(X, weight_t, bias, rows=rows, backend=backend)
    M = X.shape[0] if rows is None else rows.numel()
    assert got.shape == (M, weight_t.shape[1])
    exact = _exact_linear(Xd, weight_t, bias, rows)
    same = ref.csr_linear(Xd, weight_t, bias, rows)
    Xa = Xd.double().abs() if rows is None else Xd.double().abs()[rows]
    mag = Xa @ weight_t.double().abs() + (0 if bias is None else bias.double().abs())
    _assert_flash_bound(got, same, exact, _max_abs(mag), dtype, f"csr_linear[{backend}]")
    if backend == "cpp":  # the wrapper ran the native kernel, which reads weight_t through its row stride
        raw = torch.ops.hyforget.csr_linear(*_csr_arrays(X), rows, weight_t, bias)
        assert torch.equal(got, raw)
        assert torch.equal(raw, torch.ops.hyforget.csr_linear(*_csr_arrays(X), rows, weight_t.contiguous(), bias))


def test_csr_linear_takes_only_the_given_rows_in_their_order():
    """Exact small case: integer-valued data, so every order of summation gives the same result."""
    Xd = torch.tensor([[0., 2, 0, 0, 1], [0, 0, 0, 0, 0], [3, 0, 0, -1, 0]])
    W = torch.arange(5 * 17, dtype=torch.float32).view(5, 17) - 40
    b = torch.arange(17, dtype=torch.float32)
    rows = torch.tensor([2, 1, 2, 0])
    for dtype in DTYPES:
        X = Xd.to(dtype).to_sparse_csr()
        want = Xd.to(dtype)[rows] @ W.to(dtype) + b.to(dtype)
        assert torch.equal(ops.csr_linear(X, W.to(dtype), b.to(dtype), rows=rows, backend="cpp"), want)
        assert torch.equal(ops.csr_linear(X, W.to(dtype), backend="cpp"), Xd.to(dtype) @ W.to(dtype))


def test_csr_linear_weight_views():
    """weight_t as a column slice of a wider matrix (row stride > C) runs the kernel; a weight_t
    without unit column stride (a transposed weight) goes to the reference. Both are right."""
    g = torch.Generator().manual_seed(3)
    Xd = _sparse_dense(g, 70, 13, 0.6).float()
    X = Xd.to_sparse_csr()
    wide = torch.randn(13, 100, generator=g)
    rows = torch.tensor([5, 69, 0, 5])
    for c0, c1 in ((0, 65), (3, 20), (35, 100), (99, 100)):
        w = wide[:, c0:c1]
        want = ops.csr_linear(X, w.contiguous(), rows=rows, backend="cpp")
        assert torch.equal(torch.ops.hyforget.csr_linear(*_csr_arrays(X), rows, w, None), want)
        assert torch.equal(ops.csr_linear(X, w, rows=rows, backend="cpp"), want)
        torch.testing.assert_close(want, Xd[rows] @ w, rtol=1e-5, atol=1e-5)
    W = torch.randn(9, 13, generator=g)  # a layer's weight (C, D): W.t() has column stride 13
    torch.testing.assert_close(ops.csr_linear(X, W.t(), backend="cpp"), Xd @ W.t(), rtol=1e-5, atol=1e-5)


def test_csr_linear_degenerate_shapes():
    for dtype in DTYPES:
        W, b = torch.randn(7, 5, dtype=dtype), torch.randn(5, dtype=dtype)
        empty_X = torch.zeros(0, 7, dtype=dtype).to_sparse_csr()
        assert ops.csr_linear(empty_X, W, b, backend="cpp").shape == (0, 5)
        zeros = torch.zeros(4, 7, dtype=dtype).to_sparse_csr()  # nnz = 0: every output is the bias
        assert torch.equal(ops.csr_linear(zeros, W, b, backend="cpp"), b.expand(4, 5))
        assert torch.equal(ops.csr_linear(zeros, W, backend="cpp"), torch.zeros(4, 5, dtype=dtype))
        X = torch.eye(7, dtype=dtype)[:3].to_sparse_csr()
        assert ops.csr_linear(X, W[:, :0], backend="cpp").shape == (3, 0)
        W0 = W.clone()
        assert ops.csr_linear_sub_grad_(zeros, torch.randn(4, 5, dtype=dtype), W, backend="cpp") is W
        assert torch.equal(W, W0)


# ----------------------------------------------------------------------------- csr_linear_sub_grad_
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,c", [("cpp", c) for c in WIDTHS] + [("reference", 17), ("reference", 130)])
@settings(CI, max_examples=10)
@given(data=st.data())
def test_csr_linear_sub_grad_matches_float64(backend, c, dtype, data):
    case = data.draw(linear_cases(dtype, c))
    X, Xd, parent, off, weight_t, _, rows, g = case
    D, C = weight_t.shape
    M = X.shape[0] if rows is None else rows.numel()
    grad = (torch.randn(M, C, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    before, parent_before = weight_t.clone(), parent.clone()
    exact = _exact_sub_grad(Xd, grad, weight_t, rows)
    same = ref.csr_linear_sub_grad(Xd, grad, weight_t, rows)
    Xa = Xd.double().abs() if rows is None else Xd.double().abs()[rows]
    mag = weight_t.double().abs() + Xa.t() @ grad.double().abs()

    out = ops.csr_linear_sub_grad_(X, grad, weight_t, rows=rows, backend=backend)
    assert out is weight_t  # in place, the caller's tensor
    _assert_flash_bound(weight_t, same, exact, _max_abs(mag), dtype, f"csr_linear_sub_grad_[{backend}]")
    # Weight rows of input columns that no taken row stores are not touched at all, nor is
    # anything of the parent matrix outside the slice.
    stored = torch.zeros(D, dtype=torch.bool)
    Xs = _to_csr(Xd, g)  # structure: every nonzero of the taken rows
    taken = torch.arange(X.shape[0]) if rows is None else rows
    for r in taken.tolist():
        stored[Xs.col_indices()[Xs.crow_indices()[r]:Xs.crow_indices()[r + 1]]] = True
    assert torch.equal(weight_t[~stored], before[~stored])
    outside = torch.ones(parent.shape[1], dtype=torch.bool)
    outside[off:off + C] = False
    assert torch.equal(parent[:, outside], parent_before[:, outside])
    if M and C and stored.any():
        assert not torch.equal(weight_t[stored], before[stored])  # and the used rows did move


def test_csr_linear_sub_grad_raw_op_on_a_column_slice():
    """The raw op updates a column slice of a wider matrix in place, nothing outside it, and
    returns nothing."""
    g = torch.Generator().manual_seed(4)
    Xd = _sparse_dense(g, 90, 11, 0.5)
    X = Xd.to_sparse_csr()
    rows = torch.tensor([3, 3, 89, 0, 41])
    grad = torch.randn(5, 33, generator=g, dtype=torch.float64)
    wide = torch.randn(11, 70, generator=g, dtype=torch.float64)
    want = wide.clone()
    want[:, 30:63] = ref.csr_linear_sub_grad(Xd, grad, wide[:, 30:63], rows)
    assert torch.ops.hyforget.csr_linear_sub_grad_(*_csr_arrays(X), rows, grad, wide[:, 30:63]) is None
    torch.testing.assert_close(wide, want, rtol=0, atol=1e-12)
    assert torch.equal(wide[:, :30], want[:, :30]) and torch.equal(wide[:, 63:], want[:, 63:])


def test_sgd_step_through_csr_ops_equals_autograd():
    """One SGD step of a sparse-input linear layer via the ops equals the dense autograd step."""
    g = torch.Generator().manual_seed(5)
    Xd = _sparse_dense(g, 40, 9, 0.6)
    X, rows = Xd.to_sparse_csr(), torch.tensor([7, 1, 1, 39, 20])
    W = torch.randn(17, 9, generator=g, dtype=torch.float64, requires_grad=True)  # (C, D) layer weight
    target = torch.randn(5, 17, generator=g, dtype=torch.float64)
    loss = ((Xd[rows] @ W.t() - target) ** 2).sum()
    loss.backward()
    weight_t = W.detach().t().contiguous()  # (D, C)
    z = ops.csr_linear(X, weight_t, rows=rows, backend="cpp")
    ops.csr_linear_sub_grad_(X, 0.01 * 2 * (z - target), weight_t, rows=rows, backend="cpp")
    torch.testing.assert_close(weight_t, (W - 0.01 * W.grad).detach().t(), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- class_metrics on CSR X
@st.composite
def csr_metric_specs(draw):
    """Odd input width, h1 of 1..33 (512 // h1 networks per block of the kernel), 1 or 2 hidden layers."""
    d = 2 * draw(st.integers(1, 20), label="D // 2") + 1  # odd, >= 3
    hidden = [draw(st.sampled_from((1, 3, 7, 17, 33)), label="h1")]  # 512 // h1 networks per block
    hidden += draw(st.lists(st.sampled_from(ODD_WIDTHS), max_size=1), label="h2")
    return hf.MLPSpec([d, *hidden, draw(st.integers(2, 11), label="m_out")])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 5, 17, 75])
@settings(CI, max_examples=10)
@given(spec=csr_metric_specs(), n=st.one_of(st.sampled_from([1, 5, 97]), st.integers(257, 600)),
       seed=st.integers(0, 2**31 - 1), data=st.data())
def test_class_metrics_on_csr_matches_float64(B, dtype, spec, n, seed, data):
    """N > 256 spans several 256-row tiles, split over work items; B = 75 with h1 = 33 is 5 blocks."""
    g = torch.Generator().manual_seed(seed)
    Xd = _sparse_dense(g, n, spec.in_features, data.draw(st.floats(0.2, 0.8), label="zero fraction")).to(dtype)
    y = torch.randint(0, spec.num_classes, (n,), generator=g)
    m = data.draw(st.integers(int(y.max()) + 1, spec.num_classes), label="num_classes")
    p = _random_params(spec, B, seed, dtype)
    X = _to_csr(Xd, g, explicit_zeros=data.draw(st.booleans()), shuffle=data.draw(st.booleans()))
    got = hf.class_metrics(p, spec, X, y, m)  # CPU default backend: the native CSR kernel
    assert got.class_loss.shape == got.class_acc.shape == (B, m) and all(t.dtype == torch.float32 for t in got)
    _assert_matches_float64(got, p, spec, Xd, y, m, dtype)
    dense = hf.class_metrics(p, spec, Xd, y, m, backend="cpp")  # absent classes: NaN in both
    assert torch.equal(torch.isnan(got.class_loss), torch.isnan(dense.class_loss))


def test_class_metrics_csr_raw_op_equals_public_sums():
    """The raw op returns the per-class sums that class_metrics divides by the class counts."""
    spec = hf.MLPSpec([21, 17, 5, 4])
    g = torch.Generator().manual_seed(6)
    Xd = _sparse_dense(g, 300, 21, 0.7)
    y = torch.randint(0, 4, (300,), generator=g)
    p = _random_params(spec, 40, 6, torch.float64)
    X = Xd.to_sparse_csr()
    loss, corr = torch.ops.hyforget.class_metrics_csr(p, *_csr_arrays(X), y, list(spec.layer_sizes), 4)
    assert loss.shape == corr.shape == (40, 4) and loss.dtype == corr.dtype == torch.float32
    want_loss, want_corr = ref.class_sums(p, spec, Xd, y, 4)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-5)
    counts = torch.bincount(y, minlength=4).double()
    torch.testing.assert_close(hf.class_metrics(p, spec, X, y).class_loss, (loss.double() / counts).float())
    assert (corr == corr.round()).all() and ((corr - want_corr).abs().sum() <= 2)


@pytest.mark.parametrize("B", [3, 40])   # few networks: work split over row chunks; more: over blocks too
def test_class_metrics_csr_does_not_depend_on_the_thread_count(B):
    """Work items and their partial sums depend only on the shapes, so a collection gives the
    same bits whatever torch.get_num_threads() is."""
    spec = hf.MLPSpec([31, 9, 5, 3])
    g = torch.Generator().manual_seed(3)
    Xd = torch.rand(700, 31, generator=g)
    Xd[Xd < 0.7] = 0
    y = torch.randint(0, 3, (700,), generator=g)
    p = _random_params(spec, B, 3, torch.float32)
    args = (p, *_csr_arrays(Xd.to_sparse_csr()), y, list(spec.layer_sizes), 3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.hyforget.class_metrics_csr(*args)
        torch.set_num_threads(2)
        two = torch.ops.hyforget.class_metrics_csr(*args)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert torch.isfinite(one[0]).all() and one[0].abs().sum() > 0


# ----------------------------------------------------------------------------- NaN / Inf semantics
def _nan_case(n: int):
    """Spec with h1 = 17 (at most 30 networks per block): 40 networks make 2 blocks of 20. X: column 2 is
    blank, column 5 has exactly one nonzero (row 3, class 1)."""
    spec = hf.MLPSpec([7, 17, 3, 4])
    g = torch.Generator().manual_seed(7)
    Xd = torch.rand(n, 7, generator=g)
    Xd[Xd < 0.5] = 0
    Xd[:, 2] = 0
    Xd[:, 5] = 0
    Xd[3, 5] = 0.75
    y = torch.arange(n) % 4
    y[3] = 1
    p = _random_params(spec, 40, 7, torch.float32)
    return spec, Xd, y, p


def _w1_index(spec: hf.MLPSpec, unit: int, col: int) -> int:
    return spec.layer_slices(0)[0].start + unit * spec.in_features + col


@pytest.mark.parametrize("n", [40, 300])  # one tile (blocks transposed per item) / two tiles (up front)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_class_metrics_csr_non_finite_weight_on_a_blank_column(n, bad_value):
    """0 * Inf is NaN in the dense reference, so a non-finite first-layer weight on a column
    with no nonzero makes that network's sums NaN although the sparse product never reads it."""
    spec, Xd, y, p = _nan_case(n)
    X = Xd.to_sparse_csr()
    args = (*_csr_arrays(X), y, list(spec.layer_sizes), 4)
    clean_loss, clean_corr = torch.ops.hyforget.class_metrics_csr(p, *args)
    assert torch.isfinite(clean_loss).all() and torch.isfinite(clean_corr).all()
    broken = p.clone()
    for b in (4, 33):  # one network in each block
        broken[b, _w1_index(spec, 16, 2)] = bad_value
    loss, corr = torch.ops.hyforget.class_metrics_csr(broken, *args)
    ref_loss, _ = ref.class_sums(broken, spec, Xd, y, 4)
    keep = torch.ones(40, dtype=torch.bool)
    keep[[4, 33]] = False
    assert torch.isnan(ref_loss[~keep]).all()
    assert torch.isnan(loss[~keep]).all() and torch.isnan(corr[~keep]).all()
    assert torch.equal(loss[keep], clean_loss[keep]) and torch.equal(corr[keep], clean_corr[keep])


def test_class_metrics_csr_nan_weight_on_a_used_column():
    """A NaN weight on a column that only one row uses: the whole network is NaN (the other rows
    multiply it by 0 in the reference), neighbours are unaffected, in the raw op and the public one."""
    spec, Xd, y, p = _nan_case(300)
    X = Xd.to_sparse_csr()
    args = (*_csr_arrays(X), y, list(spec.layer_sizes), 4)
    clean_loss, _ = torch.ops.hyforget.class_metrics_csr(p, *args)
    broken = p.clone()
    broken[33, _w1_index(spec, 0, 5)] = float("nan")
    loss, _ = torch.ops.hyforget.class_metrics_csr(broken, *args)
    assert torch.isnan(loss[33]).all()
    keep = torch.arange(40) != 33
    assert torch.equal(loss[keep], clean_loss[keep])
    r = hf.class_metrics(broken, spec, X, y)
    assert all(torch.isnan(t[33]).all() for t in r)
    assert torch.equal(r.class_loss[keep], hf.class_metrics(p, spec, X, y).class_loss[keep])


@pytest.mark.parametrize("bad_value", [float("nan"), float("-inf")])
def test_class_metrics_csr_non_finite_weight_on_a_used_column_matches_reference(bad_value):
    spec, Xd, y, p = _nan_case(300)
    broken = p.clone()
    broken[33, _w1_index(spec, 0, 5)] = bad_value
    dense_loss, _ = torch.ops.hyforget.class_metrics(broken, Xd, y, list(spec.layer_sizes), 4)
    ref_loss, _ = ref.class_sums(broken, spec, Xd, y, 4)
    assert torch.isnan(ref_loss[33]).all() and torch.isnan(dense_loss[33]).all()
    loss, _ = torch.ops.hyforget.class_metrics_csr(broken, *_csr_arrays(Xd.to_sparse_csr()), y,
                                                   list(spec.layer_sizes), 4)
    assert torch.isnan(loss[33]).all()


# ----------------------------------------------------------------------------- bad inputs
def _small():
    g = torch.Generator().manual_seed(8)
    Xd = _sparse_dense(g, 9, 5, 0.5).float()
    Xd[0, 0] = Xd[0, 3] = 1.0  # row 0 stores columns 0 and 3
    return Xd, Xd.to_sparse_csr(), torch.randn(5, 7, generator=g), torch.randn(7, generator=g)


def test_csr_linear_bad_inputs_get_clear_errors():
    Xd, X, W, b = _small()
    rows = torch.tensor([1, 8])
    with pytest.raises(TypeError, match=r"X must be a 2-D sparse CSR tensor .*got torch.strided"):
        ops.csr_linear(Xd, W, b)
    with pytest.raises(TypeError, match="X must be a 2-D sparse CSR tensor"):
        ops.csr_linear_sub_grad_(Xd, torch.zeros(9, 7), W)
    with pytest.raises(ValueError, match=r"rows must be in \[0, 9\), got range \[1, 9\]"):
        ops.csr_linear(X, W, b, rows=torch.tensor([1, 9]))
    with pytest.raises(ValueError, match=r"rows must be in \[0, 9\), got range \[-1, 2\]"):
        ops.csr_linear(X, W, b, rows=torch.tensor([2, -1]))
    with pytest.raises(TypeError, match="rows must be a 1-D int64 tensor, got torch.int32"):
        ops.csr_linear(X, W, b, rows=rows.int())
    with pytest.raises(TypeError, match="dtype mismatch: weight_t is torch.float64 but X is torch.float32"):
        ops.csr_linear(X, W.double(), b)
    with pytest.raises(TypeError, match="dtype mismatch: bias is torch.float64"):
        ops.csr_linear(X, W, b.double())
    with pytest.raises(ValueError, match=r"weight_t must have shape \(5, 7\), got \(4, 7\)"):
        ops.csr_linear(X, W[:4], b)
    with pytest.raises(ValueError, match=r"weight_t must be a 2-D tensor \(5, C\)"):
        ops.csr_linear(X, W[0], b)
    with pytest.raises(ValueError, match=r"bias must have shape \(7,\), got \(6,\)"):
        ops.csr_linear(X, W, b[:6])
    with pytest.raises(ValueError, match="device mismatch: weight_t is on meta"):
        ops.csr_linear(X, W.to("meta"), b)
    with pytest.raises(ValueError, match="backends 'reference' and 'cpp', got 'triton'"):
        ops.csr_linear(X, W, b, backend="triton")
    with pytest.raises(ValueError, match=r"grad must have shape \(2, 7\), got \(9, 7\)"):
        ops.csr_linear_sub_grad_(X, torch.zeros(9, 7), W, rows=rows)
    with pytest.raises(TypeError, match="dtype mismatch: grad is torch.float64"):
        ops.csr_linear_sub_grad_(X, torch.zeros(2, 7, dtype=torch.float64), W, rows=rows)
    W0 = W.clone()
    with pytest.raises(ValueError, match="rows must be in"):
        ops.csr_linear_sub_grad_(X, torch.zeros(1, 7), W, rows=torch.tensor([9]))
    assert torch.equal(W, W0)  # nothing written before the error


def test_raw_csr_linear_ops_reject_corrupted_csr():
    """The raw ops validate the CSR arrays of the rows they take instead of reading out of bounds."""
    _, X, W, b = _small()
    crow, col, val = _csr_arrays(X)
    lin, sub = torch.ops.hyforget.csr_linear, torch.ops.hyforget.csr_linear_sub_grad_
    for bad, msg in ((5, r"column index 5 in row 0 out of range \[0, 5\)"),
                     (-1, r"column index -1 in row 0 out of range \[0, 5\)")):
        c2 = col.clone()
        c2[1] = bad
        with pytest.raises(RuntimeError, match=msg):
            lin(crow, c2, val, None, W, b)
        with pytest.raises(RuntimeError, match=msg):
            lin(crow, c2, val, torch.tensor([0]), W, b)
        W0 = W.clone()
        with pytest.raises(RuntimeError, match=msg):
            sub(crow, c2, val, None, torch.zeros(9, 7), W)
        assert torch.equal(W, W0)
    r2 = crow.clone()
    r2[1] = r2[2] + 1  # crow decreases after row 1
    with pytest.raises(RuntimeError, match="crow is not a valid CSR row pointer at row 1"):
        lin(r2, col, val, None, W, b)
    r2 = crow.clone()
    r2[-1] += 2  # past the end of col
    with pytest.raises(RuntimeError, match="crow is not a valid CSR row pointer at row 8"):
        lin(r2, col, val, torch.tensor([8]), W, b)
    with pytest.raises(RuntimeError, match="row index 9 out of range"):
        lin(crow, col, val, torch.tensor([9]), W, b)
    with pytest.raises(RuntimeError, match="crow must be a contiguous int64"):
        lin(crow.int(), col, val, None, W, b)
    with pytest.raises(RuntimeError, match="val must be a contiguous \\(nnz,\\) tensor like col"):
        lin(crow, col, val[:-1], None, W, b)
    with pytest.raises(RuntimeError, match="weight_t must have unit column stride"):
        lin(crow, col, val, None, W.t().contiguous().t(), b)
    with pytest.raises(RuntimeError, match="weight_t is Double but the CSR values are Float"):
        lin(crow, col, val, None, W.double(), b)
    with pytest.raises(RuntimeError, match=r"bias must be a contiguous \(7,\) CPU tensor"):
        lin(crow, col, val, None, W, b[:3])
    with pytest.raises(RuntimeError, match="values must be float32 or float64, got Half"):
        lin(crow, col, val.half(), None, W.half(), None)
    with pytest.raises(RuntimeError, match=r"grad must be 2-D \(9, 7\), got \[8, 7\]"):
        sub(crow, col, val, None, torch.zeros(8, 7), W)


def test_raw_csr_linear_rejects_a_negative_row_start_of_a_taken_row():
    # col / val are views two elements into larger buffers, so the out-of-bounds read stays in
    # memory we own: the kernel returns 201 for row 2 = [0, 0, 1, 1] instead of raising.
    col = torch.tensor([1, 1, 0, 1, 2, 3])[2:]
    val = torch.tensor([100., 100., 1., 1., 1., 1.])[2:]
    crow = torch.tensor([0, 2, -2, 4])  # decreasing at row 1; row 2 "starts" at -2
    with pytest.raises(RuntimeError, match="crow"):
        torch.ops.hyforget.csr_linear(crow, col, val, torch.tensor([2]), torch.eye(4), None)


def test_raw_class_metrics_csr_rejects_corrupted_csr():
    spec = hf.MLPSpec([5, 3, 4])
    Xd, X, _, _ = _small()
    y = torch.arange(9) % 4
    p = torch.randn(2, spec.num_params)
    crow, col, val = _csr_arrays(X)
    op = torch.ops.hyforget.class_metrics_csr
    sizes = list(spec.layer_sizes)
    assert op(p, crow, col, val, y, sizes, 4)[0].shape == (2, 4)
    for bad in (5, -3):
        c2 = col.clone()
        c2[1] = bad
        with pytest.raises(RuntimeError, match=r"column ind.*\[0, 5\)"):
            op(p, crow, c2, val, y, sizes, 4)
    r2 = crow.clone()
    r2[1] = r2[2] + 1
    with pytest.raises(RuntimeError, match=r"crow must be nondecreasing \(row 1\)"):
        op(p, r2, col, val, y, sizes, 4)
    r2 = crow.clone()
    r2[-1] -= 1
    with pytest.raises(RuntimeError, match="crow must run from 0 to nnz"):
        op(p, r2, col, val, y, sizes, 4)
    with pytest.raises(RuntimeError, match="must both be float32 or both float64"):
        op(p.double(), crow, col, val, y, sizes, 4)
    with pytest.raises(RuntimeError, match=r"y must be int64 of shape \(N,\) = \(9,\)"):
        op(p, crow, col, val, y[:-1], sizes, 4)
    with pytest.raises(RuntimeError, match="labels must be in"):
        op(p, crow, col, val, y + 1, sizes, 4)
    with pytest.raises(RuntimeError, match="X must be CSR arrays"):
        op(p, crow.int(), col, val, y, sizes, 4)
    # The public wrapper checks a CSR X like a dense one.
    with pytest.raises(ValueError, match=r"X must have shape \(N, 5\)"):
        hf.class_metrics(p, spec, torch.zeros(9, 6).to_sparse_csr(), y)
    with pytest.raises(ValueError, match="X contains NaN or Inf"):
        hf.class_metrics(p, spec, torch.where(Xd > 0, float("inf"), Xd).to_sparse_csr(), y)
    with pytest.raises(TypeError, match="dtype mismatch"):
        hf.class_metrics(p, spec, Xd.double().to_sparse_csr(), y)


# ----------------------------------------------------------------------------- schemas and fake kernels
def test_csr_ops_pass_torch_opcheck():
    """Schemas, fake kernels and registrations are consistent (torch.compile-ready)."""
    g = torch.Generator().manual_seed(9)
    for dtype in DTYPES:
        Xd = _sparse_dense(g, 12, 7, 0.5).to(dtype)
        crow, col, val = _csr_arrays(Xd.to_sparse_csr())
        W, b = torch.randn(7, 17, generator=g).to(dtype), torch.randn(17, generator=g).to(dtype)
        rows = torch.tensor([3, 0, 11, 3])
        for r, bias in ((None, None), (None, b), (rows, b), (rows, None)):
            torch.library.opcheck(torch.ops.hyforget.csr_linear.default, (crow, col, val, r, W, bias))
        # Mutating op: opcheck verifies that only weight_t (Tensor(a!)) is written.
        torch.library.opcheck(torch.ops.hyforget.csr_linear_sub_grad_.default,
                              (crow, col, val, rows, torch.randn(4, 17, generator=g).to(dtype), W.clone()))
        torch.library.opcheck(torch.ops.hyforget.csr_linear_sub_grad_.default,
                              (crow, col, val, None, torch.randn(12, 17, generator=g).to(dtype), W.clone()))
        y = torch.arange(12) % 3
        p = torch.randn(5, hf.MLPSpec([7, 5, 3]).num_params, generator=g).to(dtype)
        torch.library.opcheck(torch.ops.hyforget.class_metrics_csr.default, (p, crow, col, val, y, [7, 5, 3], 3))


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        crow, col, val = torch.empty(11, dtype=torch.long), torch.empty(30, dtype=torch.long), torch.empty(30)
        W, b, rows = torch.empty(6, 13), torch.empty(13), torch.empty(4, dtype=torch.long)
        out_all = torch.ops.hyforget.csr_linear(crow, col, val, None, W, b)
        out_rows = torch.ops.hyforget.csr_linear(crow, col, val, rows, W, None)
        out_f64 = torch.ops.hyforget.csr_linear(crow, col, val.double(), None, W.double(), None)
        res = torch.ops.hyforget.csr_linear_sub_grad_(crow, col, val, rows, torch.empty(4, 13), W)
        loss, corr = torch.ops.hyforget.class_metrics_csr(torch.empty(7, 6 * 5 + 5 + 5 * 3 + 3), crow, col, val,
                                                          torch.empty(10, dtype=torch.long), [6, 5, 3], 3)
    assert out_all.shape == (10, 13) and out_rows.shape == (4, 13) and out_all.dtype == torch.float32
    assert out_f64.shape == (10, 13) and out_f64.dtype == torch.float64
    assert res is None and W.shape == (6, 13)
    assert loss.shape == corr.shape == (7, 3) and loss.dtype == corr.dtype == torch.float32
