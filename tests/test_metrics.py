"""Unlearning metrics against float64 references written from their definitions."""
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC

import hyforget_fast as hf
from hyforget_fast.unlearn import metrics as M


def rand_probs(rng, n, m, zeros=True):
    """(n, m) float64 probability rows; with zeros, some entries exactly 0 (0 log 0 paths)."""
    p = rng.random((n, m)) ** 3
    if zeros:
        p[rng.random((n, m)) < 0.3] = 0.0
        p[np.arange(n), rng.integers(0, m, n)] += 0.1          # no all-zero row
    return p / p.sum(1, keepdims=True)


def kl(p, q):
    return sum(p[i] * math.log(p[i] / q[i]) for i in range(len(p)) if p[i] > 0)


prob_shapes = st.tuples(st.integers(1, 30), st.integers(1, 9), st.integers(0, 2**31 - 1))


# ------------------------------------------------------------------------------ output-space metrics

@given(prob_shapes)
def test_jsd_activation_overlap_match_definitions(shape):
    n, m, seed = shape
    rng = np.random.default_rng(seed)
    p, q = rand_probs(rng, n, m), rand_probs(rng, n, m)
    jsd = np.mean([0.5 * kl(p[i], (p[i] + q[i]) / 2) + 0.5 * kl(q[i], (p[i] + q[i]) / 2) for i in range(n)])
    act = np.mean([math.sqrt(sum((p[i, k] - q[i, k]) ** 2 for k in range(m))) for i in range(n)])
    same = sum(int(np.argmax(p[i]) == np.argmax(q[i])) for i in range(n)) / n
    assert M.js_divergence(p, q) == pytest.approx(jsd, abs=1e-12)
    assert M.unlearning_score(torch.from_numpy(p).float(), torch.from_numpy(q).float()) == pytest.approx(1 - jsd,
                                                                                                         abs=1e-6)
    assert 0 <= M.js_divergence(p, q) <= math.log(2) + 1e-12
    assert M.activation_distance(p, q) == pytest.approx(act, abs=1e-12)
    assert M.prediction_overlap(p, q) == same
    assert isinstance(M.unlearning_score(p, q), float)
    # identical models
    assert M.unlearning_score(p, p) == 1.0
    assert M.activation_distance(p, p) == 0.0
    assert M.prediction_overlap(p, p) == 1.0


def test_jsd_disjoint_supports_is_log2():
    p = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert M.js_divergence(p, p[::-1].copy()) == pytest.approx(math.log(2))
    assert M.unlearning_score(p, p[::-1].copy()) == pytest.approx(1 - math.log(2))


@given(prob_shapes)
def test_accuracies_and_split_overlaps_count(shape):
    n, m, seed = shape
    m = max(m, 2)
    rng = np.random.default_rng(seed)
    p, q = rand_probs(rng, n + 2, m), rand_probs(rng, n + 2, m)
    y = rng.integers(0, m, n + 2)
    y[:2] = [0, 1]                                             # both D_r and D_f non-empty
    forget = [1]
    fmask = np.isin(y, forget)
    hit, same = p.argmax(1) == y, p.argmax(1) == q.argmax(1)
    acc = M.accuracies(torch.from_numpy(p), torch.from_numpy(y), forget)
    assert acc == {"retain": sum(hit[~fmask]) / sum(~fmask), "forget": sum(hit[fmask]) / sum(fmask),
                   "all": sum(hit) / len(y)}
    ov = M.split_overlaps(p, q, y, forget)
    assert ov == {"retain": sum(same[~fmask]) / sum(~fmask), "forget": sum(same[fmask]) / sum(fmask),
                  "all": sum(same) / len(y)}
    assert all(type(v) is float for v in acc.values())


@given(st.integers(0, 2**31 - 1), st.sampled_from(["logreg", "svc"]))
def test_mia_matches_sklearn_on_hand_built_entropy_features(seed, attack):
    rng = np.random.default_rng(seed)
    pr, pt, pf = rand_probs(rng, 40, 4), rand_probs(rng, 30, 4, zeros=False), rand_probs(rng, 12, 4)
    H = lambda p: np.array([-sum(x * math.log(x) for x in row if x > 0) for row in p])  # noqa: E731
    np.testing.assert_allclose(M.entropy(pr), H(pr), atol=1e-12)
    X = np.concatenate([H(pr), H(pt)])[:, None]
    Y = np.r_[np.ones(40), np.zeros(30)]
    clf = (LogisticRegression(class_weight="balanced", random_state=0) if attack == "logreg"
           else SVC(class_weight="balanced", random_state=0)).fit(X, Y)
    res = M.mia(pr, pt, pf, attack=attack, seed=0)
    assert res.score == float(clf.predict(H(pf)[:, None]).mean())
    assert res.attack == attack and res.description.startswith(M.MIA_VARIANTS[attack])
    assert (res.n_retain, res.n_test, res.n_forget) == (40, 30, 12)
    assert M.mia(pr, pt, pf, attack=attack, seed=0).score == res.score                 # deterministic
    assert math.isnan(res.mean_proba) == (attack == "svc")


