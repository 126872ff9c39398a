"""The conditioning options (bench/RESULTS.md §4): adaLN-Zero, log target losses, canonical hidden-unit order."""
import json
import os

import numpy as np
import pytest
import torch

import hyforget_fast as hf
from hyforget_fast.collection.collect import collect, preset
from hyforget_fast.collection.store import CheckpointStore
from hyforget_fast.hypernet.api import Hypernet, load_hypernet
from hyforget_fast.hypernet.diffusion import GaussianDiffusion
from hyforget_fast.hypernet.models import LOG_EPS, AdaLNBlock, DiHyFo, HypernetConfig
from hyforget_fast.hypernet.train import TrainConfig, log_loss_stats, read_checkpoint, train

torch.set_num_threads(1)
SPEC = hf.MLPSpec((20, 3, 4))                       # 79 params: 4 tokens of 32
SMALL = dict(width=32, depth=2, heads=2, chunk=32, tokens="layer")   # these tests are about the layer-wise layout
QUIET = lambda *_: None  # noqa: E731


def _model(kind, **kw):
    torch.manual_seed(0)
    return DiHyFo(HypernetConfig.preset(kind, SPEC, "tiny", **{**SMALL, "cond": "adaln", **kw}))


def _inputs(model, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, C = model.layout.num_tokens, model.cfg.chunk
    x = torch.randn(b, T, C, generator=g)
    cond = (torch.randn(b, T, C, generator=g), torch.rand(b, 4, generator=g)) if model.conditional_on_theta else ()
    return x, torch.tensor([3, 400, 999])[:b], torch.rand(b, 4, generator=g) * 3, cond


def _perturb(model, std=0.05):
    """Give every zero-initialised map (decoder, modulation) a non-zero value."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("out.", "ada_f.")) or ".ada." in name or name == "null_target":
                p.normal_(0, std, generator=torch.Generator().manual_seed(len(name)))


@pytest.mark.parametrize("kind", ["dihyfo1", "dihyfo2"])
def test_adaln_shapes_sequence_and_zero_init(kind):
    m = _model(kind)
    x, t, tgt, cond = _inputs(m)
    out = m(x, t, tgt, *cond)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert m.pos.shape[1] == m.layout.num_tokens                       # no scalar tokens in the sequence
    assert all(isinstance(b, AdaLNBlock) for b in m.blocks) and m.scalar_in is None
    for b in m.blocks:                                                 # adaLN-Zero: modulation starts at 0
        assert not b.ada.weight.any() and not b.ada.bias.any()
    assert not m.ada_f.weight.any()
    want = cond[0] * m.token_mask if kind == "dihyfo1" else torch.zeros_like(out)
    torch.testing.assert_close(out, want, rtol=0, atol=0)              # θ* = θ / the normalized mean


@pytest.mark.parametrize("kind", ["dihyfo1", "dihyfo2"])
def test_adaln_target_modulates_and_dropout_replaces_it_with_the_null_embedding(kind):
    m = _model(kind)
    _perturb(m)
    x, t, tgt, cond = _inputs(m)
    a, b = m(x, t, tgt, *cond), m(x, t, tgt + 1.0, *cond)
    assert (a - b).abs().max() > 1e-4                                  # the target reaches the output
    drop = torch.tensor([True, False, True])
    da, db = m(x, t, tgt, *cond, drop_target=drop), m(x, t, tgt + 1.0, *cond, drop_target=drop)
    torch.testing.assert_close(da[drop], db[drop])                     # dropped rows ignore the target
    torch.testing.assert_close(da[~drop], a[~drop])                    # the others are unchanged
    if kind == "dihyfo1":                                              # the current loss still counts
        assert (m(x, t, tgt, cond[0], cond[1] + 1.0, drop_target=drop) - da)[drop].abs().max() > 1e-5


@pytest.mark.parametrize("repr_", ["raw", "log"])
def test_guidance_with_adaln_combines_the_two_branches(repr_):
    m = _model("dihyfo2", target_repr=repr_, target_log_mean=-1.0, target_log_std=2.0)
    _perturb(m, 0.3)
    norm = hf.ParamNorm.fit(torch.randn(16, SPEC.num_params), SPEC)
    hn = Hypernet(m, norm, GaussianDiffusion(), {"classes": [0, 1, 2, 3]})
    x, t, tgt, _ = _inputs(m)
    c = m(x, t, tgt)
    u = m(x, t, tgt, drop_target=torch.ones(3, dtype=torch.bool))
    assert not torch.allclose(c, u)
    torch.testing.assert_close(hn._guided(tgt, (), 2.5)(x, t), u + 2.5 * (c - u), atol=1e-5, rtol=1e-5)
    a = hn.sample(tgt[0], 2, steps=3, guidance=1.0)
    assert a.shape == (2, SPEC.num_params) and not torch.equal(a, hn.sample(tgt[0], 2, steps=3, guidance=3.0))


def test_log_representation_is_the_standardised_log():
    m = _model("dihyfo1", target_repr="log", target_log_mean=-1.5, target_log_std=2.0)
    L = torch.tensor([[0.0, 0.01, 1.0, 5.0]])
    torch.testing.assert_close(m.loss_repr(L), ((L + LOG_EPS).log() + 1.5) / 2.0)
    raw = _model("dihyfo1", target_repr="raw")
    assert raw.loss_repr(L) is L
    assert m.loss_encoder.freqs.max() == 2.0 ** m.cfg.target_max_freq_log2 == 8.0
    # tokens + log also runs (the "log alone" ablation row)
    tok = _model("dihyfo2", cond="tokens", target_repr="log")
    x, t, tgt, _ = _inputs(tok)
    assert tok(x, t, tgt).shape == x.shape


def test_old_configs_load_as_tokens_raw_random():
    d = HypernetConfig.preset("dihyfo2", SPEC, "tiny", **SMALL).to_dict()
    for k in ("cond", "target_repr", "target_log_mean", "target_log_std", "target_max_freq_log2"):
        d.pop(k)
    cfg = HypernetConfig.from_dict(d)
    assert cfg.cond == "tokens" and cfg.target_repr == "raw"
    assert DiHyFo(cfg).scalar_in is not None
    t = TrainConfig().to_dict()
    t.pop("unit_order")
    assert TrainConfig.from_dict(t).unit_order == "random"
    with pytest.raises(ValueError, match="cond must be one of"):
        HypernetConfig.preset("dihyfo2", SPEC, "tiny", cond="film")
    with pytest.raises(ValueError, match="target_repr must be one of"):
        HypernetConfig.preset("dihyfo2", SPEC, "tiny", target_repr="rank")
    with pytest.raises(ValueError, match="unit_order must be one of"):
        TrainConfig(unit_order="sorted")


def test_dihyfo1_canonical_sampling_returns_theta_in_the_users_unit_order():
    """At init (zero decoder) DiHyFo-1 predicts θ* = θ: in canonical mode θ is canonicalised on
    the way in and θ* mapped back, so the user's θ comes back exactly, in its own order."""
    torch.manual_seed(0)
    m = DiHyFo(HypernetConfig.preset("dihyfo1", SPEC, "tiny", **{**SMALL, "cond": "adaln"}))
    norm = hf.ParamNorm.fit(torch.randn(64, SPEC.num_params) * 0.3, SPEC)
    hn = Hypernet(m, norm, GaussianDiffusion(), {"classes": [0, 1, 2, 3], "train": {"unit_order": "canonical"}})
    assert hn.unit_order == "canonical"
    theta = torch.randn(2, SPEC.num_params) * 0.3
    perms = hf.ops.canonical_perms(theta, SPEC)
    assert not torch.equal(perms, torch.arange(3).expand(2, 3))       # the case is not trivially sorted
    out = hn.sample([0.1, 0.1, 2.0, 2.0], 2, steps=3, theta=theta, losses=[0.1] * 4)
    torch.testing.assert_close(out, theta, rtol=1e-5, atol=1e-6)
    # what the model saw is the canonical θ: its tokens equal tokenize(θ, canonical perms)
    seen = {}
    m.register_forward_pre_hook(lambda mod, args: seen.update(theta=args[3]))
    hn.sample([0.1, 0.1, 2.0, 2.0], 2, steps=1, theta=theta, losses=[0.1] * 4)
    torch.testing.assert_close(seen["theta"], hf.tokenize(theta, hn.layout, perms, hn.norm))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("coll"))
    collect(preset("mnist4", runs=6, block_runs=6, epochs=2, ckpts_per_run=8), out, log=QUIET)
    return out


