"""forget(): prompt a trained hypernetwork, sample K candidates at once, score, select (SPEC §5).

1. Prompt. Forget classes get a HIGH target loss, retained classes a LOW one. The levels are
   quantiles of each class's loss in the hypernetwork's training data (its meta), so a prompt
   never asks for a loss the model has not seen; a small grid of (high, low) levels is spread
   over the K candidates.
2. Sample all K candidates in one batched call (DDIM by default).
3. Score all K with the fused evaluator on the VALIDATION split.
4. Select by the dissertation's rule (§3.5): lowest forget accuracy, then highest retain accuracy.
The test split is never read here: reported numbers come from `unlearn.report`.

Controls (SPEC §7): the same call with prompt="keep" (every class prompted low) or guidance=0
(the unconditional branch) samples K candidates that were NOT asked to forget; how many of
them meet the forget-and-keep criterion (`forget_keep_count`) is what the real prompt must beat.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..hypernet.checkpoint import SPLIT_IDENTITY
from ..ops.functional import class_metrics
from .mlp import as_module, check_flat, flat_params
from .selection import RETAIN_MIN, class_indices, forget_keep_count, group_accuracy, select

# Quantiles of the training data's per-class loss used as prompt levels (high for D_f, low for D_r).
HIGH_LEVELS = (0.9, 0.97, 0.995)
LOW_LEVELS = (0.02, 0.1)
PROMPTS = ("forget", "keep")   # "keep": the keep-every-class control prompt (every class low)



@dataclass
class ForgetResult:
    """The chosen classifier and the evidence of how it was chosen (validation split only)."""

    model: nn.Module                    # the chosen classifier, an ordinary nn.Sequential
    params: torch.Tensor                # (P,) its flat parameters
    forget_classes: tuple[int, ...]     # digit labels
    chosen: int                         # index of the chosen candidate
    candidates: dict                    # val metrics of all K: class_loss/class_acc (K, m), forget_acc, retain_acc (K,)
    prompt: torch.Tensor                # (K, m) target losses each candidate was sampled with
    prompt_levels: dict                 # the (high, low) quantile grid and its loss values
    timing: dict                        # seconds: sample, score, select, total
    start: dict | None = None           # DiHyFo-1: the starting model (user's, or the named stored checkpoint)
    candidate_params: torch.Tensor | None = field(default=None, repr=False)   # (K, P)


def forget_prompts(loss_quantiles: dict, classes: Sequence[int], forget_idx: Sequence[int], k: int,
                   high=HIGH_LEVELS, low=LOW_LEVELS) -> tuple[torch.Tensor, dict]:
    """(K, m) target-loss prompts that ask to forget the classes `forget_idx` (indices into
    classes): each candidate gets one (high, low) cell of the level grid, round robin; classes in
    forget_idx at the high quantile, the others at the low one. An empty forget_idx gives the
    keep-every-class control prompt.

    loss_quantiles: {"q": [q...], "values": [[per-class loss at q] ...]} (q ascending, values (Q, m)).
    """
    q = np.asarray(loss_quantiles["q"], dtype=np.float64)
    vals = np.asarray(loss_quantiles["values"], dtype=np.float64)           # (Q, m)
    m = len(classes)
    if vals.shape != (len(q), m):
        raise ValueError(f"loss quantile table has shape {vals.shape}, expected ({len(q)}, {m})")

    def at(level):                                                         # (m,) loss at quantile `level`
        return np.array([np.interp(level, q, vals[:, c]) for c in range(m)])

    cells = [(h, l) for h in high for l in low] if len(forget_idx) else [(None, l) for l in low]
    rows = []
    for i in range(k):
        h, l = cells[i % len(cells)]
        row = at(l)
        if h is not None:
            row[list(forget_idx)] = at(h)[list(forget_idx)]
        rows.append(row)
    levels = {"high_quantiles": list(high), "low_quantiles": list(low),
              "cells": [{"high": h, "low": l, "prompt": [round(float(x), 4) for x in rows[i]]}
                        for i, (h, l) in enumerate(cells[:k])]}
    return torch.tensor(np.stack(rows), dtype=torch.float32), levels


def loss_quantile_table(loss_ranges: dict, classes: Sequence[int]) -> dict:
    """Hypernet meta `loss_ranges` ({label: {min, max, quantiles {q: v}}}) -> {"q": [...], "values": (Q, m)}."""
    try:
        per = [loss_ranges[str(c)] for c in classes]
    except KeyError as e:
        raise ValueError(f"the hypernetwork's meta has no training loss range for class {e}") from None
    qs = sorted(float(q) for q in per[0]["quantiles"])
    q = [0.0, *qs, 1.0]
    vals = [[r["min"] for r in per]] + [[r["quantiles"][str(x) if str(x) in r["quantiles"] else repr(x)] for r in per]
                                        for x in qs] + [[r["max"] for r in per]]
    return {"q": q, "values": vals}


def best_checkpoint(data_dir: str, exclude_runs: Sequence[int] = ()) -> tuple[torch.Tensor, dict]:
    """The stored checkpoint with the lowest mean VALIDATION loss outside `exclude_runs` (a well
    trained classifier: the usual thing one is asked to make forget). -> (P,) params, info."""
    from ..collection.store import CheckpointStore
    st = CheckpointStore(data_dir, verify="size")
    loss = torch.from_numpy(st.load("class_loss")).double()                 # (n, m) validation losses
    run = st.load("run")
    score = torch.nan_to_num(loss.mean(1), nan=float("inf"))
    score[torch.from_numpy(np.isin(run, np.asarray(list(exclude_runs), dtype=run.dtype)))] = float("inf")
    i = int(score.argmin())
    params = torch.from_numpy(st.take("params", np.array([i]))[0].copy())
    return params, {"source": "stored checkpoint (lowest mean validation loss)", "index": i, "run": int(run[i]),
                    "step": int(st.load("step")[i]), "val_class_loss": [float(x) for x in loss[i]]}


def check_split(hypernet, data) -> None:
    """Raise ValueError unless `data` (DigitSplits) is the split the hypernetwork's collection was
    made on (checkpoint.SPLIT_IDENTITY: source, classes, split seed, fractions, sizes, digits' hash,
    as pretrained models are matched to collections): candidates chosen on another split's
    validation set could be chosen on samples the collection trained on."""
    want = hypernet.meta.get("dataset", {}).get("split")
    if want is None:   # models trained before the split was recorded with them: read the manifest
        from ..collection.store import CheckpointStore
        try:
            want = CheckpointStore(hypernet.data_dir, verify="size").manifest.get("split")
        except (OSError, ValueError, AttributeError, KeyError):
            want = None
        if want is None:
            raise ValueError("cannot tell which data split this hypernetwork's collection used (its dataset is "
                             "not found); load it with its dataset (data=...)")
    got = data.describe()
    diff = {k: (want[k], got.get(k)) for k in SPLIT_IDENTITY if k in want and want[k] != got.get(k)}
    if diff:
        raise ValueError("data is not the split the hypernetwork's collection was made on: "
                         + "; ".join(f"{k}: collection {a}, given {b}" for k, (a, b) in diff.items())
                         + ". Rebuild it with collection.data.splits_from_manifest")


def choose(cand: torch.Tensor, spec, data, fidx: Sequence[int], retain_min: float = RETAIN_MIN) -> tuple[int, dict]:
    """Score K candidates (K, P) on the VALIDATION split of `data` at once and pick one by the
    selection rule for forgetting the class indices `fidx`. -> (chosen index, candidates' metrics:
    class_loss / class_acc (K, m), forget_acc / retain_acc (K,), forget_keep count with D_r
    threshold `retain_min`)."""
    m = spec.num_classes
    Xv, yv = data.X_val.to(cand.device), data.y_val.to(cand.device)
    met = class_metrics(cand, spec, Xv, yv, m)
    counts = torch.bincount(yv, minlength=m)
    f_acc = group_accuracy(met.class_acc, counts, fidx)
    r_acc = group_accuracy(met.class_acc, counts, [c for c in range(m) if c not in fidx])
    if cand.device.type == "cuda":
        torch.cuda.synchronize()
    return select(f_acc, r_acc), {"class_loss": met.class_loss.cpu(), "class_acc": met.class_acc.cpu(),
                                  "forget_acc": f_acc.cpu(), "retain_acc": r_acc.cpu(), "split": "validation",
                                  "forget_keep": forget_keep_count(f_acc, r_acc, retain_min=retain_min)}


def forget(hypernet, forget_classes, data, k: int = 256, sampler: str = "ddim", steps: int = 50,
           model: nn.Module | torch.Tensor | None = None, seed: int = 0, high=HIGH_LEVELS, low=LOW_LEVELS,
           keep_candidates: bool = True, guidance: float | None = None, prompt: str = "forget",
           retain_min: float = RETAIN_MIN) -> ForgetResult:
    """Forget `forget_classes` (digit labels) with a trained hypernetwork (hf.load_hypernet).

    data: the collection's DigitSplits (its validation split scores the candidates); a different
    split is refused (`check_split`).
    model: DiHyFo-1's starting classifier (nn.Module of the hypernetwork's spec, or flat (P,)
    params); None uses `best_checkpoint` of the hypernetwork's dataset and names it in `.start`.
    guidance: classifier-free guidance weight (None = the model's default; 0 = unconditional).
    prompt: "forget" (the request) or "keep" (the keep-every-class control: same K, sampler, seed
    and selection rule, every class prompted low). retain_min: the D_r threshold of the
    candidates' forget-and-keep count (it does not change the choice). DiHyFo-1's retained-class targets never exceed
    the starting model's current validation loss: the prompt never asks it to get worse on D_r.
    """
    hn = hypernet
    spec, classes = hn.spec, list(hn.meta["classes"])
    fidx = class_indices(classes, forget_classes, hn.meta.get("pivots", ()))
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    if tuple(data.classes) != tuple(classes):
        raise ValueError(f"data holds classes {tuple(data.classes)}, the hypernetwork {tuple(classes)}")
    check_split(hn, data)
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    dev = next(hn.model.parameters()).device
    Xv, yv = data.X_val.to(dev), data.y_val.to(dev)
    t0 = time.perf_counter()
    table = loss_quantile_table(hn.meta["loss_ranges"], classes)
    prompts, levels = forget_prompts(table, classes, fidx if prompt == "forget" else [], int(k), high, low)
    start = None
    kw = {}
    if hn.cfg.kind == "dihyfo1":
        if model is None:
            theta, start = best_checkpoint(hn.meta["dataset"]["dir"], hn.meta.get("heldout_runs", ()))
        else:
            theta = flat_params(model, spec) if isinstance(model, nn.Module) else check_flat(model, spec, "model")[0]
            start = {"source": "user model"}
        theta = theta.float().to(dev)
        cur = class_metrics(theta[None], spec, Xv, yv).class_loss[0]        # (m,) its validation losses
        start["val_class_loss"] = [float(x) for x in cur]
        keep = [c for c in range(len(classes)) if c not in fidx] if prompt == "forget" else list(range(len(classes)))
        prompts[:, keep] = torch.minimum(prompts[:, keep], cur.float().cpu()[keep])   # never worse on D_r
        kw = {"theta": theta, "losses": cur}
    elif model is not None:
        raise ValueError("DiHyFo-2 generates from the loss prompt alone; it takes no starting model")
    t1 = time.perf_counter()
    if guidance is not None:
        kw["guidance"] = guidance
    cand = hn.sample(prompts.to(dev), int(k), sampler=sampler, steps=steps, seed=seed, **kw)   # (K, P)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    i, cands = choose(cand, spec, data, fidx, retain_min)
    params = cand[i].detach().float().cpu()
    t3 = time.perf_counter()
    return ForgetResult(model=as_module(params, spec), params=params, forget_classes=tuple(classes[c] for c in fidx),
                        chosen=i, candidates=cands, prompt=prompts, prompt_levels={**levels, "kind": prompt},
                        timing={"prepare": t1 - t0, "sample": t2 - t1, "score": t3 - t2,
                                "total": t3 - t1, "k": int(k), "sampler": sampler, "steps": int(steps),
                                "guidance": hn.default_guidance if guidance is None else float(guidance)},
                        start=start, candidate_params=cand.detach().cpu() if keep_candidates else None)
