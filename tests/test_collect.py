"""Batched multi-run collection: pivot / bin rules, val-split labels, determinism, multi-rank."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hyforget_fast.collection.collect import (PHASE_FORGET, PHASE_INIT, CollectConfig, BlockTrainer, collect,
                                   collect_block, offer_probs, preset)
from hyforget_fast.collection.data import load_digits
from hyforget_fast.ops.reference import class_sums
from hyforget_fast.collection.store import CheckpointStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)  # the engine is deterministic per thread count; 1 is fastest on a busy box

TINY = preset("mnist4", runs=8, block_runs=4, epochs=4, ckpts_per_run=15, bin_cap_frac=0.03,
              forget_prob=0.75)


@pytest.fixture(scope="module")
def splits():
    return load_digits(TINY.classes, TINY.split_seed, fractions=TINY.fractions)


@pytest.fixture(scope="module")
def coll(splits, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("coll"))
    collect(TINY, out, splits=splits, log=lambda *_: None)
    return out, CheckpointStore(out)


def test_presets_match_the_dissertation():
    m4, m10 = preset("mnist4"), preset("mnist10")
    assert (m4.pivots, m4.hidden, m4.ckpts_per_run, m4.classes) == ((0, 1), (2,), 150, (0, 1, 2, 3))
    assert (m10.pivots, m10.hidden, m10.ckpts_per_run, len(m10.classes)) == ((5, 6, 7, 8, 9), (7,), 200, 10)
    assert preset("mnist10-dihyfo2").schedule == "early_late" and m4.gamma == 0.8
    assert CollectConfig.from_dict(json.loads(json.dumps(m10.to_dict()))) == m10


def test_bad_config_raises():
    with pytest.raises(ValueError, match="pivots"):
        CollectConfig(classes=(0, 1, 2), pivots=(5,))
    with pytest.raises(ValueError, match="non-pivot"):
        CollectConfig(classes=(0, 1), pivots=(0, 1))
    with pytest.raises(ValueError, match="schedule"):
        preset("mnist4", schedule="sometimes")
    with pytest.raises(ValueError, match="unknown preset"):
        preset("cifar")
    for bad in (dict(forget_prob=1.5), dict(undersample_prob=-0.1)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} is a probability"):
            preset("mnist4", **bad)
    with pytest.raises(ValueError, match="forget_max_classes must be positive"):
        preset("mnist4", forget_max_classes=0)


def test_every_run_forgets_from_full_data_when_asked(splits):
    """forget_prob 1, undersample_prob 0: every run trains on all digits, then forgets 1..max free classes."""
    bt = BlockTrainer(TINY.replace(forget_prob=1.0, undersample_prob=0.0, forget_max_classes=2), splits, 0)
    assert (bt.keep == 1).all() and torch.isfinite(bt.forget_step).all()
    n = bt.forget_mask.sum(1)
    assert ((n >= 1) & (n <= 2)).all() and not bt.forget_mask[:, :2].any()    # never a pivot
    none = BlockTrainer(TINY.replace(forget_prob=0.0), splits, 0)
    assert not none.forget_mask.any() and torch.isinf(none.forget_step).all()


def test_saved_checkpoints_obey_pivot_and_bin_rules(coll):
    out, st = coll
    acc, phase = st.load("class_acc"), st.load("phase")
    trained = phase != PHASE_INIT
    assert trained.sum() > 20
    assert (acc[trained][:, :2] >= TINY.gamma).all()       # pivots 0 and 1 always above gamma
    cap, edges = TINY.bin_cap, np.array(TINY.bin_edges)
    some_full = False
    for rec in st.manifest["shards"]:                      # caps are per block = per shard
        lo = np.load(os.path.join(out, "shards", rec["name"], "class_loss.npy"))
        ph = np.load(os.path.join(out, "shards", rec["name"], "phase.npy"))
        lev = np.searchsorted(edges, lo[ph != PHASE_INIT][:, 2:], side="right")
        _, counts = np.unique(lev[:, 0] * 100 + lev[:, 1], return_counts=True)
        assert counts.max() <= cap
        some_full |= counts.max() == cap
    assert some_full, "tiny config should make at least one bin reach its cap"


def test_saved_losses_are_validation_losses_of_saved_params(coll, splits):
    _, st = coll
    P, loss, acc = (torch.from_numpy(st.load(k)) for k in ("params", "class_loss", "class_acc"))
    spec = TINY.spec()
    ls, cs = class_sums(P, spec, splits.X_val, splits.y_val, 4)
    cnt = torch.bincount(splits.y_val, minlength=4).float()
    torch.testing.assert_close(loss, ls / cnt, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(acc, cs / cnt, rtol=0, atol=1e-6)
    lt, _ = class_sums(P, spec, splits.X_test, splits.y_test, 4)  # never the test split
    assert not torch.allclose(loss, lt / torch.bincount(splits.y_test, minlength=4).float(), atol=1e-3)


def test_each_run_saves_initial_params_then_ordered_steps(coll):
    _, st = coll
    run, step, phase = st.load("run"), st.load("step"), st.load("phase")
    assert sorted(set(run.tolist())) == list(range(TINY.runs))
    for r in range(TINY.runs):
        s, ph = step[run == r], phase[run == r]
        assert s[0] == 0 and ph[0] == PHASE_INIT and (ph[1:] != PHASE_INIT).all()
        assert (np.diff(s) > 0).all() and len(s) <= TINY.ckpts_per_run + 1
    # initial params are the PyTorch default init: |W1| <= 1/sqrt(784)
    P0 = st.load("params")[phase == PHASE_INIT]
    assert np.abs(P0[:, :784 * 2]).max() <= 1 / 28 + 1e-7


def test_forgetting_phase_follows_the_run_plan(coll):
    out, st = coll
    run, step, phase = st.load("run"), st.load("step"), st.load("phase")
    n_forget_runs = 0
    for rec in st.manifest["shards"]:
        info = json.load(open(os.path.join(out, "shards", rec["name"], "shard.json")))["info"]["runs"]
        first = rec["block"] * TINY.block_runs
        for i, fs in enumerate(info["forget_step"]):
            sel = (run == first + i) & (phase != PHASE_INIT)
            want = np.zeros(sel.sum(), bool) if fs is None else step[sel] >= fs
            assert np.array_equal(phase[sel] == PHASE_FORGET, want)
            if fs is not None:
                n_forget_runs += 1
                assert info["forget_classes"][i] and set(info["forget_classes"][i]) <= {2, 3}
    assert n_forget_runs > 0


def test_forgotten_class_gets_zero_loss_weight(splits):
    bt = BlockTrainer(TINY.replace(forget_prob=1.0), splits, 0)
    bt.class_w = bt._class_weights(torch.ones(bt.R, dtype=torch.bool))
    for step in range(1, 21):
        idx, wn = bt.sample_batch(step)                    # (S,), (R, S)
        forgotten = bt.forget_mask[:, bt.ytr[idx]]         # (R, S)
        assert forgotten.any() and (wn[forgotten] == 0).all() and (wn[~forgotten] > 0).all()
        torch.testing.assert_close(wn.sum(1), torch.ones(bt.R))


def test_undersampling_rates_are_importance_weights(splits):
    bt = BlockTrainer(TINY.replace(block_runs=4, undersample_prob=1.0, keep_range=(0.1, 0.1)), splits, 0)
    freq = torch.zeros(bt.R, 4)
    seen = []
    for step in range(1, 301):
        idx, wn = bt.sample_batch(step)
        freq.index_add_(1, bt.ytr[idx], wn)                # weighted class frequencies
        seen.append(idx)
    want = bt.keep * bt.class_count / (bt.keep * bt.class_count).sum(1, keepdim=True)
    torch.testing.assert_close(freq / 300, want, atol=0.02, rtol=0)
    # the shared minibatches walk a fresh permutation of the training set every epoch
    ep = torch.cat(seen[:bt.steps_per_epoch])
    assert torch.equal(ep.sort().values, torch.arange(len(bt.ytr)))


@pytest.mark.parametrize("sparse", [True, False])
def test_sgd_step_is_the_weighted_mean_ce_gradient_step(splits, sparse):
    cfg = preset("mnist4", runs=3, block_runs=3, hidden=(5, 3), forget_prob=1.0, undersample_prob=1.0)
    bt = BlockTrainer(cfg, splits, 0, sparse=sparse)
    bt.class_w = bt._class_weights(torch.ones(bt.R, dtype=torch.bool))
    before = bt.flat_params(full=False).clone()
    idx, wn = bt.sample_batch(1)
    bt.sgd_step(idx, wn)
    after = bt.flat_params(full=False)
    for r in range(bt.R):
        pieces = [p.squeeze(0).clone().requires_grad_() for Wb in bt.eval_spec.unflatten(before[r:r + 1]) for p in Wb]
        h = bt.Xtr[idx]
        for l in range(0, len(pieces), 2):
            h = h @ pieces[l].t() + pieces[l + 1]
            if l + 2 < len(pieces):
                h = torch.relu(h)
        ce = torch.nn.functional.cross_entropy(h, bt.ytr[idx], reduction="none")
        (ce * wn[r]).sum().backward()                      # weighted mean CE (weights sum to 1)
        want = torch.cat([(p - bt.lr[r] * p.grad).detach().flatten() for p in pieces])
        torch.testing.assert_close(after[r], want, rtol=1e-5, atol=1e-6)
        assert not torch.equal(after[r], before[r])


def test_sparse_first_layer_saves_what_the_dense_one_saves(splits):
    """The CPU engine's CSR first layer (native kernels) vs dense GEMMs: same decisions."""
    a = BlockTrainer(TINY, splits, 0, sparse=True).run()
    b = BlockTrainer(TINY, splits, 0, sparse=False).run()
    assert a.stats == b.stats and len(a.run) > 10
    for k in ("class_acc", "run", "step", "phase"):                 # the same saved set
        assert np.array_equal(getattr(a, k), getattr(b, k)), k
    np.testing.assert_allclose(a.params, b.params, rtol=1e-4, atol=1e-5)  # summation order differs
    np.testing.assert_allclose(a.class_loss, b.class_loss, rtol=1e-4)


