"""DiHyFo models, GaussianDiffusion samplers and the Hypernet.sample API (no training needed)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hyforget_fast as hf
from hyforget_fast.hypernet.api import Hypernet
from hyforget_fast.hypernet.diffusion import GaussianDiffusion
from hyforget_fast.hypernet.models import DiHyFo, HypernetConfig, TokenLinear

torch.set_num_threads(1)
SPEC = hf.MLPSpec((20, 3, 4))                       # 79 params: 4 tokens of 32 (W1 has 2)
SMALL = dict(width=32, depth=1, heads=2, chunk=32, tokens="layer")   # these tests are about the layer-wise layout


def _hypernet(kind: str, perturb: bool = True, seed: int = 0) -> Hypernet:
    torch.manual_seed(seed)
    cfg = HypernetConfig.preset(kind, SPEC, "tiny", **SMALL)
    model = DiHyFo(cfg)
    if perturb:   # a non-zero decoder (and adaLN modulation), so that samples depend on the noise and prompt
        torch.nn.init.normal_(model.out.weight, std=0.05)
        for name, p in model.named_parameters():
            if ".ada." in name or name.startswith("ada_f."):
                torch.nn.init.normal_(p, std=0.05)
    params = torch.randn(64, SPEC.num_params) * 0.3 + 0.1
    norm = hf.ParamNorm.fit(params, SPEC)
    meta = {"classes": [0, 1, 2, 3], "pivots": [0, 1], "step": 0}
    return Hypernet(model, norm, GaussianDiffusion(), meta)


@given(tokens=st.integers(1, 5), d_in=st.integers(1, 7), d_out=st.integers(1, 6), batch=st.integers(1, 3))
def test_token_linear_equals_a_loop_of_per_token_linears(tokens, d_in, d_out, batch):
    torch.manual_seed(tokens * 100 + d_in * 10 + d_out)
    tl = TokenLinear(tokens, d_in, d_out).double()
    torch.nn.init.normal_(tl.bias)
    x = torch.randn(batch, tokens, d_in, dtype=torch.float64)
    want = torch.stack([torch.nn.functional.linear(x[:, t], tl.weight[t].T, tl.bias[t]) for t in range(tokens)], 1)
    torch.testing.assert_close(tl(x), want, rtol=1e-12, atol=1e-12)


def test_models_at_init_return_theta_and_zero():
    """Zero decoder: DiHyFo-1 predicts θ* = θ (global residual), DiHyFo-2 the normalized mean 0."""
    for kind in ("dihyfo1", "dihyfo2"):
        hn = _hypernet(kind, perturb=False)
        m, T, C = hn.model, hn.layout.num_tokens, hn.cfg.chunk
        theta = hf.tokenize(torch.randn(3, SPEC.num_params), hn.layout, None, hn.norm)
        x_t, t, L = torch.randn(3, T, C), torch.tensor([0, 500, 999]), torch.rand(3, 4)
        out = m(x_t, t, L, theta, torch.rand(3, 4)) if kind == "dihyfo1" else m(x_t, t, L)
        torch.testing.assert_close(out, theta if kind == "dihyfo1" else torch.zeros_like(out), rtol=0, atol=0)


def _toy_model_fn(x, t):
    return 0.8 * torch.tanh(x) + 0.1 * (t.float() / 1000)[:, None, None]


def test_ddim_1000_steps_eta_1_is_ddpm_with_the_same_noise_stream():
    """With eta = 1 and every step, DDIM's sigma is DDPM's posterior std and its mean coefficients
    reduce to the posterior's (c0, ct); both draw x_T then one noise per step t > 0, in order."""
    d = GaussianDiffusion()
    mask = torch.ones(5, 8)
    mask[-1, 3:] = 0
    a = d.ddpm_sample(_toy_model_fn, (6, 5, 8), mask=mask, generator=torch.Generator().manual_seed(3))
    b = d.ddim_sample(_toy_model_fn, (6, 5, 8), steps=1000, eta=1.0, mask=mask,
                      generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)   # measured: 2e-7
    c = d.ddim_sample(_toy_model_fn, (6, 5, 8), steps=1000, eta=1.0, mask=mask,
                      generator=torch.Generator().manual_seed(4))
    assert (a - c).abs().max() > 1e-2     # the comparison can fail: another stream differs


def test_training_loss_given_t_and_noise_equals_drawn():
    d = GaussianDiffusion()
    x0, mask = torch.randn(4, 3, 5), torch.ones(3, 5)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = d.training_loss(_toy_model_fn, x0, mask, g1)
    t = d.sample_t(4, g2)
    b = d.training_loss(_toy_model_fn, x0, mask, t=t, noise=torch.randn(x0.shape, generator=g2) * mask)
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sample_is_seeded(sampler):
    hn = _hypernet("dihyfo2")
    steps = 10 if sampler == "ddim" else None
    kw = dict(sampler=sampler, steps=steps) if steps else dict(sampler=sampler)
    if sampler == "ddpm":   # 1000 model calls: keep it small
        hn.diffusion = GaussianDiffusion(num_steps=50)
    a = hn.sample([0.1, 0.2, 1.0, 2.0], 3, seed=5, **kw)
    b = hn.sample([0.1, 0.2, 1.0, 2.0], 3, seed=5, **kw)
    c = hn.sample([0.1, 0.2, 1.0, 2.0], 3, seed=6, **kw)
    assert a.shape == (3, SPEC.num_params) and a.dtype == torch.float32
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-4
    assert (a[0] - a[1]).abs().max() > 1e-4          # k networks get their own noise


