"""forget(): refusals, the selection rule, validation-only choice, reproducibility; the evaluate report."""
import json
import os
import sys

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
from hyforget_fast.unlearn import selection as S
from hyforget_fast.unlearn.mlp import as_module

torch.set_num_threads(1)
QUIET = lambda *_: None  # noqa: E731
SMALL = dict(width=32, depth=1, heads=2)   # the tiny preset's neuron tokens


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
        S.class_indices([0, 1, 2, 3], [0, 1, 2, 3], pivots=())
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
    f = torch.tensor([r[0] for r in rows])                  # float32, as the evaluator's accuracies
    r = torch.tensor([r[1] for r in rows])
    # the reference reads the values the tensors hold (a float64 draw like 6e-115 is 0 in float32)
    key = [((2.0 if np.isnan(a) else a), -b, i) for i, (a, b) in enumerate(zip(f.tolist(), r.tolist()))]
    best = min(key)
    i = S.select(f, r)
    assert (key[i][0], key[i][1]) == best[:2]
    # with a floor, every forget accuracy at or below it ties: the best retain among those wins
    floor = 0.25
    keyf = [(max(k[0], floor), k[1]) for k in key]
    j = S.select(f, r, forget_floor=floor)
    assert keyf[j] == min(keyf)
    # the forget-and-keep count, from its definition
    n = sum(1 for a, b in rows if not np.isnan(a) and a <= 0.25 and b >= 0.5)
    assert S.forget_keep_count(f, r, forget_max=0.25, retain_min=0.5) == n


def test_forget_prompts_are_high_on_forget_low_on_retain(setup):
    _, hns, _ = setup
    hn = hns["dihyfo2"]
    table = F.loss_quantile_table(hn.meta["loss_ranges"], hn.classes)
    keep, _ = F.forget_prompts(table, hn.classes, [], 13)                # the keep-every-class control
    prompt, levels = F.forget_prompts(table, hn.classes, [2, 3], 13)
    assert torch.equal(keep[:, [0, 1]], prompt[:, [0, 1]]) and (keep[:, [2, 3]] < prompt[:, [2, 3]]).all()
    lows = np.asarray([np.interp(q, table["q"], np.asarray(table["values"])[:, 2]) for q in F.LOW_LEVELS])
    assert set(np.round(keep[:, 2].numpy(), 5)) == set(np.round(lows.astype(np.float32), 5))
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
    assert set(res.timing) >= {"sample", "score", "total"}
    assert (kind == "dihyfo1") == (res.start is not None)


def test_controls_keep_prompt_unconditional_and_split_check(setup):
    data, hns, splits = setup
    hn = hns["dihyfo2"]
    keep = F.forget(hn, [2], splits, k=6, steps=2, seed=1, prompt="keep")
    real = F.forget(hn, [2], splits, k=6, steps=2, seed=1)
    assert keep.prompt_levels["kind"] == "keep" and not torch.equal(keep.prompt, real.prompt)
    assert keep.candidates["forget_keep"] == S.forget_keep_count(keep.candidates["forget_acc"],
                                                                 keep.candidates["retain_acc"])
    # guidance 0 = the unconditional branch alone: the prompt no longer matters
    u1 = F.forget(hn, [2], splits, k=6, steps=2, seed=1, guidance=0.0)
    u2 = F.forget(hn, [3], splits, k=6, steps=2, seed=1, guidance=0.0, prompt="keep")
    assert torch.equal(u1.candidate_params, u2.candidate_params)
    # rescoring the same candidates for another forget set = forget() for that set
    i, c = F.choose(u1.candidate_params, hn.spec, splits, [3])
    assert i == u2.chosen and torch.equal(c["class_acc"], u2.candidates["class_acc"])
    with pytest.raises(ValueError, match="prompt must be one of"):
        F.forget(hn, [2], splits, k=2, prompt="forget-all")
    # a split other than the collection's is refused by what differs
    from hyforget_fast.collection.data import load_digits
    other = load_digits(splits.classes, seed=splits.seed + 1, fractions=splits.fractions)
    with pytest.raises(ValueError, match="not the split .* seed: collection 0, given 1"):
        F.forget(hn, [2], other, k=2)


def test_dihyfo1_prompt_never_asks_for_a_worse_retained_class(setup):
    _, hns, splits = setup
    for prompt in ("forget", "keep"):
        res = F.forget(hns["dihyfo1"], [2], splits, k=8, steps=2, prompt=prompt)
        cur = torch.tensor(res.start["val_class_loss"])
        kept = [0, 1, 3] if prompt == "forget" else [0, 1, 2, 3]
        assert (res.prompt[:, kept] <= cur[kept] + 1e-6).all()
        if prompt == "forget":
            assert (res.prompt[:, 2] > cur[2]).any()      # the forget class is still asked to rise


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
    rep = evaluate_forgetting(data, hns, [[2], [3]], seeds=(0, 1), k=6, steps=2, retrain_seeds=2, out_dir=out,
                              log=QUIET, holdout={"rules": [], "forget_set": [3]})
    rows = rep["runs"][0]["methods"]
    # the baselines are tuned once per forget set: the second seed reruns the first seed's choice,
    # and its time includes that search
    r0, r1 = (r for r in rep["runs"] if r["forget"] == [2])
    for b in ("finetune", "neggrad_plus", "random_labels", "ssd"):
        assert r1["extra"][b]["tuning"]["chosen"] == r0["extra"][b]["tuning"]["chosen"]
        assert r1["extra"][b]["tuning"]["searched_at_seed"] == 0 and "searched_at_seed" not in r0["extra"][b]["tuning"]
        assert r1["methods"][b]["seconds"] >= r0["methods"][b]["seconds"] * 0.999
    expected = {"original", "retrain", "retrain_median", "dihyfo1", "dihyfo2", "finetune", "neggrad_plus",
                "random_labels", "ssd", "retrieval", "store", "dihyfo1:keep", "dihyfo2:keep"}
    expected |= {f"{k}:uncond" for k, hn in hns.items() if hn.cfg.cond_dropout > 0}
    assert set(rows) == expected
    assert rows["retrain"]["phi"] == pytest.approx(1.0) and rows["retrain"]["overlap_all"] == 1.0
    for name, row in rows.items():
        assert 0 <= row["acc_forget"] <= 1 and 0 <= row["mia"] <= 1 and row["seconds"] >= 0, name
        # 0 <= JSD <= ln 2 per input (a theorem); the bad-teacher number is a reverse KL with no such
        # bound (it grows with -log P on near-zero probabilities), so only its upper end is fixed
        assert 1 - np.log(2) - 1e-12 <= row["phi"] <= 1 + 1e-12 and row["phi_bt"] <= 1 + 1e-12, name
    for name in ("dihyfo1", "dihyfo2", "dihyfo1:keep", "dihyfo2:keep", "retrieval"):
        assert 0 <= rows[name]["forget_keep"] <= 6
    assert 0 <= rows["store"]["forget_keep"] <= rep["store_size"]
    assert "edit_l2" in rows["dihyfo1"] and "edit_l2" not in rows["dihyfo2"]
    assert rows["dihyfo2"]["nearest_stored_distance"] >= 0
    # the controls were sampled once per model and seed: the same candidates rescored for {3}
    r2, r3 = rep["runs"][0], rep["runs"][2]
    assert r3["forget"] == [3] and r3["seed"] == r2["seed"] == 0
    assert r2["extra"]["dihyfo2:keep"]["prompt"] == "keep"
    for name, run in (("finetune", r2), ("ssd", r3)):      # tuned: a grid ran and the choice is recorded
        t = run["extra"][name]["tuning"]
        assert len(t["points"]) == np.prod([len(v) for v in t["grid"].values()]) and t["chosen"]
    saved = json.load(open(os.path.join(out, "report.json")))
    assert saved["summary"]["2"]["dihyfo2"]["acc_forget"][2] == 2 and saved["verdicts"]
    assert any("held out" in v and "store holds" in v for v in saved["verdicts"])
    assert any("controls:" in v for v in saved["verdicts"])
    md = open(os.path.join(out, "report.md")).read()
    for s_ in ("| DiHyFo-2 |", "Paired metrics", "memorization", "forget and keep (controls)", "keep-every-class",
               "φ bad-teacher", "Baseline tuning", "against the dissertation"):
        assert s_ in md, s_
    for f in ("selection_2.png", "confusion_2.png", "prompt_vs_observed_2.png"):
        assert os.path.getsize(os.path.join(out, f)) > 1000