def test_block_is_deterministic_and_independent_of_other_blocks(splits):
    a = collect_block(TINY, splits, 1)
    b = collect_block(TINY, splits, 1)
    c = collect_block(TINY.replace(runs=TINY.runs + 40), splits, 1)  # more blocks after it: no effect
    for k in ("params", "class_loss", "run", "step", "phase"):
        assert np.array_equal(getattr(a, k), getattr(b, k)) and np.array_equal(getattr(a, k), getattr(c, k))
    assert a.run.min() == TINY.block_runs


def test_early_late_schedule_prefers_both_ends():
    p = offer_probs(preset("mnist10-dihyfo2"), 1000)
    u = offer_probs(preset("mnist10"), 1000)
    assert p[:100].mean() > 2 * p[450:550].mean() and p[-100:].mean() > 2 * p[450:550].mean()
    assert abs(float(p.sum()) - float(u.sum())) < 1e-2 * float(u.sum())


def _env():
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def _contents(root):
    st = CheckpointStore(root)
    order = np.lexsort((st.load("step"), st.load("run")))
    return {k: st.load(k)[order] for k in ("params", "class_loss", "class_acc", "run", "step", "phase")}


def test_two_ranks_union_equals_one_process(tmp_path):
    args = ["collect", "--preset", "mnist4", "--runs", "6", "--block-runs", "2", "--epochs", "2",
            "--ckpts-per-run", "8", "--seed", "3", "--threads", "1"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    subprocess.run([sys.executable, "-m", "hyforget_fast.cli", *args, "--out", one], env=_env(), check=True,
                   capture_output=True, timeout=300)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "hyforget_fast.cli", *args, "--out", two], env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[rank 1/2]" in r.stderr
    a, b = _contents(one), _contents(two)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    man = json.load(open(os.path.join(two, "manifest.json")))
    assert [s["name"] for s in man["shards"]] == ["block_00000", "block_00001", "block_00002"]


