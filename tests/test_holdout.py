"""Held-out loss combinations in collection (CollectConfig.holdout): never saved, JSON round trip,
default config and manifests unchanged."""
import json

import numpy as np
import pytest
import torch

from hyforget_fast.collection.collect import PHASE_INIT, BlockTrainer, CollectConfig, collect, preset
from hyforget_fast.collection.data import load_digits
from hyforget_fast.collection.store import CheckpointStore

torch.set_num_threads(1)  # the engine is deterministic per thread count

# Every run forgets one free class from early on, so "class 2 high while class 3 low" and "both
# high" are common (dozens of checkpoints each without the rule); no bin caps in the way.
BASE = preset("mnist4", runs=8, block_runs=4, epochs=5, ckpts_per_run=20, forget_prob=1.0,
              bin_cap_frac=1.0, forget_at=(0.3, 0.5))
RULES = (((3, "high", 1.5), (2, "low", 2.0)),     # class 3 loss > 1.5 while class 2 loss < 2
         ((2, "high", 1.5), (3, "high", 1.5)))    # both free classes above 1.5


# What forgetting {3} means to the selection rule: class 3 mostly wrong, every other class right.
ACC_RULES = (((3, "acc_low", 0.2), (0, "acc_high", 0.8), (1, "acc_high", 0.8), (2, "acc_high", 0.8)),)


def matches(loss: np.ndarray, rules, acc: np.ndarray | None = None) -> np.ndarray:
    """(n, m) losses (and accuracies) -> (n,) bool, written from the definition, one condition at a time."""
    loss = np.asarray(loss, dtype=np.float64)   # stored float32 values, compared exactly
    acc = np.full(loss.shape, np.nan, np.float32) if acc is None else np.asarray(acc, dtype=np.float32)
    out = np.zeros(len(loss), dtype=bool)
    for rule in rules:
        hit = np.ones(len(loss), dtype=bool)
        for c, side, t in rule:
            col = BASE.classes.index(c)
            hit &= {"high": loss[:, col] > t, "low": loss[:, col] < t,   # accuracies as stored (float32)
                    "acc_high": acc[:, col] >= np.float32(t), "acc_low": acc[:, col] <= np.float32(t)}[side]
        out |= hit
    return out


@pytest.fixture(scope="module")
def splits():
    return load_digits(BASE.classes, BASE.split_seed, fractions=BASE.fractions)


@pytest.fixture(scope="module")
def stores(splits, tmp_path_factory):
    out = {}
    for name, cfg in (("plain", BASE), ("held", BASE.replace(holdout=RULES)),
                      ("held_acc", BASE.replace(holdout=ACC_RULES))):
        path = str(tmp_path_factory.mktemp(name))
        collect(cfg, path, splits=splits, log=lambda *_: None)
        out[name] = CheckpointStore(path)
    return out


def test_held_out_combinations_are_never_saved(stores):
    plain, held = stores["plain"].load("class_loss"), stores["held"].load("class_loss")
    for k, rule in enumerate(RULES):   # each rule alone is common without the option ...
        assert matches(plain, (rule,)).sum() >= 10, f"rule {k} too rare in the test config to test anything"
    assert not matches(held, RULES).any()   # ... and never stored with it
    assert len(held) >= 20                  # other checkpoints are still collected


def test_accuracy_holdout_stores_nothing_the_selection_rule_would_accept(stores):
    """Held out by what forgetting means: with the accuracy rule for {3}, no stored checkpoint has
    class-3 validation accuracy <= 0.2 while 0, 1, 2 are >= 0.8; without it, many do."""
    def accepted(st):
        return matches(st.load("class_loss"), ACC_RULES, st.load("class_acc"))
    assert accepted(stores["plain"]).sum() >= 5, "the rule is too rare in the test config to test anything"
    assert accepted(stores["held_acc"]).sum() == 0
    assert len(stores["held_acc"]) >= 20


