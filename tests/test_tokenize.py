"""tokenize / detokenize / permute: every backend equals the PyTorch reference bit for bit."""
import os
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hyforget_fast as hf
from hyforget_fast.ops import reference as ref

from conftest import gather_backends_for_tests, mlp_specs

BACKENDS = gather_backends_for_tests()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(spec: hf.MLPSpec, batch: int, seed: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.num_params, generator=g).to(dtype).to(device)
    perms = hf.sample_perms(spec, batch, seed=seed, device=device)
    norm = hf.ParamNorm.fit(torch.randn(7, spec.num_params, generator=g) * 3 + 1, spec)
    return x, perms, norm


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(spec=mlp_specs(), chunk=st.integers(1, 40), batch=st.sampled_from([1, 3, 5, 37]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(DTYPES), use_perm=st.booleans(), use_norm=st.booleans())
def test_tokenize_matches_reference(backend, device, spec, chunk, batch, seed, dtype, use_perm, use_norm):
    layout = hf.TokenLayout(spec, chunk)
    x, perms, norm = _case(spec, batch, seed, dtype, device)
    perms = perms if use_perm else None
    norm = norm if use_norm else None
    got = hf.tokenize(x, layout, perms, norm, backend=backend)
    want = ref.tokenize(x, layout, perms, norm)
    assert got.shape == (batch, layout.num_tokens, chunk) and got.dtype == dtype
    assert torch.equal(got, want)
    buf = torch.full_like(want, float("nan"))  # a reused buffer: every value, padding too, is overwritten
    hf.tokenize(x, layout, perms, norm, backend=backend, out=buf)
    assert torch.equal(buf, want)


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(spec=mlp_specs(), chunk=st.integers(1, 40), batch=st.sampled_from([1, 4, 7]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(DTYPES), use_norm=st.booleans())
def test_detokenize_matches_reference_and_inverts(backend, device, spec, chunk, batch, seed, dtype, use_norm):
    layout = hf.TokenLayout(spec, chunk)
    x, _, norm = _case(spec, batch, seed, dtype, device)
    norm = norm if use_norm else None
    tokens = torch.randn(batch, layout.num_tokens, chunk, generator=torch.Generator().manual_seed(seed))
    tokens = tokens.to(dtype).to(device)
    assert torch.equal(hf.detokenize(tokens, layout, norm, backend=backend), ref.detokenize(tokens, layout, norm))
    if norm is None:  # without normalization the round trip is exact in every dtype
        assert torch.equal(hf.detokenize(hf.tokenize(x, layout, backend=backend), layout, backend=backend), x)


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(spec=mlp_specs(), batch=st.sampled_from([1, 3, 9, 37]), seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES))
def test_permute_matches_reference_and_inverse_restores(backend, device, spec, batch, seed, dtype):
    x, perms, _ = _case(spec, batch, seed, dtype, device)
    got = hf.permute(x, spec, perms, backend=backend)
    assert torch.equal(got, ref.permute(x, spec, perms))
    inverse = torch.cat([perms[:, o:o + h].argsort(dim=1) for o, h in zip(spec.hidden_offsets, spec.hidden_sizes)], 1)
    assert torch.equal(hf.permute(got, spec, inverse, backend=backend), x)


@given(spec=mlp_specs(), chunk=st.integers(1, 40), batch=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_padding_is_zero_and_fused_equals_unfused(spec, chunk, batch, seed):
    layout = hf.TokenLayout(spec, chunk)
    x, perms, norm = _case(spec, batch, seed, torch.float32, "cpu")
    tokens = hf.tokenize(x, layout, perms, norm)
    for t, info in enumerate(layout.tokens):
        assert 1 <= info.length <= chunk
        assert torch.all(tokens[:, t, info.length:] == 0)
    # one fused pass equals permute, then tokenize with normalization
    assert torch.equal(tokens, hf.tokenize(hf.permute(x, spec, perms), layout, None, norm))
    # normalized round trip is exact up to float32 rounding of the affine map
    back = hf.detokenize(hf.tokenize(x, layout, None, norm), layout, norm)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


@given(spec=mlp_specs(max_in=17), batch=st.sampled_from([1, 2, 5]), seed=st.integers(0, 2**16))
def test_permuted_mlp_computes_the_same_function(spec, batch, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.num_params, generator=g, dtype=torch.float64)
    inputs = torch.randn(11, spec.in_features, generator=g, dtype=torch.float64)
    perms = hf.sample_perms(spec, batch, seed=seed + 1)
    before = ref.mlp_logits(x, spec, inputs)
    after = ref.mlp_logits(hf.permute(x, spec, perms), spec, inputs)
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)


def test_layout_describes_every_token():
    spec = hf.MLPSpec([784, 7, 10])
    layout = hf.TokenLayout(spec, 100)
    # W0: 5488 values -> 55 tokens, b0: 7 -> 1, W1: 70 -> 1, b1: 10 -> 1
    assert layout.num_tokens == 58
    first_bias = layout.tokens[55]
    assert (first_bias.layer, first_bias.is_bias, first_bias.offset, first_bias.length) == (0, True, 0, 7)
    assert layout.tokens[54].length == 5488 - 54 * 100
    assert sum(t.length for t in layout.tokens) == spec.num_params


def test_sample_perms_is_seeded_and_valid():
    spec = hf.MLPSpec([5, 7, 3, 2])
    a = hf.sample_perms(spec, 64, seed=3)
    assert torch.equal(a, hf.sample_perms(spec, 64, seed=3))
    assert not torch.equal(a, hf.sample_perms(spec, 64, seed=4))
    hf.validate_perms(a, spec, 64, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    assert torch.equal(hf.sample_perms(spec, 64, generator=g), a)


def test_param_norm_standardizes_each_piece():
    spec = hf.MLPSpec([9, 5, 3])
    g = torch.Generator().manual_seed(0)
    data = torch.randn(500, spec.num_params, generator=g) * 4 + 2
    norm = hf.ParamNorm.fit(data, spec)
    y = ref.tokenize(data, hf.TokenLayout(spec, spec.num_params), None, norm).flatten(1)
    for o, (_, _, r, c) in zip(spec.piece_offsets, spec.pieces):
        piece = hf.detokenize(y.view(500, -1, spec.num_params), hf.TokenLayout(spec, spec.num_params))[:, o:o + r * c]
        assert abs(piece.mean().item()) < 1e-3 and abs(piece.std(unbiased=False).item() - 1) < 1e-3


def test_bad_input_is_refused_with_a_clear_error():
    spec = hf.MLPSpec([6, 3, 4])
    layout = hf.TokenLayout(spec, 5)
    x = torch.randn(2, spec.num_params)
    with pytest.raises(ValueError, match=r"shape \(B, 37\)"):
        hf.tokenize(torch.randn(2, 36), layout)
    with pytest.raises(TypeError, match="float32"):
        hf.tokenize(x.long(), layout)
    with pytest.raises(ValueError, match="perms is on meta"):
        hf.tokenize(x, layout, torch.zeros(2, 3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match=r"perms must have shape \(2, 3\)"):
        hf.tokenize(x, layout, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="perms must be int64"):
        hf.permute(x, spec, torch.zeros(2, 3, dtype=torch.int32))
    bad = torch.tensor([[0, 1, 2], [0, 0, 2]])
    with pytest.raises(ValueError, match="row 1 is not a permutation"):
        hf.tokenize(x, layout, bad)
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        hf.TokenLayout(spec, 0)
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        hf.TokenLayout(spec, -3)
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, 9, 5\)"):
        hf.detokenize(torch.randn(2, 3, 5), layout)
    with pytest.raises(ValueError, match="fitted for MLPSpec"):
        hf.tokenize(x, layout, norm=hf.ParamNorm.fit(torch.randn(3, 17), hf.MLPSpec([2, 3, 2])))
    with pytest.raises(ValueError, match=r"out must be a contiguous torch.float32 tensor of shape \(2, 9, 5\)"):
        hf.tokenize(x, layout, out=torch.empty(2, 9, 4))
    with pytest.raises(ValueError, match="unknown backend"):
        hf.tokenize(x, layout, backend="fortran")
    # the C++ kernel itself refuses an out-of-range index when validation is skipped
    with pytest.raises(RuntimeError, match="out of range"):
        hf.tokenize(x, layout, torch.tensor([[0, 1, 2], [0, 1, 9]]), validate=False, backend="cpp")


def test_backends_report_and_cuda_was_compiled_when_nvcc_exists():
    status = hf.backends()
    assert set(status) == {"reference", "cpp", "cuda", "triton"}
    assert status["cpp"].available, status["cpp"].reason
    compiled = torch._C._dispatch_has_kernel_for_dispatch_key("hyforget::gather_pieces", "CUDA")
    if shutil.which("nvcc") and os.environ.get("HYFORGET_NO_CUDA") != "1":
        # CI has nvcc but no GPU: the CUDA kernels must still have been compiled and registered.
        assert compiled
    if not torch.cuda.is_available():
        reason = "no CUDA device" if compiled else "built without CUDA"
        assert not status["cuda"].available and reason in status["cuda"].reason


def test_native_ops_pass_torch_opcheck():
    """Schemas, fake (meta) kernels and dispatch registrations are consistent (torch.compile-ready)."""
    spec = hf.MLPSpec([9, 5, 3, 4])
    layout = hf.TokenLayout(spec, 7)
    x = torch.randn(3, spec.num_params)
    perms = hf.sample_perms(spec, 3, seed=0)
    norm = hf.ParamNorm.fit(torch.randn(5, spec.num_params), spec).stats
    W = layout.num_tokens * layout.chunk
    torch.library.opcheck(torch.ops.hyforget.gather_pieces.default, (x, layout.table, perms, norm, W))
    torch.library.opcheck(torch.ops.hyforget.gather_pieces_out.default,
                          (x, layout.table, perms, None, torch.empty(3, W)))
    torch.library.opcheck(torch.ops.hyforget.scatter_pieces.default,
                          (torch.randn(3, W), layout.table, norm, spec.num_params))


def test_large_outputs_take_the_huge_page_path_and_stay_exact():
    """Outputs over 8 MiB are advised to transparent huge pages before the first write."""
    spec = hf.MLPSpec([784, 7, 10])
    layout = hf.TokenLayout(spec, 256)
    x, perms, norm = _case(spec, 401, 7, torch.float32, "cpu")  # 401 * 26 * 256 * 4 B = 10.7 MB out
    tokens = hf.tokenize(x, layout, perms, norm, backend="cpp")
    assert tokens.nbytes > 8 << 20
    assert torch.equal(tokens, ref.tokenize(x, layout, perms, norm))
    assert torch.equal(hf.detokenize(hf.tokenize(x, layout, backend="cpp"), layout, backend="cpp"), x)


def _tokenize_by_definition(x, layout, perms, norm):
    """Value by value, straight from the definitions in hyforget_fast.ops.spec: an oracle for the
    vectorized reference that shares none of its code."""
    spec, chunk = layout.spec, layout.chunk
    out = torch.zeros(x.shape[0], layout.num_tokens * chunk, dtype=x.dtype)
    for b in range(x.shape[0]):
        for p, (l, is_bias, rows, cols) in enumerate(spec.pieces):
            src, dst = int(layout.table[p, 0]), int(layout.table[p, 1])
            hidden_out = l < spec.num_layers - 1  # rows are hidden units of layer l
            hidden_in = l > 0 and not is_bias     # columns are hidden units of layer l - 1
            for r in range(rows):
                for c in range(cols):
                    sr = int(perms[b, spec.hidden_offsets[l] + r]) if perms is not None and hidden_out else r
                    sc = int(perms[b, spec.hidden_offsets[l - 1] + c]) if perms is not None and hidden_in else c
                    v = x[b, src + sr * cols + sc]
                    if norm is not None:
                        v = ((v.float() - norm.stats[p, 0]) * norm.stats[p, 1]).to(x.dtype)
                    out[b, dst + r * cols + c] = v
    return out.view(x.shape[0], layout.num_tokens, chunk)


@given(spec=mlp_specs(max_in=9), chunk=st.integers(1, 17), batch=st.sampled_from([1, 2]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(DTYPES), use_perm=st.booleans(), use_norm=st.booleans())
def test_reference_matches_the_definition(spec, chunk, batch, seed, dtype, use_perm, use_norm):
    layout = hf.TokenLayout(spec, chunk)
    x, perms, norm = _case(spec, batch, seed, dtype, "cpu")
    perms = perms if use_perm else None
    norm = norm if use_norm else None
    assert torch.equal(ref.tokenize(x, layout, perms, norm), _tokenize_by_definition(x, layout, perms, norm))


@given(spec=mlp_specs(max_in=17), batch=st.sampled_from([1, 2, 5]), seed=st.integers(0, 2**16))
def test_canonical_perms_are_valid_idempotent_and_keep_the_function(spec, batch, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.num_params, generator=g, dtype=torch.float64)
    perms = hf.ops.canonical_perms(x, spec)
    hf.validate_perms(perms, spec, batch, torch.device("cpu"))               # a permutation per layer
    canon = hf.permute(x, spec, perms)
    identity = torch.cat([torch.arange(h).expand(batch, h) for h in spec.hidden_sizes], 1)
    assert torch.equal(hf.ops.canonical_perms(canon, spec), identity)         # canonicalising twice = once
    # any random relabelling of the units has the same canonical form (ties have probability 0 here)
    shuffled = hf.permute(x, spec, hf.sample_perms(spec, batch, seed=seed + 1))
    assert torch.equal(hf.permute(shuffled, spec, hf.ops.canonical_perms(shuffled, spec)), canon)
    inputs = torch.randn(11, spec.in_features, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ref.mlp_logits(canon, spec, inputs), ref.mlp_logits(x, spec, inputs),
                               rtol=1e-12, atol=1e-12)
    # the statistic: incoming-weight norms of each hidden layer, in non-increasing order
    for l in range(spec.num_layers - 1):
        W, _ = spec.unflatten(canon)[l]
        n = W.pow(2).sum(2)
        assert bool((n[:, :-1] >= n[:, 1:]).all())
