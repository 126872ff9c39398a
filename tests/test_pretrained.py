"""Pretrained hypernetworks: the shipped weights are tied to their cards (config, one recorded forget
request reproduced, its numbers recomputed here in plain float64 PyTorch rather than by the fused
scorer and selection code that wrote them), and the export / load / matching machinery on a tiny
model of our own."""
import hashlib
import os

import numpy as np
import pytest
import torch

import hyforget_fast as hf
from hyforget_fast.collection.collect import collect, preset
from hyforget_fast.collection.data import splits_from_manifest
from hyforget_fast.collection.store import CheckpointStore
from hyforget_fast.hypernet import pretrained as P
from hyforget_fast.hypernet.train import TrainConfig, train
from hyforget_fast.unlearn.forget import forget

torch.set_num_threads(1)
QUIET = lambda *_: None  # noqa: E731
SHIPPED = [c.name for c in P.pretrained()]


def _splits_for(card):
    """The card's data split, rebuilt from the bundled digits (no collection needed)."""
    return splits_from_manifest({"split": card["dataset"]["split"]})


def test_the_shipped_models_have_cards():
    from hyforget_fast.demo import KINDS, SETTINGS
    assert {"mnist4-dihyfo1", "mnist4-dihyfo2"} <= set(SHIPPED)
    assert set(SHIPPED) <= {f"{s}-{k}" for s in SETTINGS for k in KINDS}
    for rec in P.pretrained():
        card = P.model_card(rec.name)
        assert (rec.name, rec.kind, rec.setting) == (card["name"], card["kind"], card["setting"])
        assert len(repr(rec)) < 200 and "\n" not in repr(rec) and rec.name in repr(rec)
        for key in ("commands", "dataset", "training", "prompt_alignment", "forgetting", "check", "reason"):
            assert card[key], (card["name"], key)
        assert "{data}" in card["commands"]["collect"] and "--steps" in card["commands"]["train"]