def test_sample_per_row_prompts_and_batches():
    hn = _hypernet("dihyfo2")
    prompts = torch.tensor([[0.1, 0.2, 1.0, 2.0]] * 4)
    a = hn.sample(prompts, 4, steps=5, seed=1)
    assert torch.equal(a, hn.sample(prompts[0], 4, steps=5, seed=1))    # (m,) broadcasts to k rows
    assert torch.equal(a, hn.sample(prompts, 4, steps=5, seed=1, batch=4))
    assert hn.sample(prompts, 4, steps=5, seed=1, batch=3).shape == (4, SPEC.num_params)


def test_dihyfo1_at_init_samples_theta_back_in_flat_order():
    """Zero decoder => x0 = tokens of θ; sample detokenizes with the norm -> θ itself."""
    hn = _hypernet("dihyfo1", perturb=False)
    theta = torch.randn(2, SPEC.num_params) * 0.3
    out = hn.sample([0.1, 0.1, 2.0, 2.0], 2, steps=3, theta=theta, losses=[0.1, 0.1, 0.1, 0.1])
    torch.testing.assert_close(out, theta, rtol=1e-5, atol=1e-6)


def test_sample_errors_name_the_problem():
    h1, h2 = _hypernet("dihyfo1"), _hypernet("dihyfo2")
    P, ok = SPEC.num_params, [0.1, 0.1, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"target_losses must have shape \(4,\).*one loss per class"):
        h2.sample([0.1, 0.2, 0.3], 2)
    with pytest.raises(ValueError, match="target_losses holds a non-finite value.*row 1, column 2"):
        h2.sample([ok, [0.1, 0.1, float("nan"), 1.0]], 2)
    with pytest.raises(ValueError, match="has 3 rows but k = 2"):
        h2.sample([ok] * 3, 2)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        h2.sample(ok, 2, sampler="euler")
    with pytest.raises(ValueError, match="DDIM steps"):
        h2.sample(ok, 2, steps=0)
    with pytest.raises(ValueError, match="DiHyFo-2 is conditioned on target losses only"):
        h2.sample(ok, 2, theta=torch.zeros(P))
    with pytest.raises(ValueError, match="DiHyFo-1 .* pass theta"):
        h1.sample(ok, 2)
    with pytest.raises(ValueError, match=rf"theta must have shape \({P},\).*P = {P} parameters of MLPSpec\(20, 3, 4\)"):
        h1.sample(ok, 2, theta=torch.zeros(P + 1), losses=ok)
    bad = torch.zeros(P)
    bad[7] = float("nan")
    with pytest.raises(ValueError, match="theta holds a non-finite value.*column 7"):
        h1.sample(ok, 2, theta=bad, losses=ok)
    with pytest.raises(ValueError, match="losses holds a non-finite"):
        h1.sample(ok, 2, theta=torch.zeros(P), losses=[0.1, float("inf"), 1, 1])
    with pytest.raises(ValueError, match="k .* positive integer"):
        h2.sample(ok, 0)


@pytest.mark.parametrize("kind", ["dihyfo1", "dihyfo2"])
def test_guidance_combines_the_two_branches(kind):
    hn = _hypernet(kind)
    torch.nn.init.normal_(hn.model.null_target, std=0.5)        # a non-trivial "no target" embedding
    m, P = 4, SPEC.num_params
    tgt = torch.rand(3, m)
    cond = (hf.tokenize(torch.randn(3, P), hn.layout, None, hn.norm), torch.rand(3, m)) if kind == "dihyfo1" else ()
    x, t = torch.randn(3, *hn.model.token_mask.shape), torch.tensor([5, 500, 999])
    c = hn.model(x, t, tgt, *cond)
    u = hn.model(x, t, tgt, *cond, drop_target=torch.ones(3, dtype=torch.bool))
    assert not torch.allclose(c, u)                              # the target tokens matter
    torch.testing.assert_close(hn._guided(tgt, cond, 2.5)(x, t), u + 2.5 * (c - u), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hn._guided(tgt, cond, 1.0)(x, t), c)
    kw = {"theta": torch.randn(P), "losses": torch.rand(m)} if kind == "dihyfo1" else {}
    assert not torch.equal(hn.sample(tgt[0], 2, steps=3, guidance=1.0, **kw), hn.sample(tgt[0], 2, steps=3, guidance=3.0, **kw))


def test_guidance_needs_a_model_trained_with_target_dropout():
    torch.manual_seed(0)
    model = DiHyFo(HypernetConfig.preset("dihyfo2", SPEC, "tiny", **SMALL, cond_dropout=0.0))
    hn = Hypernet(model, hf.ParamNorm.fit(torch.randn(8, SPEC.num_params), SPEC), GaussianDiffusion(), {})
    assert hn.default_guidance == 1.0
    with pytest.raises(ValueError, match="without target dropout"):
        hn.sample(torch.rand(4), 1, steps=2, guidance=2.0)
    with pytest.raises(ValueError, match="guidance"):
        _hypernet("dihyfo2").sample(torch.rand(4), 1, steps=2, guidance=float("nan"))
