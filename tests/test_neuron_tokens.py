"""The equivariant DiT over neuron tokens (hyforget_fast/hypernet/models.py, "neuron" layout of
hyforget_fast/ops/spec.py): permuting the hidden units permutes the prediction, for DiHyFo-1 and
DiHyFo-2, both conditioning designs, with and without the target (guidance's two branches); the
config field, and a tiny training run + sampling end to end."""
import copy
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hyforget_fast as hf
from hyforget_fast.collection.store import CheckpointStore
from hyforget_fast.hypernet.api import Hypernet, load_hypernet
from hyforget_fast.hypernet.diffusion import GaussianDiffusion
from hyforget_fast.hypernet.models import DiHyFo, HypernetConfig, UnitLinear
from hyforget_fast.hypernet.train import TrainConfig, loss_weight, train

from conftest import mlp_specs

torch.set_num_threads(1)
QUIET = lambda *_: None  # noqa: E731
SMALL = dict(width=32, depth=2, heads=2)


def _model(kind: str, spec: hf.MLPSpec, cond: str, seed: int, skip: str = "none") -> DiHyFo:
    """A neuron-token model with EVERY parameter random: zero-initialised decoders and adaLN-Zero
    maps would make the prediction trivially equivariant (θ or 0)."""
    torch.manual_seed(seed)
    m = DiHyFo(HypernetConfig.preset(kind, spec, "tiny", **SMALL, cond=cond, tokens="neuron", cond_dropout=0.1,
                                     skip=skip))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


