"""class_metrics / class_outputs: every backend, the package's own "reference" included, against
a forward written out in this file (one network at a time, `F.linear` and `F.cross_entropy`),
so no backend is measured against itself.

Errors are measured against that computation in float64 on the very same (rounded) params and
inputs; a backend may err at most 2x as much as the same computation at the input's own
precision, plus a tiny absolute slack for the float32 rounding of the outputs. Accuracy must
agree exactly except on inputs whose top-two float64 logits tie within rounding.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import hyforget_fast as hf
from hyforget_fast.ops import reference as ref

from conftest import class_metrics_backends_for_tests, labelled_sets, mlp_specs

BACKENDS = class_metrics_backends_for_tests()
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Relative top-two logit gap under which an input's prediction may differ from float64.
TIE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}


def _interpreted(backend: str, device: str) -> bool:
    """Triton under the CPU interpreter: correct but slow, so tests keep its sizes small."""
    return backend == "triton" and device == "cpu"


def _supported(backend: str, spec: hf.MLPSpec, dtype: torch.dtype) -> bool:
    """The GPU kernels have no float64 and hold at most 64 units per layer in registers."""
    return backend not in ("cuda", "triton") or hf.ops.functional._gpu_supports(spec, dtype)


def _random_params(spec: hf.MLPSpec, B: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, P) params with He-like scale per layer, so logits are O(1) and not all ties."""
    g = torch.Generator().manual_seed(seed)
    cols = []
    for l in range(spec.num_layers):
        fi, fo = spec.layer_sizes[l], spec.layer_sizes[l + 1]
        cols += [torch.randn(B, fo * fi, generator=g, dtype=torch.float64) * (2.0 / fi) ** 0.5,
                 torch.randn(B, fo, generator=g, dtype=torch.float64) * 0.1]
    return torch.cat(cols, 1).to(dtype)


def _plain_logits(params: torch.Tensor, spec: hf.MLPSpec, X: torch.Tensor) -> torch.Tensor:
    """(B, P), (N, D) -> (B, N, m) logits at the inputs' precision, one network at a time with
    F.linear, read from the flat order (per layer W (out, in) row-major, then b) here: independent
    of the package's batched-einsum reference."""
    sizes, out = spec.layer_sizes, []
    for p in params:
        h, o = X, 0
        for l, (a, c) in enumerate(zip(sizes, sizes[1:])):
            h = F.linear(h, p[o:o + a * c].view(c, a), p[o + a * c:o + a * c + c])
            o += a * c + c
            if l < len(sizes) - 2:
                h = torch.relu(h)
        out.append(h)
    return torch.stack(out)


def _plain_metrics(params: torch.Tensor, spec: hf.MLPSpec, X: torch.Tensor, y: torch.Tensor,
                   m: int) -> hf.ClassMetrics:
    """Per-class mean cross-entropy and accuracy, and both over all inputs, at the inputs' precision
    (NaN for a class without inputs), by F.cross_entropy on `_plain_logits`."""
    logits = _plain_logits(params, spec, X)                                          # (B, N, m)
    B = logits.shape[0]
    loss = F.cross_entropy(logits.transpose(1, 2), y[None].expand(B, -1), reduction="none")   # (B, N)
    correct = (logits.argmax(-1) == y).to(loss.dtype)
    n = torch.bincount(y, minlength=m).to(loss.dtype)
    per_class = [torch.zeros(B, m, dtype=loss.dtype).index_add_(1, y, v) / n for v in (loss, correct)]
    return hf.ClassMetrics(per_class[0], per_class[1], loss.mean(1), correct.mean(1))


def _near_ties(params: torch.Tensor, spec: hf.MLPSpec, X: torch.Tensor, y: torch.Tensor, m: int,
               rtol: float) -> torch.Tensor:
    """(B, m) number of inputs per network and class whose top-two float64 logits differ by
    less than rtol * (1 + max |logit|): their predictions may legitimately flip."""
    logits = _plain_logits(params.double(), spec, X.double())  # (B, N, m_out)
    top2 = logits.topk(min(2, logits.shape[-1]), dim=-1).values  # (B, N, 2)
    gap = top2[..., 0] - top2[..., -1] if top2.shape[-1] > 1 else torch.full_like(top2[..., 0], float("inf"))
    tie = (gap <= rtol * (1 + logits.abs().amax(-1))).double()  # (B, N)
    return torch.zeros(params.shape[0], m, dtype=torch.float64).index_add_(1, y, tie)


