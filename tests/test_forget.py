"""forget(): refusals, the selection rule, validation-only choice, reproducibility; the evaluate report."""
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import hyforget_fast as hf
from hyforget_fast.collection.collect import collect, preset
from hyforget_fast.collection.store import CheckpointStore
from hyforget_fast.hypernet.api import load_hypernet
from hyforget_fast.collection.data import splits_from_manifest
from hyforget_fast.hypernet.train import TrainConfig, train
from hyforget_fast.unlearn import forget as F
from hyforget_fast.unlearn.mlp import as_module

torch.set_num_threads(1)
QUIET = lambda *_: None  # noqa: E731
SMALL = dict(width=32, depth=1, heads=2, chunk=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fg")
    data = str(root / "data")
    collect(preset("mnist4", runs=16, block_runs=16, epochs=3, ckpts_per_run=12), data, log=QUIET)
    hns = {}
    for kind in ("dihyfo1", "dihyfo2"):
        train(TrainConfig(model=kind, steps=4, batch_size=8, warmup_steps=1, log_every=100, overrides=SMALL),
              data, str(root / kind), log=QUIET)
        hns[kind] = load_hypernet(str(root / kind))
    return data, hns, splits_from_manifest(CheckpointStore(data, verify="size").manifest)


def test_refusals(setup):
    data, hns, splits = setup
    hn = hns["dihyfo2"]
    for bad, msg in (([], "empty"), ([7], "unknown classes"), ([0], "pivots"), ([2, 2], "repeats")):
        with pytest.raises(ValueError, match=msg):
            F.forget(hn, bad, splits, k=2)
    with pytest.raises(ValueError, match="every class"):
        F.class_indices([0, 1, 2, 3], [0, 1, 2, 3], pivots=())
    with pytest.raises(ValueError, match="no starting model"):
        F.forget(hn, [2], splits, k=2, model=torch.zeros(hn.spec.num_params))
    wrong = nn.Sequential(nn.Linear(784, 3), nn.ReLU(), nn.Linear(3, 4))
    with pytest.raises(ValueError, match="layer sizes"):
        F.forget(hns["dihyfo1"], [2], splits, k=2, model=wrong)
    with pytest.raises(ValueError, match="shape"):
        F.forget(hns["dihyfo1"], [2], splits, k=2, model=torch.zeros(5))
    nan = torch.zeros(hn.spec.num_params)
    nan[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        F.forget(hns["dihyfo1"], [2], splits, k=2, model=nan)


@given(st.lists(st.tuples(st.sampled_from([0.0, 0.25, 0.5, 1.0, float("nan")]),
                          st.floats(0, 1, allow_nan=False)), min_size=1, max_size=40))
def test_select_is_lowest_forget_then_highest_retain(rows):
    f = torch.tensor([r[0] for r in rows])
    r = torch.tensor([r[1] for r in rows])
    key = [((2.0 if np.isnan(a) else a), -b, i) for i, (a, b) in enumerate(rows)]
    best = min(key)
    i = F.select(f, r)
    assert (key[i][0], key[i][1]) == best[:2]


def test_prompt_grid_is_high_on_forget_low_on_retain(setup):
    _, hns, _ = setup
    hn = hns["dihyfo2"]
    table = F.loss_quantile_table(hn.meta["loss_ranges"], hn.classes)
    prompt, levels = F.prompt_grid(table, hn.classes, [2, 3], 13)
    assert prompt.shape == (13, 4)
    assert (prompt[:, [2, 3]].min(1).values > prompt[:, [0, 1]].max(1).values).all()
    lo = np.asarray(table["values"]).min(0)
    hi = np.asarray(table["values"]).max(0)
    assert (prompt.numpy() >= lo - 1e-6).all() and (prompt.numpy() <= hi + 1e-6).all()   # within the seen range


@pytest.mark.parametrize("kind", ["dihyfo1", "dihyfo2"])
def test_forget_chooses_on_validation_only_and_reproducibly(setup, kind, monkeypatch):
    _, hns, splits = setup
    hn = hns[kind]
    seen = []
    real = F.class_metrics

    def spy(params, spec, X, y, *a, **kw):
        seen.append(X)
        return real(params, spec, X, y, *a, **kw)

    monkeypatch.setattr(F, "class_metrics", spy)
    res = F.forget(hn, [2], splits, k=12, steps=3, seed=5)
    assert seen and all(torch.equal(X, splits.X_val) for X in seen)
    # the test split cannot influence the choice: poisoning it changes nothing
    poisoned = type(splits)(**{**splits.__dict__, "X_test": torch.full_like(splits.X_test, float("nan"))})
    res2 = F.forget(hn, [2], poisoned, k=12, steps=3, seed=5)
    assert res2.chosen == res.chosen and torch.equal(res2.params, res.params)
    other = F.forget(hn, [2], splits, k=12, steps=3, seed=6)
    assert not torch.equal(other.candidate_params, res.candidate_params)
    # the result is self-consistent
    P = hn.spec.num_params
    assert res.candidate_params.shape == (12, P) and res.candidates["class_acc"].shape == (12, 4)
    assert torch.equal(res.params, res.candidate_params[res.chosen])
    m = real(res.params[None], hn.spec, splits.X_val, splits.y_val)
    assert torch.allclose(m.class_acc[0], res.candidates["class_acc"][res.chosen])
    x = splits.X_val[:5]
    probs, _ = hf.class_outputs(res.params[None], hn.spec, x)
    assert torch.allclose(torch.softmax(res.model(x), -1), probs[0], atol=1e-5)
    assert set(res.timing) >= {"sample", "score", "select", "total"}
    assert (kind == "dihyfo1") == (res.start is not None)


def test_dihyfo1_edits_the_users_model(setup):
    data, hns, splits = setup
    st_ = CheckpointStore(data, verify="size")
    theta = torch.from_numpy(st_.take("params", np.array([5]))[0].copy())
    a = F.forget(hns["dihyfo1"], [3], splits, k=4, steps=2, model=as_module(theta, hns["dihyfo1"].spec))
    b = F.forget(hns["dihyfo1"], [3], splits, k=4, steps=2, model=theta)
    assert a.start["source"] == "user model" and torch.equal(a.params, b.params)
    c = F.forget(hns["dihyfo1"], [3], splits, k=4, steps=2)
    assert c.start["source"].startswith("stored checkpoint") and isinstance(c.start["index"], int)


def test_evaluate_report(setup, tmp_path):
    from hyforget_fast.unlearn.report import evaluate_forgetting
    data, hns, _ = setup
    out = str(tmp_path / "rep")
    rep = evaluate_forgetting(data, hns, [[2]], seeds=(0,), k=6, steps=2, retrain_seeds=2, out_dir=out, log=QUIET)
    rows = rep["runs"][0]["methods"]
    expected = {"original", "retrain", "retrain_median", "dihyfo1", "dihyfo2", "finetune", "neggrad_plus",
                "random_labels", "ssd", "retrieval"}
    assert set(rows) == expected
    assert rows["retrain"]["phi"] == pytest.approx(1.0) and rows["retrain"]["overlap_all"] == 1.0
    for name, row in rows.items():
        assert 0 <= row["acc_forget"] <= 1 and 0 <= row["mia"] <= 1 and row["seconds"] >= 0, name
    assert "edit_l2" in rows["dihyfo1"] and "edit_l2" not in rows["dihyfo2"]
    assert rows["dihyfo2"]["nearest_stored_distance"] >= 0
    saved = json.load(open(os.path.join(out, "report.json")))
    assert saved["summary"]["2"]["dihyfo2"]["acc_forget"][2] == 1 and saved["verdicts"]
    md = open(os.path.join(out, "report.md")).read()
    assert "| DiHyFo-2 |" in md and "Paired metrics" in md and "memorization" in md
    for f in ("selection_2.png", "confusion_2.png", "prompt_vs_observed_2.png"):
        assert os.path.getsize(os.path.join(out, f)) > 1000


def test_forget_cli_writes_the_chosen_classifier(setup, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from hyforget_fast.cli import main
    data, hns, splits = setup
    out = str(tmp_path / "f")
    start = str(tmp_path / "start.safetensors")
    save_file({"params": F.best_checkpoint(data)[0]}, start)
    assert main(["forget", "--hypernet", hns["dihyfo1"].meta["path"], "--forget", "3", "--out", out, "--k", "4",
                 "--steps", "2", "--model", start]) == 0
    info = json.load(open(os.path.join(out, "forget.json")))
    params = load_file(os.path.join(out, "model.safetensors"))["params"]
    assert info["forget"] == [3] and info["start"]["source"] == "user model" and params.shape == (1582,)
    got = hf.class_metrics(params[None], hns["dihyfo1"].spec, splits.X_val, splits.y_val)
    assert got.class_loss[0].tolist() == pytest.approx(info["val_class_loss"], rel=1e-5)
    assert "forgot [3]" in capsys.readouterr().out
    assert main(["forget", "--hypernet", hns["dihyfo2"].meta["path"], "--forget", "0", "--out", out]) == 2
