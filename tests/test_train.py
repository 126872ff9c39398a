"""Hypernetwork training loop: exact resume, DDP equivalence, checkpoint format, held-out runs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hyforget_fast.collection.collect import collect, preset
from hyforget_fast.collection.pairs import PairDataset
from hyforget_fast.collection.store import CheckpointStore
from hyforget_fast.ops.spec import MLPSpec
from hyforget_fast.hypernet import train as tr
from hyforget_fast.hypernet.api import load_hypernet
from hyforget_fast.hypernet.models import DiHyFo, HypernetConfig
from hyforget_fast.hypernet.train import TrainConfig, read_checkpoint, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)
SMALL = dict(width=32, depth=1, heads=2, chunk=64, tokens="layer")   # these tests are about the layer-wise layout
QUIET = lambda *_: None  # noqa: E731


def _cfg(model, **kw):
    return TrainConfig(model=model, steps=kw.pop("steps", 6), batch_size=kw.pop("batch_size", 8), log_every=1,
                       warmup_steps=2, overrides=SMALL, **kw)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("coll"))
    collect(preset("mnist4", runs=8, block_runs=8, epochs=2, ckpts_per_run=10), out, log=QUIET)
    return out


@pytest.mark.parametrize("model", ["dihyfo1", "dihyfo2"])
def test_resume_is_bitwise_exact(data, tmp_path, model):
    cfg = _cfg(model, steps=8)
    train(cfg, data, str(tmp_path / "a"), log=QUIET)
    train(cfg, data, str(tmp_path / "b"), log=QUIET, stop_at=4)
    mid, conf = read_checkpoint(str(tmp_path / "b"))
    assert conf["step"] == 4
    train(cfg, data, str(tmp_path / "b"), log=QUIET, resume=True)
    a, _ = read_checkpoint(str(tmp_path / "a"))
    b, _ = read_checkpoint(str(tmp_path / "b"))
    assert a.keys() == b.keys() and any(k.startswith("opt.") for k in a) and "rng.batch" in a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert not torch.equal(a["model.out.weight"], mid["model.out.weight"])   # it did train after the resume
    ca, cb = (json.load(open(tmp_path / d / "curves.json")) for d in ("a", "b"))
    assert [r["loss"] for r in ca] == [r["loss"] for r in cb] and [r["step"] for r in cb] == list(range(1, 9))


def test_checkpoint_folder_is_pickle_free_and_complete(data, tmp_path):
    out = str(tmp_path / "o")
    train(_cfg("dihyfo2"), data, out, log=QUIET)
    files = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
    assert all(f.endswith((".safetensors", ".json")) or f.startswith("tb" + os.sep + "events.out.tfevents")
               for f in files), files
    assert any(f.startswith("tb" + os.sep) for f in files)
    with open(os.path.join(out, "config.json")) as f:
        conf = json.load(f)
    store = CheckpointStore(data)
    runs = np.unique(store.load("run"))
    assert conf["step"] == 6 and conf["train"]["ema_decay"] == 0.995 and conf["diffusion"]["num_steps"] == 1000
    assert len(conf["heldout_runs"]) == 1 and set(conf["heldout_runs"]) <= set(runs.tolist())
    assert conf["dataset"]["layer_sizes"] == [784, 2, 4] and conf["dataset"]["num_checkpoints"] == len(store)
    assert conf["classes"] == [0, 1, 2, 3] and conf["pivots"] == [0, 1]
    assert np.array(conf["norm"]["stats"]).shape == (4, 2)
    # loss ranges are those of the training runs' checkpoints only
    run, loss = store.load("run"), store.load("class_loss")
    tl = loss[~np.isin(run, conf["heldout_runs"])]
    for j, c in enumerate(conf["classes"]):
        r = conf["loss_ranges"][str(c)]
        assert r["min"] == pytest.approx(tl[:, j].min()) and r["max"] == pytest.approx(tl[:, j].max())
        assert r["min"] <= r["quantiles"]["0.5"] <= r["max"]


def test_batches_never_draw_heldout_runs(data):
    store = CheckpointStore(data)
    runs = np.unique(store.load("run"))
    train_runs, held = tr.split_runs(store.load("run"), 0.25, seed=3)
    assert len(held) == 2 and sorted(train_runs + held) == runs.tolist()
    assert tr.split_runs(store.load("run"), 0.25, seed=3) == (train_runs, held)
    counts = dict(zip(*np.unique(store.load("run"), return_counts=True)))
    assert all(counts[r] >= 2 for r in held)          # DiHyFo-1 evaluates on pairs of a held-out run
    ds = PairDataset(store, runs=train_runs)
    g = torch.Generator().manual_seed(0)
    seen = set(ds.sample_checkpoints(512, g)["run"].tolist()) | set(ds.sample_batch(512, g)["run"].tolist())
    assert seen and seen <= set(train_runs)
    with pytest.raises(ValueError, match="not in the checkpoint store"):
        PairDataset(store, runs=[999])


def test_weight_decay_groups_and_schedule():
    model = DiHyFo(HypernetConfig.preset("dihyfo1", MLPSpec((784, 2, 4)), "tiny", **SMALL, cond="tokens"))
    decay, no = tr.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no["params"]}
    assert {"pos", "x_in.bias", "out.bias", "ln_f.weight", "blocks.0.ln1.weight", "blocks.0.qkv.bias"} <= nd
    ada = DiHyFo(HypernetConfig.preset("dihyfo1", MLPSpec((784, 2, 4)), "tiny", **SMALL, cond="adaln"))
    d_a, no_a = tr.param_groups(ada, 0.1)
    an = {id(p): n for n, p in ada.named_parameters()}
    assert {"blocks.0.ada.bias", "ada_f.bias", "t_embed.0.bias"} <= {an[id(p)] for p in no_a["params"]}
    assert {"blocks.0.ada.weight", "ada_f.weight", "target_embed.0.weight"} <= {an[id(p)] for p in d_a["params"]}
    assert {names[id(p)] for p in decay["params"]} >= {"x_in.weight", "out.weight", "blocks.0.qkv.weight"}
    assert not nd & {names[id(p)] for p in decay["params"]} and decay["weight_decay"] == 0.1
    c = TrainConfig(steps=110, warmup_steps=10, lr=1e-3)
    assert c.lr_at(0) == pytest.approx(1e-4) and c.lr_at(9) == pytest.approx(1e-3)
    assert c.lr_at(60) == pytest.approx(5e-4) and c.lr_at(110) == pytest.approx(0.0, abs=1e-12)


def test_eval_hook_and_save_load_round_trip(data, tmp_path, monkeypatch):
    """The in-memory EMA Hypernet handed to the evaluator samples what load_hypernet samples."""
    seen = {}

    def fake_eval(hn, data_dir, heldout_runs, **kw):
        seen["samples"] = hn.sample([0.1, 0.1, 1.0, 1.5], 3, steps=4, seed=2,
                                    theta=torch.zeros(1582), losses=[0.5] * 4)
        seen["held"], seen["kw"] = heldout_runs, kw
        return {"r2": {"2": 0.5, "3": 0.25}, "pearson": {"2": 0.9, "3": 0.8}, "r2_free_mean": 0.375}

    monkeypatch.setattr(tr, "evaluate_hypernet", fake_eval)
    out = str(tmp_path / "e")
    train(_cfg("dihyfo1", eval_every=3), data, out, log=QUIET)
    hn = load_hypernet(out, device="cpu")
    assert hn.kind == "dihyfo1" and hn.meta["step"] == 6 and not hn.model.training
    assert seen["held"] == hn.heldout_runs and seen["kw"]["sampler"] == "ddim"
    again = hn.sample([0.1, 0.1, 1.0, 1.5], 3, steps=4, seed=2, theta=torch.zeros(1582), losses=[0.5] * 4)
    assert torch.equal(seen["samples"], again)
    with open(os.path.join(out, "curves.json")) as f:
        curves = json.load(f)
    ev = [r for r in curves if "eval" in r]
    assert [r["step"] for r in ev] == [3, 6] and ev[0]["eval"]["r2/2"] == 0.5 and ev[0]["eval"]["r2_free_mean"] == 0.375


def test_dataset_spec_mismatch_is_refused(data, tmp_path):
    other = str(tmp_path / "h3")
    collect(preset("mnist4", runs=2, block_runs=2, epochs=1, ckpts_per_run=3, hidden=(3,)), other, log=QUIET)
    out = str(tmp_path / "o")
    train(_cfg("dihyfo2", steps=2), data, out, log=QUIET)
    with pytest.raises(ValueError, match=r"MLPSpec\(784, 3, 4\) networks, but the model was built for "
                                         r"MLPSpec\(784, 2, 4\)"):
        train(_cfg("dihyfo2", steps=4), other, out, log=QUIET, resume=True)
    with pytest.raises(ValueError, match="MLPSpec"):
        load_hypernet(out, device="cpu").check_dataset(other)
    with pytest.raises(ValueError, match="already holds a trained hypernetwork"):
        train(_cfg("dihyfo2", steps=4), data, out, log=QUIET)
    with pytest.raises(ValueError, match="holds a dihyfo2 run"):
        train(_cfg("dihyfo1", steps=4), data, out, log=QUIET, resume=True)


def test_ddp_two_processes_follow_the_single_process_curve(data, tmp_path):
    args = ["train", "--model", "dihyfo1", "--data", data, "--steps", "4", "--batch-size", "8", "--log-every", "1",
            "--width", "32", "--depth", "1", "--heads", "2", "--chunk", "64", "--tokens", "layer", "--device", "cpu",
            "--threads", "1",
            "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "hyforget_fast.cli", *args, "--out", two], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    # the same run in this process (what the CLI builds from those flags)
    train(TrainConfig(model="dihyfo1", steps=4, batch_size=8, log_every=1, overrides=SMALL), data, one,
          log=QUIET, device="cpu")
    c1, c2 = (json.load(open(os.path.join(d, "curves.json"))) for d in (one, two))
    assert [r["step"] for r in c2] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in c2], [r["loss"] for r in c1], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in c2], [r["grad_norm"] for r in c1], rtol=1e-4)
    a, conf2 = read_checkpoint(two)
    b, _ = read_checkpoint(one)
    assert conf2["world_size"] == 2
    for k in a:
        if k.startswith(("model.", "ema.")):
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_piece_loss_weighting_gives_every_piece_the_same_share():
    from hyforget_fast.ops.spec import TokenLayout
    spec = MLPSpec([29, 3, 5])
    layout = TokenLayout(spec, 16)
    model = DiHyFo(HypernetConfig.preset("dihyfo2", spec, "tiny", width=32, depth=1, heads=2, chunk=16, tokens="layer"))
    mask = model.token_mask
    w = tr.loss_weight(layout, "piece", mask)
    assert torch.equal(tr.loss_weight(layout, "value", mask), mask)
    assert (w[mask == 0] == 0).all() and w.sum().item() == pytest.approx(mask.sum().item())
    share = {}
    for i, tok in enumerate(layout.tokens):
        share[(tok.layer, tok.is_bias)] = share.get((tok.layer, tok.is_bias), 0.0) + w[i].sum().item()
    assert len(share) == 4 and max(share.values()) == pytest.approx(min(share.values()))
    with pytest.raises(ValueError, match="loss_weighting"):
        tr.loss_weight(layout, "layer", mask)
