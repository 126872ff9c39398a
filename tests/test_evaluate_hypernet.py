"""Prompt-alignment evaluation (hypernet/evaluate.py), with stand-in hypernetworks so nothing here
depends on training: a nearest-checkpoint fake (its networks have losses close to the prompt:
high R²), a random-checkpoint fake (losses unrelated to the prompt: R² <= 0), a perfect fake
(observed == target through a stubbed evaluator)."""
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hyforget_fast as hf
from hyforget_fast.collection.collect import collect, preset
from hyforget_fast.collection.data import load_digits
from hyforget_fast.hypernet import evaluate as ev
from hyforget_fast.ops.functional import ClassMetrics

HELDOUT = [0, 1, 4, 5, 7, 8, 9, 11, 12, 14, 15]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("coll"))
    collect(preset("mnist4", runs=16, block_runs=16, epochs=3, ckpts_per_run=20), d, log=lambda *a: None)
    return d


@pytest.fixture(scope="module")
def store(store_dir):
    return hf.CheckpointStore(store_dir)


class FakeHN:
    """Minimal Hypernet stand-in. mode: "nearest" (the store checkpoint whose per-class losses
    are nearest the prompt), "random" (a random store checkpoint), "perfect" (records targets).
    kind "dihyfo1" checks theta / losses are given, like the real API."""

    def __init__(self, store, mode, kind="dihyfo2"):
        self.store, self.mode = store, mode
        self.spec = hf.MLPSpec(store.layer_sizes)
        self.cfg = types.SimpleNamespace(kind=kind)
        self.meta = {"classes": list(store.classes), "pivots": store.manifest["pivots"],
                     "heldout_runs": HELDOUT, "data_dir": store.root}
        self.params, self.loss = store.load("params"), store.load("class_loss")
        self.calls, self.refined = [], []

    def sample(self, target_losses, k, sampler="ddim", steps=50, seed=0, theta=None, losses=None):
        tgt = np.asarray(target_losses, dtype=np.float64)
        assert tgt.shape == (k, self.loss.shape[1])
        if self.cfg.kind == "dihyfo1" and (theta is None or losses is None):
            raise ValueError("DiHyFo-1 needs theta and losses")
        self.calls.append(dict(target=tgt, k=k, sampler=sampler, steps=steps, seed=seed, theta=theta, losses=losses))
        if self.mode == "nearest":
            idx = ((self.loss[None] - tgt[:, None]) ** 2).sum(-1).argmin(1)
        elif self.mode == "lookup":   # what the retrieval control does: training runs only, log space
            train = np.flatnonzero(~np.isin(self.store.load("run"), HELDOUT))
            d = ((np.log(self.loss[train][None] + 1e-3) - np.log(tgt[:, None] + 1e-3)) ** 2).sum(-1)
            idx = train[d.argmin(1)]
        else:
            idx = np.random.default_rng(seed).integers(0, len(self.loss), k)
        return torch.from_numpy(self.params[idx].copy())


    def refine(self, target_losses, params, X, y, rounds=1, seed=0, **kw):   # records, edits nothing
        self.refined.append(dict(X=X, y=y, rounds=rounds, params=params, seed=seed, kw=kw))
        return params


def r2_ref(obs, tgt, eps=1e-8):
    obs, tgt = np.asarray(obs, np.float64), np.asarray(tgt, np.float64)
    num = sum((o - t) ** 2 for o, t in zip(obs, tgt))
    mu = sum(tgt) / len(tgt)
    return 1 - num / (sum((t - mu) ** 2 for t in tgt) + eps)


@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 10)), min_size=1, max_size=40))
def test_r2_and_pearson_match_float64_formulas(pairs):
    obs, tgt = np.array(pairs).T
    assert ev.prompt_alignment_r2(obs, tgt) == pytest.approx(r2_ref(obs, tgt), rel=1e-9, abs=1e-9)
    r = ev.pearson(obs, tgt)
    if len(obs) >= 2 and obs.std() > 1e-6 and tgt.std() > 1e-6:
        assert r == pytest.approx(np.corrcoef(obs, tgt)[0, 1], abs=1e-9)
    assert ev.prompt_alignment_r2(tgt, tgt) == pytest.approx(1.0) or tgt.std() == 0


def test_r2_rejects_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        ev.prompt_alignment_r2([1.0, 2.0], [1.0])