def _counts(y: torch.Tensor, m: int) -> torch.Tensor:
    return torch.bincount(y, minlength=m).double()  # (m,)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| where b is defined (NaN in both counts as equal)."""
    ok = ~torch.isnan(b)
    assert torch.equal(torch.isnan(a), ~ok), "NaN pattern differs"
    return float((a.double() - b.double())[ok].abs().max()) if ok.any() else 0.0


def _assert_matches_float64(got: hf.ClassMetrics, p, spec, X, y, m, dtype) -> None:
    exact = _plain_metrics(p.double(), spec, X.double(), y, m)
    same = _plain_metrics(p, spec, X, y, m)
    # log-softmax at the input's precision loses about eps * |logit| to cancellation, however the
    # logits were summed: the two computations' roundings differ by that much
    logit = float(_plain_logits(p.double(), spec, X.double()).abs().max())
    rounding = 4 * torch.finfo(p.dtype).eps * (1 + logit)
    for name in ("class_loss", "loss"):
        e_got, e_same = _max_err(getattr(got, name), getattr(exact, name)), _max_err(getattr(same, name),
                                                                                       getattr(exact, name))
        scale = float(getattr(exact, name).nan_to_num().abs().max())
        assert e_got <= 2 * e_same + 2e-6 * (1 + scale) + rounding, \
            f"{name}: error {e_got} vs same-precision torch {e_same} (rounding slack {rounding})"
    # Accuracy: correct counts equal except on near ties of the top-two logits, plus as many
    # flips as same-precision PyTorch makes (in bfloat16 a hidden unit near its ReLU kink can
    # flip a prediction whose top-two logits are far apart).
    n = _counts(y, m)
    diff = ((got.class_acc.double() - exact.class_acc.double()) * n).nan_to_num().abs().round()  # (B, m)
    diff_same = ((same.class_acc.double() - exact.class_acc.double()) * n).nan_to_num().abs().round()
    ties = _near_ties(p, spec, X, y, m, TIE_RTOL[dtype]) + diff_same
    assert (diff <= ties).all(), f"accuracy differs beyond near ties: {diff[diff > ties][:5]}"


@pytest.mark.parametrize("backend,device", BACKENDS)
@settings(max_examples=20)
@given(spec=mlp_specs(), B=st.integers(1, 24), dtype=st.sampled_from(DTYPES), data=st.data())
def test_matches_float64_reference(backend, device, spec, B, dtype, data):
    assume(_supported(backend, spec, dtype))
    small = _interpreted(backend, device)
    X, y, seed = data.draw(labelled_sets(spec.in_features, spec.num_classes, sizes=(1, 2, 97) if small else
                                         (1, 2, 97, 997)))
    if small:
        B, X, y = min(B, 4), X[:97], y[:97]
    m = data.draw(st.integers(max(1, int(y.max()) + 1), spec.num_classes), label="num_classes")
    p = _random_params(spec, B, seed, dtype)
    X = X.to(dtype)
    got = hf.class_metrics(p.to(device), spec, X.to(device), y.to(device), m, backend=backend)
    got = hf.ClassMetrics(*(t.cpu() for t in got))
    assert got.class_loss.shape == got.class_acc.shape == (B, m) and got.loss.shape == got.acc.shape == (B,)
    assert all(t.dtype == torch.float32 for t in got)
    _assert_matches_float64(got, p, spec, X, y, m, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@settings(max_examples=10)
@given(spec=mlp_specs(), B=st.integers(1, 9), data=st.data())
def test_permuting_hidden_units_changes_nothing(backend, device, spec, B, data):
    assume(_supported(backend, spec, torch.float32))
    X, y, seed = data.draw(labelled_sets(spec.in_features, spec.num_classes, sizes=(97,)))
    p = _random_params(spec, B, seed, torch.float32)
    q = hf.permute(p, spec, hf.sample_perms(spec, B, seed=seed))
    X32 = X.float()
    a = hf.class_metrics(p.to(device), spec, X32.to(device), y.to(device), backend=backend)
    b = hf.class_metrics(q.to(device), spec, X32.to(device), y.to(device), backend=backend)
    torch.testing.assert_close(b.class_loss, a.class_loss, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-5)
    # Summation order differs after permuting, so only near-tie inputs may change prediction.
    m = spec.num_classes
    diff = ((a.class_acc - b.class_acc).cpu().double() * _counts(y, m)).nan_to_num().abs().round()
    assert (diff <= _near_ties(p, spec, X, y, m, TIE_RTOL[torch.float32])).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_absent_classes_are_nan(backend, device):
    spec = hf.MLPSpec([7, 5, 4])
    X, y = torch.randn(97, 7), torch.randint(0, 4, (97,))
    y[y == 2] = 1  # class 2 absent
    p = _random_params(spec, 3, 0, torch.float32)
    r = hf.class_metrics(p.to(device), spec, X.to(device), y.to(device), backend=backend)
    assert torch.isnan(r.class_loss[:, 2]).all() and torch.isnan(r.class_acc[:, 2]).all()
    others = torch.tensor([0, 1, 3])
    assert torch.isfinite(r.class_loss[:, others]).all() and torch.isfinite(r.class_acc[:, others]).all()
    assert torch.isfinite(r.loss).all() and torch.isfinite(r.acc).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["W1", "b1", "W_last", "b_last"])