def test_report_wiring_against_independent_computation(setup):
    """The report's numbers come from the right arrays: checked against metrics computed here from
    the models themselves (nn.Module softmax, not the fused evaluator)."""
    from hyforget_fast.unlearn import baselines as B
    from hyforget_fast.unlearn import metrics as M
    from hyforget_fast.unlearn.report import evaluate_forgetting
    data, hns, splits = setup
    spec = hns["dihyfo2"].spec
    got = {}

    def copy_of_retrain(params, spec_, forget, splits_, seed=0):   # a user method: retraining itself
        got["seen_forget"] = list(forget)
        return B.retrain(None, spec_, forget, splits_, seeds=2, seed=seed)

    rep = evaluate_forgetting(data, {}, [[2]], seeds=(0,), retrain_seeds=2, log=QUIET, tune=False, relearning=False,
                              memorization=False, methods={"copy_of_retrain": copy_of_retrain})
    run = rep["runs"][0]
    rows = run["methods"]
    assert got["seen_forget"] == [2]
    from hyforget_fast.unlearn.report import markdown_tables
    md = markdown_tables(rep)   # untuned baselines are not labelled tuned
    assert "NegGrad+ (defaults)" in md and "(tuned)" not in md
    # a method equal to the retrained model scores phi = 1 and overlap 1 in both conventions
    c = rows["copy_of_retrain"]
    assert c["phi"] == 1.0 and c["phi_bt"] == 1.0 and c["overlap_all"] == 1.0 and c["activation_distance"] == 0.0

    def softmax(params, X):
        with torch.no_grad():
            return torch.softmax(as_module(torch.tensor(params), spec)(X).double(), -1)

    orig, retr = run["params"]["original"], run["params"]["retrain"]
    f_tr = splits.y_train == 2
    p_r, p_t, p_f = softmax(orig, splits.X_train[~f_tr]), softmax(orig, splits.X_test), softmax(orig, splits.X_train[f_tr])
    want = M.mia(p_r, p_t, p_f, seed=0).score
    assert rows["original"]["mia"] == pytest.approx(want, abs=1e-9)
    # the test would catch swapped retain / test arrays (when they give a different score) ...
    swapped = M.mia(p_t, p_r, p_f, seed=0).score
    assert swapped != pytest.approx(want, abs=1e-9)
    # ... and a wrong reference model for the paired metrics
    ref = softmax(retr, splits.X_test)
    assert rows["original"]["phi"] == pytest.approx(M.unlearning_score(p_t, ref), abs=1e-6)
    assert rows["original"]["phi"] < 1.0
    assert rows["original"]["phi_bt"] == pytest.approx(M.unlearning_score(p_t, ref, "bad_teacher"), abs=1e-6)
    assert rows["original"]["phi"] != pytest.approx(M.unlearning_score(p_t, softmax(orig, splits.X_test)), abs=1e-6)
    y = splits.y_test
    acc_f = float((p_t.argmax(1) == y)[y == 2].double().mean())
    assert rows["original"]["acc_forget"] == pytest.approx(acc_f)
    assert rows["store"]["forget_keep"] >= 0 and "retrieval" not in rows   # retrieval needs a hypernetwork's prompts