def test_perfect_fake_gives_r2_and_pearson_one(store, monkeypatch):
    fake = FakeHN(store, "random")

    def stub(params, spec, X, y):   # observed == the target the last sample call was asked for
        t = torch.from_numpy(fake.calls[-1]["target"]).float()
        return ClassMetrics(t, torch.ones_like(t), t.mean(1), torch.ones(len(t)))

    monkeypatch.setattr(ev, "class_metrics", stub)
    res = ev.evaluate_hypernet(fake, store.root, HELDOUT, num_prompts=20, per_prompt=4)
    for c in store.classes:
        assert res["r2"][c] == pytest.approx(1.0, abs=1e-6)
        assert res["pearson"][c] == pytest.approx(1.0, abs=1e-6)
    assert res["r2_free_mean"] == pytest.approx(1.0, abs=1e-6) and res["nonfinite_total"] == 0
    assert len(fake.calls) == len(store.classes)          # one sample call per class
    assert all(cl["k"] == 80 for cl in fake.calls)


def test_nearest_beats_random_and_prompts_span_range(store):
    kw = dict(num_prompts=20, per_prompt=4, steps=7, sampler="ddpm", seed=3)
    good = ev.evaluate_hypernet(FakeHN(store, "nearest"), store.root, HELDOUT, **kw)
    bad = ev.evaluate_hypernet(FakeHN(store, "random"), store.root, HELDOUT, **kw)
    free = [c for c in store.classes if c not in store.manifest["pivots"]]
    assert good["free_classes"] == free
    assert good["r2_free_mean"] > 0.5, good["r2"]
    assert bad["r2_free_mean"] < 0.1, bad["r2"]
    for c in free:
        assert good["r2"][c] > bad["r2"][c] + 0.4
        assert good["pearson"][c] > 0.7
    # prompts: 20 regularly spaced values from the 2nd to the 98th percentile of held-out losses
    run = store.load("run")
    held = store.load("class_loss")[np.isin(run, HELDOUT)]
    for ci, c in enumerate(store.classes):
        p = np.array(good["prompts"][c])
        assert len(p) == 20 and np.allclose(np.diff(p), np.diff(p)[0])
        assert p[0] == pytest.approx(np.percentile(held[:, ci], 2)) and p[-1] == pytest.approx(np.percentile(held[:, ci], 98))
        t = np.array(good["target"][c]).reshape(20, 4)
        assert np.allclose(t, p[:, None], atol=1e-6)          # each prompt repeated per item
        o = np.array(good["observed"][c]).reshape(20, 4)      # pooled R² == mean of per-set R² (G.pt)
        assert good["r2"][c] == pytest.approx(np.mean([r2_ref(o[:, s], t[:, s]) for s in range(4)]), abs=1e-6)
    s = good["settings"]
    assert (s["sampler"], s["steps"], s["per_prompt"], s["num_prompts"]) == ("ddpm", 7, 4, 20)
    mm = ev.evaluate_hypernet(FakeHN(store, "nearest"), store.root, HELDOUT, classes=[2], per_prompt=1,
                              percentiles=(0, 100))
    assert mm["prompts"][2][0] == pytest.approx(held[:, 2].min()) and mm["prompts"][2][-1] == pytest.approx(held[:, 2].max())


def test_retrieval_control_is_a_lookup_among_training_runs(store):
    """A stand-in that returns the training-run checkpoint nearest each prompt in log-loss space
    aligns exactly as the retrieval control says; better stand-ins can beat it, a random one cannot."""
    kw = dict(num_prompts=20, per_prompt=3, seed=4)
    look = ev.evaluate_hypernet(FakeHN(store, "lookup"), store.root, HELDOUT, **kw)
    bad = ev.evaluate_hypernet(FakeHN(store, "random"), store.root, HELDOUT, **kw)
    for c in store.classes:   # observed losses recomputed on validation == the stored ones
        assert look["r2"][c] == pytest.approx(look["r2_retrieval"][c], abs=1e-4)
        assert look["pearson"][c] == pytest.approx(look["pearson_retrieval"][c], abs=1e-4)
        assert bad["r2_retrieval"][c] == look["r2_retrieval"][c]      # the control does not depend on the model
        assert bad["r2"][c] < look["r2_retrieval"][c]
    assert look["r2_retrieval_free_mean"] == pytest.approx(
        np.mean([look["r2_retrieval"][c] for c in look["free_classes"]]))


