"""Unlearning metrics (dissertation §3.2), plus relearning and memorization checks.

Output-space metrics take softmax probabilities `probs` (N, m) (torch or numpy; each row must be a
probability vector) and integer labels `y` (N,) in 0..m-1 (column indices, as DigitSplits stores
them), and return plain Python floats. Forget classes are DIGIT LABELS, as everywhere in the
public API: pass `classes=` (the digit of each column, e.g. splits.classes); without it column c
is digit c.

  accuracies(probs, y, forget_classes, classes=None) -> {"retain", "forget", "all"} accuracy on D_r, D_f, all
  prediction_overlap(probs_a, probs_b)      -> fraction of inputs with the same argmax
  split_overlaps(probs_a, probs_b, y, fc)   -> prediction_overlap on D_r, D_f and the whole split
  activation_distance(probs_a, probs_b)     -> mean_i ||p_a,i - p_b,i||_2
  js_divergence / unlearning_score          -> mean_i JSD(p_a,i || p_b,i) and phi = 1 - that
  entropy(probs), mia(...)                  -> membership-inference attack (Chundawat et al. 2023)

Parameter-space checks take flat parameter vectors (hyforget_fast.ops.spec order):

  anamnesis_index(...)      relearning steps on D_f of the unlearned vs the retrained model
  edit_locality(...)        overlap with the original model on D_r and L2 distance to it
  nearest_checkpoint(...)   distance to the closest stored checkpoint up to hidden-unit permutation
  neighbour_distance(...)   the typical such distance between stored checkpoints themselves
  CheckpointIndex           the permutation-invariant index both of them use

Conventions: natural logarithms; 0 * log 0 = 0; JSD is averaged per sample (`batchmean`), never over
classes, so it lies in [0, log 2]. Bad input raises ValueError/TypeError naming the problem.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..ops.functional import permute
from ..ops.spec import MLPSpec
from .mlp import batched_logits, check_flat
from .selection import class_indices

PROB_ATOL = 1e-4  # rows of float32 softmax sum to 1 within ~1e-6; anything further off is not a softmax


# ----------------------------------------------------------------------------------------- validation

def _as_float64(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        try:
            t = torch.from_numpy(np.asarray(x))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}") from e
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    return t.to(torch.float64)


def _probs(p, name: str = "probs") -> torch.Tensor:
    """Validated (N, m) float64 probabilities: finite, >= 0, rows summing to 1 within PROB_ATOL."""
    t = _as_float64(p, name)
    if t.ndim != 2:
        raise ValueError(f"{name} must have shape (N, m) (one softmax row per input), got {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty: the set it was computed on has no samples")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has zero classes")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or Inf values; pass softmax probabilities")
    if (t < 0).any():
        raise ValueError(f"{name} holds negative values; pass softmax probabilities, not logits")
    dev = (t.sum(1) - 1).abs()
    if (dev > PROB_ATOL).any():
        i = int(dev.argmax())
        raise ValueError(f"rows of {name} must sum to 1 (softmax probabilities); row {i} sums to "
                         f"{float(t[i].sum()):.6g}")
    return t


def _pair(a, b, names=("probs_a", "probs_b")) -> tuple[torch.Tensor, torch.Tensor]:
    pa, pb = _probs(a, names[0]), _probs(b, names[1])
    if pa.shape != pb.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape (same inputs, same classes), "
                         f"got {tuple(pa.shape)} and {tuple(pb.shape)}")
    return pa, pb


def _labels(y, n: int, m: int, name: str = "y") -> torch.Tensor:
    t = y.detach().cpu() if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y))
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got dtype {t.dtype}")
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the probabilities, got {tuple(t.shape)}")
    t = t.to(torch.int64)
    if n and (t.min() < 0 or t.max() >= m):
        raise ValueError(f"{name} holds labels outside 0..{m - 1}: min {int(t.min())}, max {int(t.max())}")
    return t


def _forget_mask(y: torch.Tensor, forget_classes, m: int, classes=None) -> torch.Tensor:
    """(N,) bool, True on D_f; forget_classes are digit labels of `classes` (default 0..m-1), checked
    by selection.class_indices; refuses empty forget or retain sets."""
    classes = list(range(m)) if classes is None else list(classes)
    if len(classes) != m:
        raise ValueError(f"classes names {len(classes)} digits but the probabilities have {m} columns")
    fc = class_indices(classes, forget_classes)
    mask = torch.isin(y, torch.tensor(fc, dtype=torch.int64))
    if not mask.any():
        raise ValueError(f"the forget set is empty: no sample has a label in forget_classes {forget_classes}")
    if mask.all():
        raise ValueError(f"the retain set is empty: every sample has a label in forget_classes {forget_classes}")
    return mask


# ----------------------------------------------------------------------------------- output space

def accuracies(probs, y, forget_classes, classes=None) -> dict[str, float]:
    """Accuracy of argmax(probs) (N, m) against y (N,) on D_r, D_f and all N inputs -> plain floats."""
    p = _probs(probs)
    t = _labels(y, *p.shape)
    f = _forget_mask(t, forget_classes, p.shape[1], classes)
    hit = (p.argmax(1) == t).double()
    return {"retain": float(hit[~f].mean()), "forget": float(hit[f].mean()), "all": float(hit.mean())}


def prediction_overlap(probs_a, probs_b) -> float:
    """Fraction of inputs on which two models' argmax predictions agree; probs (N, m) each."""
    pa, pb = _pair(probs_a, probs_b)
    return float((pa.argmax(1) == pb.argmax(1)).double().mean())


