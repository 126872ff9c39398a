"""How a forget request names its classes, and how candidates are judged on the VALIDATION split.

One definition of each, used by `forget`, the baselines and the report:
  class_indices     digit labels of a forget request -> indices into `classes` (refusals by name)
  group_accuracy    pooled accuracy over a group of classes, from per-class accuracies
  select            the dissertation's selection rule (§3.5)
  forget_keep_count the forget-and-keep criterion that counts candidates (the controls of `forget` and the report)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# The forget-and-keep criterion: pooled validation accuracy <= FORGET_MAX on D_f and >= RETAIN_MIN on D_r.
FORGET_MAX = 0.01
RETAIN_MIN = 0.95


def class_indices(classes: Sequence[int], requested, pivots: Sequence[int] = ()) -> list[int]:
    """Digit labels (an int or a sequence) -> indices into `classes`, in the order given; refuses
    non-integer, empty, repeated, unknown, pivot and all-class requests."""
    req = [requested] if isinstance(requested, (int, np.integer)) else list(requested)
    if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in req):
        raise TypeError(f"forget classes must be integer digit labels, got {requested!r}")
    if not req:
        raise ValueError("forget set is empty: name at least one class to forget")
    if len(set(req)) != len(req):
        raise ValueError(f"forget set {req} repeats a class")
    unknown = [int(c) for c in req if c not in classes]
    if unknown:
        raise ValueError(f"unknown classes {unknown}: the model's classes are {list(classes)}")
    piv = [int(c) for c in req if c in pivots]
    if piv:
        raise ValueError(f"classes {piv} are pivots (kept above the accuracy threshold in every training "
                         f"checkpoint); the hypernetwork cannot forget them. Forgettable: "
                         f"{[c for c in classes if c not in pivots]}")
    if len(req) == len(classes):
        raise ValueError("cannot forget every class at once: nothing would be retained")
    return [list(classes).index(int(c)) for c in req]


def group_accuracy(class_acc: torch.Tensor, counts: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
    """(K, m) per-class accuracy, (m,) sample counts -> (K,) accuracy pooled over the samples of the
    classes idx (a count-weighted mean; classes without samples weigh nothing)."""
    idx = torch.as_tensor(list(idx), dtype=torch.long, device=class_acc.device)
    n = counts.to(class_acc)[idx]
    acc = torch.nan_to_num(class_acc[:, idx], nan=0.0) if bool((n == 0).any()) else class_acc[:, idx]
    return (acc * n).sum(1) / n.sum()


def select(forget_acc: torch.Tensor, retain_acc: torch.Tensor, forget_floor: float = 0.0) -> int:
    """Dissertation §3.5: lowest forget accuracy first, then highest retain accuracy (NaN last).
    forget_floor > 0 treats every forget accuracy at or below it as equal (used to tune the
    post-hoc baselines: the best retain accuracy among settings that forget)."""
    f = torch.nan_to_num(forget_acc.double(), nan=2.0).clamp_min(float(forget_floor))
    r = torch.nan_to_num(retain_acc.double(), nan=-1.0)
    best = f == f.min()
    return int(torch.where(best, r, torch.full_like(r, -2.0)).argmax())


def forget_keep_count(forget_acc: torch.Tensor, retain_acc: torch.Tensor, forget_max: float = FORGET_MAX,
                      retain_min: float = RETAIN_MIN) -> int:
    """How many candidates (K,) forget (accuracy <= forget_max on D_f) and keep (>= retain_min on
    D_r); NaN counts as neither."""
    return int(((forget_acc <= forget_max) & (retain_acc >= retain_min)).sum())