@pytest.fixture
def scored_on(monkeypatch):
    """The (X, y) of every `class_metrics` call the evaluator makes, in order (it still scores)."""
    seen = []
    real = ev.class_metrics

    def spy(params, spec, X, y):
        seen.append((X, y))
        return real(params, spec, X, y)

    monkeypatch.setattr(ev, "class_metrics", spy)
    return seen


def test_other_classes_prompted_as_in_data_and_measured_on_validation(store, scored_on):
    fake = FakeHN(store, "nearest")
    seen = scored_on
    res = ev.evaluate_hypernet(fake, None, None, num_prompts=5, per_prompt=3, classes=[3])   # from meta
    sp = load_digits(store.classes, store.manifest["split_seed"], fractions=store.manifest["split"]["fractions"])
    assert len(seen) == 1 and torch.equal(seen[0][0], sp.X_val) and torch.equal(seen[0][1], sp.y_val)
    assert not torch.equal(seen[0][0][: len(sp.X_test)], sp.X_test)
    # non-prompted classes of every target row are the losses of one held-out checkpoint
    held = store.load("class_loss")[np.isin(store.load("run"), HELDOUT)]
    tgt = fake.calls[0]["target"]
    for row in tgt:
        assert np.isclose(held[:, :3], row[None, :3], atol=1e-6).all(1).any()
    assert res["evaluated_classes"] == [3] and len(res["observed"][3]) == 15


def test_dihyfo1_gets_earlier_theta_of_same_heldout_run(store):
    fake = FakeHN(store, "nearest", kind="dihyfo1")
    ev.evaluate_hypernet(fake, store.root, HELDOUT, num_prompts=4, per_prompt=5, classes=[2])
    call = fake.calls[0]
    theta, losses, tgt = call["theta"].numpy(), call["losses"].numpy(), call["target"]
    P, L = store.load("params"), store.load("class_loss")
    run, step = store.load("run"), store.load("step")
    for th, lo, tg in zip(theta, losses, tgt):
        i = np.flatnonzero((P == th).all(1))[0]
        assert run[i] in HELDOUT and np.array_equal(L[i], lo)
        later = np.flatnonzero((run == run[i]) & (step > step[i]) & np.isclose(L[:, [0, 1, 3]], tg[[0, 1, 3]]).all(1))
        assert later.size, "target's other classes must come from a later checkpoint of the same run"
    fake2 = FakeHN(store, "nearest", kind="dihyfo1")
    ev.evaluate_hypernet(fake2, store.root, HELDOUT, num_prompts=4, per_prompt=5, classes=[2], start="init")
    th = fake2.calls[0]["theta"].numpy()
    rows = [np.flatnonzero((P == t).all(1))[0] for t in th]
    assert (store.load("phase")[rows] == 0).all()


def test_nonfinite_counted_and_bad_input_refused(store, monkeypatch):
    class NaNFake(FakeHN):
        def sample(self, *a, **k):
            p = super().sample(*a, **k)
            p[::2] = float("nan")
            return p

    res = ev.evaluate_hypernet(NaNFake(store, "nearest"), store.root, HELDOUT, num_prompts=5, per_prompt=2, classes=[2])
    assert res["nonfinite"][2] == 5 and res["nonfinite_total"] == 5 and np.isfinite(res["r2"][2])
    fake = FakeHN(store, "nearest")
    with pytest.raises(ValueError, match="not in the store"):
        ev.evaluate_hypernet(fake, store.root, [999])
    with pytest.raises(ValueError, match="not among"):
        ev.evaluate_hypernet(fake, store.root, HELDOUT, classes=[7])
    with pytest.raises(ValueError, match="sampler"):
        ev.evaluate_hypernet(fake, store.root, HELDOUT, sampler="euler")
    fake.meta["dataset"] = {"manifest_sha256": "0" * 64}           # trained on another collection
    with pytest.raises(ValueError, match="not the collection"):
        ev.evaluate_hypernet(fake, store.root, None)
    ev.evaluate_hypernet(fake, store.root, HELDOUT, num_prompts=2, classes=[2])   # explicit runs: allowed
    fake.spec = hf.MLPSpec((784, 3, 4))
    with pytest.raises(ValueError, match="spec"):
        ev.evaluate_hypernet(fake, store.root, HELDOUT)