def split_overlaps(probs_a, probs_b, y, forget_classes, classes=None) -> dict[str, float]:
    """prediction_overlap on D_r, D_f and all inputs of one split; y (N,) selects D_f by label."""
    pa, pb = _pair(probs_a, probs_b)
    f = _forget_mask(_labels(y, *pa.shape), forget_classes, pa.shape[1], classes)
    same = (pa.argmax(1) == pb.argmax(1)).double()
    return {"retain": float(same[~f].mean()), "forget": float(same[f].mean()), "all": float(same.mean())}


def activation_distance(probs_a, probs_b) -> float:
    """Mean over inputs of the L2 norm of the difference of two softmax outputs (dissertation Eq. 3.1)."""
    pa, pb = _pair(probs_a, probs_b)
    return float((pa - pb).norm(dim=1).mean())


def _xlogx_over(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Elementwise p * log(p / q) with 0 * log(0 / q) = 0 (q > 0 wherever p > 0 here)."""
    return torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))


# The two conventions of JSD in the unlearning literature. "per_sample": JSD(P||Q) of each
# input's two softmax rows, summed over classes, averaged over inputs (in [0, ln 2]). "bad_teacher":
# the public code of Chundawat et al. (2023), which the dissertation's φ follows:
# JSDiv(p, q) = 0.5 F.kl_div(log p, m) + 0.5 F.kl_div(log q, m) with F.kl_div's default
# reduction "mean", i.e. the mean over all N·m ELEMENTS of m (log m - log p) (a KL(M||P) term),
# about m times smaller than the per-sample value.
JSD_CONVENTIONS = {
    "per_sample": "mean over inputs of JSD(P||Q) = KL(P||M)/2 + KL(Q||M)/2 summed over classes, natural log",
    "bad_teacher": "Chundawat et al. (2023) code: 0.5 F.kl_div(log P, M) + 0.5 F.kl_div(log Q, M), reduction "
                   "'mean' = mean over all N*m elements of M (log M - log P); about m times smaller",
}


def js_divergence(probs_a, probs_b, convention: str = "per_sample") -> float:
    """Jensen-Shannon divergence of two models' softmax outputs (N, m), M = (P+Q)/2, natural log,
    in one of JSD_CONVENTIONS. "bad_teacher" takes log P at P's smallest positive double where a
    probability underflowed to 0 (the original code would give inf there)."""
    if convention not in JSD_CONVENTIONS:
        raise ValueError(f"convention must be one of {sorted(JSD_CONVENTIONS)}, got {convention!r}")
    p, q = _pair(probs_a, probs_b)
    m = (p + q) / 2
    if convention == "per_sample":
        return float((0.5 * _xlogx_over(p, m).sum(1) + 0.5 * _xlogx_over(q, m).sum(1)).mean())
    tiny = torch.finfo(p.dtype).tiny

    def kl_div_mean(log_input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:   # F.kl_div(.., "mean")
        return torch.where(target > 0, target * (torch.log(target) - log_input), torch.zeros_like(target)).mean()
    return float(0.5 * kl_div_mean(p.clamp_min(tiny).log(), m) + 0.5 * kl_div_mean(q.clamp_min(tiny).log(), m))


def unlearning_score(probs_a, probs_b, convention: str = "per_sample") -> float:
    """phi = 1 - JSD of two models' softmax outputs (dissertation Eq. 3.3) in one of
    JSD_CONVENTIONS; 1 = same outputs. The dissertation's tables use "bad_teacher"."""
    return 1.0 - js_divergence(probs_a, probs_b, convention)


def entropy(probs) -> np.ndarray:
    """(N, m) probabilities -> (N,) float64 Shannon entropy in nats, 0 * log 0 = 0."""
    p = _probs(probs)
    return (-torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(1)).numpy()


MIA_VARIANTS = {
    "logreg": "sklearn LogisticRegression(class_weight='balanced', random_state=seed) (lbfgs, L2, C=1)",
    "svc": "sklearn SVC(class_weight='balanced', random_state=seed) (RBF kernel, C=1)",
}
MIA_SCORING = ("features: entropy of each softmax row; attack train set: retain-train rows labelled 1, "
               "test rows labelled 0; score: mean of the classifier's .predict() 0/1 labels on the forget "
               "rows (Chundawat et al. 2023 code, dissertation Fig. 3.3)")


@dataclass(frozen=True)
class MIAResult:
    """score: mean predicted membership (0/1 .predict labels) on D_f; attack: key of MIA_VARIANTS.

    mean_proba is the mean predicted membership probability (logreg only, NaN for svc), for
    information; `score` is the dissertation's number.
    """

    score: float
    attack: str
    description: str
    mean_proba: float
    n_retain: int
    n_test: int
    n_forget: int


def _subsample(n: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if cap is None or n <= cap else np.sort(rng.choice(n, cap, replace=False))


def mia(probs_retain, probs_test, probs_forget, *, attack: str = "logreg", seed: int = 0,
        max_train: int | None = None) -> MIAResult:
    """Membership-inference attack score of one model (Chundawat et al. 2023; dissertation Fig. 3.3).

    probs_retain (N_r, m): the model's softmax on the retain TRAINING samples (members, label 1);
    probs_test (N_t, m): on the test samples (non-members, label 0); probs_forget (N_f, m): on the
    forget samples to attack. The attack classifier (MIA_VARIANTS[attack]) is fit on the entropies
    of retain + test rows and the score is the mean of its 0/1 `.predict` on the forget rows.
    max_train caps each of the two training groups by a seeded subsample (for SVC, whose fit is
    quadratic in the samples); None uses everything. Deterministic for a given seed.
    """
    if attack not in MIA_VARIANTS:
        raise ValueError(f"attack must be one of {sorted(MIA_VARIANTS)}, got {attack!r}")
    if max_train is not None and (int(max_train) != max_train or max_train < 1):
        raise ValueError(f"max_train must be a positive integer or None, got {max_train!r}")
    pr, pt, pf = _probs(probs_retain, "probs_retain"), _probs(probs_test, "probs_test"), \
        _probs(probs_forget, "probs_forget")
    if not pr.shape[1] == pt.shape[1] == pf.shape[1]:
        raise ValueError(f"probs_retain, probs_test and probs_forget must have the same number of classes, "
                         f"got {pr.shape[1]}, {pt.shape[1]}, {pf.shape[1]}")
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    rng = np.random.default_rng(seed)
    hr, ht, hf_ = entropy(pr), entropy(pt), entropy(pf)
    hr, ht = hr[_subsample(len(hr), max_train, rng)], ht[_subsample(len(ht), max_train, rng)]
    X = np.concatenate([hr, ht])[:, None]                                   # (N_r + N_t, 1)
    Y = np.concatenate([np.ones(len(hr), np.int64), np.zeros(len(ht), np.int64)])
    clf = (LogisticRegression(class_weight="balanced", random_state=seed) if attack == "logreg"
           else SVC(class_weight="balanced", random_state=seed))
    clf.fit(X, Y)
    Xf = hf_[:, None]                                                       # (N_f, 1)
    proba = float(clf.predict_proba(Xf)[:, 1].mean()) if attack == "logreg" else math.nan
    return MIAResult(score=float(clf.predict(Xf).mean()), attack=attack,
                     description=f"{MIA_VARIANTS[attack]}; {MIA_SCORING}", mean_proba=proba,
                     n_retain=len(hr), n_test=len(ht), n_forget=len(hf_))


# --------------------------------------------------------------------------- relearning and editing

def _inputs(X, spec: MLPSpec, name: str, device) -> torch.Tensor:
    t = X.detach() if isinstance(X, torch.Tensor) else torch.from_numpy(np.asarray(X))
    if t.ndim != 2 or t.shape[1] != spec.in_features:
        raise ValueError(f"{name} must have shape (N, {spec.in_features}), got {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty: the set has no samples")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    return t.to(device=device, dtype=torch.float32)


def _acc(theta: torch.Tensor, spec: MLPSpec, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """theta (B, P) -> (B,) accuracy on (X, y)."""
    with torch.no_grad():
        return (batched_logits(theta, spec, X).argmax(2) == y).float().mean(1)


@dataclass(frozen=True)
class AnamnesisResult:
    """Relearning steps on D_f to reach target_acc = (1 - alpha) * original_acc on D_f (validation).

    steps_* is the first SGD step count (0 = before any step; checked every eval_every steps) at
    which the model's D_f validation accuracy reached target_acc; a model that never got there is
    reported with steps = max_steps and reached_* = False. ratio = steps_unlearned / steps_retrained
    (inf when only the retrained model needs 0 steps, NaN when both do); ratio_kind says whether it
    is "exact", a "lower" bound (only the unlearned model capped), an "upper" bound (only the
    retrained model capped) or "undetermined" (both capped).
    """

    steps_unlearned: int
    steps_retrained: int
    ratio: float
    ratio_kind: str
    reached_unlearned: bool
    reached_retrained: bool
    original_acc: float
    target_acc: float
    final_acc_unlearned: float
    final_acc_retrained: float
    max_steps: int


def anamnesis_ratio(steps_unlearned: int, steps_retrained: int) -> float:
    """steps_unlearned / steps_retrained, inf when only the denominator is 0, NaN when both are."""
    if steps_retrained == 0:
        return math.nan if steps_unlearned == 0 else math.inf
    return steps_unlearned / steps_retrained


def anamnesis_index(unlearned: torch.Tensor, retrained: torch.Tensor, original: torch.Tensor, spec: MLPSpec,
                    X_forget_train, y_forget_train, X_forget_val, y_forget_val, *, alpha: float = 0.05,
                    lr: float = 0.01, batch_size: int = 32, max_steps: int = 1000, eval_every: int = 1,
                    seed: int = 0) -> AnamnesisResult:
    """Anamnesis index (Chundawat et al. 2023, zero-shot unlearning): how fast D_f is relearnt.

    unlearned, retrained, original: (P,) flat parameters. Both the unlearned and the retrained model
    are fine-tuned by plain SGD (lr, minibatches of batch_size drawn without replacement per epoch
    from the D_f training samples X_forget_train (N, D), y_forget_train (N,), seeded) as ONE (2, P)
    batched computation, so both see the same minibatches; their D_f accuracy on the validation
    samples is measured every eval_every steps until it reaches (1 - alpha) * the original model's
    accuracy there, or max_steps. Deterministic for a seed on one device.
    """
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec must be an MLPSpec, got {type(spec).__name__}")
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must lie in [0, 1), got {alpha}")
    for name, v in (("batch_size", batch_size), ("max_steps", max_steps), ("eval_every", eval_every)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    thetas = [check_flat(t, spec, n) for t, n in ((unlearned, "unlearned"), (retrained, "retrained"),
                                                   (original, "original"))]
    if any(t.shape[0] != 1 for t in thetas):
        raise ValueError("unlearned, retrained and original must each be ONE (P,) parameter vector")
    dev = thetas[0].device
    Xtr, Xva = _inputs(X_forget_train, spec, "X_forget_train", dev), _inputs(X_forget_val, spec, "X_forget_val", dev)
    m = spec.num_classes
    ytr = _labels(y_forget_train, Xtr.shape[0], m, "y_forget_train").to(dev)
    yva = _labels(y_forget_val, Xva.shape[0], m, "y_forget_val").to(dev)

    orig_acc = float(_acc(thetas[2].to(dev, torch.float32), spec, Xva, yva)[0])
    target = (1 - alpha) * orig_acc
    theta = torch.cat(thetas[:2]).to(dev, torch.float32).clone()           # (2, P)
    steps: list[int | None] = [0 if float(a) >= target else None for a in _acc(theta, spec, Xva, yva)]
    gen = torch.Generator().manual_seed(int(seed))
    n, order, pos, step = Xtr.shape[0], torch.empty(0, dtype=torch.int64), 0, 0
    bs = min(int(batch_size), n)
    while step < max_steps and None in steps:
        if pos + bs > len(order):                                           # new epoch, same for both models
            order, pos = torch.randperm(n, generator=gen).to(dev), 0
        idx = order[pos:pos + bs]
        pos += bs
        theta.requires_grad_(True)
        logits = batched_logits(theta, spec, Xtr[idx])                      # (2, S, m)
        # sum of the two models' mean losses: each row of theta gets only its own gradient
        loss = F.cross_entropy(logits.flatten(0, 1), ytr[idx].repeat(2), reduction="sum") / len(idx)
        (g,) = torch.autograd.grad(loss, theta)
        theta = (theta - lr * g).detach()
        step += 1
        if step % eval_every == 0 or step == max_steps:
            for i, a in enumerate(_acc(theta, spec, Xva, yva)):
                if steps[i] is None and float(a) >= target:
                    steps[i] = step
    final = _acc(theta, spec, Xva, yva)
    reached = [s is not None for s in steps]
    su, sr = (s if s is not None else int(max_steps) for s in steps)
    kind = {(True, True): "exact", (False, True): "lower", (True, False): "upper",
            (False, False): "undetermined"}[tuple(reached)]
    return AnamnesisResult(steps_unlearned=su, steps_retrained=sr, ratio=anamnesis_ratio(su, sr), ratio_kind=kind,
                           reached_unlearned=reached[0], reached_retrained=reached[1], original_acc=orig_acc,
                           target_acc=target, final_acc_unlearned=float(final[0]),
                           final_acc_retrained=float(final[1]), max_steps=int(max_steps))


@dataclass(frozen=True)
class EditLocality:
    """retain_overlap: prediction overlap of the edited and original model on D_r inputs;
    param_distance: L2 distance of their flat parameter vectors."""

    retain_overlap: float
    param_distance: float


def edit_locality(edited: torch.Tensor, original: torch.Tensor, spec: MLPSpec, X_retain) -> EditLocality:
    """How local an edit of `original` (P,) into `edited` (P,) is; X_retain (N, D) the D_r inputs."""
    e, o = check_flat(edited, spec, "edited"), check_flat(original, spec, "original")
    if e.shape[0] != 1 or o.shape[0] != 1:
        raise ValueError("edited and original must each be ONE (P,) parameter vector")
    X = _inputs(X_retain, spec, "X_retain", e.device)
    with torch.no_grad():
        preds = batched_logits(torch.cat([e, o.to(e.device)]).float(), spec, X).argmax(2)  # (2, N)
    dist = (e.double().cpu() - o.double().cpu()).norm()
    return EditLocality(retain_overlap=float((preds[0] == preds[1]).double().mean()), param_distance=float(dist))


# ------------------------------------------------------------------------------------- memorization

def _as_store(stored, spec: MLPSpec):
    if isinstance(stored, torch.Tensor):
        ok = stored.is_floating_point()
    elif isinstance(stored, np.ndarray):
        ok = np.issubdtype(stored.dtype, np.floating)
    else:
        raise TypeError(f"stored must be a numpy array/memmap or torch tensor (n, P), got {type(stored).__name__}")
    if not ok:
        raise TypeError(f"stored parameters must be floating point, got {stored.dtype}")
    if stored.ndim != 2 or stored.shape[1] != spec.num_params:
        raise ValueError(f"stored must have shape (n, {spec.num_params}) for spec {spec.layer_sizes}, "
                         f"got {tuple(stored.shape)}")
    if stored.shape[0] == 0:
        raise ValueError("stored holds no checkpoints")
    return stored


def _rows(stored, idx: np.ndarray) -> torch.Tensor:
    """stored[idx] as (k, P) float64; idx sorted for memmap locality by the caller."""
    if isinstance(stored, torch.Tensor):
        return stored[torch.from_numpy(idx).to(stored.device)].detach().cpu().double()
    return torch.from_numpy(np.asarray(stored[idx], dtype=np.float64))


def invariant_features(params: torch.Tensor, spec: MLPSpec) -> torch.Tensor:
    """(B, P) -> (B, F) features unchanged by any hidden-unit permutation, with
    ||f(a) - f(b)|| <= min_perm ||permute(a) - b|| (a lower bound on the permutation distance).

    The parameters are split into disjoint groups whose norms a permutation only reorders: for each
    hidden layer the (W_l row, b_l entry) of each unit, the columns of the last weight, and the
    output bias (never permuted). Per layer the norms are sorted; sorted matching minimises the sum
    of squared norm differences (rearrangement inequality) and |‖u‖ - ‖v‖| <= ‖u - v‖ per group.
    """
    p = params.double()
    feats = []
    layers = spec.unflatten(p)                                              # [(W (B, out, in), b (B, out))]
    for W, b in layers[:-1]:
        rows = torch.cat([W, b[:, :, None]], 2).norm(dim=2)                  # (B, h_l)
        feats.append(rows.sort(1).values)
    W, b = layers[-1]
    feats.append(W.norm(dim=1).sort(1).values)                              # (B, h_last) column norms
    feats.append(b)                                                         # (B, m)
    return torch.cat(feats, 1)


def _all_perms(spec: MLPSpec) -> torch.Tensor:
    """Every hidden-unit permutation of the spec -> (prod h_l!, H) int64."""
    per_layer = [list(itertools.permutations(range(h))) for h in spec.hidden_sizes]
    return torch.tensor([sum(c, ()) for c in itertools.product(*per_layer)], dtype=torch.int64)


def _units(params: torch.Tensor, spec: MLPSpec, k: int, incoming_only: bool = False) -> torch.Tensor:
    """(B, P) -> (B, h_k, D) vectors of hidden layer k's units: W_k row, b_k entry, W_{k+1} column
    (the last left out with incoming_only)."""
    (W, b), (W2, _) = spec.unflatten(params)[k:k + 2]
    parts = [W, b[:, :, None]] + ([] if incoming_only else [W2.transpose(1, 2)])
    return torch.cat(parts, 2)


@dataclass(frozen=True)
class NearestCheckpoint:
    """distance / index of the nearest stored checkpoint up to hidden-unit permutation (float/int for
    one query, (B,) arrays for a batch); certified: no stored checkpoint left unchecked could be
    closer (the lower bound of every skipped one is >= distance); method: "enumerate" (all
    permutations, exact), "hungarian" (exact for one hidden layer) or "hungarian-cd" (layer-wise
    coordinate descent for several hidden layers: an upper bound on the true distance)."""

    distance: float | np.ndarray
    index: int | np.ndarray
    certified: bool | np.ndarray
    method: str
    candidates_checked: int | np.ndarray


class CheckpointIndex:
    """Permutation-invariant nearest-neighbour search over stored checkpoints (n, P).

    stored: numpy array / memmap or torch tensor, read in chunks of `chunk` rows once to build the
    (n, F) invariant features (float64, small). A query ranks all checkpoints by the feature lower
    bound, then computes the exact permutation distance of candidates in that order, in blocks that
    double from `block`, until the next lower bound is >= the best distance (certified) or
    max_candidates were checked. Per candidate: all prod h_l! permutations when that is
    <= max_perms, else Hungarian matching (scipy linear_sum_assignment) of per-unit costs.
    """

    def __init__(self, stored, spec: MLPSpec, *, chunk: int = 8192, max_perms: int = 720):
        if not isinstance(spec, MLPSpec):
            raise TypeError(f"spec must be an MLPSpec, got {type(spec).__name__}")
        self.stored, self.spec, self.chunk = _as_store(stored, spec), spec, int(chunk)
        self.n = stored.shape[0]
        n_perms = math.prod(math.factorial(h) for h in spec.hidden_sizes)
        self.method = ("enumerate" if n_perms <= max_perms
                       else "hungarian" if len(spec.hidden_sizes) == 1 else "hungarian-cd")
        self.perms = _all_perms(spec) if self.method == "enumerate" else None
        feats = []
        for s in range(0, self.n, self.chunk):
            rows = _rows(self.stored, np.arange(s, min(s + self.chunk, self.n)))  # (c, P)
            if not torch.isfinite(rows).all():
                bad = s + int((~torch.isfinite(rows)).any(1).nonzero()[0, 0])
                raise ValueError(f"stored checkpoint {bad} holds NaN or Inf values")
            feats.append(invariant_features(rows, spec))
        self.features = torch.cat(feats)                                    # (n, F)

    def _distances(self, q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        """Permutation distance of one query q (P,) to candidates C (k, P), float64 -> (k,); for
        "enumerate" exact, for "hungarian-cd" an upper bound (coordinate descent over layers)."""
        spec, k = self.spec, C.shape[0]
        if self.method == "enumerate":
            Q = permute(q.expand(len(self.perms), -1).contiguous(), spec, self.perms)  # (n_perm, P)
            step = max(1, (1 << 22) // len(Q))                                 # bound the (k, n_perm) block
            out = []
            for s in range(0, k, step):
                c = C[s:s + step]
                d2 = (c * c).sum(1, keepdim=True) + (Q * Q).sum(1) - 2 * c @ Q.T  # (k', n_perm)
                out.append((Q[d2.argmin(1)] - c).norm(dim=1))                   # exact distance of the best
            return torch.cat(out)
        from scipy.optimize import linear_sum_assignment

        perms = torch.cat([torch.arange(h) for h in spec.hidden_sizes]).repeat(k, 1)  # (k, H), identity

        def match(l: int, incoming_only: bool) -> bool:
            """Re-match hidden layer l of every candidate by LAP on per-unit costs; True if changed."""
            o, h = spec.hidden_offsets[l], spec.hidden_sizes[l]
            Qp = permute(q.expand(k, -1).contiguous(), spec, perms)            # (k, P)
            cost = torch.cdist(_units(C, spec, l, incoming_only),
                               _units(Qp, spec, l, incoming_only)).square().numpy()  # (k, h, h): stored r, query j
            changed = False
            for i in range(k):
                sigma = torch.from_numpy(linear_sum_assignment(cost[i])[1])
                new = perms[i, o:o + h][sigma]                                  # query unit sigma(r) -> slot r
                changed |= not torch.equal(new, perms[i, o:o + h])
                perms[i, o:o + h] = new
            return changed

        # forward init on incoming weights only (exact for a permuted copy), then coordinate descent with
        # full unit costs: each LAP minimises the exact distance given the other layers, so it never worsens
        for l in range(len(spec.hidden_sizes)):
            match(l, True)
        for _ in range(20):
            if not any([match(l, False) for l in range(len(spec.hidden_sizes))]):
                break
        return (permute(q.expand(k, -1).contiguous(), spec, perms) - C).norm(dim=1)

    def _scan_lap(self, q: torch.Tensor, C: torch.Tensor, idx: np.ndarray, best: list) -> None:
        """One hidden layer: exact distance = Hungarian on unit inner products, pruned by the
        row/column-max relaxation of the assignment (a lower bound); updates best = [d, index, perm]."""
        from scipy.optimize import linear_sum_assignment

        spec = self.spec
        (W, b), (W2, _) = spec.unflatten(C)                                     # (k, h, in), (k, h), (k, out, h)
        (Wq, bq), (W2q, _) = [(w[0], c[0]) for w, c in spec.unflatten(q[None])]
        # G[k, r, j] = <stored unit r, query unit j>, units = (W row, b entry, W2 column); no copies of C
        G = W @ Wq.T + b[:, :, None] * bq + W2.transpose(1, 2) @ W2q          # (k, h, h)
        bL = spec.layer_slices(1)[1]                                            # output bias, never permuted
        const = (q * q).sum() + (C * C).sum(1) - 2 * (C[:, bL] @ q[bL])       # (k,)
        lb2 = const - 2 * torch.minimum(G.amax(2).sum(1), G.amax(1).sum(1))    # relaxed assignment
        slack = 1e-10 * (const.abs() + 1)                                       # float64 rounding of d^2
        for j in np.argsort(lb2.numpy(), kind="stable"):
            if lb2[j] - slack[j] > best[0] ** 2:
                break
            _, col = linear_sum_assignment(G[j].numpy(), maximize=True)
            d = math.sqrt(max(float(const[j] - 2 * G[j][np.arange(len(col)), col].sum()), 0.0))
            if d < best[0]:
                best[:] = [d, int(idx[j]), torch.from_numpy(col)]

    def _query_one(self, q: torch.Tensor, banned: np.ndarray | None, block: int, max_candidates: int | None):
        lb = (self.features - invariant_features(q[None], self.spec)).norm(dim=1).numpy()  # (n,)
        if banned is not None:
            lb[banned] = np.inf
        order = np.argsort(lb, kind="stable")
        n_ok = int(np.isfinite(lb).sum())
        if n_ok == 0:
            raise ValueError("no stored checkpoint is left to compare with after the exclusions")
        cap = n_ok if max_candidates is None else min(n_ok, int(max_candidates))
        best, done, size, certified = [math.inf, -1, None], 0, int(block), False
        while done < cap:
            srt = np.sort(order[done:min(done + size, cap)])                  # sorted: memmap locality
            for s in range(0, len(srt), self.chunk):
                part = srt[s:s + self.chunk]
                C = _rows(self.stored, part)
                if self.method == "hungarian":
                    self._scan_lap(q, C, part, best)
                else:
                    d = self._distances(q, C)
                    j = int(d.argmin())
                    if float(d[j]) < best[0]:
                        best = [float(d[j]), int(part[j]), None]
            done += len(srt)
            size *= 2
            # lower bounds are float64 norms; the slack only absorbs their rounding
            if done >= n_ok or lb[order[done]] >= best[0] * (1 + 1e-9) + 1e-12:
                certified = True
                break
        if best[2] is not None:                                                 # exact distance of the winner,
            Qp = permute(q[None], self.spec, best[2][None])                    # free of d^2 cancellation
            best[0] = float((Qp[0] - _rows(self.stored, np.array([best[1]]))[0]).norm())
        return best[0], best[1], certified, done

    def query(self, params, *, exclude: Sequence[np.ndarray | None] | None = None, block: int = 64,
              max_candidates: int | None = None) -> NearestCheckpoint:
        """params (P,) or (B, P) -> NearestCheckpoint; exclude[b] (index array or bool mask (n,)) are
        stored checkpoints query b may not match (e.g. itself)."""
        if int(block) != block or block < 1:
            raise ValueError(f"block must be a positive integer, got {block!r}")
        q = check_flat(torch.as_tensor(params) if isinstance(params, np.ndarray) else params, self.spec,
                       "params").detach().cpu().double()
        if exclude is not None and len(exclude) != q.shape[0]:
            raise ValueError(f"exclude needs one entry per query ({q.shape[0]}), got {len(exclude)}")
        out = []
        for b in range(q.shape[0]):
            ban = None
            if exclude is not None and exclude[b] is not None:
                ban = np.asarray(exclude[b])
                if ban.dtype != bool and ban.size and (ban.min() < 0 or ban.max() >= self.n):
                    raise ValueError(f"exclude[{b}] holds indices outside 0..{self.n - 1}")
            out.append(self._query_one(q[b], ban, block, max_candidates))
        d, i, c, k = (np.array(v) for v in zip(*out))
        if params.ndim == 1:
            return NearestCheckpoint(float(d[0]), int(i[0]), bool(c[0]), self.method, int(k[0]))
        return NearestCheckpoint(d, i, c, self.method, k)


def nearest_checkpoint(params, stored, spec: MLPSpec, *, chunk: int = 8192, max_perms: int = 720,
                       block: int = 64, max_candidates: int | None = None) -> NearestCheckpoint:
    """Distance from params (P,) or (B, P) to the nearest of `stored` (n, P) over all hidden-unit
    permutations (a permuted MLP computes the same function). See CheckpointIndex; build one
    yourself to query the same store repeatedly."""
    return CheckpointIndex(stored, spec, chunk=chunk, max_perms=max_perms).query(
        params, block=block, max_candidates=max_candidates)


@dataclass(frozen=True)
class NeighbourDistance:
    """median of `distances`: each sampled stored checkpoint's permutation distance to its nearest
    OTHER stored checkpoint (other group, when groups were given); indices: the sampled ones."""

    median: float
    distances: np.ndarray
    indices: np.ndarray
    neighbours: np.ndarray
    certified: bool


def neighbour_distance(stored, spec: MLPSpec, *, n_sample: int = 64, seed: int = 0, groups=None,
                       index: CheckpointIndex | None = None, **query_kw) -> NeighbourDistance:
    """Typical distance between neighbouring stored checkpoints, to set generated models' nearest
    distance beside: for n_sample seeded random checkpoints, the distance to the nearest other one.

    groups (n,) optional labels (e.g. the store's `run` array): neighbours in the same group are
    excluded too (otherwise the next checkpoint of the same run is usually the nearest).
    """
    idx_obj = index if index is not None else CheckpointIndex(stored, spec)
    n = idx_obj.n
    if n < 2:
        raise ValueError("neighbour_distance needs at least 2 stored checkpoints")
    if int(n_sample) != n_sample or n_sample < 1:
        raise ValueError(f"n_sample must be a positive integer, got {n_sample!r}")
    g = None
    if groups is not None:
        g = np.asarray(groups.cpu() if isinstance(groups, torch.Tensor) else groups)
        if g.shape != (n,):
            raise ValueError(f"groups must have shape ({n},), got {g.shape}")
    pick = np.sort(np.random.default_rng(seed).choice(n, min(int(n_sample), n), replace=False))
    bans = []
    for i in pick:
        ban = (g == g[i]) if g is not None else np.zeros(n, bool)
        ban[i] = True
        bans.append(ban)
    res = idx_obj.query(_rows(idx_obj.stored, pick), exclude=bans, **query_kw)
    return NeighbourDistance(median=float(np.median(res.distance)), distances=res.distance, indices=pick,
                             neighbours=res.index, certified=bool(np.all(res.certified)))