@pytest.mark.parametrize("model", ["dihyfo1", "dihyfo2"])
def test_training_with_every_new_option_stores_and_reloads_the_log_statistics(data, tmp_path, model):
    out = str(tmp_path / "o")
    cfg = TrainConfig(model=model, steps=3, batch_size=8, log_every=1, warmup_steps=1, unit_order="canonical",
                      overrides={**SMALL, "chunk": 64, "cond": "adaln", "target_repr": "log"})
    train(cfg, data, out, log=QUIET)
    with open(os.path.join(out, "config.json")) as f:
        conf = json.load(f)
    store = CheckpointStore(data)
    train_rows = ~np.isin(store.load("run"), conf["heldout_runs"])
    want = log_loss_stats(store.load("class_loss")[train_rows])
    assert conf["model"]["target_log_mean"] == pytest.approx(want["target_log_mean"])
    assert conf["model"]["target_log_std"] == pytest.approx(want["target_log_std"])
    assert conf["model"]["cond"] == "adaln" and conf["train"]["unit_order"] == "canonical"
    hn = load_hypernet(out, device="cpu")
    assert hn.cfg.target_log_mean == pytest.approx(want["target_log_mean"]) and hn.unit_order == "canonical"
    _, saved = read_checkpoint(out)
    assert saved["model"] == conf["model"]
    kw = {"theta": torch.from_numpy(store.take("params", np.array([0]))[0]), "losses": [0.1] * 4} \
        if model == "dihyfo1" else {}
    assert torch.isfinite(hn.sample([0.05, 0.05, 3.0, 0.1], 2, steps=2, **kw)).all()


