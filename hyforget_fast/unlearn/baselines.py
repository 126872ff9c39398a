"""Unlearning baselines: retraining, fine-tuning, NegGrad+, random labels, SSD, retrieval;
`tuned` runs a post-hoc method over a small grid and keeps what the validation split prefers.

Every method takes a model as flat parameters (P,) of an MLPSpec (order: hyforget_fast.ops.spec),
the forget classes as digit labels (as in `splits.classes`) and the DigitSplits, and returns a
BaselineResult with the unlearned parameters (P,) float32 on the same spec. D_f = training
samples of the forget classes, D_r = the other training samples. Methods see the TRAIN split
(and retrain's seed selection the VALIDATION split) only; the test split is never read here.

The post-hoc methods are their authors' published code written out on flat parameters (each
docstring names the file and function, and says where and why the package departs from it):
fine-tuning and NegGrad+ as in the SCRUB code (Kurmanji et al. 2023), random labels and SSD as
in the SSD code (Foster et al. 2024). They train through `mlp.batched_logits` with torch.optim on
one network, random draws from a torch.Generator seeded from `seed`, so each is deterministic for
a given seed. Retraining runs S seeds as ONE batched computation in the collection engine.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..collection.data import DigitSplits
from ..collection.store import CheckpointStore
from ..ops.spec import MLPSpec
from .mlp import batched_logits, check_flat
from .selection import FORGET_MAX, class_indices, group_accuracy, select


@dataclass
class BaselineResult:
    """One baseline's output. params (P,) float32 flat on the input's MLPSpec; seconds: wall clock
    of the method; hparams: every setting used (defaults included); extra: method-specific."""

    name: str
    params: torch.Tensor
    seconds: float
    hparams: dict
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- input checks
def _check_splits(splits) -> None:
    if not isinstance(splits, DigitSplits):
        raise TypeError(f"splits must be a DigitSplits, got {type(splits).__name__}")


def forget_indices(splits: DigitSplits, forget) -> list[int]:
    """Forget classes (digit labels; an int or a sequence) -> sorted label indices into splits.classes
    (`selection.class_indices`), refusing also classes without training samples."""
    _check_splits(splits)
    idx = sorted(class_indices(splits.classes, forget))
    counts = torch.bincount(splits.y_train, minlength=len(splits.classes))
    empty = [splits.classes[i] for i in idx if counts[i] == 0]
    if empty:
        raise ValueError(f"forget classes {empty} have no training samples (D_f would be empty)")
    return idx


def _check_model(params: torch.Tensor, spec: MLPSpec, splits: DigitSplits) -> torch.Tensor:
    """-> (P,) float32 detached copy; refuses a model that does not fit the data."""
    if not isinstance(spec, MLPSpec):
        raise TypeError(f"spec must be an MLPSpec, got {type(spec).__name__}")
    _check_splits(splits)
    p = check_flat(params, spec, "params")
    if p.shape[0] != 1:
        raise ValueError(f"params must be one model (P,), got {p.shape[0]} rows")
    if spec.in_features != splits.X_train.shape[1]:
        raise ValueError(f"spec takes {spec.in_features} inputs but the data has {splits.X_train.shape[1]} features")
    if spec.num_classes != len(splits.classes):
        raise ValueError(f"spec has {spec.num_classes} outputs but splits hold {len(splits.classes)} classes")
    return p[0].detach().float().clone()


def _forget_mask(y: torch.Tensor, fidx: Sequence[int]) -> torch.Tensor:
    """(N,) bool: the label is a forget class."""
    return torch.isin(y, torch.tensor(list(fidx), dtype=y.dtype, device=y.device))


def without_classes(splits: DigitSplits, fidx: Sequence[int]) -> DigitSplits:
    """A copy of `splits` with the samples of label indices `fidx` removed from train and val (test
    untouched; labels keep their indices, so the removed classes just have no samples)."""
    keep_tr, keep_va = ~_forget_mask(splits.y_train, fidx), ~_forget_mask(splits.y_val, fidx)
    return dataclasses.replace(splits, X_train=splits.X_train[keep_tr], y_train=splits.y_train[keep_tr],
                               X_val=splits.X_val[keep_va], y_val=splits.y_val[keep_va],
                               extra={**splits.extra, "removed_class_indices": list(fidx)})


def _check_positive(**kw) -> None:
    for k, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{k} must be a positive number, got {v!r}")


# ----------------------------------------------------------------------------- metrics (val)
def split_metrics(params: torch.Tensor, spec: MLPSpec, X: torch.Tensor, y: torch.Tensor,
                  fidx: Sequence[int]) -> dict:
    """Metrics of B networks (B, P) on one labelled set: per-class class_loss / class_acc (B, m) and,
    pooled over samples, retain_acc, retain_loss, forget_acc, forget_loss (B,)."""
    from ..ops import functional as ops
    m = spec.num_classes
    cm = ops.class_metrics(params.float(), spec, X, y, m)
    cnt = torch.bincount(y, minlength=m)                                  # (m,)
    out = {"class_loss": cm.class_loss, "class_acc": cm.class_acc}
    for name, idx in (("retain", [c for c in range(m) if c not in fidx]), ("forget", list(fidx))):
        out[f"{name}_acc"] = group_accuracy(cm.class_acc, cnt, idx)       # (B,) pooled over samples
        out[f"{name}_loss"] = group_accuracy(cm.class_loss, cnt, idx)
    return out


# ----------------------------------------------------------------------------- retraining
def train_from_scratch(spec: MLPSpec, splits: DigitSplits, runs: int = 5, epochs: int = 25, lr: float = 0.1,
                       batch_size: int = 32, seed: int = 0, device="cpu") -> torch.Tensor:
    """Train `runs` fresh networks at once with the collection engine -> (runs, P) float32 params.

    Plain SGD on the whole TRAIN split of `splits` (no undersampling, no forgetting phase, one fixed
    lr), PyTorch-default init per run; the runs share the minibatch order and differ in their init.
    The network shape is the engine's: 784 inputs, spec's hidden sizes, one output per class."""
    from ..collection.collect import BlockTrainer, CollectConfig
    _check_positive(runs=runs, epochs=epochs, lr=lr, batch_size=batch_size)
    if spec.in_features != 784 or spec.num_classes != len(splits.classes):
        raise ValueError(f"the collection engine trains 784 -> hidden -> {len(splits.classes)} networks; "
                         f"spec is {spec.layer_sizes}")
    if len(splits.y_train) == 0:
        raise ValueError("the training split is empty")
    cfg = CollectConfig(classes=tuple(splits.classes), pivots=(), hidden=spec.hidden_sizes, runs=int(runs),
                        block_runs=int(runs), epochs=int(epochs), batch_size=int(batch_size),
                        lr_range=(float(lr), float(lr)), undersample_prob=0.0, forget_prob=0.0, seed=int(seed),
                        split_seed=splits.seed, fractions=tuple(splits.fractions))
    tr = BlockTrainer(cfg, splits, 0, device)
    for step in range(1, tr.total_steps + 1):   # the engine's SGD steps without collection offers
        tr.sgd_step(*tr.sample_batch(step))
    return tr.flat_params().float().cpu()


def retrain(params: torch.Tensor | None, spec: MLPSpec, forget, splits: DigitSplits, *, seeds: int = 5,
            epochs: int = 25, lr: float = 0.1, batch_size: int = 32, seed: int = 0, device="cpu") -> BaselineResult:
    """Retrain from scratch without D_f (the gold standard). `params` only has its shape checked
    (None allowed): retraining starts from fresh inits.

    Trains `seeds` networks at once on the train split with every D_f sample removed (the engine
    never holds one), then picks the seed with the highest pooled retain VALIDATION accuracy (ties:
    lower retain val loss). Tiny ReLU MLPs often die, hence several seeds. Defaults follow the
    mnist4 preset (25 epochs, batch 32) with a fixed lr of 0.1 from its lr_range (0.01, 0.3).
    extra: val metrics of all seeds, chosen index, the median seed (by retain val acc) and its params."""
    if params is not None:
        _check_model(params, spec, splits)
    # forget = () trains on every class: a classifier from outside the store (a user's model)
    fidx = [] if isinstance(forget, (list, tuple)) and len(forget) == 0 else forget_indices(splits, forget)
    _check_positive(seeds=seeds)
    t0 = time.perf_counter()
    kept = without_classes(splits, fidx)
    P = train_from_scratch(spec, kept, seeds, epochs, lr, batch_size, seed, device)   # (S, P)
    val = split_metrics(P, spec, splits.X_val, splits.y_val, fidx)
    acc, loss = val["retain_acc"].nan_to_num(-1.0), val["retain_loss"].nan_to_num(float("inf"))
    order = sorted(range(len(P)), key=lambda i: (-float(acc[i]), float(loss[i]), i))  # best first
    best, median = order[0], order[len(order) // 2]
    seconds = time.perf_counter() - t0
    per_seed = {k: v.tolist() for k, v in val.items()}
    return BaselineResult("retrain", P[best].clone(), seconds,
                          {"seeds": int(seeds), "epochs": int(epochs), "lr": float(lr), "batch_size": int(batch_size),
                           "seed": int(seed), "optimizer": "sgd", "init": "pytorch-default",
                           "selection": "max retain val acc, ties: min retain val loss"},
                          {"chosen": best, "val": per_seed, "median_index": median, "median_params": P[median].clone(),
                           "median_val": {k: v[median] for k, v in per_seed.items()},
                           "forget_class_indices": fidx, "train_samples": len(kept.y_train)})


# ----------------------------------------------------------------------------- gradient methods
# Each post-hoc method below follows one published implementation, named in its docstring, step
# for step: the same loss, optimiser, batch sizes and batch pairing; only the random draws come
# from a torch.Generator seeded by `seed` (one torch.randperm per data loader per epoch, in the
# order the authors' loops first draw from their loaders), so every method is deterministic per
# seed. Departures are listed in each docstring with their reason.
def _slices(idx: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive batches of an index vector, the last one short (DataLoader, drop_last=False)."""
    return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One shuffled epoch over range(n): batches of torch.randperm(n, generator=gen), as a
    DataLoader(shuffle=True) whose sampler draws from `gen` yields them."""
    return _slices(torch.randperm(n, generator=gen), batch_size)


def authors_order(y: torch.Tensor, fidx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(retain, forget) index vectors into y in the order of the SSD authors' data sets
    (`build_retain_forget_sets` of their forget_full_class_strategies.py): class by class in
    ascending label index, each class's samples in their order in the split."""
    order = torch.sort(y, stable=True).indices                             # by class, stable
    fm = _forget_mask(y[order], fidx)
    return order[~fm], order[fm]