def _plain_scores(params, layer_sizes, X, y, m):
    """Per-class mean cross-entropy (K, m) and which inputs each network gets right (K, N) of K
    flat-parameter MLPs, float64, written out here from the flat order (per layer W (out, in)
    row-major, then b)."""
    losses, hits = [], []
    for p in params.double():
        h, o = X.double(), 0
        for l, (a, b) in enumerate(zip(layer_sizes, layer_sizes[1:])):
            W, bias = p[o:o + a * b].view(b, a), p[o + a * b:o + a * b + b]
            o += a * b + b
            h = h @ W.T + bias
            if l < len(layer_sizes) - 2:
                h = h.clamp_min(0)
        ce = torch.nn.functional.cross_entropy(h, y, reduction="none")
        losses.append(torch.stack([ce[y == c].mean() for c in range(m)]))
        hits.append((h.argmax(1) == y).double())
    return torch.stack(losses), torch.stack(hits)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_reproduces_its_card(name):
    hn = hf.load_pretrained(name, device="cpu")
    card = hn.card
    assert hn.cfg.to_dict() == card["training"]["model_config"]
    assert hn.kind == card["kind"] and hn.classes == card["dataset"]["classes"]
    chk = card["check"]
    start = P.load_start(name) if hn.kind == "dihyfo1" else None
    res = forget(hn, chk["forget"], _splits_for(card), k=chk["k"], sampler=chk["sampler"], steps=chk["steps"],
                 seed=chk["seed"], model=start)
    # the card's numbers, recomputed from the K sampled networks without the fused scorer or `select`
    splits = _splits_for(card)
    X, y, m = splits.X_val, splits.y_val, len(card["dataset"]["classes"])
    loss, hits = _plain_scores(res.candidate_params, card["dataset"]["layer_sizes"], X, y, m)
    fmask = torch.isin(y, torch.tensor([card["dataset"]["classes"].index(c) for c in chk["forget"]]))
    f_acc, r_acc = hits[:, fmask].mean(1), hits[:, ~fmask].mean(1)            # pooled over the digits
    best = [j for j in range(len(f_acc)) if f_acc[j] == f_acc.min()]
    chosen = max(best, key=lambda j: (r_acc[j], -j))
    assert chosen == chk["chosen"] == res.chosen
    assert float(f_acc[chosen]) == pytest.approx(chk["val_forget_acc"], abs=1e-6)
    assert float(r_acc[chosen]) == pytest.approx(chk["val_retain_acc"], abs=1e-6)
    np.testing.assert_allclose(loss[chosen].numpy(), chk["val_class_loss"], rtol=1e-4, atol=1e-5)
    assert int(((f_acc <= 0.01) & (r_acc >= 0.95)).sum()) == chk["forget_keep"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    data = str(root / "data")
    collect(preset("mnist4", runs=8, block_runs=8, epochs=2, ckpts_per_run=8), data, log=QUIET)
    run = str(root / "run")
    train(TrainConfig(model="dihyfo2", steps=3, batch_size=8, warmup_steps=1, log_every=100,
                      overrides=dict(width=32, depth=1, heads=2, chunk=64)), data, run, log=QUIET)
    return root, data, run


def test_export_load_and_match_by_split(tiny_run, monkeypatch):
    root, data, run = tiny_run
    monkeypatch.setattr(P, "PRETRAINED_DIR", str(root / "shipped"))
    card = {"name": "toy", "kind": "dihyfo2"}
    P.export_pretrained(run, str(root / "shipped" / "toy"), dict(card))
    P.export_pretrained(run, str(root / "shipped" / "toy-bf16"), {"name": "toy-bf16"}, dtype=torch.bfloat16)
    assert [c.name for c in P.pretrained()] == ["toy", "toy-bf16"]
    hn = P.load_pretrained("toy", device="cpu")
    ref = hf.load_hypernet(run, device="cpu")
    with open(root / "shipped" / "toy" / "checkpoint.safetensors", "rb") as f:   # the card records the file's hash
        assert hn.card == {**card, "storage": {"sha256": {"checkpoint.safetensors": hashlib.sha256(f.read()).hexdigest()}}}
    assert hn.card == P.model_card("toy") and hn.cfg == ref.cfg
    for (k, a), (_, b) in zip(hn.model.state_dict().items(), ref.model.state_dict().items()):
        assert torch.equal(a, b), k                                         # float32: exact
    low = P.load_pretrained("toy-bf16", device="cpu")
    for (k, a), (_, b) in zip(low.model.state_dict().items(), ref.model.state_dict().items()):
        assert torch.equal(a, b.to(torch.bfloat16).float()), k              # bf16: the rounded weights
    # the exported model carries no optimizer state and no path to its training data
    from hyforget_fast.hypernet.checkpoint import read_checkpoint
    tensors, conf = read_checkpoint(str(root / "shipped" / "toy"))
    assert all(k.startswith("ema.") for k in tensors) and conf["dataset"]["match"] == "split"
    assert conf["dataset"]["dir"] is None
    # any collection of the same split matches; another split is refused by what differs
    again = str(root / "again")
    collect(preset("mnist4", runs=4, block_runs=4, epochs=1, ckpts_per_run=4), again, log=QUIET)
    hn2 = P.load_pretrained("toy", device="cpu", data=again)
    assert hn2.data_dir == os.path.abspath(again)
    splits = splits_from_manifest(CheckpointStore(again).manifest)
    assert forget(hn2, [2], splits, k=3, steps=2).params.shape == (hn.spec.num_params,)
    other = str(root / "other")
    collect(preset("mnist4", runs=4, block_runs=4, epochs=1, ckpts_per_run=4, split_seed=5), other, log=QUIET)
    with pytest.raises(ValueError, match="differs in .*seed"):
        P.load_pretrained("toy", device="cpu", data=other)
    with pytest.raises(ValueError, match="no pretrained hypernetwork named 'nope'; shipped: \\['toy', 'toy-bf16'\\]"):
        P.load_pretrained("nope")


def test_write_card_ships_the_start_its_check_used(tiny_run, monkeypatch):
    """A re-measured card and the start its check used are written together: the start loads back
    exactly, and the card's hashes cover it (a stale start fails verification)."""
    root, _, run = tiny_run
    monkeypatch.setattr(P, "PRETRAINED_DIR", str(root / "shipped2"))
    folder = str(root / "shipped2" / "toy1")
    first, second = torch.randn(11), torch.randn(11)
    P.export_pretrained(run, folder, {"name": "toy1", "kind": "dihyfo1"}, start=first)
    assert torch.equal(P.load_start("toy1"), first)
    card = P.write_card(folder, {**P.model_card("toy1"), "remeasured": {"reason": "test"}}, second)
    assert P.model_card("toy1") == card and card["remeasured"] == {"reason": "test"}
    assert torch.equal(P.load_start("toy1"), second)
    assert set(card["storage"]["sha256"]) == {P.CKPT, P.START}
    P.write_card(folder, card)                                     # no start given: the shipped one stays
    assert torch.equal(P.load_start("toy1"), second)
    from safetensors.torch import save_file
    save_file({"params": first}, os.path.join(folder, P.START))  # a start the card does not record
    with pytest.raises(ValueError, match="start.safetensors"):
        P.load_start("toy1")