def test_non_finite_params_poison_only_their_network(backend, device, bad_value, where):
    spec = hf.MLPSpec([9, 7, 3, 5])
    B = 11
    X, y = torch.randn(97, 9), torch.randint(0, 5, (97,))
    p = _random_params(spec, B, 1, torch.float32)
    clean = hf.class_metrics(p.to(device), spec, X.to(device), y.to(device), backend=backend)
    ws, bs = spec.layer_slices(0 if where.endswith("1") else spec.num_layers - 1)
    col = (ws if where.startswith("W") else bs).start + 1
    broken = p.clone()
    broken[4, col] = bad_value
    r = hf.class_metrics(broken.to(device), spec, X.to(device), y.to(device), backend=backend)
    for name, t in r._asdict().items():
        assert torch.isnan(t[4]).all(), f"{name} of the broken network is not NaN"
        keep = torch.arange(B) != 4
        assert torch.equal(t[keep], getattr(clean, name)[keep]), f"{name} of a neighbour changed"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_chunking_over_networks(backend, device):
    spec = hf.MLPSpec([13, 5, 3, 6])
    dtype = torch.float32 if backend in ("cuda", "triton") else torch.float64
    X, y = torch.randn(97, 13, dtype=dtype), torch.randint(0, 6, (97,))
    p = _random_params(spec, 23, 2, dtype)
    args = (spec, X.to(device), y.to(device))
    whole = hf.class_metrics(p.to(device), *args, backend=backend)
    for mb in (1, 5, 23, 100):
        part = hf.class_metrics(p.to(device), *args, max_batch=mb, backend=backend)
        for a, b in zip(part, whole):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_tokens_equal_flat(backend, device):
    spec = hf.MLPSpec([11, 7, 10])
    layout = hf.TokenLayout(spec, 8)
    p = _random_params(spec, 6, 3, torch.float32)
    X, y = torch.randn(97, 11), torch.randint(0, 10, (97,))
    flat = hf.class_metrics(p.to(device), spec, X.to(device), y.to(device), backend=backend)
    tokens = hf.tokenize(p, layout).to(device)  # (B, T, chunk)
    tok = hf.class_metrics(tokens, layout, X.to(device), y.to(device), backend=backend)
    for a, b in zip(tok, flat):
        assert torch.equal(a.nan_to_num(-1), b.nan_to_num(-1))


def test_exact_ties_pick_the_first_class():
    """All-zero networks: every logit ties, torch.argmax says class 0, loss is log(m)."""
    spec = hf.MLPSpec([4, 3, 5])
    p = torch.zeros(2, spec.num_params)
    X, y = torch.randn(50, 4), torch.arange(50) % 5
    for backend in ("reference", "cpp"):
        r = hf.class_metrics(p, spec, X, y, backend=backend)
        assert torch.equal(r.class_acc, torch.tensor([[1.0, 0, 0, 0, 0]] * 2))
        torch.testing.assert_close(r.class_loss, torch.full((2, 5), float(torch.log(torch.tensor(5.0)))))