def test_forget_cli_writes_the_chosen_classifier(setup, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from hyforget_fast.cli import main
    data, hns, splits = setup
    out = str(tmp_path / "f")
    start = str(tmp_path / "start.safetensors")
    save_file({"params": F.best_checkpoint(data)[0]}, start)
    rc = main(["forget", "--hypernet", hns["dihyfo1"].meta["path"], "--forget", "3", "--out", out, "--k", "4",
               "--steps", "2", "--model", start, "--seed", "5", "--guidance", "1,2"])
    info = json.load(open(os.path.join(out, "forget.json")))
    params = load_file(os.path.join(out, "model.safetensors"))["params"]
    assert info["forget"] == [3] and info["start"]["source"] == "user model" and params.shape == (1582,)
    got = hf.class_metrics(params[None], hns["dihyfo1"].spec, splits.X_val, splits.y_val)
    assert got.class_loss[0].tolist() == pytest.approx(info["val_class_loss"], rel=1e-5)
    # the exit status and the message say whether the chosen classifier meets the criterion
    ok = info["val_forget_acc"] <= 0.01 and info["val_retain_acc"] >= 0.95
    assert rc == (0 if ok else 3) and info["forgot"] is ok
    printed = capsys.readouterr().out
    assert (f"forgot [3]" if ok else "did NOT forget [3]") in printed
    # everything needed to rerun it
    st = info["settings"]
    assert (st["seed"], st["k"], st["steps"], st["sampler"], st["guidance_grid"]) == (5, 4, 2, "ddim", [1.0, 2.0])
    assert st["hypernet"]["sha256"] and len(st["hypernet"]["sha256"]) == 64 and st["data"]["manifest_sha256"]
    assert st["package_version"] == hf.__version__ and st["high_levels"] and st["low_levels"]
    assert [g["guidance"] for g in info["per_guidance"]] == [1.0, 2.0] and sum(g["k"] for g in info["per_guidance"]) == 4
    assert info["chosen_guidance"] in (1.0, 2.0) and set(info["timing"]) >= {"prepare", "sample", "score", "total"}
    assert main(["forget", "--hypernet", hns["dihyfo2"].meta["path"], "--forget", "0", "--out", out]) == 2


@pytest.fixture(scope="module")
def odd_classes(tmp_path_factory):
    """A collection of digits 3, 5, 7, 9 (pivots 3, 5): labels and column indices differ."""
    root = tmp_path_factory.mktemp("odd")
    data = str(root / "data")
    collect(preset("mnist4", classes=(3, 5, 7, 9), pivots=(3, 5), runs=16, block_runs=16, epochs=3, ckpts_per_run=12),
            data, log=QUIET)
    train(TrainConfig(model="dihyfo2", steps=4, batch_size=8, warmup_steps=1, log_every=100, overrides=SMALL),
          data, str(root / "d2"), log=QUIET)
    return data, load_hypernet(str(root / "d2")), splits_from_manifest(CheckpointStore(data, verify="size").manifest)


def test_one_class_convention_digit_labels_on_non_contiguous_classes(odd_classes):
    """forget, the baselines, the metrics and the report all name classes by digit label."""
    from hyforget_fast.unlearn import baselines as B
    from hyforget_fast.unlearn import metrics as M
    from hyforget_fast.unlearn.report import evaluate_forgetting
    data, hn, splits = odd_classes
    assert splits.classes == (3, 5, 7, 9)
    col = 2                                                 # digit 7 is column 2
    res = F.forget(hn, [7], splits, k=6, steps=2)
    assert res.forget_classes == (7,)
    acc = res.candidates["class_acc"][:, col]
    assert torch.allclose(res.candidates["forget_acc"], acc)
    for bad in ([2], [col]):                                # an index, or a digit not in the collection
        with pytest.raises(ValueError, match="unknown classes"):
            F.forget(hn, bad, splits, k=2)
        with pytest.raises(ValueError, match="unknown classes"):
            B.finetune(res.params, hn.spec, bad, splits)
    with pytest.raises(ValueError, match="pivots"):
        F.forget(hn, [5], splits, k=2)
    ft = B.finetune(res.params, hn.spec, [7], splits, epochs=1)
    assert ft.extra["forget_class_indices"] == [col]
    probs = hf.class_outputs(res.params[None], hn.spec, splits.X_test)[0][0].double()
    y = splits.y_test
    want = float((probs.argmax(1) == y)[y == col].double().mean())
    assert M.accuracies(probs, y, [7], classes=splits.classes)["forget"] == pytest.approx(want)
    with pytest.raises(ValueError, match="unknown classes"):
        M.accuracies(probs, y, [7])                         # without classes=, columns are digits 0..3
    row = hf.evaluate_model(res.model, splits, [7], reference=res.params)
    assert row["acc_forget"] == pytest.approx(want) and row["phi"] == 1.0 and row["overlap_all"] == 1.0
    rep = evaluate_forgetting(data, {"dihyfo2": hn}, [[7]], seeds=(0,), k=6, steps=2, retrain_seeds=2, log=QUIET,
                              tune=False, relearning=False, memorization=False)
    got = rep["runs"][0]
    p = hf.class_outputs(torch.tensor(got["params"]["dihyfo2"])[None], hn.spec, splits.X_test)[0][0]
    assert got["methods"]["dihyfo2"]["acc_forget"] == pytest.approx(float((p.argmax(1) == y)[y == col].float().mean()))
    assert got["forget"] == [7]


# ------------------------------------------------------------------ guidance grid and DiHyFo-1 starts
@given(k=st.integers(1, 40), g=st.integers(1, 5), cells=st.integers(1, 7))
def test_spread_covers_every_weight_and_every_cell(k, g, cells):
    grid = [float(x) for x in range(g)]
    if k < g:
        with pytest.raises(ValueError, match="cannot cover"):
            F.spread(k, grid, cells)
        return
    w, cell = F.spread(k, grid, cells)
    assert w.shape == cell.shape == (k,)
    counts = [int((w == x).sum()) for x in grid]
    assert sum(counts) == k and max(counts) - min(counts) <= 1        # K split evenly over the weights
    for x in grid:                                                    # each weight runs its own round robin
        c = cell[w == x]
        assert c.tolist() == [i % cells for i in range(len(c))]


def test_guidance_grid_rows_match_single_weight_calls(setup):
    """A grid call is the per-weight calls side by side: each candidate's weight is recorded, the
    per-weight counts add up, and a row sampled at w equals sampling that prompt at w alone."""
    data, hns, splits = setup
    hn = hns["dihyfo2"]
    res = F.forget(hn, [2], splits, k=8, steps=2, seed=3, guidance=[1.0, 3.0], warn=False)
    w = res.candidates["guidance"]
    assert w.tolist() == [1.0] * 4 + [3.0] * 4 and res.chosen_guidance == float(w[res.chosen])
    assert [g["guidance"] for g in res.per_guidance] == [1.0, 3.0]
    assert sum(g["forget_keep"] for g in res.per_guidance) == res.forget_keep
    ok = (res.candidates["forget_acc"] <= S.FORGET_MAX) & (res.candidates["retain_acc"] >= S.RETAIN_MIN)
    assert res.forgot == bool(ok[res.chosen])
    cell = res.prompt_levels["cells"][int(res.candidates["cell"][res.chosen])]
    assert res.chosen_level == {"high": cell["high"], "low": cell["low"]}
    # per-row weights: the same noise and prompt sampled at one weight gives the same network
    one = hn.sample(res.prompt, 8, steps=2, seed=3, guidance=3.0)
    both = hn.sample(res.prompt, 8, steps=2, seed=3, guidance=w)
    torch.testing.assert_close(both[4:], one[4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[:4], hn.sample(res.prompt, 8, steps=2, seed=3, guidance=1.0)[:4],
                               atol=1e-5, rtol=1e-5)
    for bad, msg in (([], "empty"), ([1.0, 1.0], "repeats"), ([-1.0], ">= 0"), ([float("nan")], ">= 0")):
        with pytest.raises(ValueError, match=msg):
            F.forget(hn, [2], splits, k=4, steps=2, guidance=bad)
    with pytest.raises(ValueError, match="positive integer"):
        F.forget(hn, [2], splits, k=2.5, steps=2)
    # the model's default grid comes from its meta (the card's `sampling`)
    hn.meta["sampling"] = {"guidance_grid": [1.0, 2.0]}
    try:
        assert F.forget(hn, [2], splits, k=4, steps=2, warn=False).settings["guidance_grid"] == [1.0, 2.0]
    finally:
        del hn.meta["sampling"]
    assert F.forget(hn, [2], splits, k=4, steps=2, warn=False).settings["guidance_grid"] == [hn.default_guidance]


def test_best_checkpoint_is_the_most_accurate_then_lowest_loss(setup, tmp_path):
    """The best stored start is chosen by validation accuracy first, loss second, outside the
    excluded runs: three checkpoints rigged so that the lowest loss, the highest accuracy and the
    tie-break each pick a different one."""
    import shutil
    data = str(tmp_path / "data")
    shutil.copytree(setup[0], data)
    st_ = CheckpointStore(data, verify="size")
    shard = os.path.join(data, "shards", st_.manifest["shards"][0]["name"])
    acc, loss = np.load(os.path.join(shard, "class_acc.npy")), np.load(os.path.join(shard, "class_loss.npy"))
    run = np.load(os.path.join(shard, "run.npy"))
    acc[:], loss[:] = 0.5, 1.0
    assert len(st_.manifest["shards"]) == 1
    i, j = 0, int(np.flatnonzero(run != run[0])[0])
    t = int(np.flatnonzero((run != run[0]) & (run != run[j]))[0])
    loss[i] = 0.01                                    # lowest loss, not the most accurate
    acc[j], loss[j] = 0.9, 0.5                        # most accurate, tied with t ...
    acc[t], loss[t] = 0.9, 0.4                        # ... which has the lower loss
    for name, a in (("class_acc", acc), ("class_loss", loss)):   # same shape and dtype: same size
        with open(os.path.join(shard, name + ".npy"), "wb") as f:
            np.save(f, a)
    assert F.best_checkpoint(data)[1]["index"] == t
    info = F.best_checkpoint(data, [int(run[t])])[1]
    assert info["index"] == j and info["val_class_acc"] == pytest.approx([0.9] * acc.shape[1])
    assert F.best_checkpoint(data, [int(run[t]), int(run[j])])[1]["index"] == i   # ties at 0.5: lowest loss
    with pytest.raises(ValueError, match="no stored checkpoint"):
        F.best_checkpoint(data, np.unique(st_.load("run")).tolist())


def test_dihyfo1_starts(setup):
    data, hns, splits = setup
    hn = hns["dihyfo1"]
    best, info = F.best_checkpoint(data, hn.heldout_runs)
    r_best = F.forget(hn, [2], splits, k=4, steps=2, start="best", warn=False)
    assert r_best.start["kind"] == "best" and r_best.start["index"] == info["index"]
    torch.testing.assert_close(r_best.start_params, best.float())
    r_rand = F.forget(hn, [2], splits, k=4, steps=2, start="random", seed=7, warn=False)
    torch.testing.assert_close(r_rand.start_params, F.random_start(hn.spec, 7))
    # the random start is PyTorch's default nn.Linear init under that seed
    torch.manual_seed(7)
    ref = nn.Sequential(nn.Linear(784, 2), nn.ReLU(), nn.Linear(2, 4))
    torch.testing.assert_close(F.random_start(hn.spec, 7), hf.flat_params(ref))
    assert not torch.equal(F.random_start(hn.spec, 7), F.random_start(hn.spec, 8))
    r_user = F.forget(hn, [2], splits, k=4, steps=2, model=F.random_start(hn.spec, 7), warn=False)
    assert r_user.start["kind"] == "model" and r_user.settings["start"] == "model"
    with pytest.raises(ValueError, match="start='model' needs a model"):
        F.forget(hn, [2], splits, k=4, steps=2, start="model")
    with pytest.raises(ValueError, match="a model was given"):
        F.forget(hn, [2], splits, k=4, steps=2, start="random", model=best)
    with pytest.raises(ValueError, match="start must be one of"):
        F.forget(hn, [2], splits, k=4, steps=2, start="worst")
    with pytest.raises(ValueError, match="no starting model"):
        F.forget(hns["dihyfo2"], [2], splits, k=4, steps=2, start="best")


class _SweptResult:
    """What sweep_guidance reads of a forget call, made up: in each prompt cell, the first
    round(share x n) candidates meet the criterion; shares by low level, or by (high, low) cell."""

    def __init__(self, shares: dict, k: int, low, prompt: str, high=F.HIGH_LEVELS):
        cells = [{"high": h, "low": q} for h in (high if prompt == "forget" else (None,)) for q in low]
        cell = torch.arange(k) % len(cells)
        ok = torch.zeros(k, dtype=torch.bool)
        for i, c in enumerate(cells):
            idx = (cell == i).nonzero().flatten()
            share = shares.get((c["high"], c["low"]), shares.get(c["low"], 0.0))
            ok[idx[:round(share * len(idx))]] = True
        self.candidates = {"forget_acc": torch.where(ok, 0.0, 1.0), "retain_acc": torch.ones(k), "cell": cell}
        self.prompt_levels = {"cells": cells}
        self.settings = {"retain_min": 0.95}
        self.forget_keep = int(ok.sum())


def test_sweep_guidance_picks_weights_by_validation_counts(setup, monkeypatch):
    data, hns, splits = setup
    hn = hns["dihyfo2"]
    out = F.sweep_guidance(hn, splits, [[2], [3]], weights=(1.0, 2.0), k=6, steps=2)
    for s_ in ("2", "3"):                     # the counts are those of single-weight forget calls
        for w in (1.0, 2.0):
            f = F.forget(hn, [int(s_)], splits, k=6, steps=2, seed=100, guidance=w, low=F.SWEEP_LOW_LEVELS,
                         high=F.SWEEP_HIGH_LEVELS, warn=False)
            assert out["counts"][s_][str(w)]["forget"] == f.forget_keep
            assert sum(v["forget"][0] for v in out["counts"][s_][str(w)]["by_cell"].values()) == f.forget_keep
            assert sum(v["forget"][1] for v in out["counts"][s_][str(w)]["by_cell"].values()) == 6
    # the rule, on made-up counts at one low level: the run of weights with the best worst-set mean count, the widest near it
    fake = {("2", 1.0): 170, ("2", 2.0): 170, ("2", 4.0): 90, ("2,3", 1.0): 200, ("2,3", 2.0): 255, ("2,3", 4.0): 256,
            ("3", 1.0): 0, ("3", 2.0): 0, ("3", 4.0): 0}

    def fake_forget(hn_, fs, data_, prompt="forget", guidance=None, low=None, k=256, high=None, **kw):
        n = 0 if prompt == "keep" else fake[(",".join(map(str, fs)), guidance)]
        return _SweptResult({q: n / k for q in low}, k, low, prompt, high)
    monkeypatch.setattr(F, "forget", fake_forget)
    one = dict(weights=(1.0, 2.0, 4.0), lows=(0.1,), highs=(0.9,))
    got = F.sweep_guidance(hn, splits, [[2], [2, 3], [3]], **one)
    assert got["guidance_grid"] == [1.0, 2.0]      # worst-set means: [1] 170, [1,2] 170, [1,2,4] 143; {3} skipped
    assert got["worst"]["1.0,2.0,4.0|0.1|0.9"] == pytest.approx(min(np.mean([170, 170, 90]), np.mean([200, 255, 256])))
    assert F.sweep_guidance(hn, splits, [[3]], **one)["guidance_grid"] == [hn.default_guidance]
    assert F.sweep_guidance(hn, splits, [[3]], **one)["low_levels"] == list(F.LOW_LEVELS)   # nothing forgets: defaults
    assert F.sweep_guidance(hn, splits, [[3]], **one)["high_levels"] == list(F.HIGH_LEVELS)
    assert F.sweep_guidance(hn, splits, [[2], [2, 3]], weights=(1.0, 4.0), lows=(0.1,))["guidance_grid"] == [1.0]
    # per request size: {2} alone wants 1-2, {2,3} alone 2-4 (both at 255-256 > 0.98 x best); {3} forgets at no weight
    assert got["guidance_by_size"] == {"1": [1.0, 2.0], "2": [2.0, 4.0]}
    assert F.sweep_guidance(hn, splits, [[3]], weights=(1.0, 2.0), lows=(0.1,))["guidance_by_size"] == {"1": [hn.default_guidance]}


def test_sweep_guidance_chooses_low_levels_with_the_weights(setup, monkeypatch):
    _, hns, splits = setup
    hn = hns["dihyfo2"]
    # made-up forget-and-keep shares per (set, weight) and low level 0.02 / 0.1 / 0.3; the keep prompt never counts
    share = {("2", 1.0): (0.0, 0.5, 1.0), ("2", 2.0): (0.0, 0.6, 0.9),
             ("2,3", 1.0): (0.2, 0.9, 0.9), ("2,3", 2.0): (0.1, 0.95, 0.95)}

    def fake_forget(hn_, fs, data_, prompt="forget", guidance=None, low=None, k=256, high=None, **kw):
        sh = dict(zip(low, share[(",".join(map(str, fs)), guidance)])) if prompt == "forget" else {}
        return _SweptResult(sh, k, low, prompt, high)
    monkeypatch.setattr(F, "forget", fake_forget)
    # k = 300: 100 candidates per low level under both prompts, so the shares are exact
    got = F.sweep_guidance(hn, splits, [[2], [2, 3]], weights=(1.0, 2.0), lows=(0.02, 0.1, 0.3), highs=(0.9,), k=300)
    # over both sets, the worst set's mean over the grid's cells: [1,2] x [0.3] gives min(0.95, 0.925) x K, the best
    assert (got["guidance_grid"], got["low_levels"]) == ([1.0, 2.0], [0.3])
    assert got["worst"]["1.0,2.0|0.3|0.9"] == pytest.approx(300 * 0.925)
    assert got["worst"]["1.0,2.0|0.1,0.3|0.9"] == pytest.approx(300 * np.mean([0.5, 1.0, 0.6, 0.9]))
    # {2} alone: weight 1 at 0.3 (1.0); {2,3} alone: 0.95 at weight 2 over 0.1 and 0.3 (the largest such grid)
    assert (got["guidance_by_size"], got["low_levels_by_size"]) == ({"1": [1.0], "2": [2.0]}, {"1": [0.3], "2": [0.1, 0.3]})
    assert got["counts"]["2"]["1.0"]["by_cell"]["0.9|0.1"]["forget"] == [50, 100]
    with pytest.raises(ValueError, match="low levels must be distinct quantiles"):
        F.sweep_guidance(hn, splits, [[2]], lows=(0.1, 1.5))


def test_sweep_guidance_chooses_high_levels(setup, monkeypatch):
    _, hns, splits = setup
    hn = hns["dihyfo2"]
    # made-up shares per (set, weight) and (high, low) cell: pushed to the very top (0.995), {2} keeps nothing;
    # at 0.8 it forgets and keeps; {2,3} likes 0.8 and 0.9 alike
    share = {("2", 1.0): {(0.8, 0.3): 0.9, (0.9, 0.3): 0.4, (0.995, 0.3): 0.0},
             ("2,3", 1.0): {(0.8, 0.3): 0.8, (0.9, 0.3): 0.8, (0.995, 0.3): 0.5}}

    def fake_forget(hn_, fs, data_, prompt="forget", guidance=None, low=None, k=256, high=None, **kw):
        assert high == (0.8, 0.9, 0.995) and low == (0.3,)          # the sweep samples every (high, low) cell
        return _SweptResult(share[(",".join(map(str, fs)), guidance)] if prompt == "forget" else {}, k, low, prompt, high)
    monkeypatch.setattr(F, "forget", fake_forget)
    got = F.sweep_guidance(hn, splits, [[2], [2, 3]], weights=(1.0,), lows=(0.3,), highs=(0.8, 0.9, 0.995), k=300)
    assert got["counts"]["2"]["1.0"]["by_cell"]["0.8|0.3"]["forget"] == [90, 100]
    # the keep prompt has no high level: all its candidates at low 0.3 count toward every high level of that low one
    assert got["counts"]["2"]["1.0"]["by_cell"]["0.995|0.3"]["keep"] == [0, 300]
    assert got["high_levels"] == [0.8] and got["high_levels_by_size"] == {"1": [0.8], "2": [0.8, 0.9]}
    assert got["worst"]["1.0|0.3|0.8,0.9"] == pytest.approx(300 * min(np.mean([0.9, 0.4]), 0.8))
    assert got["rule"].endswith("and high_levels_by_size")
    # forget() uses the card's high levels for the request's size, and the defaults without them
    monkeypatch.undo()
    saved = hn.meta.get("sampling")
    try:
        hn.meta["sampling"] = {k_: got[k_] for k_ in ("guidance_grid", "guidance_by_size", "low_levels",
                                                      "low_levels_by_size", "high_levels", "high_levels_by_size")}
        assert hn.high_levels_for(2) == [0.8, 0.9] and hn.high_levels_for(5) == [0.8]
        two = F.forget(hn, [2, 3], splits, k=4, steps=2, warn=False)
        assert two.settings["high_levels"] == [0.8, 0.9] and {c["high"] for c in two.prompt_levels["cells"]} == {0.8, 0.9}
        assert F.forget(hn, [2], splits, k=4, steps=2, warn=False, high=(0.7,)).settings["high_levels"] == [0.7]
        hn.meta["sampling"] = {"guidance_grid": [1.0]}
        assert hn.high_levels_for(1) is None
        assert F.forget(hn, [2], splits, k=4, steps=2, warn=False).settings["high_levels"] == list(F.HIGH_LEVELS)
        with pytest.raises(ValueError, match="high levels must be distinct"):
            F.forget(hn, [2], splits, k=4, steps=2, high=(0.9, 1.2))
    finally:
        hn.meta["sampling"] = saved
    # a sweep stored before high levels were swept (counts by low level, no "highs") is re-chosen as it was
    old = {"weights": [1.0], "lows": [0.3], "k": 100, "starts": [],
           "counts": {"2": {"1.0": {"forget": 50, "keep": 0, "by_low": {"0.3": {"forget": [50, 100], "keep": [0, 1]}}}}}}
    re = F.choose_sampling(old, 1.0)
    assert re["worst"] == {"1.0|0.3": 50.0} and "high_levels" not in re and re["low_levels"] == [0.3]


def test_sweep_guidance_serves_every_start(setup, monkeypatch):
    _, hns, splits = setup
    hn = hns["dihyfo1"]
    # made-up forget-and-keep shares per (set, start, weight) under the forget and the keep prompt: from the
    # stored start {2} works best at weight 2, from a fresh classifier only at 3; from the fresh one {2,3}
    # forgets nowhere and at weight 4 its keep prompt passes more often than its forget prompt
    share = {("forget", "2", "best", 2.0): 0.8, ("forget", "2", "best", 3.0): 0.6, ("forget", "2", "fresh", 3.0): 0.5,
             ("forget", "2,3", "best", 3.0): 0.9, ("forget", "2,3", "fresh", 4.0): 0.2, ("keep", "2,3", "fresh", 4.0): 0.6}
    seen = []

    def fake_forget(hn_, fs, data_, prompt="forget", guidance=None, low=None, k=256, start=None, model=None,
                    high=None, **kw):
        label = "best" if start == "best" else "fresh"
        assert (start == "best") != (model is not None)       # each start's own forget kwargs reach forget
        seen.append(label)
        sh = share.get((prompt, ",".join(map(str, fs)), label, guidance), 0.0)
        return _SweptResult({q: sh for q in low}, k, low, prompt, high)
    monkeypatch.setattr(F, "forget", fake_forget)
    one = dict(weights=(1.0, 2.0, 3.0, 4.0), lows=(0.1,), highs=(0.9,), k=300)
    alone = F.sweep_guidance(hn, splits, [[2], [2, 3]], start="best", **one)
    assert alone["starts"] == [] and "2" in alone["counts"]
    starts = {"best": {"start": "best"}, "fresh": {"model": F.random_start(hn.spec, 3)}}
    both = F.sweep_guidance(hn, splits, [[2], [2, 3]], starts=starts, **one)
    assert set(seen) == {"best", "fresh"} and both["starts"] == ["best", "fresh"]
    assert sorted(both["counts"]) == ["2 from best", "2 from fresh", "2,3 from best", "2,3 from fresh"]
    assert both["counts"]["2,3 from fresh"]["4.0"]["keep"] == 180
    # several starts: first the grid serving the most (set, start) pairs (a cell with a positive net count from
    # that start), then the most live cells (cells serving some pair), then the worst-set count (mean over starts).
    # size 1: weight 3 serves both starts; [2, 3] also holds weight 2, live from the stored start, so it beats [3]
    # (0.55 K) although its count is lower (0.475 K), and beats [1, 2, 3] and [2, 3, 4] (as live, lower counts)
    assert both["guidance_by_size"]["1"] == [2.0, 3.0]
    # size 2: only the stored start forgets {2,3} (weight 3); weight 4's net is negative (the fresh start's keep
    # prompt beats its forget prompt), so it is no live cell and [3, 4] loses to [3] on the count
    assert both["guidance_by_size"]["2"] == [3.0]
    assert both["guidance_grid"] == [2.0, 3.0]
    assert both["served"] == {"all": [3, 4], "by_size": {"1": [2, 2], "2": [1, 2]}}
    assert both["worst"]["3.0|0.1|0.9"] == pytest.approx(300 * min(0.55, 0.45))          # over both sets
    assert both["worst"]["3.0,4.0|0.1|0.9"] == pytest.approx(300 * min(0.275, (0.45 + (0.2 - 0.6) / 2) / 2))
    # K // CELL_CANDIDATES bounds the grid: at K = 8 a grid holds one cell, the one serving both starts for {2}
    small = F.sweep_guidance(hn, splits, [[2], [2, 3]], starts=starts, **{**one, "k": 8})
    assert small["guidance_by_size"] == {"1": [3.0], "2": [3.0]} and small["served"]["all"] == [3, 4]
    # one start keeps the count rule: {2} from the stored start alone is best at weight 2 (0.8 K)
    assert alone["guidance_by_size"]["1"] == [2.0] and "served" not in alone
    # the rule is a function of the stored counts alone: re-choosing the sweep returns it
    assert F.choose_sampling({k_: v for k_, v in both.items() if k_ not in ("worst", "rule")},
                             hn.default_guidance) == both
    with pytest.raises(ValueError, match="starts must be a non-empty dict"):
        F.sweep_guidance(hn, splits, [[2]], starts={}, **one)


def test_forget_uses_the_cards_grid_for_the_requests_size(setup):
    data, hns, splits = setup
    hn = hns["dihyfo2"]
    saved = hn.meta.get("sampling")
    try:
        hn.meta["sampling"] = {"guidance_grid": [1.0, 2.0], "guidance_by_size": {"2": [3.0]}}
        assert hn.guidance_grid_for(2) == [3.0] and hn.guidance_grid_for(1) == [1.0, 2.0]
        one = F.forget(hn, [2], splits, k=4, steps=2, warn=False)
        two = F.forget(hn, [2, 3], splits, k=4, steps=2, warn=False)
        keep = F.forget(hn, [2, 3], splits, k=4, steps=2, warn=False, prompt="keep")
        assert one.settings["guidance_grid"] == [1.0, 2.0] and sorted(set(one.candidates["guidance"].tolist())) == [1.0, 2.0]
        assert two.settings["guidance_grid"] == [3.0] and set(two.candidates["guidance"].tolist()) == {3.0}
        assert keep.settings["guidance_grid"] == [3.0]                  # the control samples the request's grid
        assert F.forget(hn, [2, 3], splits, k=4, steps=2, warn=False, guidance=1.0).settings["guidance_grid"] == [1.0]
        assert one.settings["low_levels"] == list(F.LOW_LEVELS)          # a card without levels: the defaults
        hn.meta["sampling"]["low_levels_by_size"] = {"2": [0.1, 0.3]}
        two = F.forget(hn, [2, 3], splits, k=4, steps=2, warn=False)
        keep = F.forget(hn, [2, 3], splits, k=4, steps=2, warn=False, prompt="keep")
        assert two.settings["low_levels"] == keep.settings["low_levels"] == [0.1, 0.3]   # the control: same levels
        assert {c["low"] for c in two.prompt_levels["cells"]} == {0.1, 0.3}
        assert F.forget(hn, [2], splits, k=4, steps=2, warn=False).settings["low_levels"] == list(F.LOW_LEVELS)
        assert F.forget(hn, [2, 3], splits, k=4, steps=2, warn=False, low=(0.05,)).settings["low_levels"] == [0.05]
        with pytest.raises(ValueError, match="low levels must be distinct"):
            F.forget(hn, [2], splits, k=4, steps=2, low=(0.1, 0.1))
    finally:
        hn.meta["sampling"] = saved


def test_report_controls_use_each_request_sizes_levels(setup):
    """Two request sizes with the same guidance grid but different levels: the keep control is
    sampled at each size's levels, not reused from the other size."""
    from hyforget_fast.unlearn.report import evaluate_forgetting
    data, hns, _ = setup
    hn = hns["dihyfo2"]
    saved = hn.meta.get("sampling")
    try:
        hn.meta["sampling"] = {"guidance_grid": [1.0], "guidance_by_size": {"1": [1.0], "2": [1.0]},
                               "low_levels_by_size": {"1": [0.1], "2": [0.02]}}
        rep = evaluate_forgetting(data, {"dihyfo2": hn}, [[2], [2, 3]], seeds=(0,), k=4, steps=2, retrain_seeds=2,
                                  log=QUIET, tune=False, relearning=False, memorization=False)
        got = {tuple(r["forget"]): r["extra"] for r in rep["runs"]}
        for fs, lows in (((2,), [0.1]), ((2, 3), [0.02])):
            assert got[fs]["dihyfo2"]["settings"]["low_levels"] == lows
            assert got[fs]["dihyfo2:keep"]["low_levels"] == lows
    finally:
        hn.meta["sampling"] = saved


def test_report_rows_per_start_with_controls_at_the_same_grid(setup, tmp_path):
    from hyforget_fast.unlearn.report import evaluate_forgetting, markdown_tables
    data, hns, splits = setup
    user = F.random_start(hns["dihyfo1"].spec, 11)
    rep = evaluate_forgetting(data, {"dihyfo1": hns["dihyfo1"]}, [[2]], seeds=(0,), k=4, steps=2, retrain_seeds=2,
                              log=QUIET, tune=False, relearning=False, memorization=False, model=user,
                              starts=("model", "best", "random"), guidance=[1.0, 2.0])
    run = rep["runs"][0]
    rows, extra = run["methods"], run["extra"]
    for name in ("dihyfo1", "dihyfo1@best", "dihyfo1@random"):
        assert {name, f"{name}:keep", f"{name}:uncond"} <= set(rows)
        assert extra[name]["settings"]["guidance_grid"] == [1.0, 2.0]
        assert extra[f"{name}:keep"]["guidance_grid"] == [1.0, 2.0]            # the control at the same grid
        assert extra[f"{name}:keep"]["low_levels"] == extra[name]["settings"]["low_levels"]   # ... and levels
        assert rows[name]["forget_keep@1"] + rows[name]["forget_keep@2"] == rows[name]["forget_keep"]
    assert extra["dihyfo1"]["start"]["kind"] == "model" and extra["dihyfo1@random"]["start"]["kind"] == "random"
    # edit locality against each row's own start; none for the random start
    sp = splits
    te_r = sp.y_test != 2
    from hyforget_fast.unlearn import metrics as M
    el = M.edit_locality(torch.tensor(run["params"]["dihyfo1"]), user, hns["dihyfo1"].spec, sp.X_test[te_r])
    assert rows["dihyfo1"]["edit_l2"] == pytest.approx(el.param_distance)
    assert "edit_l2" in rows["dihyfo1@best"] and "edit_l2" not in rows["dihyfo1@random"]
    md = markdown_tables(rep)
    assert "DiHyFo-1 from a random initialisation" in md and "per guidance weight" in md


def test_evaluate_model_takes_a_forget_result_and_refuses_another_split(setup):
    from hyforget_fast.collection.data import load_digits
    from hyforget_fast.unlearn.report import evaluate_model
    data, hns, splits = setup
    res = F.forget(hns["dihyfo1"], [2], splits, k=4, steps=2, warn=False)
    got = evaluate_model(res, splits, retrain_seeds=2)
    ref = evaluate_model(res.model, splits, [2], original=res.start_params, retrain_seeds=2)
    assert got == pytest.approx(ref) and "edit_l2" in got          # the start is the original
    other = load_digits(classes=splits.classes, seed=splits.seed + 1)
    with pytest.raises(ValueError, match="not the split this forget result was chosen on"):
        evaluate_model(res, other, retrain_seeds=2)
    with pytest.raises(ValueError, match="differs from the result's forget classes"):
        evaluate_model(res, splits, [3], retrain_seeds=2)


def _made_up_sweep(works: dict, k: int = 63) -> dict:
    """A stored sweep of set {2} from several starts at one low and one high level: works[start] is
    the weights at which every candidate of that start forgets and keeps (the keep prompt never does)."""
    ws = (1.0, 2.0, 3.0)
    cell = lambda ok: {"forget": [k // 3 if ok else 0, k // 3], "keep": [0, k // 3]}
    counts = {F.sweep_count_key([2], s): {str(w): {"by_cell": {"0.9|0.3": cell(w in on)}} for w in ws}
              for s, on in works.items()}
    return {"weights": list(ws), "lows": [0.3], "highs": [0.9], "k": k, "steps": 2, "sampler": "ddim", "seed": 0,
            "starts": list(works), "counts": counts, "split": "validation"}


def test_held_out_starts_are_served_by_breadth():
    """bench/sweep_starts.py held-out: leaving one start out, the count rule picks the weight most
    seen starts share and misses a start whose band sits beside it; the rule for several starts
    keeps every live weight and serves it."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    from sweep_starts import grid_count, held_out, merge_sweeps
    sweep = _made_up_sweep({"a": (1.0,), "b": (1.0, 2.0), "c": (2.0,)})
    got = held_out(sweep)
    served = {rule: {r["start"]: r["served"] for r in rs} for rule, rs in got.items()}
    # without a: w2 is in both b and c, the count rule's [2] misses a; w1 is live (b) so the other rule keeps [1, 2]
    # without c: w1 is in both a and b, [1] misses c
    assert served["count"] == {"a": False, "b": True, "c": False}
    assert served["served"] == {"a": True, "b": True, "c": True}
    assert {r["start"]: r["count"] for r in got["served"]} == pytest.approx({"a": 31.5, "b": 63.0, "c": 31.5})
    assert grid_count(sweep, "2 from b", [1.0, 2.0, 3.0], [0.3], [0.9]) == (True, pytest.approx(42.0))
    with pytest.raises(ValueError, match="at least 3 starts"):
        held_out(_made_up_sweep({"a": (1.0,), "b": (2.0,)}))
    # `add` merges a later sweep's starts: the same as sweeping them all at once, plus where they came from
    two, one = _made_up_sweep({"a": (1.0,), "b": (1.0, 2.0)}), _made_up_sweep({"c": (2.0,)})
    merged = merge_sweeps(F.choose_sampling(two, 1.0), one, 1.0, date="2026-12-07")
    assert {k_: v for k_, v in merged.items() if k_ not in ("counts_added", "seconds")} == F.choose_sampling(sweep, 1.0)
    assert merged["counts_added"] == [{"starts": ["c"], "date": "2026-12-07", "how": merged["counts_added"][0]["how"]}]
    with pytest.raises(ValueError, match="differ in \\['k'\\]"):
        merge_sweeps(two, {**one, "k": 30}, 1.0)
    with pytest.raises(ValueError, match="both sweeps hold"):
        merge_sweeps(two, two, 1.0)


def test_release_sweep_in_two_processes_equals_one(setup):
    """bench/retrain_pretrained.py --jobs 2: the starts split between two single-thread processes give
    the serial sweep's counts, keys in the same order, and the same chosen grids."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    from retrain_pretrained import parallel_sweep
    data, hns, splits = setup
    hn = hns["dihyfo1"]
    starts = {"best": {"start": "best"}, **{f"fresh {s}": {"model": F.random_start(hn.spec, s)} for s in (3, 4, 5)}}
    kw = dict(weights=(1.0, 2.0), lows=(0.3,), highs=(0.9,), k=6, steps=2, retain_min=0.0)
    serial = F.sweep_guidance(hn, splits, [[2], [2, 3]], starts=starts, **kw)
    split = parallel_sweep(hn, data, [[2], [2, 3]], starts, 2, **kw)
    assert list(split["counts"]) == list(serial["counts"]) and split == serial
    assert sum(c["forget"] + c["keep"] for v in serial["counts"].values() for c in v.values()) > 0   # not all empty


def test_release_measure_in_two_processes_equals_one(setup):
    """bench/retrain_pretrained.py measure(jobs=2): the alignment in a second process beside the forgetting
    table; the card's numbers are one process's (the alignment up to float rounding)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    from retrain_pretrained import measure
    data, hns, _ = setup
    hn = hns["dihyfo2"]
    saved = hn.meta.get("sampling")
    try:
        one, _ = measure(hn, "mnist4-dihyfo2", data, seeds=(0,), k=4, jobs=1)
        two, _ = measure(hn, "mnist4-dihyfo2", data, seeds=(0,), k=4, jobs=2)
    finally:
        hn.meta["sampling"] = saved
    def drop(d):   # wall times differ
        return {k_: drop(v) for k_, v in d.items() if k_ != "seconds"} if isinstance(d, dict) else d
    assert drop(one["sampling"]) == drop(two["sampling"]) and one["check"] == two["check"]
    assert drop(one["forgetting"]) == drop(two["forgetting"])
    for w, got in one["prompt_alignment"]["per_guidance"].items():
        other = two["prompt_alignment"]["per_guidance"][w]
        for c, r2 in got["r2"].items():
            assert r2 == pytest.approx(other["r2"][c], rel=1e-4, abs=1e-4), (w, c)


def test_refine_edits_again_from_the_measured_losses(setup):
    """Hypernet.refine: round r is `sample` from the current networks and their losses on (X, y),
    with seed + 1 + r; rounds compose; bad input is refused."""
    data, hns, splits = setup
    hn = hns["dihyfo1"]
    st_ = CheckpointStore(data)
    theta = torch.from_numpy(st_.take("params", np.array([0, 5, 9])))
    losses = torch.from_numpy(st_.take("class_loss", np.array([0, 5, 9])))
    tgt = torch.tensor([[0.1, 0.2, 4.0, 0.3]]).expand(3, -1)
    kw = dict(steps=4, guidance=1.5)
    first = hn.sample(tgt, 3, seed=5, theta=theta, losses=losses, **kw)
    X, y = splits.X_val[:301], splits.y_val[:301]
    assert torch.equal(hn.refine(tgt, first, X, y, rounds=0, seed=5, **kw), first)
    once = hn.refine(tgt, first, X, y, rounds=1, seed=5, **kw)
    measured = hf.class_metrics(first, hn.spec, X, y).class_loss
    assert torch.equal(once, hn.sample(tgt, 3, seed=6, theta=first, losses=measured, **kw))
    assert not torch.equal(once, first)
    twice = hn.refine(tgt, first, X, y, rounds=2, seed=5, **kw)
    assert torch.equal(twice, hn.refine(tgt, once, X, y, rounds=1, seed=6, **kw))
    with pytest.raises(ValueError, match="DiHyFo-1"):
        hns["dihyfo2"].refine(tgt, first, X, y)
    with pytest.raises(ValueError, match="rounds"):
        hn.refine(tgt, first, X, y, rounds=-1)
    with pytest.raises(ValueError, match=r"\(k, P\)"):
        hn.refine(tgt, first[0], X, y)
    bad = first.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        hn.refine(tgt, bad, X, y)


def test_release_alignment_records_dihyfo1_in_closed_loop(setup):
    """bench/retrain_pretrained.py alignment(): DiHyFo-1's card also holds the closed-loop R²
    (refine=1) at each CLOSED_LOOP_WEIGHTS weight, the mean of its evaluation seeds; DiHyFo-2's not."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    import retrain_pretrained as R
    from hyforget_fast.hypernet.evaluate import evaluate_hypernet
    data, hns, _ = setup
    got = R.alignment(hns["dihyfo1"], data, [2.0], seeds=(0, 1))
    closed = got["closed_loop"]["per_guidance"]
    assert got["closed_loop"]["refine"] == 1 and list(closed) == [str(w) for w in R.CLOSED_LOOP_WEIGHTS]
    direct = evaluate_hypernet(hns["dihyfo1"], data, None, guidance=1.5, refine=1, seed=1)["r2_free_mean"]
    one = closed["1.5"]
    assert one["r2_free_mean_per_seed"][1] == pytest.approx(direct, abs=1e-6)
    assert one["r2_free_mean"] == pytest.approx(np.mean(one["r2_free_mean_per_seed"]))
    assert one["settings"]["refine"] == 1 and "half B" in one["settings"]["measured_on"]
    assert set(got["per_guidance"]) == {"1.0", "2.0"} and got["guidance"] == 2.0
    assert "closed_loop" not in R.alignment(hns["dihyfo2"], data, [1.0])


def test_forget_closed_loop_probe(setup, capsys):
    """bench/forget_closed_loop.py: its test accuracies are the module's, and its open-loop row is
    the forget call's own count; the closed-loop row scores the refined candidates."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    import forget_closed_loop as fcl
    data, hns, splits = setup
    hn = hns["dihyfo1"]
    p = torch.from_numpy(CheckpointStore(data).take("params", np.array([7])))[0]
    d_f, d_r = fcl.accuracy_on_test_split(p, hn.spec, splits, [2])
    pred = as_module(p, hn.spec)(splits.X_test).argmax(1)
    f = splits.y_test == 2
    assert d_f == pytest.approx(float((pred[f] == 2).float().mean()), abs=1e-6)
    assert d_r == pytest.approx(float((pred[~f] == splits.y_test[~f]).float().mean()), abs=1e-6)
    fcl.main(["--model", hn.meta["path"], "--data", data, "--forget", "2", "--k", "6", "--retain-min", "0.0"])
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].split()[-1] for line in out] == ["open", "closed"]
    from hyforget_fast.demo import users_model
    res = F.forget(hn, [2], splits, k=6, model=users_model(data)[0], seed=0, retain_min=0.0, warn=False)
    assert f"forget&keep {res.forget_keep:.1f}" in out[0]