def test_save_evaluation_writes_strict_json_and_figures(store, tmp_path):
    res = ev.evaluate_hypernet(FakeHN(store, "nearest"), store.root, HELDOUT, num_prompts=5, per_prompt=2)
    res["r2"][0] = float("nan")                                    # NaN must become null
    curves = [{"step": s, "loss": 1.0 / (s + 1), "lr": 1e-4, "grad_norm": 0.5 + s % 3} for s in range(0, 50, 5)]
    curves[-1]["r2"] = {"2": 0.3, "3": 0.5}
    curves[-1]["r2_free_mean"] = 0.4
    (tmp_path / "curves.json").write_text(json.dumps(curves))
    out = ev.save_evaluation(res, str(tmp_path))

    def no_nan(x):
        raise AssertionError(f"non-strict JSON constant {x}")

    with open(out["json"]) as f:
        back = json.load(f, parse_constant=no_nan)
    assert back["r2"]["0"] is None and back["r2"]["2"] == pytest.approx(res["r2"][2])
    for k in ("alignment", "learning_curves"):
        assert os.path.getsize(out[k]) > 1000
        with open(out[k], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from hyforget_fast.hypernet.figures import plot_alignment
    assert os.path.exists(plot_alignment(back, str(tmp_path / "a2.png")))   # a result re-read from JSON


def test_cli_evaluate_hypernet(store, tmp_path, monkeypatch):
    fake = FakeHN(store, "nearest")
    import hyforget_fast.hypernet.pretrained  # noqa: F401  bound to the real api before it is stubbed
    api = types.ModuleType("hyforget_fast.hypernet.api")
    api.load_hypernet = lambda d, device=None, data=None: fake
    monkeypatch.setitem(sys.modules, "hyforget_fast.hypernet.api", api)
    import hyforget_fast.hypernet as hpkg
    monkeypatch.setattr(hpkg, "api", api, raising=False)
    from hyforget_fast.cli import main
    rc = main(["evaluate-hypernet", str(tmp_path), "--steps", "5", "--per-prompt", "2", "--seed", "1"])
    assert rc == 0
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["settings"]["steps"] == 5 and res["settings"]["per_prompt"] == 2
    fake.cfg.kind = "dihyfo1"                      # closed loop: its own file, the open loop's kept
    assert main(["evaluate-hypernet", str(tmp_path), "--steps", "5", "--per-prompt", "2", "--refine", "1"]) == 0
    closed = json.loads((tmp_path / "eval_refine.json").read_text())
    assert closed["settings"]["refine"] == 1 and "half B" in closed["settings"]["measured_on"]
    assert fake.refined and json.loads((tmp_path / "eval.json").read_text())["settings"]["refine"] == 0
    assert (tmp_path / "alignment.png").exists()
    assert all(c["steps"] == 5 for c in fake.calls)


def test_each_rows_items_and_retrieval_are_returned(store):
    """rows / start_rows / retrieved name, per target row, the store row whose losses prompt the
    other classes, DiHyFo-1's earlier start of the same run, and the retrieval control's loss."""
    fake = FakeHN(store, "nearest", kind="dihyfo1")
    res = ev.evaluate_hypernet(fake, store.root, HELDOUT, num_prompts=4, per_prompt=3, classes=[1, 2], seed=3)
    L, run, step = store.load("class_loss"), store.load("run"), store.load("step")
    assert len(fake.calls) == 2                                   # one sample call per class
    for c, call in zip((1, 2), fake.calls):
        rows, src = np.asarray(res["rows"][c]), np.asarray(res["start_rows"][c])
        tgt = np.asarray(res["target"][c])
        assert len(rows) == len(src) == len(tgt) == 12
        others = [j for j in range(L.shape[1]) if j != c]
        assert np.allclose(L[rows][:, others], call["target"][:, others], atol=1e-6)
        assert np.allclose(call["target"][:, c], tgt, atol=1e-6)
        assert np.array_equal(call["losses"].numpy(), L[src])
        assert (run[rows] == run[src]).all() and (step[src] < step[rows]).all()
        assert ev.prompt_alignment_r2(res["retrieved"][c], tgt) == pytest.approx(res["r2_retrieval"][c])
    two = ev.evaluate_hypernet(FakeHN(store, "nearest"), store.root, HELDOUT, num_prompts=4, per_prompt=3, classes=[1])
    assert two["start_rows"][1] is None and len(two["rows"][1]) == 12


def _rule_holds(rule, classes, loss_row, acc_row):
    """The documented holdout semantics, one row, one rule, in plain Python."""
    for c, side, t in rule:
        j = list(classes).index(c)
        if side == "high" and not float(loss_row[j]) > t:
            return False
        if side == "low" and not float(loss_row[j]) < t:
            return False
        if side == "acc_high" and not np.float32(acc_row[j]) >= np.float32(t):
            return False
        if side == "acc_low" and not np.float32(acc_row[j]) <= np.float32(t):
            return False
    return True


@given(st.integers(1, 40), st.integers(0, 2 ** 31 - 1))
def test_held_out_mask_is_the_rule_row_by_row(n, seed):
    from hyforget_fast.collection.collect import held_out_mask
    rng = np.random.default_rng(seed)
    classes = [0, 1, 2, 3, 4]
    loss = rng.uniform(0, 8, (n, 5)).astype(np.float32)
    acc = (rng.integers(0, 11, (n, 5)) / 10).astype(np.float32)   # thresholds hit exactly, too
    loss[rng.random((n, 5)) < 0.05] = np.nan
    rules = [[(3, "acc_low", 0.2), (2, "acc_high", 0.3)], [(1, "high", 4.0), (4, "low", 2.5)]]
    got = held_out_mask(rules, classes, loss, acc)
    want = [any(_rule_holds(r, classes, loss[i], acc[i]) for r in rules) for i in range(n)]
    assert got.tolist() == want


def test_alignment_breakdown_reads_accuracy_at_the_prompt_and_flags_held_out_rows():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    import alignment_breakdown as ab
    # a store in which accuracy falls with loss: acc = max(0, 1 - loss / 5) for every class
    sl = np.linspace(0, 10, 2001)
    store_loss = np.stack([sl] * 5, 1)
    store_acc = np.clip(1 - store_loss / 5, 0, 1).astype(np.float32)
    got = ab.accuracy_at_loss(sl, store_acc[:, 0], np.array([0.5, 2.5, 9.0]), neighbours=21)
    assert got == pytest.approx([0.9, 0.5, 0.0], abs=1e-6)
    rules = [[(3, "acc_low", 0.2), (2, "acc_high", 0.3)]]
    target = np.array([[0.1, 0.1, 0.1, 6.0, 0.1],    # 3 forgotten (acc 0), 2 kept by the item: off
                       [0.1, 0.1, 0.1, 0.5, 0.1],    # 3 kept: on
                       [0.1, 0.1, 0.1, 6.0, 0.1]])   # 3 forgotten, 2 forgotten by the item: on
    item_acc = np.array([[1, 1, 0.9, 1, 1], [1, 1, 0.9, 1, 1], [1, 1, 0.0, 1, 1]], np.float32)
    off = ab.off_support(rules, [0, 1, 2, 3, 4], 3, target, item_acc, store_loss, store_acc, neighbours=21)
    assert off.tolist() == [True, False, False]
    asked = np.array([-5.0, -2.0, 0.5, 2.0, 6.0, 8.0])
    achieved = asked * np.array([0.2, 0.5, 1.0, 1.0, 0.5, 0.75])
    rows = ab.move_table(asked, achieved, achieved - asked)
    assert sum(r["n"] for r in rows) == 6 and sum(r["sse_share"] for r in rows) == pytest.approx(1.0)
    assert [r["achieved_over_asked"] for r in rows] == pytest.approx([0.2, 0.5, 1.0, 1.0, 0.625])


@given(st.integers(1, 9), st.integers(1, 6), st.floats(0.5, 3.0), st.integers(0, 2 ** 31 - 1))
def test_alignment_probes_calibration_moves_only_large_rises(k, m, a, seed):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    import alignment_probes as ap
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(k, m, generator=g, dtype=torch.float64) * 3
    t = torch.rand(k, m, generator=g, dtype=torch.float64) * 10
    got = ap.calibrated_prompts(t, s, a)
    big = (t - s) > ap.CALIBRATE_FROM
    assert torch.equal(got[~big], t[~big])                       # small and downward moves unchanged
    want = s + ap.CALIBRATE_FROM + a * (t - s - ap.CALIBRATE_FROM)
    assert torch.allclose(got[big], want[big], rtol=0, atol=1e-12)
    assert torch.allclose(ap.calibrated_prompts(t, s, 1.0), t, rtol=0, atol=1e-12)   # a = 1: the prompt itself


def test_alignment_probes_training_runs_and_noise_scale(store):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    import alignment_probes as ap
    import hyforget_fast.hypernet.diffusion as diffusion
    held = [0, 5, 9, 14]                                          # 16 runs in the store
    runs = ap.training_runs_like(store, held, seed=3)
    assert len(runs) == len(held) == len(set(runs)) and not set(runs) & set(held)
    assert set(runs) <= set(np.unique(store.load("run")).tolist())
    assert runs == ap.training_runs_like(store, held, seed=3)
    with pytest.raises(ValueError, match="fewer than"):
        ap.training_runs_like(store, HELDOUT, seed=0)              # 11 held out, 5 left
    # one DDIM step with a model that returns its input: the sample is x_T itself
    gd = diffusion.GaussianDiffusion(num_steps=50)
    draw = lambda: gd.ddim_sample(lambda x, t: x, (3, 5), steps=1, generator=torch.Generator().manual_seed(1))
    x = draw()
    with ap.noise_scaled(0.25):
        y = draw()
    assert torch.allclose(y, 0.25 * x) and not torch.allclose(x, y)
    assert torch.equal(draw(), x)                                # restored on exit


@pytest.mark.parametrize("flag", [["--sample-steps", "0"], ["--noise-scale", "0"], ["--calibrate", "-1"]])
def test_alignment_probes_rejects_bad_settings_before_loading(flag, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    import alignment_probes as ap
    with pytest.raises(SystemExit):
        ap.main(["--model", "no-such-model", "--data", "no-such-folder", *flag])
    assert flag[0] in capsys.readouterr().err


@given(st.lists(st.integers(0, 6), min_size=2, max_size=60))
def test_validation_halves_are_disjoint_stratified_and_keep_order(labels):
    y = torch.tensor(labels)
    X = torch.arange(len(labels), dtype=torch.float32)[:, None].repeat(1, 3)   # row i holds i
    (XA, yA), (XB, yB) = ev.validation_halves(X, y)
    ia, ib = XA[:, 0].long(), XB[:, 0].long()
    assert sorted(ia.tolist() + ib.tolist()) == list(range(len(labels)))         # a partition
    assert torch.equal(ia, ia.sort().values) and torch.equal(ib, ib.sort().values)
    assert torch.equal(y[ia], yA) and torch.equal(y[ib], yB)
    for c in set(labels):
        na, nb = int((yA == c).sum()), int((yB == c).sum())
        assert na - nb in (0, 1)                                                 # half of each class, A first
    with pytest.raises(ValueError, match="same N"):
        ev.validation_halves(X[:-1], y)


def test_refine_gets_feedback_from_one_half_and_is_scored_on_the_other(store, scored_on):
    fake = FakeHN(store, "nearest", kind="dihyfo1")
    seen = scored_on
    res = ev.evaluate_hypernet(fake, None, None, num_prompts=4, per_prompt=3, classes=[2], refine=2)
    (XA, yA), (XB, yB) = ev.validation_halves(*ev.validation_split(store))
    assert len(fake.refined) == 1 and fake.refined[0]["rounds"] == 2
    assert torch.equal(fake.refined[0]["X"], XA) and torch.equal(fake.refined[0]["y"], yA)
    assert len(seen) == 1 and torch.equal(seen[0][0], XB) and torch.equal(seen[0][1], yB)
    assert res["settings"]["refine"] == 2 and "half B" in res["settings"]["measured_on"]
    fb = (XB[:10], yB[:10])                                   # explicit feedback: scored on all of validation
    fake2 = FakeHN(store, "nearest", kind="dihyfo1")
    seen.clear()
    ev.evaluate_hypernet(fake2, None, None, num_prompts=4, per_prompt=3, classes=[2], refine=1, feedback=fb)
    assert fake2.refined[0]["X"] is fb[0] and torch.equal(seen[0][0], ev.validation_split(store)[0])
    with pytest.raises(ValueError, match="DiHyFo-1"):
        ev.evaluate_hypernet(FakeHN(store, "nearest"), None, None, num_prompts=4, per_prompt=3, classes=[2], refine=1)
    with pytest.raises(ValueError, match="non-negative"):
        ev.evaluate_hypernet(fake, None, None, num_prompts=4, per_prompt=3, classes=[2], refine=-1)