def test_empty_batch_and_default_backend():
    spec = hf.MLPSpec([4, 3, 5])
    X, y = torch.randn(20, 4), torch.randint(0, 5, (20,))
    r = hf.class_metrics(torch.zeros(0, spec.num_params), spec, X, y)
    assert r.class_loss.shape == (0, 5) and r.loss.shape == (0,)
    p = _random_params(spec, 3, 4, torch.float32)
    auto, cpp = hf.class_metrics(p, spec, X, y), hf.class_metrics(p, spec, X, y, backend="cpp")
    assert all(torch.equal(a.nan_to_num(-1), b.nan_to_num(-1)) for a, b in zip(auto, cpp))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_bad_inputs_get_clear_errors(backend):
    spec = hf.MLPSpec([6, 5, 3])
    p, X, y = torch.randn(4, spec.num_params), torch.randn(30, 6), torch.randint(0, 3, (30,))

    def call(p=p, X=X, y=y, **kw):
        return hf.class_metrics(p, spec, X, y, backend=backend, **kw)

    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        call(y=torch.where(y == 0, 3, y))
    with pytest.raises(ValueError, match="labels must be in"):
        call(y=y - 1)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        call(y=torch.full_like(y, 2), num_classes=2)
    with pytest.raises(TypeError, match="y must be int64"):
        call(y=y.float())
    with pytest.raises(ValueError, match=r"y must have shape \(30,\)"):
        call(y=y[:-1])
    with pytest.raises(ValueError, match=r"X must have shape \(N, 6\)"):
        call(X=torch.randn(30, 7))
    with pytest.raises(TypeError, match="dtype mismatch"):
        call(X=X.double())
    with pytest.raises(ValueError, match="device mismatch"):
        call(X=X.to("meta"))
    with pytest.raises(ValueError, match="device mismatch"):
        call(y=y.to("meta"))
    X_nan = X.clone()
    X_nan[7, 2] = float("nan")  # one bad pixel is enough; a random threshold could leave X clean
    with pytest.raises(ValueError, match="X contains NaN"):
        call(X=X_nan)
    with pytest.raises(ValueError, match=r"params must have shape \(B, "):
        call(p=p[:, :-1])
    with pytest.raises(ValueError, match="num_classes must be in"):
        call(num_classes=4)
    with pytest.raises(ValueError, match="max_batch must be a positive integer"):
        call(max_batch=0)
    with pytest.raises(TypeError, match="MLPSpec or a TokenLayout"):
        hf.class_metrics(p, [6, 5, 3], X, y)


def test_native_op_checks_its_inputs():
    """The C++ op validates on its own too (it is public as torch.ops.hyforget.class_metrics)."""
    op = torch.ops.hyforget.class_metrics
    p, X, y = torch.randn(2, 5 * 6 + 5 + 3 * 5 + 3), torch.randn(10, 6), torch.randint(0, 3, (10,))
    assert op(p, X, y, [6, 5, 3], 3)[0].shape == (2, 3)
    with pytest.raises(RuntimeError, match="labels must be in"):
        op(p, X, y + 3, [6, 5, 3], 3)
    with pytest.raises(RuntimeError, match="same dtype"):
        op(p, X.double(), y, [6, 5, 3], 3)
    with pytest.raises(RuntimeError, match="X must be"):
        op(p, X[:, :5], y, [6, 5, 3], 3)


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        p, X, y = torch.empty(7, 53), torch.empty(10, 6), torch.empty(10, dtype=torch.long)
        loss, corr = torch.ops.hyforget.class_metrics(p, X, y, [6, 5, 3], 3)
    assert loss.shape == corr.shape == (7, 3) and loss.dtype == torch.float32


@settings(max_examples=10)
@given(spec=mlp_specs(max_hidden_layers=3), dtype=st.sampled_from(DTYPES), data=st.data())
def test_class_outputs(spec, dtype, data):
    X, y, seed = data.draw(labelled_sets(spec.in_features, spec.num_classes, sizes=(97,)))
    p = _random_params(spec, 3, seed, dtype)
    X = X.to(dtype)
    probs, pred = hf.class_outputs(p, spec, X)
    assert probs.shape == (3, X.shape[0], spec.num_classes) and pred.shape == (3, X.shape[0])
    exact = torch.softmax(_plain_logits(p.double(), spec, X.double()), -1)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(probs.double(), exact, rtol=0, atol=tol)
    assert torch.equal(pred, probs.argmax(-1))
    layout = hf.TokenLayout(spec, 5)
    probs_t, pred_t = hf.class_outputs(hf.tokenize(p, layout), layout, X)
    assert torch.equal(probs_t, probs) and torch.equal(pred_t, pred)
    # The fused op's accuracy agrees with the per-sample predictions of its companion.
    acc = (pred == y).double().mean(1)
    r = hf.class_metrics(p, spec, X, y, backend="cpp")
    ties = _near_ties(p, spec, X, y, spec.num_classes, 1e-4).sum(1)
    assert ((r.acc.double() - acc).abs() * X.shape[0] <= ties + 1e-3).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_inputs_with_all_zero_columns(backend, device, dtype):
    """MNIST-like X: sparse, with columns that are zero in every row (the C++ kernel skips
    those columns in its GEMM); same agreement with float64 as any other input."""
    spec = hf.MLPSpec([40, 7, 3, 10])
    g = torch.Generator().manual_seed(5)
    X = torch.rand(97, 40, generator=g, dtype=torch.float64)
    X[X < 0.7] = 0  # ~70% zeros
    X[:, [0, 1, 2, 17, 39]] = 0  # blank columns, like MNIST's border
    y = torch.randint(0, 10, (97,), generator=g)
    p, X = _random_params(spec, 13, 5, dtype), X.to(dtype)
    got = hf.class_metrics(p.to(device), spec, X.to(device), y.to(device), backend=backend)
    _assert_matches_float64(hf.ClassMetrics(*(t.cpu() for t in got)), p, spec, X, y, 10, dtype)


