"""GPU kernels of class_metrics vs hyforget_fast.ops.reference.class_sums run in float64.

Triton runs under the interpreter on CPU tensors when no GPU is present (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported). The CUDA kernel tests run only where a GPU is visible.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hyforget_fast
from hyforget_fast.ops import reference as ref
from hyforget_fast.ops.backends import _has_kernel, import_kernels
from hyforget_fast.ops.spec import MLPSpec

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HAS_GPU = torch.cuda.is_available()
DEV = "cuda" if HAS_GPU else "cpu"


def _triton():
    return import_kernels().class_metrics


def _cuda_op():
    if not HAS_GPU:
        pytest.skip("no CUDA device")
    hyforget_fast.backends()  # loads the native library
    if not _has_kernel("class_metrics", "CUDA"):
        pytest.skip("native library built without the CUDA class_metrics kernel")
    return lambda p, sizes, X, y, m: torch.ops.hyforget.class_metrics(p, X, y, list(sizes), m)


def _triton_op():
    k = _triton()
    return k.class_sums


def make_case(sizes, B, N, dtype, seed, scale=1.0):
    """Random params (B, P), X (N, D) in `dtype`, labels (N,) covering a few classes; on DEV."""
    g = torch.Generator().manual_seed(seed)
    spec = MLPSpec(sizes)
    p = (torch.randn(B, spec.num_params, generator=g) * scale).to(dtype)
    X = torch.randn(N, sizes[0], generator=g).to(dtype)
    y = torch.randint(0, sizes[-1], (N,), generator=g)
    return spec, p.to(DEV), X.to(DEV), y.to(DEV)


def check_against_reference(fn, spec, p, X, y):
    """Loss error <= 2x same-precision PyTorch error + slack; counts equal up to near-ties."""
    m = spec.num_classes
    loss, corr = fn(p, spec.layer_sizes, X, y, m)
    assert loss.shape == corr.shape == (p.shape[0], m) and loss.dtype == corr.dtype == torch.float32
    p64, X64 = p.double().cpu(), X.double().cpu()
    yc = y.cpu()
    l64, c64 = ref.class_sums(p64, spec, X64, yc, m)
    l64, c64 = l64.double(), c64.double()
    if p.dtype == torch.float32 or p.device.type == "cpu":
        lsame, _ = ref.class_sums(p.cpu(), spec, X.cpu(), yc, m)
    else:  # same precision on the same device as the kernel
        lsame, _ = ref.class_sums(p, spec, X, y, m)
    same_err = (lsame.double().cpu() - l64).abs()
    err = (loss.double().cpu() - l64).abs()
    slack = 1e-4 * (1 + l64.abs())
    assert torch.all(err <= 2 * same_err + slack), f"loss error {err.max()} vs same-precision {same_err.max()}"
    # Correct counts: exact except rows whose top-two float64 logits tie within fp32 rounding.
    logits = ref.mlp_logits(p64, spec, X64)  # (B, N, m)
    top2 = logits.topk(min(2, m), dim=-1).values
    near = (top2[..., 0] - top2[..., -1]) <= 1e-4 * (1 + top2[..., 0].abs()) if m > 1 else torch.zeros_like(top2[..., 0], dtype=torch.bool)
    amb = torch.zeros_like(c64).index_add_(1, yc, near.double())  # (B, m) ambiguous rows per class
    assert torch.all((corr.double().cpu() - c64).abs() <= amb), "correct counts differ beyond near-ties"


specs = st.builds(
    lambda d, hidden, m: (d, *hidden, m),
    st.sampled_from([13, 33]),
    st.lists(st.sampled_from([2, 3, 7]), min_size=1, max_size=2),
    st.integers(3, 10),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=specs, B=st.sampled_from([1, 3, 5]), N=st.sampled_from([31, 97]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31 - 1))
def test_triton_matches_float64_reference(sizes, B, N, dtype, seed):
    spec, p, X, y = make_case(sizes, B, N, dtype, seed)
    check_against_reference(_triton_op(), spec, p, X, y)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=specs, B=st.sampled_from([1, 3, 37]), N=st.sampled_from([97, 997]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31 - 1))
def test_cuda_matches_float64_reference(sizes, B, N, dtype, seed):
    op = _cuda_op()
    spec, p, X, y = make_case(sizes, B, N, dtype, seed)
    check_against_reference(op, spec, p, X, y)


@pytest.mark.parametrize("which", ["triton", "cuda"])
def test_wide_and_deep_shapes(which):
    """Hidden width 64 (one network per tile) and a 3-hidden-layer MLP, several tiles of rows."""
    op = _triton_op() if which == "triton" else _cuda_op()
    for sizes, B, N in [((33, 64, 10), 2, 70), ((13, 5, 9, 6, 4), 3, 97), ((40, 3, 2), 70, 33)]:
        spec, p, X, y = make_case(sizes, B, N, torch.float32, seed=sum(sizes))
        check_against_reference(op, spec, p, X, y)


@pytest.mark.parametrize("which", ["triton", "cuda"])
def test_permuting_hidden_units_changes_nothing(which):
    op = _triton_op() if which == "triton" else _cuda_op()
    spec, p, X, y = make_case((13, 7, 5, 4), 3, 97, torch.float32, seed=3)
    perms = torch.stack([torch.cat([torch.randperm(7), torch.randperm(5)]) for _ in range(3)]).to(p.device)
    a = op(p, spec.layer_sizes, X, y, 4)
    b = op(ref.permute(p, spec, perms), spec.layer_sizes, X, y, 4)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a[1], b[1])


@pytest.mark.parametrize("which", ["triton", "cuda"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_params_poison_only_their_network(which, bad):
    op = _triton_op() if which == "triton" else _cuda_op()
    spec, p, X, y = make_case((13, 7, 10), 5, 97, torch.float32, seed=7)
    clean = op(p, spec.layer_sizes, X, y, 10)
    p = p.clone()
    p[1, 5] = bad  # a first-layer weight of network 1
    p[3, -1] = bad  # the last output bias of network 3
    loss, corr = op(p, spec.layer_sizes, X, y, 10)
    present = torch.bincount(y.cpu(), minlength=10) > 0
    for b in (1, 3):
        lb = loss[b].cpu()[present]
        # NaN params: NaN losses. Inf params: non-finite (Inf or NaN), as in the reference.
        assert (torch.isnan(lb) if bad != bad else ~torch.isfinite(lb)).all(), lb
        assert torch.isfinite(corr[b]).all()  # counts stay counts
    keep = [0, 2, 4]
    torch.testing.assert_close(loss[keep], clean[0][keep])
    torch.testing.assert_close(corr[keep], clean[1][keep])


@pytest.mark.parametrize("which", ["triton", "cuda"])
def test_exact_ties_pick_the_first_class(which):
    op = _triton_op() if which == "triton" else _cuda_op()
    from test_class_metrics_cuda_emulated import tied_case
    spec, p, X, y = tied_case()
    _, corr = op(p.to(DEV), spec.layer_sizes, X.to(DEV), y.to(DEV), spec.num_classes)
    _, c64 = ref.class_sums(p.double(), spec, X.double(), y, spec.num_classes)
    assert c64[:, 1].sum() > 0 and c64[:, 4].sum() == 0
    torch.testing.assert_close(corr.cpu(), c64.float())


def test_triton_rejects_bad_input():
    k = _triton()
    spec, p, X, y = make_case((13, 7, 10), 2, 20, torch.float32, seed=0)
    with pytest.raises(ValueError, match="X must be"):
        k.class_sums(p, spec.layer_sizes, X[:, :12], y, 10)
    with pytest.raises(ValueError, match="params must be"):
        k.class_sums(p[:, :-1], spec.layer_sizes, X, y, 10)
    with pytest.raises(TypeError, match="dtype"):
        k.class_sums(p.half(), spec.layer_sizes, X, y, 10)
    with pytest.raises(TypeError, match="integer labels"):
        k.class_sums(p, spec.layer_sizes, X, y.float(), 10)
    with pytest.raises(ValueError, match="<= 64"):
        k.class_sums(torch.zeros(1, MLPSpec((3, 65, 2)).num_params), (3, 65, 2), X[:, :3], y, 2)


def test_cuda_rejects_bad_input():
    op = _cuda_op()
    spec, p, X, y = make_case((13, 7, 10), 2, 20, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="X must be"):
        op(p, spec.layer_sizes, X[:, :12], y, 10)
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(p.half(), spec.layer_sizes, X, y, 10)
    with pytest.raises(RuntimeError, match="one CUDA device"):
        op(p, spec.layer_sizes, X.cpu(), y, 10)
    with pytest.raises(RuntimeError, match="<= 64"):
        op(torch.zeros(1, MLPSpec((13, 65, 2)).num_params, device=DEV), (13, 65, 2), X, y, 2)