def test_mia_separates_member_like_from_test_like_entropies():
    rng = np.random.default_rng(0)
    members = rand_probs(rng, 200, 4) * 0.05 + np.eye(4)[rng.integers(0, 4, 200)] * 0.95   # confident
    members /= members.sum(1, keepdims=True)
    tests = np.full((200, 4), 0.25) + rng.random((200, 4)) * 0.05                           # uncertain
    tests /= tests.sum(1, keepdims=True)
    assert M.mia(members, tests, members[:50]).score == 1.0
    assert M.mia(members, tests, tests[:50]).score == 0.0


def test_bad_probabilities_and_labels_are_refused():
    p = rand_probs(np.random.default_rng(1), 6, 3)
    y = np.array([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="same shape"):
        M.activation_distance(p, p[:5])
    with pytest.raises(ValueError, match="negative"):
        M.unlearning_score(p - 0.5, p)
    with pytest.raises(ValueError, match="sum to 1"):
        M.js_divergence(p * 2, p)
    bad = p.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        M.prediction_overlap(bad, p)
    with pytest.raises(ValueError, match="empty"):
        M.unlearning_score(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"shape \(N, m\)"):
        M.activation_distance(p[0], p[0])
    with pytest.raises(ValueError, match="outside 0..2"):
        M.accuracies(p, np.array([0, 1, 2, 3, 1, 2]), [1])
    with pytest.raises(TypeError, match="integer class indices"):
        M.accuracies(p, y.astype(float), [1])
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        M.accuracies(p, y[:4], [1])
    with pytest.raises(ValueError, match="forget set is empty"):
        M.accuracies(p, np.array([0, 1, 0, 0, 1, 1]), [2])
    with pytest.raises(ValueError, match="retain set is empty"):
        M.split_overlaps(p, p, np.array([2] * 6), [2])
    with pytest.raises(ValueError, match="unknown classes"):
        M.accuracies(p, y, [5])
    with pytest.raises(ValueError, match="forget set is empty"):
        M.accuracies(p, y, [])
    with pytest.raises(ValueError, match="repeats"):
        M.accuracies(p, y, [1, 1])
    with pytest.raises(ValueError, match="3 columns"):
        M.accuracies(p, y, [1], classes=[3, 5])
    with pytest.raises(ValueError, match="attack must be one of"):
        M.mia(p, p, p, attack="forest")
    with pytest.raises(ValueError, match="probs_forget is empty"):
        M.mia(p, p, p[:0])
    with pytest.raises(ValueError, match="same number of classes"):
        M.mia(p, p, rand_probs(np.random.default_rng(2), 4, 5))


# ------------------------------------------------------------------------------ relearning, editing

def _digits_like(spec, n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, spec.in_features, generator=g)
    y = torch.randint(0, spec.num_classes, (n,), generator=g)
    return X, y


def test_anamnesis_zero_steps_at_original_accuracy_and_ratio_from_counts():
    spec = hf.MLPSpec([6, 5, 3])
    g = torch.Generator().manual_seed(0)
    original = torch.randn(spec.num_params, generator=g)
    X, _ = _digits_like(spec, 64, 1)
    y = hf.class_outputs(original[None], spec, X)[1][0]       # original is 100 % right on its own labels
    retrained = torch.randn(spec.num_params, generator=g)
    kw = dict(lr=0.5, batch_size=16, max_steps=400, seed=3)
    res = M.anamnesis_index(original, retrained, original, spec, X, y, X, y, **kw)
    assert res.original_acc == 1.0 and res.target_acc == pytest.approx(0.95)
    assert res.steps_unlearned == 0 and res.reached_unlearned
    assert res.reached_retrained and res.steps_retrained > 0 and res.final_acc_retrained >= 0.95
    assert res.ratio == 0 / res.steps_retrained and res.ratio_kind == "exact"
    # swapped roles: the ratio is steps_u / steps_r of the two counts, same minibatches -> same counts
    swap = M.anamnesis_index(retrained, original, original, spec, X, y, X, y, **kw)
    assert (swap.steps_unlearned, swap.steps_retrained) == (res.steps_retrained, 0)
    assert swap.ratio == math.inf and swap == M.anamnesis_index(retrained, original, original, spec, X, y, X, y, **kw)
    # a cap is reported as such
    capped = M.anamnesis_index(retrained, original, original, spec, X, y, X, y, lr=1e-6, max_steps=3)
    assert (capped.steps_unlearned, capped.reached_unlearned, capped.ratio_kind) == (3, False, "lower")
    assert capped.ratio == math.inf


def test_anamnesis_ratio_conventions_and_bad_input():
    assert M.anamnesis_ratio(6, 3) == 2.0
    assert M.anamnesis_ratio(4, 0) == math.inf and math.isnan(M.anamnesis_ratio(0, 0))
    spec = hf.MLPSpec([4, 3, 2])
    t = torch.zeros(spec.num_params)
    X, y = _digits_like(spec, 8, 0)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        M.anamnesis_index(t, t, t, spec, X[:, :3], y, X, y)
    with pytest.raises(ValueError, match="X_forget_val is empty"):
        M.anamnesis_index(t, t, t, spec, X, y, X[:0], y[:0])
    with pytest.raises(ValueError, match="alpha"):
        M.anamnesis_index(t, t, t, spec, X, y, X, y, alpha=1.5)
    with pytest.raises(ValueError, match="ONE"):
        M.anamnesis_index(t.repeat(2, 1), t, t, spec, X, y, X, y)


def test_edit_locality():
    spec = hf.MLPSpec([5, 3, 4])
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(spec.num_params, generator=g), torch.randn(spec.num_params, generator=g)
    X, _ = _digits_like(spec, 50, 1)
    same = M.edit_locality(a, a, spec, X)
    assert same == M.EditLocality(retain_overlap=1.0, param_distance=0.0)
    pa, pb = (hf.class_outputs(t[None].double(), spec, X.double())[1][0] for t in (a, b))
    got = M.edit_locality(b, a, spec, X.numpy())
    assert got.retain_overlap == (pa == pb).double().mean().item()
    assert got.param_distance == pytest.approx(math.sqrt(((a.double() - b.double()) ** 2).sum().item()), rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        M.edit_locality(b[:-1], a, spec, X)


# ------------------------------------------------------------------------------------- memorization

@st.composite
def small_specs(draw, widths=(1, 2, 3, 5, 7, 13)):
    depth = draw(st.integers(1, 2))
    hidden = draw(st.lists(st.sampled_from(widths), min_size=depth, max_size=depth))
    return hf.MLPSpec([draw(st.integers(1, 9)), *hidden, draw(st.integers(2, 5))])


def brute_force(q, S, spec):
    """(n,) float64 min over ALL hidden-unit permutations of ||permute(q) - S_i||."""
    per = [list(itertools.permutations(range(h))) for h in spec.hidden_sizes]
    perms = torch.tensor([sum(c, ()) for c in itertools.product(*per)])
    Q = hf.permute(q.double().expand(len(perms), -1).contiguous(), spec, perms)     # (n_perm, P)
    return torch.cdist(S.double(), Q).amin(1)


@given(small_specs(), st.integers(0, 2**31 - 1))
def test_permuted_model_is_at_distance_zero_from_itself(spec, seed):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(12, spec.num_params, generator=g)
    i = seed % 12
    q = hf.permute(S[i:i + 1], spec, hf.sample_perms(spec, 1, seed=seed))[0]
    res = M.nearest_checkpoint(q, S.numpy(), spec)
    assert res.distance < 1e-9 and res.index == i and res.certified
    assert type(res.distance) is float and type(res.index) is int


@given(small_specs(widths=(1, 2, 3, 4)), st.integers(0, 2**31 - 1))
def test_nearest_checkpoint_matches_brute_force_over_all_permutations(spec, seed):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(10, spec.num_params, generator=g)
    q = torch.randn(2, spec.num_params, generator=g)
    ref = torch.stack([brute_force(qb, S, spec) for qb in q])                      # (2, n)
    # the invariant features are a lower bound of the permutation distance
    lb = torch.cdist(M.invariant_features(q, spec), M.invariant_features(S, spec))
    assert (lb <= ref + 1e-9).all()
    for max_perms in (10**6, 1):                                                   # enumerate, Hungarian
        res = M.CheckpointIndex(torch.from_numpy(S.numpy()), spec, max_perms=max_perms).query(q, block=3)
        assert res.certified.all()
        np.testing.assert_array_equal(res.distance >= ref.amin(1).numpy() - 1e-9, True)
        if res.method != "hungarian-cd":                                           # exact methods
            np.testing.assert_allclose(res.distance, ref.amin(1).numpy(), rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(ref[np.arange(2), res.index].numpy(), res.distance, rtol=1e-9, atol=1e-9)


def test_neighbour_distance_and_store_formats(tmp_path):
    spec = hf.MLPSpec([7, 3, 4])
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, spec.num_params, generator=g)
    S = torch.cat([A, hf.permute(A, spec, hf.sample_perms(spec, 5, seed=1))])     # each model twice
    mm = np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype=np.float32, shape=tuple(S.shape))
    mm[:] = S.numpy()
    nd = M.neighbour_distance(np.load(tmp_path / "p.npy", mmap_mode="r"), spec, n_sample=10)
    assert nd.median < 1e-6 and nd.certified and sorted(nd.indices) == list(range(10))
    np.testing.assert_array_equal(nd.neighbours, (nd.indices + 5) % 10)             # its permuted copy
    groups = np.arange(10) % 5                                                      # copies share a group
    ng = M.neighbour_distance(S, spec, n_sample=10, groups=groups)
    ref = [min(brute_force(S[i], S[j:j + 1], spec).item() for j in range(10) if groups[j] != groups[i])
           for i in ng.indices]
    np.testing.assert_allclose(ng.distances, ref, rtol=1e-6)
    assert ng.median == pytest.approx(float(np.median(ref)), rel=1e-6)
    # a capped scan is flagged uncertified
    capped = M.nearest_checkpoint(torch.randn(spec.num_params, generator=g), S, spec, block=1, max_candidates=1)
    assert capped.candidates_checked == 1 and not capped.certified


def test_memorization_bad_input():
    spec = hf.MLPSpec([3, 2, 2])
    S = np.random.default_rng(0).standard_normal((4, spec.num_params))
    with pytest.raises(ValueError, match=r"shape \(n, 14\)"):
        M.nearest_checkpoint(torch.zeros(spec.num_params), S[:, :5], spec)
    with pytest.raises(ValueError, match="no checkpoints"):
        M.nearest_checkpoint(torch.zeros(spec.num_params), S[:0], spec)
    with pytest.raises(TypeError, match="numpy array/memmap or torch tensor"):
        M.nearest_checkpoint(torch.zeros(spec.num_params), S.tolist(), spec)
    bad = S.copy()
    bad[2, 3] = np.inf
    with pytest.raises(ValueError, match="checkpoint 2 holds NaN or Inf"):
        M.nearest_checkpoint(torch.zeros(spec.num_params), bad, spec)
    with pytest.raises(ValueError, match="shape"):
        M.nearest_checkpoint(torch.zeros(5), S, spec)
    with pytest.raises(ValueError, match="at least 2"):
        M.neighbour_distance(S[:1], spec)
    with pytest.raises(ValueError, match="groups must have shape"):
        M.neighbour_distance(S, spec, groups=np.zeros(3))
    with pytest.raises(ValueError, match="no stored checkpoint is left"):
        M.neighbour_distance(S, spec, groups=np.zeros(4))


@given(prob_shapes)
def test_bad_teacher_jsd_matches_the_public_code(shape):
    """The dissertation's convention: Chundawat et al.'s JSDiv, F.kl_div with reduction 'mean' over
    all N*m elements, written here exactly as in their code (strictly positive softmax rows)."""
    import torch.nn.functional as F
    n, m, seed = shape
    rng = np.random.default_rng(seed)
    p, q = (torch.from_numpy(rand_probs(rng, n, m, zeros=False)) for _ in range(2))
    mid = (p + q) / 2
    ref = float(0.5 * F.kl_div(torch.log(p), mid) + 0.5 * F.kl_div(torch.log(q), mid))
    assert M.js_divergence(p, q, "bad_teacher") == pytest.approx(ref, rel=1e-9, abs=1e-15)
    assert M.unlearning_score(p, q, "bad_teacher") == pytest.approx(1 - ref, abs=1e-12)
    assert M.unlearning_score(p, p, "bad_teacher") == 1.0
    # not the same number as the per-sample JSD unless m == 1 (both 0 then)
    if m > 1 and not torch.allclose(p, q):
        assert M.js_divergence(p, q, "bad_teacher") != pytest.approx(M.js_divergence(p, q), rel=1e-3)


def test_bad_teacher_jsd_of_a_zero_probability_is_finite_and_convention_is_checked():
    p = np.array([[1.0, 0.0], [0.5, 0.5]])
    q = np.array([[0.0, 1.0], [0.5, 0.5]])
    assert math.isfinite(M.js_divergence(p, q, "bad_teacher"))
    with pytest.raises(ValueError, match="convention must be one of"):
        M.js_divergence(p, q, "elementwise")