def test_native_op_nan_weight_on_a_blank_column():
    """0 * NaN is NaN in the reference, so a NaN first-layer weight on an all-zero input column
    must still make that network's loss NaN, even though the C++ GEMM skips the column."""
    spec = hf.MLPSpec([6, 5, 3])
    X, y = torch.rand(30, 6), torch.randint(0, 3, (30,))
    X[:, 4] = 0
    p = _random_params(spec, 4, 6, torch.float32)
    ws, _ = spec.layer_slices(0)
    p[2, ws.start + 4] = float("nan")  # W1[0, 4] of network 2
    loss, _ = torch.ops.hyforget.class_metrics(p, X, y, list(spec.layer_sizes), 3)
    ref_loss, _ = ref.class_sums(p, spec, X, y, 3)
    assert torch.isnan(loss[2]).all() and torch.isnan(ref_loss[2]).all()
    keep = torch.tensor([0, 1, 3])
    torch.testing.assert_close(loss[keep], ref_loss[keep], rtol=1e-5, atol=1e-4)


def test_finite_check_of_X_is_remembered_only_while_X_is_unchanged():
    """Scoring the same X again skips re-scanning it, but an in-place write is seen."""
    spec = hf.MLPSpec([5, 3, 4])
    p = torch.randn(2, spec.num_params)
    X = torch.randn(9, 5)
    y = torch.arange(9) % 4
    hf.class_metrics(p, spec, X, y)
    hf.class_metrics(p, spec, X, y)
    X[3, 2] = float("nan")  # bumps X's version counter
    with pytest.raises(ValueError, match="NaN or Inf"):
        hf.class_metrics(p, spec, X, y)


@settings(max_examples=10)
@given(spec=mlp_specs(max_hidden_layers=3), data=st.data())
def test_reference_matches_torch_nn_per_network(spec, data):
    """The batched reference equals nn.Linear/ReLU modules and F.cross_entropy run network by
    network (an oracle sharing none of its code), in float64."""
    X, y, seed = data.draw(labelled_sets(spec.in_features, spec.num_classes, sizes=(97,)))
    p = _random_params(spec, 3, seed, torch.float64)
    X = X.double()
    got = hf.class_metrics(p, spec, X, y, backend="reference")
    for b in range(p.shape[0]):
        layers = []
        for l, (W, bias) in enumerate(spec.unflatten(p[b:b + 1])):
            lin = torch.nn.Linear(W.shape[2], W.shape[1], dtype=torch.float64)
            lin.load_state_dict({"weight": W[0], "bias": bias[0]})
            layers += [lin] + ([torch.nn.ReLU()] if l < spec.num_layers - 1 else [])
        with torch.no_grad():
            logits = torch.nn.Sequential(*layers)(X)
        ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        right = (logits.argmax(1) == y).double()
        for c in range(spec.num_classes):
            sel = y == c
            want_loss = ce[sel].mean() if sel.any() else torch.tensor(float("nan"), dtype=torch.float64)
            want_acc = right[sel].mean() if sel.any() else torch.tensor(float("nan"), dtype=torch.float64)
            torch.testing.assert_close(got.class_loss[b, c].double(), want_loss, rtol=1e-5, atol=1e-6, equal_nan=True)
            torch.testing.assert_close(got.class_acc[b, c].double(), want_acc, rtol=0, atol=1e-7, equal_nan=True)
        torch.testing.assert_close(got.loss[b].double(), ce.mean(), rtol=1e-5, atol=1e-6)