def test_mlp_head_sgd_op_checks_inputs_and_has_a_fake_kernel():
    """The collector's fused per-run SGD step (its values are checked against autograd above)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    op = torch.ops.hyforget.mlp_head_sgd_
    R, S, sizes = 3, 5, [6, 4, 2]                         # head per run: W2 (2, 4) + b2 (2,) = 10
    args = lambda y: (torch.randn(S, R * 4), torch.randn(R, 10), torch.randn(R, 4), y,  # noqa: E731
                      torch.full((R, S), 1 / S), torch.full((R,), 0.1), sizes)
    assert op(*args(torch.tensor([0, 1, 1, 0, 1]))).shape == (S, R * 4)
    with pytest.raises(RuntimeError, match=r"label 2 out of range \[0, 2\)"):
        op(*args(torch.tensor([0, 1, 2, 0, 1])))
    with pytest.raises(RuntimeError, match=r"head must be \(R, 10\)"):
        op(torch.randn(S, R * 4), torch.randn(R, 9), torch.randn(R, 4), torch.zeros(S, dtype=torch.long),
           torch.full((R, S), 1 / S), torch.full((R,), 0.1), sizes)
    with FakeTensorMode():
        G = op(torch.empty(S, R * 4), torch.empty(R, 10), torch.empty(R, 4), torch.empty(S, dtype=torch.long),
               torch.empty(R, S), torch.empty(R), sizes)
    assert G.shape == (S, R * 4)


def test_scoring_from_the_engine_layout_equals_scoring_flat_params(splits):
    """class_metrics_runs_csr reads W1T / b1 / head directly; the same bits as class_metrics_csr on
    the gathered flat parameters, NaN for a run with a non-finite parameter, clear errors."""
    bt = BlockTrainer(preset("mnist4", runs=9, block_runs=9, hidden=(5, 3)), splits, 0, sparse=True)
    for step in range(1, 4):
        bt.sgd_step(*bt.sample_batch(step))
    bt.head[4, 2] = float("inf")
    rows = torch.tensor([7, 4, 0, 7])
    op = torch.ops.hyforget
    got = op.class_metrics_runs_csr(bt.W1T, bt.b[0], bt.head, rows, *bt._csr_val, bt.yv, bt._sizes, bt.m)
    want = op.class_metrics_csr(bt.flat_params(rows, full=False), *bt._csr_val, bt.yv, bt._sizes, bt.m)
    for g, w in zip(got, want):
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.nan_to_num(), w.nan_to_num())
    assert torch.isnan(got[0][1]).all() and torch.isfinite(got[0][[0, 2, 3]]).all()
    with pytest.raises(RuntimeError, match=r"run 9 out of range \[0, 9\)"):
        op.class_metrics_runs_csr(bt.W1T, bt.b[0], bt.head, torch.tensor([9]), *bt._csr_val, bt.yv, bt._sizes, bt.m)
    with pytest.raises(RuntimeError, match="head must be"):
        op.class_metrics_runs_csr(bt.W1T, bt.b[0], bt.head[:, 1:].contiguous(), rows, *bt._csr_val, bt.yv,
                                  bt._sizes, bt.m)


def test_cli_passes_the_forgetting_mix_to_the_collection(tmp_path):
    from hyforget_fast.cli import main
    out = str(tmp_path / "c")
    assert main(["collect", "--preset", "mnist4", "--runs", "2", "--block-runs", "2", "--epochs", "2",
                 "--ckpts-per-run", "6", "--threads", "1", "--forget-prob", "1", "--undersample-prob", "0",
                 "--forget-max-classes", "1", "--out", out, "--quiet"]) == 0
    cfg = CheckpointStore(out).manifest["config"]
    assert (cfg["forget_prob"], cfg["undersample_prob"], cfg["forget_max_classes"]) == (1.0, 0.0, 1)
    assert (CheckpointStore(out).load("phase") == PHASE_FORGET).any()


def test_forget_pair_counts_match_a_run_by_run_count(coll):
    """bench/forget_pairs.py's vectorised count against a plain loop over runs, on thresholds
    loose enough that the tiny collection has pair runs, forget-only runs and neither."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from forget_pairs import forget_pair_counts
    _, st = coll
    run, step, acc = st.load("run"), st.load("step"), st.load("class_acc")
    for fs, known, gone, keep in (((2,), 0.5, 0.3, 0.5), ((3,), 0.5, 0.3, 0.5), ((2, 3), 0.4, 0.4, 0.4)):
        fi = [st.classes.index(c) for c in fs]
        ri = [i for i in range(len(st.classes)) if i not in fi]
        pairs = forgets = 0
        for r in np.unique(run):
            rows = np.nonzero(run == r)[0]
            rows = rows[np.argsort(step[rows])]
            a = acc[rows]
            knows = (a[:, fi] >= known).all(1)
            forgot = (a[:, fi] <= gone).all(1) & (a[:, ri].mean(1) >= keep)
            forgets += bool(forgot.any())
            pairs += any(forgot[j] and knows[:j].any() for j in range(len(rows)))
        got = forget_pair_counts(st, fs, known, gone, keep)
        assert got == {"runs": len(np.unique(run)), "forget_and_keep_runs": forgets, "pair_runs": pairs}, fs
    with pytest.raises(ValueError, match="not among the collection"):
        forget_pair_counts(st, (7,))