def test_canonical_order_uses_the_start_networks_order_for_both_members_of_a_pair(data):
    """In a DiHyFo-1 step θ and θ* are permuted by canonical_perms(θ); in DiHyFo-2 by their own."""
    from hyforget_fast.collection.pairs import PairDataset
    from hyforget_fast.hypernet import train as tr
    calls = []
    real = tr.canonical_perms

    def spy(params, spec):
        calls.append(params.clone())
        return real(params, spec)
    ds = PairDataset(CheckpointStore(data))
    tcfg = TrainConfig(model="dihyfo1", steps=1, batch_size=4, unit_order="canonical", overrides=SMALL)
    m = DiHyFo(HypernetConfig.preset("dihyfo1", hf.MLPSpec(CheckpointStore(data).layer_sizes), "tiny",
                                     **{**SMALL, "chunk": 64, "cond": "adaln"}))
    norm = hf.ParamNorm.fit(ds.take("params", ds.rows[:32]), m.cfg.spec)
    step = tr._Step(tcfg, m, GaussianDiffusion(), ds, norm, 0, 4)
    g = torch.Generator().manual_seed(0)
    tr.canonical_perms = spy
    try:
        step.loss(m, g)
    finally:
        tr.canonical_perms = real
    g = torch.Generator().manual_seed(0)
    batch = ds.sample_batch(4, g)
    assert len(calls) == 1 and torch.equal(calls[0], batch["theta"])


def test_train_cli_flags_reach_the_saved_config(data, tmp_path):
    from hyforget_fast.cli import main
    out = str(tmp_path / "cli")
    rc = main(["train", "--model", "dihyfo2", "--data", data, "--out", out, "--steps", "2", "--batch-size", "4",
               "--width", "32", "--depth", "1", "--heads", "2", "--cond", "tokens", "--target-repr", "log",
               "--target-max-freq-log2", "2", "--unit-order", "canonical", "--threads", "1", "--quiet",
               "--device", "cpu"])
    assert rc == 0
    with open(os.path.join(out, "config.json")) as f:
        conf = json.load(f)
    assert (conf["model"]["cond"], conf["model"]["target_repr"], conf["model"]["target_max_freq_log2"]) == \
        ("tokens", "log", 2.0)
    assert conf["train"]["unit_order"] == "canonical"


def test_class_losses_match_class_metrics_and_have_the_autograd_gradient_of_the_float64_reference():
    from hyforget_fast.ops import reference as ref
    from hyforget_fast.ops.functional import class_losses
    spec = hf.MLPSpec((6, 3, 4))
    g = torch.Generator().manual_seed(0)
    params = torch.randn(5, spec.num_params, generator=g, dtype=torch.float64)
    X, y = torch.rand(40, 6, generator=g, dtype=torch.float64), torch.arange(40) % 4
    L = class_losses(params, spec, X, y)
    torch.testing.assert_close(L.float(), hf.class_metrics(params.float(), spec, X.float(), y).class_loss,
                               rtol=1e-5, atol=1e-5)
    assert torch.autograd.gradcheck(lambda p: class_losses(p, spec, X, y), (params.clone().requires_grad_(),))
    p32 = params.float().requires_grad_()
    class_losses(p32, spec, X.float(), y).sum().backward()
    p64 = params.clone().requires_grad_()
    s, _ = ref.class_sums(p64, spec, X, y, 4)
    (s.double() / 10).sum().backward()                                # 10 samples of each class
    torch.testing.assert_close(p32.grad.double(), p64.grad, rtol=1e-4, atol=1e-5)
    assert torch.isnan(class_losses(params, spec, X, torch.zeros(40, dtype=torch.long))[:, 1:]).all()