def test_holdout_filters_without_changing_training(stores):
    """Rules only decide what is saved: a (run, step) saved in both stores has the same params."""
    key = {n: s.load("run") * 100_000 + s.load("step") for n, s in stores.items()}
    common, ip, ih = np.intersect1d(key["plain"], key["held"], return_indices=True)
    assert len(common) >= 10
    np.testing.assert_array_equal(stores["plain"].load("params")[ip], stores["held"].load("params")[ih])


def test_holdout_applies_to_initial_params_and_keeps_run_capacity(stores):
    st = stores["held"]
    phase, run = st.load("phase"), st.load("run")
    init_plain = stores["plain"].load("class_loss")[stores["plain"].load("phase") == PHASE_INIT]
    assert matches(init_plain, RULES).any(), "config should start some run inside a held-out region"
    assert (phase == PHASE_INIT).sum() == (~matches(init_plain, RULES)).sum()
    for r in np.unique(run):   # a run whose init was dropped still saves at most ckpts_per_run
        assert ((run == r) & (phase != PHASE_INIT)).sum() <= BASE.ckpts_per_run
    assert st.manifest["config"]["holdout"] == [[list(c) for c in rule] for rule in RULES]


def test_held_out_mask_matches_definition(splits):
    tr = BlockTrainer(BASE.replace(runs=1, block_runs=1, holdout=RULES), splits, 0)
    g = torch.Generator().manual_seed(0)
    loss = (torch.rand(500, 4, generator=g) * 4).numpy()
    loss[::7, 2] = np.nan                                  # NaN meets no condition
    loss[1::7, 3] = np.float32(1.5)                        # exactly at a threshold: not "high"
    loss[2::7, 3] = np.nextafter(np.float32(1.5), np.float32(2))
    acc = (torch.randint(0, 11, (500, 4), generator=g).float() / 10).numpy()   # float32 k/10: many at 0.2 / 0.8
    acc[3::7, 0] = np.nan
    acc[4::7] = [0.8, 0.9, 1.0, 0.2]                      # exactly at both thresholds: held out
    acc[5::7] = [0.8, 0.9, 1.0, np.nextafter(np.float32(0.2), np.float32(1))]   # just above 0.2: kept
    np.testing.assert_array_equal(tr.held_out(loss, acc), matches(loss, RULES))
    assert not BlockTrainer(BASE.replace(runs=1, block_runs=1), splits, 0).held_out(loss, acc).any()
    tra = BlockTrainer(BASE.replace(runs=1, block_runs=1, holdout=ACC_RULES), splits, 0)
    want = matches(loss, ACC_RULES, acc)
    assert want.any() and not want.all()
    np.testing.assert_array_equal(tra.held_out(loss, acc), want)   # inclusive at 0.2 and 0.8


def test_holdout_json_round_trip_and_default_unchanged():
    cfg = BASE.replace(holdout=RULES)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert CollectConfig.from_dict(d) == cfg and CollectConfig.from_dict(d).holdout == RULES
    # The default writes no holdout key, so collection.json of older collections compares equal,
    # and an older config dict (without the key) still loads as the default.
    assert "holdout" not in BASE.to_dict() and "holdout" not in preset("mnist10").to_dict()
    assert CollectConfig.from_dict(json.loads(json.dumps(BASE.to_dict()))) == BASE
    assert CollectConfig.from_dict(dict(BASE.to_dict(), holdout=[])) == BASE
    # lists (JSON) and tuples normalise to the same rules; integer thresholds become floats
    assert BASE.replace(holdout=[[[3, "high", 1.5], [2, "low", 2]]]).holdout == (RULES[0],)


@pytest.mark.parametrize("bad, msg", [
    ((((7, "high", 1.0),),), "class 7 is not among"),
    ((((2, "up", 1.0),),), "side must be one of"),
    ((((2, "high", float("nan")),),), "finite number"),
    ((((2, "high", "1"),),), "finite number"),
    (((),), "non-empty"),
    ((((2, "high"),),), r"\(class, side, threshold\)"),
    ("2 high 1", "sequence of rules"),
])
def test_bad_holdout_refused(bad, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        BASE.replace(holdout=bad)