def test_forget_loss_levels_place_each_loss_in_the_prompt_table(coll):
    """bench/forget_pairs.py --levels: a checkpoint's loss at a table value sits at that value's
    quantile, between two values linearly; only the checkpoints that forget and keep count."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from forget_pairs import forget_loss_levels
    _, st = coll
    acc, loss = st.load("class_acc"), st.load("class_loss")
    m = len(st.classes)
    fi = [st.classes.index(2)]
    ri = [i for i in range(m) if i not in fi]
    ok = (acc[:, fi] <= 0.3).all(1) & (acc[:, ri].mean(1) >= 0.5)
    assert ok.any(), "the tiny collection should hold checkpoints that forget 2 at these thresholds"
    # a two-row table, linear from below the smallest loss (q 0) to above the largest (q 1)
    lo, hi = loss.min(0) - 1.0, loss.max(0) + 1.0                      # (m,)
    table = {"q": [0.0, 1.0], "values": [lo.tolist(), hi.tolist()]}
    got = forget_loss_levels(st, (2,), table, forgot_max=0.3, retain_min=0.5)
    want = (loss[ok] - lo) / (hi - lo)                                 # (n_ok, m)
    assert got["n"] == int(ok.sum())
    np.testing.assert_allclose(got["median"], np.median(want, 0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got["p10"], np.percentile(want, 10, 0), rtol=1e-6, atol=1e-9)
    assert forget_loss_levels(st, (2,), table, forgot_max=-1.0) == {"n": 0}