def _permute_units(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """(B, T, C) tokens with unit tokens 0..T-2 reordered by perm (B, T-1); the last token stays."""
    units = x[:, :-1].gather(1, perm[:, :, None].expand(-1, -1, x.shape[2]))
    return torch.cat([units, x[:, -1:]], 1)


@settings(max_examples=8)
@given(spec=mlp_specs(max_hidden_layers=1, max_in=13), kind=st.sampled_from(["dihyfo1", "dihyfo2"]),
       cond=st.sampled_from(["adaln", "tokens"]), seed=st.integers(0, 2**16), skip=st.booleans())
def test_permuting_hidden_units_permutes_the_prediction(spec, kind, cond, seed, skip):
    m = _model(kind, spec, cond, seed, "vp" if skip and kind == "dihyfo2" else "none")
    b, g = 4, torch.Generator().manual_seed(seed)
    T, C, mcls = m.layout.num_tokens, m.layout.token_width, spec.num_classes
    x = torch.randn(b, T, C, generator=g) * m.token_mask
    t = torch.randint(0, 1000, (b,), generator=g)
    tgt = torch.rand(b, mcls, generator=g) * 2
    theta = torch.randn(b, T, C, generator=g) * m.token_mask if kind == "dihyfo1" else None
    cur = torch.rand(b, mcls, generator=g) * 2 if kind == "dihyfo1" else None
    perms = hf.sample_perms(spec, b, seed=seed + 1)                                   # (b, h)
    # the permutation of the network's hidden units IS this permutation of its tokens
    params = torch.randn(b, spec.num_params, generator=g)
    assert torch.equal(hf.tokenize(hf.permute(params, spec, perms), m.layout),
                       _permute_units(hf.tokenize(params, m.layout), perms))
    px, pth = _permute_units(x, perms), (None if theta is None else _permute_units(theta, perms))
    m64 = copy.deepcopy(m).double()
    d = lambda v: None if v is None else v.double()  # noqa: E731
    with torch.no_grad():
        for drop in (None, torch.ones(b, dtype=torch.bool), torch.tensor([True, False, True, False])):
            out = m(x, t, tgt, theta, cur, drop_target=drop)                          # (b, T, C)
            got = m(px, t, tgt, pth, cur, drop_target=drop)
            # exact in float64 (only the order of sums differs) ...
            out64 = m64(d(x), t, d(tgt), d(theta), d(cur), drop_target=drop)
            got64 = m64(d(px), t, d(tgt), d(pth), d(cur), drop_target=drop)
            torch.testing.assert_close(got64, _permute_units(out64, perms), rtol=1e-9, atol=1e-10)
            # ... and in float32 within a small multiple of float32's own error against float64
            err32 = (out.double() - out64).abs().max().item()
            assert (got.double() - _permute_units(out64, perms)).abs().max().item() <= 4 * err32 + 1e-6
            if spec.hidden_sizes[0] > 1:   # the units' predictions differ: the check is not vacuous
                assert not torch.allclose(out[:, 0], out[:, 1], atol=1e-3)
        # classifier-free guidance (Hypernet's batched conditional + unconditional forward)
        hn = Hypernet(m, hf.ParamNorm(spec, torch.tensor([[0.0, 1.0]] * 4)), GaussianDiffusion(),
                      {"classes": list(range(mcls))})
        cond_in = () if theta is None else (theta, cur)
        pcond_in = () if theta is None else (pth, cur)
        guided = hn._guided(tgt, cond_in, 3.0)(x, t)
        torch.testing.assert_close(hn._guided(tgt, pcond_in, 3.0)(px, t), _permute_units(guided, perms),
                                   rtol=1e-4, atol=1e-4)
        if kind == "dihyfo1" and spec.hidden_sizes[0] > 1 and not torch.equal(perms, perms.sort(1).values):
            # permuting θ* alone, not the same units of θ, is another input: the θ pathway is per unit
            other = m(px, t, tgt, theta, cur)
            assert not torch.allclose(other, _permute_units(m(x, t, tgt, theta, cur), perms), atol=1e-3)


def test_unit_tokens_share_their_maps_and_embedding_and_start_at_theta_or_zero():
    spec = hf.MLPSpec([11, 5, 3])
    for kind in ("dihyfo1", "dihyfo2"):
        torch.manual_seed(0)
        m = DiHyFo(HypernetConfig.preset(kind, spec, "tiny", **SMALL, tokens="neuron"))
        assert isinstance(m.x_in, UnitLinear) and isinstance(m.out, UnitLinear)
        assert m.x_in.weight.shape == (11 + 1 + 3, 32) and m.pos.shape == (1, 2, 32)   # unit type, bias type
        assert m.theta_in is None if kind == "dihyfo2" else isinstance(m.theta_in, UnitLinear)
        pos = m._pos()                                                     # (1, T, W): one vector for all units
        assert pos.shape == (1, 6, 32) and bool((pos[0, :5] == pos[0, :1]).all())
        x = torch.randn(2, 6, 15) * m.token_mask
        theta = torch.randn(2, 6, 15) * m.token_mask
        args = (theta, torch.rand(2, 3)) if kind == "dihyfo1" else ()
        out = m(x, torch.tensor([1, 900]), torch.rand(2, 3), *args)
        # zero decoder: DiHyFo-1 predicts θ (the residual on θ), DiHyFo-2 the normalized mean 0
        torch.testing.assert_close(out, theta if kind == "dihyfo1" else torch.zeros_like(out), rtol=0, atol=0)
        assert not out[:, -1, 3:].any()                                    # the output-bias token's padding


def test_skip_connection_starts_at_the_posterior_mean_scale_and_reads_old_configs():
    spec = hf.MLPSpec([11, 5, 3])
    torch.manual_seed(0)
    cfg = HypernetConfig.preset("dihyfo2", spec, "tiny", **SMALL, skip="vp")
    m = DiHyFo(cfg)
    d = GaussianDiffusion()
    x, t = torch.randn(3, 6, 15) * m.token_mask, torch.tensor([0, 400, 999])
    # zero decoder: x0 = sqrt(ab_t) x_t, the linear denoiser of unit-variance data
    torch.testing.assert_close(m(x, t, torch.rand(3, 3)), d.sqrt_ab[t].view(-1, 1, 1) * x, rtol=0, atol=0)
    with torch.no_grad():
        m.out.weight.normal_()
    out = m(x, t, torch.rand(3, 3))
    assert not out[:, -1, 3:].any()                                     # padding stays 0
    assert not torch.allclose(out, d.sqrt_ab[t].view(-1, 1, 1) * x)     # the decoder now contributes
    assert HypernetConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["skip"] == "vp"
    plain = HypernetConfig.preset("dihyfo2", spec, "tiny", **SMALL)
    assert "skip" not in plain.to_dict() and HypernetConfig.from_dict(plain.to_dict()).skip == "none"
    with pytest.raises(ValueError, match="skip must be one of"):
        HypernetConfig.preset("dihyfo2", spec, "tiny", skip="eps")
    with pytest.raises(ValueError, match="DiHyFo-1 already predicts theta"):
        HypernetConfig.preset("dihyfo1", spec, "tiny", skip="vp")


def test_config_field_defaults_to_layer_and_refuses_what_it_cannot_build():
    spec = hf.MLPSpec([6, 3, 4])
    cfg = HypernetConfig.preset("dihyfo2", spec, "tiny", tokens="neuron")
    assert cfg.layout == hf.TokenLayout(spec, kind="neuron")
    assert HypernetConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    del old["tokens"]                                                      # a config saved before the field
    assert HypernetConfig.from_dict(old).tokens == "layer" and HypernetConfig.from_dict(old).layout.kind == "layer"
    assert "tokens" not in HypernetConfig.from_dict(old).to_dict()         # layer-wise configs read as before
    with pytest.raises(ValueError, match="tokens must be one of"):
        HypernetConfig.preset("dihyfo2", spec, "tiny", tokens="unit")
    with pytest.raises(ValueError, match="exactly one hidden layer"):
        HypernetConfig.preset("dihyfo2", hf.MLPSpec([6, 3, 3, 4]), "tiny", tokens="neuron")


def test_piece_weighting_gives_every_piece_equal_weight_in_both_layouts():
    spec = hf.MLPSpec([13, 4, 3])
    for layout in (hf.TokenLayout(spec, kind="neuron"), hf.TokenLayout(spec, 5)):
        mask = layout.token_mask()
        w = loss_weight(layout, "piece", mask)
        pm = layout.piece_map()
        totals = [float(w[pm == p].sum()) for p in range(4)]
        assert totals == pytest.approx([spec.num_params / 4] * 4)
        assert not w[mask == 0].any()


from test_conditioning import data  # noqa: E402,F401  (the same small collection fixture)


@pytest.mark.parametrize("model", ["dihyfo1", "dihyfo2"])
def test_train_cli_with_neuron_tokens_trains_and_samples(data, tmp_path, model):
    from hyforget_fast.cli import main
    out = str(tmp_path / model)
    rc = main(["train", "--model", model, "--data", data, "--out", out, "--steps", "3", "--batch-size", "8",
               "--width", "32", "--depth", "1", "--heads", "2", "--tokens", "neuron", "--log-every", "1",
               "--threads", "1", "--quiet", "--device", "cpu"])
    assert rc == 0
    with open(os.path.join(out, "config.json")) as f:
        conf = json.load(f)
    assert conf["model"]["tokens"] == "neuron"
    assert all(np.isfinite(c["loss"]) for c in json.load(open(os.path.join(out, "curves.json"))) if "loss" in c)
    hn = load_hypernet(out, device="cpu")
    store = CheckpointStore(data)
    assert hn.layout == hf.TokenLayout(hf.MLPSpec(store.layer_sizes), kind="neuron")
    assert hn.model.token_mask.shape == (store.layer_sizes[1] + 1, store.layer_sizes[0] + 1 + store.layer_sizes[2])
    kw = {"theta": torch.from_numpy(store.take("params", np.array([0]))[0]), "losses": [0.1] * 4} \
        if model == "dihyfo1" else {}
    nets = hn.sample([0.05, 0.05, 3.0, 0.1], 3, steps=2, guidance=2.0, **kw)
    assert nets.shape == (3, hf.MLPSpec(store.layer_sizes).num_params)
    assert torch.isfinite(nets).all()
    # a resumed neuron-token run keeps its layout (the saved config is the base)
    train(TrainConfig(model=model, steps=4, batch_size=8, overrides={**SMALL, "width": 32, "depth": 1,
                                                                     "tokens": "neuron"}),
          data, out, resume=True, log=QUIET)
    assert load_hypernet(out, device="cpu").meta["step"] == 4


def test_resuming_a_layer_wise_run_accepts_the_explicit_default_layout():
    from hyforget_fast.hypernet.train import resumed_config
    cfg = TrainConfig(model="dihyfo2", steps=4, overrides=SMALL)
    # a run saved before neuron tokens existed: its model config has no `tokens` field
    saved = {"train": cfg.to_dict(), "model": HypernetConfig.preset("dihyfo2", hf.MLPSpec([6, 3, 4]), "tiny",
                                                                     **SMALL, tokens="layer").to_dict()}
    assert "tokens" not in saved["model"]
    assert resumed_config(saved, {"overrides": {"tokens": "layer"}, "steps": 9}).steps == 9
    with pytest.raises(ValueError, match="tokens"):
        resumed_config(saved, {"overrides": {"tokens": "neuron"}})
