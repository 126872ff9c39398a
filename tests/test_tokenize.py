"""tokenize / detokenize / permute: every backend equals the PyTorch reference bit for bit, in both
token layouts (layer-wise chunks and neuron tokens, hyforget_fast/ops/spec.py TokenLayout)."""
import os
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hyforget_fast as hf
from hyforget_fast.ops import reference as ref

from conftest import gather_backends_for_tests, mlp_specs

# Every case compares a backend with the plain-PyTorch reference, so the reference itself is not
# one of them (it would be compared with itself); the reference is checked against the
# value-by-value definition instead (test_reference_matches_the_definition).
BACKENDS = [b for b in gather_backends_for_tests() if getattr(b, "values", b)[0] != "reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# normalized round trip x -> (x - shift) * scale -> y / scale + shift: two roundings in the dtype
ROUND_TRIP_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@st.composite
def layouts(draw, max_in: int = 41, max_chunk: int = 40) -> hf.TokenLayout:
    """Layer-wise layouts of odd chunk sizes, or neuron layouts of odd one-hidden-layer MLPs."""
    if draw(st.booleans()):
        return hf.TokenLayout(draw(mlp_specs(max_hidden_layers=1, max_in=max_in)), kind="neuron")
    return hf.TokenLayout(draw(mlp_specs(max_in=max_in)), draw(st.integers(1, max_chunk)))


def _case(spec: hf.MLPSpec, batch: int, seed: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.num_params, generator=g).to(dtype).to(device)
    perms = hf.sample_perms(spec, batch, seed=seed, device=device)
    norm = hf.ParamNorm.fit(torch.randn(7, spec.num_params, generator=g) * 3 + 1, spec)
    return x, perms, norm


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(layout=layouts(), batch=st.sampled_from([1, 3, 5, 37]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(DTYPES), use_perm=st.booleans(), use_norm=st.booleans())
def test_tokenize_matches_reference(backend, device, layout, batch, seed, dtype, use_perm, use_norm):
    spec = layout.spec
    x, perms, norm = _case(spec, batch, seed, dtype, device)
    perms = perms if use_perm else None
    norm = norm if use_norm else None
    got = hf.tokenize(x, layout, perms, norm, backend=backend)
    want = ref.tokenize(x, layout, perms, norm)
    assert got.shape == (batch, layout.num_tokens, layout.token_width) and got.dtype == dtype
    assert torch.equal(got, want)
    buf = torch.full_like(want, float("nan"))  # a reused buffer: every value, padding too, is overwritten
    hf.tokenize(x, layout, perms, norm, backend=backend, out=buf)
    assert torch.equal(buf, want)


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(layout=layouts(), batch=st.sampled_from([1, 4, 7]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(DTYPES), use_norm=st.booleans())
def test_detokenize_matches_reference_and_inverts(backend, device, layout, batch, seed, dtype, use_norm):
    x, _, norm = _case(layout.spec, batch, seed, dtype, device)
    norm = norm if use_norm else None
    tokens = torch.randn(batch, layout.num_tokens, layout.token_width, generator=torch.Generator().manual_seed(seed))
    tokens = tokens.to(dtype).to(device)
    assert torch.equal(hf.detokenize(tokens, layout, norm, backend=backend), ref.detokenize(tokens, layout, norm))
    if norm is None:  # without normalization the round trip is exact in every dtype
        assert torch.equal(hf.detokenize(hf.tokenize(x, layout, backend=backend), layout, backend=backend), x)
    else:             # with it, up to the dtype's rounding of the affine map and its inverse
        back = hf.detokenize(hf.tokenize(x, layout, None, norm, backend=backend), layout, norm, backend=backend)
        tol = ROUND_TRIP_TOL[dtype]
        torch.testing.assert_close(back.float(), x.float(), rtol=tol, atol=tol * float(x.float().abs().max()))


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(spec=mlp_specs(max_hidden_layers=1), batch=st.sampled_from([1, 3, 6]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(DTYPES), use_norm=st.booleans())
def test_neuron_tokens_permute_with_the_hidden_units(backend, device, spec, batch, seed, dtype, use_norm):
    """A hidden-unit permutation of the network is exactly that permutation of the unit tokens;
    the output-bias token stays where it is."""
    layout = hf.TokenLayout(spec, kind="neuron")
    x, perms, norm = _case(spec, batch, seed, dtype, device)
    norm = norm if use_norm else None
    h = spec.hidden_sizes[0]
    plain = hf.tokenize(x, layout, None, norm, backend=backend)                       # (B, h + 1, C)
    moved = hf.tokenize(x, layout, perms, norm, backend=backend)
    assert torch.equal(moved[:, :h], plain[:, :h].gather(1, perms[:, :, None].expand(-1, -1, layout.token_width)))
    assert torch.equal(moved[:, h], plain[:, h])
    assert torch.equal(hf.tokenize(hf.permute(x, spec, perms, backend=backend), layout, None, norm, backend=backend),
                       moved)


@pytest.mark.parametrize("backend,device", BACKENDS)
@given(spec=mlp_specs(), batch=st.sampled_from([1, 3, 9, 37]), seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES))
def test_permute_matches_reference_and_inverse_restores(backend, device, spec, batch, seed, dtype):
    x, perms, _ = _case(spec, batch, seed, dtype, device)
    got = hf.permute(x, spec, perms, backend=backend)
    assert torch.equal(got, ref.permute(x, spec, perms))
    inverse = torch.cat([perms[:, o:o + h].argsort(dim=1) for o, h in zip(spec.hidden_offsets, spec.hidden_sizes)], 1)
    assert torch.equal(hf.permute(got, spec, inverse, backend=backend), x)


@given(layout=layouts(), batch=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_padding_is_zero_and_fused_equals_unfused(layout, batch, seed):
    spec, chunk = layout.spec, layout.token_width
    x, perms, norm = _case(spec, batch, seed, torch.float32, "cpu")
    tokens = hf.tokenize(x, layout, perms, norm)
    mask = layout.token_mask()                                   # (T, C)
    assert int(mask.sum()) == spec.num_params
    assert torch.all(tokens[:, mask == 0] == 0)
    if layout.kind == "layer":   # the mask says what the token descriptions say
        for t, info in enumerate(layout.tokens):
            assert 1 <= info.length <= chunk
            assert mask[t, :info.length].all() and not mask[t, info.length:].any()
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


def test_neuron_layout_holds_each_units_weights_bias_and_outgoing_weights():
    """The neuron layout by its definition, on a small MLP (3 inputs, 4 hidden units, 2 outputs)."""
    spec = hf.MLPSpec([3, 4, 2])
    layout = hf.TokenLayout(spec, kind="neuron")
    assert (layout.num_tokens, layout.token_width, layout.num_unit_tokens) == (5, 3 + 1 + 2, 4)
    x = torch.arange(1, spec.num_params + 1, dtype=torch.float32)[None]              # 12 + 4 + 8 + 2 = 26 values
    (W0, b0), (W1, b1) = spec.unflatten(x)
    for backend in ("cpp", "triton"):
        tok = hf.tokenize(x, layout, backend=backend)[0]                              # (5, 6)
        for j in range(4):
            assert tok[j].tolist() == [*W0[0, j].tolist(), b0[0, j].item(), *W1[0, :, j].tolist()]
        assert tok[4].tolist() == [*b1[0].tolist(), 0, 0, 0, 0]
    assert layout.token_mask()[4].tolist() == [1, 1, 0, 0, 0, 0] and layout.token_mask()[:4].all()
    assert layout.piece_map()[0].tolist() == [0, 0, 0, 1, 2, 2]
    assert layout == hf.TokenLayout(spec, None, "neuron") and layout != hf.TokenLayout(spec, 6)
    assert len({layout, hf.TokenLayout(spec, kind="neuron")}) == 1


def test_neuron_layout_refuses_deeper_mlps_and_other_widths():
    with pytest.raises(ValueError, match="exactly one hidden layer"):
        hf.TokenLayout(hf.MLPSpec([5, 3, 3, 2]), kind="neuron")
    with pytest.raises(ValueError, match="8 values wide"):
        hf.TokenLayout(hf.MLPSpec([5, 3, 2]), 64, kind="neuron")
    with pytest.raises(ValueError, match="kind must be one of"):
        hf.TokenLayout(hf.MLPSpec([5, 3, 2]), 4, kind="unit")
    with pytest.raises(TypeError, match="mix pieces"):
        hf.TokenLayout(hf.MLPSpec([5, 3, 2]), kind="neuron").tokens


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_ops_taking_a_layout_take_neuron_tokens(backend):
    """class_metrics / class_outputs read tokens of either layout as the flat networks they hold."""
    spec = hf.MLPSpec([7, 5, 3])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, spec.num_params, generator=g)
    X, y = torch.randn(31, 7, generator=g), torch.randint(0, 3, (31,), generator=g)
    for layout in (hf.TokenLayout(spec, kind="neuron"), hf.TokenLayout(spec, 4)):
        tokens = hf.tokenize(x, layout, backend=backend)
        flat, tok = hf.class_metrics(x, spec, X, y), hf.class_metrics(tokens, layout, X, y)
        for a, b in zip(flat, tok):
            assert torch.equal(a, b)
        for a, b in zip(hf.class_outputs(x[:2], spec, X), hf.class_outputs(tokens[:2], layout, X)):
            assert torch.equal(a, b)


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
    spec = hf.MLPSpec([9, 5, 4])                                   # the neuron layout's strided table
    layout = hf.TokenLayout(spec, kind="neuron")
    x, perms = torch.randn(3, spec.num_params), hf.sample_perms(spec, 3, seed=0)
    W = layout.num_tokens * layout.chunk
    torch.library.opcheck(torch.ops.hyforget.gather_pieces.default, (x, layout.table, perms, None, W))
    torch.library.opcheck(torch.ops.hyforget.scatter_pieces.default, (torch.randn(3, W), layout.table, None,
                                                                      spec.num_params))


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
    """Value by value, straight from the piece table's definition in hyforget_fast.ops.spec
    (element (r, c) of a piece at DST + r*RS + c*CS): an oracle for the vectorized reference
    that shares none of its code."""
    spec, chunk = layout.spec, layout.chunk
    out = torch.zeros(x.shape[0], layout.num_tokens * chunk, dtype=x.dtype)
    for b in range(x.shape[0]):
        for p, (l, is_bias, rows, cols) in enumerate(spec.pieces):
            src, dst = int(layout.table[p, 0]), int(layout.table[p, 1])
            rs, cs = int(layout.table[p, 8]), int(layout.table[p, 9])
            hidden_out = l < spec.num_layers - 1  # rows are hidden units of layer l
            hidden_in = l > 0 and not is_bias     # columns are hidden units of layer l - 1
            for r in range(rows):
                for c in range(cols):
                    sr = int(perms[b, spec.hidden_offsets[l] + r]) if perms is not None and hidden_out else r
                    sc = int(perms[b, spec.hidden_offsets[l - 1] + c]) if perms is not None and hidden_in else c
                    v = x[b, src + sr * cols + sc]
                    if norm is not None:
                        v = ((v.float() - norm.stats[p, 0]) * norm.stats[p, 1]).to(x.dtype)
                    out[b, dst + r * rs + c * cs] = v
    return out.view(x.shape[0], layout.num_tokens, chunk)


@given(layout=layouts(max_in=9, max_chunk=17), batch=st.sampled_from([1, 2]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(DTYPES), use_perm=st.booleans(), use_norm=st.booleans())
def test_reference_matches_the_definition(layout, batch, seed, dtype, use_perm, use_norm):
    spec = layout.spec
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
