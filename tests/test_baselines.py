"""Unlearning baselines: each forgets, retraining never sees D_f, retrieval is exact, all are
deterministic per seed, bad input is refused."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hyforget_fast.collection.collect import BlockTrainer, collect, preset
from hyforget_fast.collection.data import load_digits
from hyforget_fast.collection.store import CheckpointStore
from hyforget_fast.unlearn import baselines as bl

torch.set_num_threads(1)  # the engine and the SGD loops are deterministic per thread count

CFG = preset("mnist4")
SPEC = CFG.spec()                     # 784 -> 2 -> 4
FORGET = (2,)
# Settings at which each method forgets this short-trained model (its defaults are the authors',
# made for larger networks: random labels' Adam at lr 1e-4 barely moves it, SSD's alpha = 10 lies
# above what imp_f / imp_D reaches with 4 classes and selects almost nothing).
FAST = {"retrain": dict(seeds=3, epochs=8), "finetune": {}, "neggrad_plus": {},
        "random_labels": dict(lr=0.03, epochs=3), "ssd": dict(alpha=3.0, lam=0.3)}


@pytest.fixture(scope="module")
def splits():
    return load_digits(CFG.classes, CFG.split_seed, fractions=CFG.fractions)


@pytest.fixture(scope="module")
def model(splits):
    """A short-trained original model: best of 3 runs (10 epochs) on validation accuracy."""
    P = bl.train_from_scratch(SPEC, splits, runs=3, epochs=10, lr=0.1, seed=1)
    acc = bl.split_metrics(P, SPEC, splits.X_val, splits.y_val, [2])["class_acc"].mean(1)
    return P[int(acc.argmax())].clone()


def accs_on_test(params, splits) -> tuple[float, float]:
    """Pooled (D_f, D_r) accuracy on the TEST split (measured inside the tests only)."""
    m = bl.split_metrics(params[None], SPEC, splits.X_test, splits.y_test, [2])
    return float(m["forget_acc"][0]), float(m["retain_acc"][0])


@pytest.fixture(scope="module")
def results(model, splits):
    return {name: fn(model, SPEC, FORGET, splits, **FAST[name]) for name, fn in bl.BASELINES.items()}


@pytest.mark.parametrize("name", list(bl.BASELINES))
def test_each_baseline_lowers_forget_accuracy(name, results, model, splits):
    f0, r0 = accs_on_test(model, splits)
    assert f0 > 0.7 and r0 > 0.9, "the original model should know every class"
    r = results[name]
    assert r.name == name and r.params.shape == (SPEC.num_params,) and r.params.dtype == torch.float32
    assert torch.isfinite(r.params).all() and r.seconds > 0
    f1, r1 = accs_on_test(r.params, splits)
    assert f1 < f0 - 0.1
    assert r1 > r0 - 0.05, "forgetting must not wreck the retained classes"
    if name in ("retrain", "neggrad_plus", "random_labels", "ssd"):   # these forget the class outright
        assert f1 < 0.1
    assert r.hparams, "defaults must be recorded"


def test_retrain_picks_best_validation_seed(results, splits):
    r = results["retrain"]
    acc = r.extra["val"]["retain_acc"]
    assert len(acc) == 3 and r.extra["chosen"] == int(np.argmax(acc))
    assert acc[r.extra["median_index"]] == sorted(acc, reverse=True)[1]
    vm = bl.split_metrics(r.params[None], SPEC, splits.X_val, splits.y_val, [2])
    assert float(vm["retain_acc"][0]) == pytest.approx(max(acc), abs=1e-6)
    assert r.extra["train_samples"] == int((splits.y_train != 2).sum())


def test_retrain_never_sees_forget_samples(splits, monkeypatch):
    """Two proofs: (1) the engine trains on no D_f label, ever: every minibatch is recorded;
    (2) D_f training rows poisoned with NaN change nothing: the result is finite and identical."""
    seen = []
    orig_step = BlockTrainer.sgd_step

    def spy(self, idx, wn):
        seen.append(self.ytr[idx].clone())
        assert self.Xtr.shape[0] == len(self.ytr) == int((splits.y_train != 2).sum())
        return orig_step(self, idx, wn)

    monkeypatch.setattr(BlockTrainer, "sgd_step", spy)
    clean = bl.retrain(None, SPEC, FORGET, splits, seeds=2, epochs=2)
    labels = torch.cat(seen)
    assert len(labels) > 100 and not (labels == 2).any()
    X = splits.X_train.clone()
    X[splits.y_train == 2] = float("nan")
    poisoned = bl.retrain(None, SPEC, FORGET, dataclasses.replace(splits, X_train=X), seeds=2, epochs=2)
    assert torch.isfinite(poisoned.params).all()
    assert torch.equal(poisoned.params, clean.params)
    assert torch.equal(poisoned.extra["median_params"], clean.extra["median_params"])


@pytest.mark.parametrize("name", list(bl.BASELINES))
def test_deterministic_per_seed(name, model, splits, results):
    fn, kw = bl.BASELINES[name], FAST[name]
    again = fn(model, SPEC, FORGET, splits, **kw)
    assert torch.equal(again.params, results[name].params)
    other = fn(model, SPEC, FORGET, splits, seed=7, **kw)
    if name == "ssd":   # no random draw: the authors' importances run over unshuffled batches
        assert torch.equal(other.params, results[name].params)
    else:
        assert not torch.equal(other.params, results[name].params)


@given(n=st.integers(1, 400), m=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
       weighted=st.booleans(), dup=st.booleans())
def test_retrieval_is_exact_nearest_neighbour(n, m, seed, weighted, dup):
    g = np.random.default_rng(seed)
    L = (g.random((n, m)) * 5).astype(np.float32)
    if dup and n > 2:
        L[n - 1] = L[n // 2]                           # exact tie: the lower index must win
    P = g.standard_normal((n, 3)).astype(np.float32)
    target = L[g.integers(n)].astype(np.float64) + g.normal(0, 0.3, m) if g.random() < 0.5 else g.random(m) * 5
    w = g.random(m) + 0.01 if weighted else None
    ww = np.ones(m) if w is None else w
    brute = [math.fsum(ww[c] * (float(L[i, c]) - target[c]) ** 2 for c in range(m)) for i in range(n)]
    best = min(range(n), key=lambda i: (brute[i], i))
    hit = bl.RetrievalIndex(L, P).query(target, w)
    assert hit.index == best
    assert hit.distance == pytest.approx(brute[best], rel=1e-12, abs=1e-12)
    np.testing.assert_array_equal(hit.class_loss, L[best])
    np.testing.assert_array_equal(hit.params.numpy(), P[best])


def test_nearest_distinct_gives_each_target_its_nearest_unused_checkpoint():
    rng = np.random.default_rng(3)
    L = rng.random((50, 4)).astype(np.float32)
    L[7] = L[8] = L[9]                                    # ties
    idx = bl.RetrievalIndex(L)
    cells = rng.random((3, 4))
    T = cells[[0, 1, 0, 2, 0, 0, 1, 2, 2, 0, 1]]          # 11 targets over 3 distinct cells, repeated
    got = idx.nearest_distinct(T)
    assert len(set(got.tolist())) == len(T)
    taken = set()
    for t, g in zip(T, got):                              # brute force, target by target, in order
        d = ((L.astype(np.float64) - t) ** 2).sum(1)
        free = [i for i in np.argsort(d, kind="stable") if i not in taken]
        assert d[g] == d[free[0]]
        taken.add(int(g))
    with pytest.raises(ValueError, match="K <= 50"):
        idx.nearest_distinct(np.zeros((51, 4)))


def test_tuned_keeps_the_best_retain_among_points_that_forget(model, splits):
    calls = []

    def fake(params, spec, forget, splits, *, seed=0, shift=0.0):
        """A 'method' that only shifts the output bias of class 2 (the flat order ends with it)."""
        calls.append(shift)
        p = params.clone()
        p[-SPEC.num_classes + 2] += shift
        return bl.BaselineResult("fake", p, 0.0, {"shift": shift})

    grid = (0.0, -1.0, -60.0, -30.0)
    r = bl.tuned("fake", model, SPEC, FORGET, splits, grid={"shift": grid}, method=fake)
    pts = r.extra["tuning"]["points"]
    assert calls == list(grid) and [p["shift"] for p in pts] == calls
    forgets = [p for p in pts if p["val_forget_acc"] <= 0.01]
    assert forgets and pts[0]["val_forget_acc"] > 0.5       # shift 0 keeps class 2, -60 forgets it
    want = max(forgets, key=lambda p: p["val_retain_acc"])   # first of equals, as select() breaks ties
    assert r.hparams["shift"] == want["shift"] == r.extra["tuning"]["chosen"]["shift"]
    for p in pts:                                          # every point scored on validation, as defined
        q = fake(model, SPEC, FORGET, splits, shift=p["shift"]).params
        v = bl.split_metrics(q[None], SPEC, splits.X_val, splits.y_val, bl.forget_indices(splits, FORGET))
        assert p["val_forget_acc"] == pytest.approx(float(v["forget_acc"][0]))
    assert r.seconds >= 0 and r.extra["tuning"]["grid"] == {"shift": list(grid)}
    c = r.hparams["shift"]                                 # a choice at an end of the grid is named
    want_bound = {} if min(grid) < c < max(grid) else {"shift": "lowest" if c == min(grid) else "highest"}
    assert r.extra["tuning"]["at_bound"] == want_bound
    assert bl.grid_bounds({"a": (1, 2, 3), "b": (5,)}, {"a": 3, "b": 5}) == {"a": "highest"}
    assert bl.grid_bounds({"a": (3, 2, 1)}, {"a": 2}) == {}
    t = bl.tuned("ssd", model, SPEC, FORGET, splits, grid={"alpha": (10.0,), "lam": (1.0,)})
    assert torch.equal(t.params, bl.ssd(model, SPEC, FORGET, splits).params)


def test_every_tuning_grid_says_why_it_stops_where_it_does():
    for name, grid in bl.TUNING_GRIDS.items():
        assert set(grid) == set(bl.GRID_BOUNDS[name]), name
        for knob, vals in grid.items():
            assert len(set(vals)) == len(vals) > 1, (name, knob)
            sig = bl.BASELINES[name].__kwdefaults__
            assert knob in sig, f"{name} has no knob {knob}"


def test_bad_input_refused(model, splits):
    for forget, msg in (((), "empty"), ((7,), r"unknown classes \[7\]"), ((0, 1, 2, 3), "every class"),
                        ((2, 2), "repeats"), (("2",), "integer digit labels")):
        with pytest.raises((ValueError, TypeError), match=msg):
            bl.finetune(model, SPEC, forget, splits)
    with pytest.raises(ValueError, match="no training samples"):
        bl.ssd(model, SPEC, FORGET, bl.without_classes(splits, [2]))
    with pytest.raises(ValueError, match="shape"):
        bl.neggrad_plus(model[:-1], SPEC, FORGET, splits)
    bad = model.clone()
    bad[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        bl.random_labels(bad, SPEC, FORGET, splits)
    with pytest.raises(ValueError, match="lr must be a positive"):
        bl.finetune(model, SPEC, FORGET, splits, lr=-1.0)
    with pytest.raises(ValueError, match="beta"):
        bl.neggrad_plus(model, SPEC, FORGET, splits, beta=1.5)
    with pytest.raises(ValueError, match="l2 must be a non-negative"):
        bl.finetune(model, SPEC, FORGET, splits, l2=-0.1)
    with pytest.raises(ValueError, match="forget_batch_size must be a positive"):
        bl.neggrad_plus(model, SPEC, FORGET, splits, forget_batch_size=0)
    with pytest.raises(ValueError, match="lam must be a non-negative"):
        bl.ssd(model, SPEC, FORGET, splits, lam=-1.0)
    with pytest.raises(ValueError, match="seeds must be a positive"):
        bl.retrain(None, SPEC, FORGET, splits, seeds=0)
    with pytest.raises(TypeError, match="DigitSplits"):
        bl.ssd(model, SPEC, FORGET, {"X_train": splits.X_train})
    idx = bl.RetrievalIndex(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="target must be 4"):
        idx.query([1.0, 2.0])
    with pytest.raises(ValueError, match="weights"):
        idx.query([1.0] * 4, weights=[-1, 1, 1, 1])