def _ce(p: torch.Tensor, spec: MLPSpec, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the network p (P,) on X (n, D), y (n,)."""
    return F.cross_entropy(batched_logits(p[None], spec, X)[0], y)    # logits (n, m)


def _train(p: torch.Tensor, epochs: int, lr: float, batches: Callable[[], list],
           loss_fn: Callable[[torch.Tensor, object], torch.Tensor], optimizer: str = "sgd") -> torch.Tensor:
    """Minibatch training of the flat parameters: for each epoch, for each item of batches(), one
    torch.optim step ("sgd": plain SGD, no momentum or decay; "adam": torch's Adam defaults) on
    loss_fn(q, item). Both optimisers act element by element, so a flat vector trains exactly as
    the module's separate tensors would."""
    q = p.clone().requires_grad_(True)
    opt = torch.optim.SGD([q], lr=lr) if optimizer == "sgd" else torch.optim.Adam([q], lr=lr)
    for _ in range(int(epochs)):
        for item in batches():
            opt.zero_grad(set_to_none=True)
            loss_fn(q, item).backward()
            opt.step()
    out = q.detach()
    if not torch.isfinite(out).all():
        raise FloatingPointError("unlearning diverged (non-finite parameters); lower lr or epochs")
    return out


def _prepare(params, spec, forget, splits, **positive):
    p = _check_model(params, spec, splits)
    fidx = forget_indices(splits, forget)
    _check_positive(**positive)
    fm = _forget_mask(splits.y_train, fidx)
    return p, fidx, (splits.X_train[~fm], splits.y_train[~fm]), (splits.X_train[fm], splits.y_train[fm])


def _check_l2(l2) -> float:
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2 must be a non-negative number, got {l2!r}")
    return float(l2)


def _l2_penalty(q: torch.Tensor, p0: torch.Tensor, l2: float) -> torch.Tensor:
    """SCRUB's `l2_penalty`: (l2 / 2) * ||q - p0||^2, the distance to the starting model."""
    return (l2 / 2.0) * (q - p0).pow(2).sum()


def finetune(params: torch.Tensor, spec: MLPSpec, forget, splits: DigitSplits, *, epochs: int = 10,
             lr: float = 0.01, batch_size: int = 32, l2: float = 0.0, seed: int = 0) -> BaselineResult:
    """Fine-tune on D_r only (catastrophic forgetting of D_f), as `finetune` of the SCRUB code
    (Kurmanji et al. 2023, small_scale_unlearning.ipynb, its `run_train_epoch`): plain SGD (no
    momentum, no weight decay) on the loss CE(D_r batch) + (l2 / 2) ||theta - theta_0||^2, over D_r
    in its split order reshuffled each epoch; defaults as there: 10 epochs, lr 0.01, batch 32.

    l2 is SCRUB's `args.weight_decay`, the weight decay the original model was trained with; the
    collection trains with plain SGD, so its counterpart here is 0 (the default), which is also
    SCRUB's large-scale `train_vanilla` variant."""
    p, fidx, (Xr, yr), _ = _prepare(params, spec, forget, splits, epochs=epochs, lr=lr, batch_size=batch_size)
    l2 = _check_l2(l2)
    t0 = time.perf_counter()
    gen, p0 = torch.Generator().manual_seed(int(seed)), p.clone()

    def loss(q, idx):
        out = _ce(q, spec, Xr[idx], yr[idx])
        return out + _l2_penalty(q, p0, l2) if l2 else out

    out = _train(p, epochs, lr, lambda: _batches(len(yr), int(batch_size), gen), loss)
    return BaselineResult("finetune", out, time.perf_counter() - t0,
                          {"epochs": int(epochs), "lr": float(lr), "batch_size": int(batch_size), "l2": l2,
                           "seed": int(seed), "optimizer": "sgd"}, {"forget_class_indices": fidx})


def neggrad_plus(params: torch.Tensor, spec: MLPSpec, forget, splits: DigitSplits, *, beta: float = 0.95,
                 epochs: int = 10, lr: float = 0.01, batch_size: int = 32, forget_batch_size: int = 64,
                 l2: float = 0.0, seed: int = 0) -> BaselineResult:
    """NegGrad+ as the SCRUB code runs it (Kurmanji et al. 2023, small_scale_unlearning.ipynb:
    `negative_grad` / `run_neggrad_epoch`): plain SGD on
        beta * (CE(D_r batch) + (l2 / 2) ||theta - theta_0||^2) - (1 - beta) * CE(D_f batch).
    Each epoch walks a reshuffled D_r in batches of `batch_size`; step i pairs retain batch i with
    D_f batch i mod n_f of ONE shuffle of D_f drawn at the start of that epoch (the authors'
    zip(retain_loader, cycle(forget_loader)): itertools.cycle replays its first pass, and a new
    cycle starts every epoch). Defaults as there: beta 0.95, 10 epochs, lr 0.01, retain batch 32,
    forget batch 64. l2 as in `finetune` (0 = no weight decay in the original's training; also
    the form of SCRUB's thirdparty `train_negrad`)."""
    p, fidx, (Xr, yr), (Xf, yf) = _prepare(params, spec, forget, splits, epochs=epochs, lr=lr,
                                           batch_size=batch_size, forget_batch_size=forget_batch_size)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    l2 = _check_l2(l2)
    t0 = time.perf_counter()
    gen, B, Bf, p0 = torch.Generator().manual_seed(int(seed)), int(batch_size), int(forget_batch_size), p.clone()

    def batches():
        r = _batches(len(yr), B, gen)                                      # the retain loader's epoch
        f = _batches(len(yf), Bf, gen)                                     # cycle's one pass of D_f
        return [(ri, f[i % len(f)]) for i, ri in enumerate(r)]

    def loss(q, item):
        r, f = item
        keep = _ce(q, spec, Xr[r], yr[r]) + (_l2_penalty(q, p0, l2) if l2 else 0.0)
        return beta * keep - (1.0 - beta) * _ce(q, spec, Xf[f], yf[f])

    out = _train(p, epochs, lr, batches, loss)
    return BaselineResult("neggrad_plus", out, time.perf_counter() - t0,
                          {"beta": float(beta), "epochs": int(epochs), "lr": float(lr), "batch_size": B,
                           "forget_batch_size": Bf, "l2": l2, "seed": int(seed), "optimizer": "sgd"},
                          {"forget_class_indices": fidx})


def random_labels(params: torch.Tensor, spec: MLPSpec, forget, splits: DigitSplits, *, epochs: int = 3,
                  lr: float = 1e-4, batch_size: int = 128, seed: int = 0) -> BaselineResult:
    """Random relabelling (Graves et al. 2021, "amnesiac" unlearning) as the SSD authors' code runs
    it (`amnesiac` in forget_full_class_strategies.py of Foster et al., from the bad-teacher code of
    Chundawat et al.): every D_f sample gets ONE random label, drawn once and uniformly from the
    retain classes; the relabelled D_f followed by D_r (both in `authors_order`) is trained on,
    shuffled each epoch, with Adam (torch defaults) on CE. Defaults as there: 3 epochs, lr 1e-4,
    batch 128. Draws: the labels first, then one permutation per epoch.

    With several forget classes the labels are drawn from the retain classes (the authors forget
    one class, whose "every other class" is exactly the retain classes)."""
    p, fidx, _, _ = _prepare(params, spec, forget, splits, epochs=epochs, lr=lr, batch_size=batch_size)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(int(seed))
    ri, fi = authors_order(splits.y_train, fidx)
    keep = torch.tensor([c for c in range(spec.num_classes) if c not in fidx])
    wrong = keep[torch.randint(len(keep), (len(fi),), generator=gen)]      # one label per D_f sample
    X = splits.X_train[torch.cat([fi, ri])]                                # (N, D): D_f then D_r
    y = torch.cat([wrong, splits.y_train[ri]])                             # (N,)
    out = _train(p, epochs, lr, lambda: _batches(len(y), int(batch_size), gen),
                 lambda q, idx: _ce(q, spec, X[idx], y[idx]), optimizer="adam")
    return BaselineResult("random_labels", out, time.perf_counter() - t0,
                          {"epochs": int(epochs), "lr": float(lr), "batch_size": int(batch_size), "seed": int(seed),
                           "optimizer": "adam", "labels": "one uniform retain-class label per D_f sample"},
                          {"forget_class_indices": fidx})


def importance(p: torch.Tensor, spec: MLPSpec, X: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """SSD importance (P,) as `ParameterPerturber.calc_importance` of the SSD authors' ssd.py: the
    squared gradient of the batch-mean CE, summed over CONSECUTIVE batches of (X, y) in the given
    order (their unshuffled DataLoader) and divided by the number of batches."""
    q = p.detach().requires_grad_(True)
    imp = torch.zeros_like(p)
    bs = _slices(torch.arange(len(y)), int(batch_size))
    for idx in bs:
        (g,) = torch.autograd.grad(_ce(q, spec, X[idx], y[idx]), q)
        imp += g * g
    return imp / len(bs)


def ssd(params: torch.Tensor, spec: MLPSpec, forget, splits: DigitSplits, *, alpha: float = 10.0,
        lam: float = 1.0, batch_size: int = 64, seed: int = 0) -> BaselineResult:
    """Selective Synaptic Dampening (Foster et al. 2024) as the authors' code computes it
    (`ssd_tuning` in forget_full_class_strategies.py; ParameterPerturber in ssd.py), no training:
    importances (`importance`) of D_f and of the full training set D, each over UNSHUFFLED batches
    of 64 in the authors' loader order: D_f class by class, and D = ConcatDataset(D_r, D_f) with D_r
    class by class (`authors_order`), so nearly every batch holds one class. Every parameter with
    imp_f > alpha * imp_D is multiplied by min(lam * imp_D / imp_f, 1). Defaults alpha = 10,
    lam = 1 as in the paper's full-class runs.

    Route: the authors' batched estimate, not the paper's per-sample diagonal Fisher. On
    single-class batches imp_f / imp_D mostly keeps to the per-sample bound n / n_f (about the
    class count; a rare parameter whose batch gradients cancel exceeds it), so alpha must lie
    below the class count to select much (TUNING_GRIDS). Nothing is random: `seed` is accepted
    for the common signature and has no effect."""
    p, fidx, _, _ = _prepare(params, spec, forget, splits, alpha=alpha, batch_size=batch_size)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a non-negative number (0 zeroes the selected parameters), got {lam!r}")
    t0 = time.perf_counter()
    ri, fi = authors_order(splits.y_train, fidx)
    X, y = splits.X_train, splits.y_train
    imp_f = importance(p, spec, X[fi], y[fi], int(batch_size))                           # (P,)
    full = torch.cat([ri, fi])                                                           # ConcatDataset
    imp_d = importance(p, spec, X[full], y[full], int(batch_size))                       # (P,)
    sel = imp_f > alpha * imp_d
    damp = torch.where(sel, (lam * imp_d / imp_f.clamp_min(1e-30)).clamp(max=1.0), torch.ones_like(p))
    out = p * damp
    return BaselineResult("ssd", out, time.perf_counter() - t0,
                          {"alpha": float(alpha), "lam": float(lam), "batch_size": int(batch_size), "seed": int(seed),
                           "importance": "authors' calc_importance: mean over unshuffled batches (authors' order) "
                                         "of the squared batch-mean CE gradient"},
                          {"forget_class_indices": fidx, "selected": int(sel.sum()),
                           "mean_dampening": float(damp[sel].mean()) if sel.any() else 1.0})


# ----------------------------------------------------------------------------- tuning
# Grids over each post-hoc method's knobs, as the unlearning literature tunes them (learning rate
# and length for the gradient methods, beta for NegGrad+, alpha / lambda for SSD), measured on the
# bundled MNIST-4 digits (bench/RESULTS.md, "Baselines as their authors wrote them") and widened
# until the choices are interior or sit at a bound that GRID_BOUNDS explains. Values run from
# mild to strong, so that among settings with equal validation scores the first (milder) wins.
TUNING_GRIDS = {
    "finetune": {"lr": (0.01, 0.03, 0.1, 0.3), "epochs": (3, 10, 25)},
    "neggrad_plus": {"beta": (0.9999, 0.999, 0.99, 0.95, 0.9), "lr": (0.1, 0.3, 1.0), "epochs": (3, 10, 25)},
    "random_labels": {"lr": (0.001, 0.003, 0.01, 0.03, 0.1, 0.3), "epochs": (1, 3, 10, 25)},
    "ssd": {"alpha": (10.0, 5.0, 3.0, 2.0, 1.5, 1.0), "lam": (1.0, 0.3, 0.1, 0.01, 0.0)},
}

# Why each grid stops where it does; the report prints the reason beside a choice at a bound.
# Counts: the demo's MNIST-4 model, forget sets {2}, {2,3}, {3}, seeds 0-2, all points pooled
# (bench/RESULTS.md, "Baselines as their authors wrote them").
_LENGTH = ("25 epochs is the retraining budget (retrain trains 25 epochs without D_f, the gold "
           "standard), so a longer point would cost more than retraining")
GRID_BOUNDS = {
    "finetune": {"lr": "0.3 is the top of the collection's training lr range; at lr 1 SGD collapses the 784-2-4 "
                       "network to one class on {2} and {3} (validation D_r accuracy 0.333); fine-tuning's forget "
                       "accuracy falls with every step, so when no point forgets the strongest one is chosen",
                 "epochs": _LENGTH},
    "neggrad_plus": {"beta": "beta 1 is plain fine-tuning, which forgets nothing here; from 0.999 to 0.9999 fewer "
                             "points forget (31 vs 24 of 81); at 0.9, 17 of 81 points diverge and the median "
                             "validation D_r accuracy is 0.44",
                     "lr": "at lr 1 the median validation D_r accuracy is already 0.333 (most points collapse the "
                           "network to one class); in a wider run lr 0.03 and below were never chosen",
                     "epochs": _LENGTH},
    "random_labels": {"lr": "at lr 0.001 no point forgets; at 0.3 nearly every point forgets but the median "
                            "validation D_r accuracy is 0.46",
                      "epochs": _LENGTH},
    "ssd": {"alpha": "imp_f / imp_D stays below about the class count (the per-sample bound n / n_f), so alpha "
                     "10 selects almost nothing at 4 classes; below 1 SSD would select parameters that matter less "
                     "to D_f than to D, outside its selection idea. On {2,3} and {3} only alpha 1 with lam 0 "
                     "forgets, by breaking D_r (validation 0.42-0.50; alpha 0.25-0.75 did no better in a wider run)",
            "lam": "lam 0 sets the selected parameters to zero, the strongest dampening there is; lam 1 "
                   "forgets at no point"},
}


def grid_bounds(grid: dict, point: dict) -> dict:
    """{knob: "lowest" | "highest"} for each knob of `point` at an end of its grid (knobs with one
    value are not tuned and not listed)."""
    out = {}
    for k, vals in grid.items():
        if len(vals) > 1 and k in point:
            if point[k] == min(vals):
                out[k] = "lowest"
            elif point[k] == max(vals):
                out[k] = "highest"
    return out


def tuned(name: str, params: torch.Tensor, spec: MLPSpec, forget, splits: DigitSplits, *, seed: int = 0,
          grid: dict | None = None, method: Callable | None = None) -> BaselineResult:
    """Run baseline `name` at every point of its grid (TUNING_GRIDS[name] unless given) and keep the
    one that the VALIDATION split prefers: the highest retain accuracy among the points whose forget
    accuracy is at most selection.FORGET_MAX, else the lowest forget accuracy (`select` with that
    floor; ties: the first point in grid order). `method` replaces BASELINES[name] (a user's method
    with the baselines' signature). seconds = the whole search (every point and its scoring);
    hparams = the chosen point's; extra["tuning"] = the grid, every point's validation accuracies,
    the chosen point, its knobs at an end of the grid (`at_bound`, see GRID_BOUNDS) and the rule."""
    fn = method if method is not None else BASELINES[name]
    grid = TUNING_GRIDS.get(name, {}) if grid is None else grid
    fidx = forget_indices(splits, forget)
    t0 = time.perf_counter()
    keys = list(grid)
    points = [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))] or [{}]
    results, rows = [], []
    for pt in points:
        try:
            r = fn(params, spec, forget, splits, seed=seed, **pt)
        except FloatingPointError:     # a diverging setting is a point the search rejects, not an error
            rows.append({**pt, "diverged": True})
            results.append(None)
            continue
        results.append(r)
        v = split_metrics(r.params[None], spec, splits.X_val, splits.y_val, fidx)
        rows.append({**pt, "val_forget_acc": float(v["forget_acc"][0]), "val_retain_acc": float(v["retain_acc"][0])})
    ok = [i for i, r in enumerate(results) if r is not None]
    if not ok:
        raise FloatingPointError(f"{name}: every point of the tuning grid {grid} diverged")
    f = torch.tensor([rows[i]["val_forget_acc"] for i in ok])
    r_ = torch.tensor([rows[i]["val_retain_acc"] for i in ok])
    best = ok[select(f, r_, forget_floor=FORGET_MAX)]
    chosen = results[best]
    return BaselineResult(chosen.name, chosen.params, time.perf_counter() - t0, chosen.hparams,
                          {**chosen.extra, "tuning": {"grid": {k: list(v) for k, v in grid.items()}, "points": rows,
                                                      "chosen": points[best],
                                                      "at_bound": grid_bounds(grid, points[best]),
                                                      "rule": f"max val retain acc among val forget acc <= "
                                                              f"{FORGET_MAX}, else min val forget acc"}})


# ----------------------------------------------------------------------------- retrieval
@dataclass
class RetrievalHit:
    """Nearest stored checkpoint: index (global row), class_loss (m,) its VALIDATION losses,
    distance (weighted squared L2 to the target), params (P,) float32 or None without a source."""

    index: int
    class_loss: np.ndarray
    distance: float
    params: torch.Tensor | None


class RetrievalIndex:
    """Nearest-neighbour search over a whole checkpoint store by per-class validation loss.

    The (n, m) float32 loss matrix is loaded once and kept; a query scans it in float64 chunks
    (d_i = sum_c w_c (L_ic - t_c)^2), so the answer is the exact argmin (lowest index on ties).
    `params` is an (n, P) array / tensor, a CheckpointStore (rows read on demand), or None."""

    CHUNK = 1 << 18

    def __init__(self, class_loss, params=None):
        L = torch.as_tensor(np.asarray(class_loss, dtype=np.float32))
        if L.ndim != 2 or L.shape[0] == 0 or L.shape[1] == 0:
            raise ValueError(f"class_loss must be a non-empty (n, m) matrix, got shape {tuple(L.shape)}")
        if params is not None and not isinstance(params, CheckpointStore) and len(params) != L.shape[0]:
            raise ValueError(f"params has {len(params)} rows but class_loss has {L.shape[0]}")
        self.class_loss, self.params = L.contiguous(), params

    @classmethod
    def from_store(cls, store) -> "RetrievalIndex":
        """Index of a CheckpointStore (its class_loss array, read once; params read per hit)."""
        return cls(store.load("class_loss"), store)

    def __len__(self) -> int:
        return self.class_loss.shape[0]

    def _check_query(self, target, weights) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.class_loss.shape[1]
        t = torch.as_tensor(np.asarray(target, dtype=np.float64))
        if t.shape != (m,) or not torch.isfinite(t).all():
            raise ValueError(f"target must be {m} finite per-class losses, got {np.asarray(target).tolist()}")
        w = torch.ones(m, dtype=torch.float64) if weights is None else torch.as_tensor(np.asarray(weights, np.float64))
        if w.shape != (m,) or not torch.isfinite(w).all() or (w < 0).any() or not (w > 0).any():
            raise ValueError(f"weights must be {m} finite non-negative numbers, not all zero; got "
                             f"{np.asarray(weights).tolist()}")
        return t, w

    def distances(self, target, weights=None) -> torch.Tensor:
        """(n,) float64 weighted squared L2 distances of every checkpoint to target (NaN rows -> inf)."""
        t, w = self._check_query(target, weights)
        out = torch.empty(len(self), dtype=torch.float64)
        for i in range(0, len(self), self.CHUNK):
            d = self.class_loss[i:i + self.CHUNK].double() - t                # (c, m)
            out[i:i + len(d)] = (d * d) @ w
        return out.nan_to_num_(nan=math.inf)

    def nearest_distinct(self, targets) -> np.ndarray:
        """(K, m) targets -> (K,) indices of K DISTINCT stored checkpoints: target i gets its nearest
        checkpoint not already given to targets 0..i-1 (equal-budget retrieval: as many stored
        candidates as the hypernetwork samples). Needs K <= len(self)."""
        T = np.asarray(targets, dtype=np.float64)
        if T.ndim != 2 or T.shape[0] > len(self):
            raise ValueError(f"targets must be (K, m) with K <= {len(self)} stored checkpoints, got {T.shape}")
        cells, inv = np.unique(T, axis=0, return_inverse=True)
        k = T.shape[0]
        order = []
        for c in cells:                                                    # each distinct target's K nearest
            d = self.distances(c)
            order.append(torch.topk(d, k, largest=False, sorted=True).indices.numpy())
        taken, pos, out = set(), np.zeros(len(cells), dtype=np.int64), np.empty(k, dtype=np.int64)
        for i, c in enumerate(np.asarray(inv).reshape(-1)):
            while int(order[c][pos[c]]) in taken:                          # K nearest always leave one free
                pos[c] += 1
            out[i] = order[c][pos[c]]
            taken.add(int(out[i]))
        return out

    def query(self, target, weights=None) -> RetrievalHit:
        """Exact nearest checkpoint to `target` (m,) under optional per-class `weights` (m,)."""
        d = self.distances(target, weights)
        i = int(torch.argmin(d))                                          # first minimum
        if self.params is None:
            p = None
        elif isinstance(self.params, CheckpointStore):
            p = torch.from_numpy(self.params.take("params", np.array([i]))[0].copy())
        else:
            p = torch.as_tensor(np.asarray(self.params[i], dtype=np.float32)).clone()
        return RetrievalHit(i, self.class_loss[i].numpy().copy(), float(d[i]), p)


BASELINES = {"retrain": retrain, "finetune": finetune, "neggrad_plus": neggrad_plus,
             "random_labels": random_labels, "ssd": ssd}