def test_loss_matching_trains_and_pulls_the_predicted_network_towards_the_target(data, tmp_path):
    from hyforget_fast.collection.data import splits_from_manifest
    from hyforget_fast.collection.pairs import PairDataset
    from hyforget_fast.hypernet import train as tr
    store = CheckpointStore(data)
    sp = splits_from_manifest(store.manifest)
    ds = PairDataset(store)
    m = DiHyFo(HypernetConfig.preset("dihyfo2", hf.MLPSpec(store.layer_sizes), "tiny", **{**SMALL, "chunk": 64}))
    norm = hf.ParamNorm.fit(ds.take("params", ds.rows[:32]), m.cfg.spec)
    cfg = TrainConfig(model="dihyfo2", steps=1, batch_size=4, loss_match=1.0, loss_match_images=64, overrides=SMALL)
    step = tr._Step(cfg, m, GaussianDiffusion(), ds, norm, 0, 4, images=(sp.X_train, sp.y_train))
    plain = tr._Step(TrainConfig(model="dihyfo2", steps=1, batch_size=4, overrides=SMALL), m, GaussianDiffusion(),
                     ds, norm, 0, 4)
    a = step.loss(m, torch.Generator().manual_seed(0))
    b = plain.loss(m, torch.Generator().manual_seed(0))
    assert torch.isfinite(a) and a > b                                # the same MSE plus a positive term
    a.backward()
    assert m.out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="images of its split"):
        tr._Step(cfg, m, GaussianDiffusion(), ds, norm, 0, 4)
    out = str(tmp_path / "lm")
    train(TrainConfig(model="dihyfo1", steps=2, batch_size=4, log_every=1, warmup_steps=1, loss_match=0.5,
                      loss_match_images=32, overrides={**SMALL, "chunk": 64, "cond": "adaln"}), data, out, log=QUIET)
    assert json.load(open(os.path.join(out, "config.json")))["train"]["loss_match"] == 0.5


def test_loss_matching_against_the_networks_own_losses_is_zero_at_the_clean_network(data):
    """loss_match_target "own": x̂0 = x0 costs nothing, whatever the conditioning losses say; the
    default ("prompt") compares training-image losses with the validation losses it is conditioned on."""
    from hyforget_fast.collection.data import splits_from_manifest
    from hyforget_fast.collection.pairs import PairDataset
    from hyforget_fast.hypernet import train as tr
    from hyforget_fast.ops.functional import tokenize
    store = CheckpointStore(data)
    sp = splits_from_manifest(store.manifest)
    ds = PairDataset(store)
    m = DiHyFo(HypernetConfig.preset("dihyfo2", hf.MLPSpec(store.layer_sizes), "tiny", **{**SMALL, "chunk": 64}))
    norm = hf.ParamNorm.fit(ds.take("params", ds.rows[:32]), m.cfg.spec)
    batch = ds.sample_checkpoints(5, torch.Generator().manual_seed(1))
    clean = batch["params"].float()                                      # (5, P)
    pred = tokenize(clean, m.layout, None, norm)                          # (5, T, C) the clean network itself
    t = torch.tensor([0, 3, 10, 50, 200])
    steps = {target: tr._Step(TrainConfig(model="dihyfo2", steps=1, batch_size=5, loss_match=1.0,
                                          loss_match_images=64, loss_match_target=target, overrides=SMALL),
                              m, GaussianDiffusion(), ds, norm, 0, 5, images=(sp.X_train, sp.y_train))
             for target in ("prompt", "own")}
    own = steps["own"].match_loss(pred, batch["loss"], t, torch.Generator().manual_seed(2), clean)
    prompt = steps["prompt"].match_loss(pred, batch["loss"], t, torch.Generator().manual_seed(2), clean)
    assert own < 1e-8 < prompt
    moved = pred + 0.5 * torch.randn(pred.shape, generator=torch.Generator().manual_seed(3)) * m.token_mask
    moved.requires_grad_()
    far = steps["own"].match_loss(moved, batch["loss"], t, torch.Generator().manual_seed(2), clean)
    far.backward()
    assert far > 1e-4 and moved.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="loss_match_target"):
        TrainConfig(model="dihyfo2", loss_match=1.0, loss_match_target="test")


def test_the_loss_matching_flags_train_dihyfo1_and_are_saved(data, tmp_path):
    from hyforget_fast.cli import main
    out = str(tmp_path / "own")
    rc = main(["train", "--model", "dihyfo1", "--data", data, "--out", out, "--steps", "2", "--batch-size", "4",
               "--width", "32", "--depth", "1", "--heads", "2", "--chunk", "64", "--cond", "adaln",
               "--loss-match", "0.5", "--loss-match-target", "own", "--loss-match-split", "val",
               "--threads", "1", "--quiet", "--device", "cpu"])
    assert rc == 0
    conf = json.load(open(os.path.join(out, "config.json")))["train"]
    assert (conf["loss_match"], conf["loss_match_target"], conf["loss_match_split"]) == (0.5, "own", "val")
