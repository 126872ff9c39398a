"""The benchmark's "G.pt way" baseline computes the same function as the fast path it is compared to."""
import os
import sys

import pytest
import torch

import hyforget_fast as hf
from hyforget_fast.hypernet.models import DiHyFo, HypernetConfig

# the reference serves the benchmark only, so it lives in bench/, outside the installed package
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from gpt_reference import GptStyleDiHyFo, gpt_style_batch  # noqa: E402

SPEC = hf.MLPSpec([20, 6, 3])


def _random_model(kind: str, seed: int) -> DiHyFo:
    torch.manual_seed(seed)
    cfg = HypernetConfig(kind=kind, layer_sizes=SPEC.layer_sizes, width=32, depth=1, heads=4, chunk=16)
    model = DiHyFo(cfg, num_diffusion_steps=1000)
    with torch.no_grad():  # the zero-initialised decoder / positions would make the check vacuous
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("kind", ["dihyfo1", "dihyfo2"])
def test_gpt_style_model_equals_dihyfo(kind):
    model = _random_model(kind, 0)
    B, T, C, m = 3, model.layout.num_tokens, model.cfg.chunk, SPEC.num_classes
    g = torch.Generator().manual_seed(1)
    x_t, theta = torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)
    t = torch.tensor([0, 417, 999])
    target, loss = torch.rand(B, m, generator=g) * 2, torch.rand(B, m, generator=g) * 2
    kw = dict(theta=theta, loss=loss) if kind == "dihyfo1" else {}
    gpt = GptStyleDiHyFo(model)
    assert all(a is b for a, b in zip(gpt.parameters(), model.parameters()))   # shared, not copied
    want = model(x_t, t, target, **kw)
    assert want.abs().max() > 0.1 and not torch.allclose(want, want[:1].expand_as(want))
    torch.testing.assert_close(gpt(x_t, t, target, **kw), want, rtol=1e-4, atol=1e-4)
    # float64 weights and inputs (DiHyFo keeps its scalar encoding and output in fp32): tight
    m64 = model.double()
    kw64 = {k: v.double() for k, v in kw.items()}
    want64 = m64(x_t.double(), t, target.double(), **kw64)
    got64 = GptStyleDiHyFo(m64)(x_t.double(), t, target.double(), **kw64)
    torch.testing.assert_close(got64, want64, rtol=1e-6, atol=1e-6)
    # a copy starts equal and is independent
    cp = GptStyleDiHyFo(m64, copy=True)
    torch.testing.assert_close(cp(x_t.double(), t, target.double(), **kw64), want64, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        next(cp.parameters()).add_(1.0)
    assert not torch.equal(next(cp.parameters()), next(m64.parameters()))


def test_gpt_style_model_refuses_missing_theta():
    gpt = GptStyleDiHyFo(_random_model("dihyfo1", 2))
    T, C = gpt.layout.num_tokens, gpt.cfg.chunk
    with pytest.raises(ValueError, match="theta"):
        gpt(torch.zeros(2, T, C), torch.zeros(2, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="DiHyFo"):
        GptStyleDiHyFo(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("sizes,chunk", [([20, 6, 3], 16), ([12, 5, 4, 3], 7), ([9, 1, 2], 4)])
def test_gpt_style_batch_equals_fused_tokenize(sizes, chunk):
    spec = hf.MLPSpec(sizes)
    layout = hf.TokenLayout(spec, chunk)
    g = torch.Generator().manual_seed(3)
    theta, theta_star = torch.randn(5, spec.num_params, generator=g), torch.randn(5, spec.num_params, generator=g)
    norm = hf.ParamNorm.fit(torch.randn(64, spec.num_params, generator=g) * 0.5 + 0.1, spec)
    perms = hf.sample_perms(spec, 5, seed=4)
    a, b = gpt_style_batch((theta, theta_star), layout, perms, norm)
    assert torch.equal(a, hf.tokenize(theta, layout, perms, norm))
    assert torch.equal(b, hf.tokenize(theta_star, layout, perms, norm))
    assert torch.equal(gpt_style_batch(theta, layout, perms, None), hf.tokenize(theta, layout, perms, None))
    # perms drawn per sample: the same for θ and θ*, seeded, and true permutations
    a1, b1 = gpt_style_batch((theta, theta), layout, None, norm, seed=7)
    assert torch.equal(a1, b1)
    assert torch.equal(a1, gpt_style_batch(theta, layout, None, norm, seed=7))
    if min(spec.hidden_sizes) > 1:
        assert not torch.equal(a1, gpt_style_batch(theta, layout, None, norm, seed=8))
    with pytest.raises(ValueError, match="perms"):
        gpt_style_batch(theta, layout, perms[:2], norm)
