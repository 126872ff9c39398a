"""forget(): prompt a trained hypernetwork, sample K candidates at once, score, select.

1. Prompt. Forget classes get a HIGH target loss, retained classes a LOW one. The levels are
   quantiles of each class's loss in the hypernetwork's training data (its meta), so a prompt
   never asks for a loss the model has not seen; a small grid of (high, low) levels is spread
   over the K candidates, and so is a grid of classifier-free guidance weights (the model card's
   grid for the request's size, `sampling.guidance_by_size`, chosen on validation at release):
   guidance is a sampling setting chosen like the levels, not a fixed number (DiHyFo-1 follows its
   prompt only at w of 2-24, the more classes the higher; DiHyFo-2 prefers w of 1-4). Both
   levels are chosen on validation the same way (`sampling.low_levels_by_size`, `high_levels_by_size`):
   how low to ask the retained classes to stay, and how high to push the forgotten ones, are
   properties of the model (MNIST-4's DiHyFo-1 forgets only when the retained classes are asked
   very low, the ten-class one keeps D_r only when they are not; asked for the very top of class
   2's loss range, the ten-class DiHyFo-2 breaks the retained classes with it). DiHyFo-1's
   candidates are nearly one network per (level, weight) cell: the grids are what vary them.
2. Sample all K candidates in one batched call (DDIM by default).
3. Score all K with the fused evaluator on the VALIDATION split.
4. Select by the dissertation's rule (§3.5): lowest forget accuracy, then highest retain accuracy.
The test split is never read here: reported numbers come from `unlearn.report`.

Controls: the same call with prompt="keep" (every class prompted low, over the same guidance
grid) or guidance=0 (the unconditional branch) samples K candidates that were NOT asked to
forget; how many of them meet the forget-and-keep criterion (`forget_keep_count`) is what the
real prompt must beat.

DiHyFo-1 edits a starting classifier (`start`): the user's model, the best stored checkpoint,
or a random initialisation (the dissertation's "set of current parameters (which may be
initialized randomly)").
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..hypernet.checkpoint import split_differences
from ..ops.functional import class_metrics
from .mlp import as_module, check_flat, flat_params
from .selection import FORGET_MAX, RETAIN_MIN, class_indices, forget_keep_count, group_accuracy, select

# Quantiles of the training data's per-class loss used as prompt levels (high for D_f, low for D_r).
HIGH_LEVELS = (0.9, 0.97, 0.995)   # a model card without high_levels_by_size (released before the sweep chose them)
LOW_LEVELS = (0.02, 0.1)              # a model card without low_levels_by_size (released before the sweep chose them)
SWEEP_LOW_LEVELS = (0.02, 0.1, 0.3)   # the low levels sweep_guidance chooses among
# ... and the high ones. The ten-class store's checkpoints that forget {2} while keeping D_r hold
# class 2's loss near its 0.8 quantile (10-90 %: 0.72-0.95), below the first fixed level.
SWEEP_HIGH_LEVELS = (0.7, 0.8, 0.9, 0.97, 0.995)
PROMPTS = ("forget", "keep")   # "keep": the keep-every-class control prompt (every class low)
STARTS = ("model", "best", "random")   # DiHyFo-1's starting classifier: the user's, best stored, random init

@dataclass
class ForgetResult:
    """The chosen classifier and the evidence of how it was chosen (validation split only).

    chosen_guidance / chosen_level: the guidance weight and (high, low) prompt-level cell the
    chosen candidate was sampled with; per_guidance: the forget-and-keep count among the
    candidates of each guidance weight; forgot: whether the chosen candidate itself meets the
    forget-and-keep criterion (False: nothing was forgotten by that definition); settings:
    everything needed to rerun the call (seed, K, sampler, steps, guidance grid, levels,
    hypernetwork and data with their hashes, package version).
    """

    model: nn.Module                    # the chosen classifier, an ordinary nn.Sequential
    params: torch.Tensor                # (P,) its flat parameters
    forget_classes: tuple[int, ...]     # digit labels
    chosen: int                         # index of the chosen candidate
    candidates: dict                    # val metrics of all K: class_loss/class_acc (K, m), forget_acc, retain_acc,
                                        # guidance (K,), cell (K,) index into prompt_levels["cells"]
    prompt: torch.Tensor                # (K, m) target losses each candidate was sampled with
    prompt_levels: dict                 # the (high, low) quantile grid and its loss values
    timing: dict                        # seconds: prepare, sample, score, total (= all three)
    start: dict | None = None           # DiHyFo-1: the starting model (user's, stored checkpoint, random init)
    candidate_params: torch.Tensor | None = field(default=None, repr=False)   # (K, P)
    chosen_guidance: float = 1.0
    chosen_level: dict = field(default_factory=dict)   # {"high": quantile or None, "low": quantile}
    forget_keep: int = 0                # candidates meeting the criterion on validation
    per_guidance: list = field(default_factory=list)   # [{"guidance", "k", "forget_keep"}] in grid order
    forgot: bool = False
    settings: dict = field(default_factory=dict)
    start_params: torch.Tensor | None = field(default=None, repr=False)   # DiHyFo-1: (P,) the start θ

    def summary(self) -> str:
        """One line: what was forgotten, from which candidate, and how many candidates qualified."""
        va = float(self.candidates["forget_acc"][self.chosen])
        vr = float(self.candidates["retain_acc"][self.chosen])
        k = len(self.candidates["forget_acc"])
        lv = self.chosen_level
        level = (f"high q{lv.get('high')}, " if lv.get("high") is not None else "") + f"low q{lv.get('low')}"
        head = (f"forgot {list(self.forget_classes)}" if self.forgot else
                f"did NOT forget {list(self.forget_classes)} (no candidate met the forget-and-keep criterion)"
                if self.forget_keep == 0 else
                f"did NOT forget {list(self.forget_classes)} by the criterion (the selection rule's pick misses it)")
        per = ", ".join(f"w={g['guidance']:g}: {g['forget_keep']}/{g['k']}" for g in self.per_guidance)
        return (f"{head}: candidate {self.chosen} of {k} (guidance {self.chosen_guidance:g}, {level}), validation "
                f"acc D_f {va:.3f}, D_r {vr:.3f}; {self.forget_keep} of {k} candidates forget and keep ({per})")

    def __repr__(self) -> str:
        """One line (the K candidates' metrics, prompts and parameters stay in the attributes)."""
        total = self.timing.get("total")
        took = f"; {total:.2f} s" if isinstance(total, (int, float)) else ""
        return (f"ForgetResult({self.summary()}{took}; attributes: model, params, candidates, prompt, timing, "
                f"settings)")


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
    """The most accurate stored checkpoint on VALIDATION (mean per-class accuracy; ties, which
    accuracy on a few hundred digits makes common, go to the lowest mean validation loss) outside
    `exclude_runs`: a well trained classifier, the usual thing one is asked to make forget. Accuracy
    first, as the dissertation selects and reports by accuracy (§3.5); the lowest loss alone can
    pick a less accurate network. -> (P,) params, info."""
    from ..collection.store import CheckpointStore
    st = CheckpointStore(data_dir, verify="size")
    loss = torch.from_numpy(st.load("class_loss")).double()                 # (n, m) validation losses
    acc = torch.from_numpy(st.load("class_acc")).double()                   # (n, m) validation accuracies
    run = st.load("run")
    excluded = torch.from_numpy(np.isin(run, np.asarray(list(exclude_runs), dtype=run.dtype)))
    acc_score = torch.nan_to_num(acc.mean(1), nan=-1.0).masked_fill(excluded, -1.0)
    loss_score = torch.nan_to_num(loss.mean(1), nan=float("inf")).masked_fill(excluded, float("inf"))
    if bool((acc_score < 0).all()):
        raise ValueError(f"no stored checkpoint outside the {len(set(exclude_runs))} excluded runs of {data_dir}")
    top = torch.nonzero(acc_score == acc_score.max()).flatten()             # the most accurate, then
    i = int(top[loss_score[top].argmin()])                                  # the lowest loss among them
    params = torch.from_numpy(st.take("params", np.array([i]))[0].copy())
    return params, {"source": "stored checkpoint (most accurate on validation, then lowest loss)", "index": i,
                    "run": int(run[i]), "step": int(st.load("step")[i]),
                    "val_class_acc": [float(x) for x in acc[i]], "val_class_loss": [float(x) for x in loss[i]]}


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
    diff = split_differences(want, got)
    if diff:
        raise ValueError("data is not the split the hypernetwork's collection was made on: "
                         + "; ".join(f"{k}: collection {a}, given {b}" for k, (a, b) in diff.items())
                         + ". Build it from the collection folder with hf.load_splits(folder)")


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


def guidance_grid(hypernet, guidance=None, n_forget: int | None = None) -> list[float]:
    """The guidance weights a forget call spreads its K candidates over: None = the model's
    default grid for a request of n_forget classes (`Hypernet.guidance_grid_for`, from its card;
    n_forget None: `Hypernet.guidance_grid`), a number = that weight alone, a sequence = that
    grid. Refuses an empty grid, repeats and weights that are negative or not finite."""
    if guidance is None:
        grid = list(hypernet.guidance_grid if n_forget is None else hypernet.guidance_grid_for(n_forget))
    elif isinstance(guidance, (int, float, np.integer, np.floating)) and not isinstance(guidance, bool):
        grid = [float(guidance)]
    else:
        try:
            grid = [float(w) for w in guidance]
        except (TypeError, ValueError):
            raise TypeError(f"guidance must be a number or a sequence of numbers, got {guidance!r}") from None
    if not grid:
        raise ValueError("guidance grid is empty: give at least one weight")
    if len(set(grid)) != len(grid):
        raise ValueError(f"guidance grid {grid} repeats a weight")
    if any(not np.isfinite(w) or w < 0 for w in grid):
        raise ValueError(f"guidance weights must be finite and >= 0, got {grid}")
    return grid


def spread(k: int, grid: Sequence[float], n_cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K candidates over a guidance grid (G,) and n_cells prompt-level cells: contiguous blocks of
    K // G (the first K % G blocks one more) per weight, the cells round robin inside each block,
    so every weight sees every cell. -> guidance (K,) float64, cell (K,) long."""
    if k < len(grid):
        raise ValueError(f"k = {k} candidates cannot cover a guidance grid of {len(grid)} weights {list(grid)}")
    sizes = [k // len(grid) + (g < k % len(grid)) for g in range(len(grid))]
    w = torch.cat([torch.full((n,), float(x), dtype=torch.float64) for x, n in zip(grid, sizes)])
    cell = torch.cat([torch.arange(n) % n_cells for n in sizes])
    return w, cell


def low_levels(hypernet, low=None, n_forget: int | None = None) -> tuple[float, ...]:
    """The low prompt levels a forget call uses: `low` when given, else the model card's for a
    request of n_forget classes (`Hypernet.low_levels_for`), else LOW_LEVELS; checked."""
    return _levels(hypernet, low, n_forget, "low", LOW_LEVELS)


def high_levels(hypernet, high=None, n_forget: int | None = None) -> tuple[float, ...]:
    """The high prompt levels a forget call uses: `high` when given, else the model card's for a
    request of n_forget classes (`Hypernet.high_levels_for`), else HIGH_LEVELS; checked."""
    return _levels(hypernet, high, n_forget, "high", HIGH_LEVELS)


def _levels(hypernet, given, n_forget, name: str, default) -> tuple[float, ...]:
    """`given`, else the card's `{name}_levels_for(n_forget)`, else `default`; checked."""
    if given is None and n_forget is not None:
        given = getattr(hypernet, f"{name}_levels_for")(n_forget)
    return check_levels(default if given is None else given, name)


def check_levels(levels, name: str) -> tuple[float, ...]:
    """A grid of prompt levels (quantiles) -> tuple of floats; refuses an empty grid, repeats
    and levels outside [0, 1]."""
    try:
        out = tuple(float(q) for q in levels)
    except (TypeError, ValueError):
        raise TypeError(f"{name} levels must be a sequence of quantiles, got {levels!r}") from None
    if not out or len(set(out)) != len(out) or any(not 0.0 <= q <= 1.0 for q in out):
        raise ValueError(f"{name} levels must be distinct quantiles in [0, 1], at least one; got {levels!r}")
    return out


def random_start(spec, seed: int = 0) -> torch.Tensor:
    """A freshly initialised classifier of `spec` (PyTorch's default nn.Linear init, as the
    collection's runs start), seeded -> (P,) float32. DiHyFo-1's random start."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        lins = [nn.Linear(a, b) for a, b in zip(spec.layer_sizes[:-1], spec.layer_sizes[1:])]
    return torch.cat([t.detach().reshape(-1) for l in lins for t in (l.weight, l.bias)]).float()


def _sha256(path: str | None) -> str | None:
    """sha256 of a file (collection.store.sha256_file), None when there is no such file."""
    from ..collection.store import sha256_file
    return sha256_file(path) if path and os.path.isfile(path) else None


def _provenance(hn, data=None) -> dict:
    """Which hypernetwork and data a forget call used: name or path with the weights' hash, the
    collection folder with its manifest hash, the package version."""
    from .. import __version__
    path = hn.meta.get("path")
    ck = os.path.join(path, "checkpoint.safetensors") if path and os.path.isdir(path) else path
    card = getattr(hn, "card", None) or {}
    data_dir = hn.meta.get("data_dir")
    man = os.path.join(data_dir, "manifest.json") if data_dir else None
    return {"hypernet": {"name": card.get("name"), "path": os.path.abspath(path) if path else None,
                         "sha256": _sha256(ck), "kind": hn.kind, "step": hn.meta.get("step")},
            "data": {"dir": data_dir, "manifest_sha256": _sha256(man),
                     "split": data.describe() if data is not None else None},
            "package_version": __version__, "torch_version": torch.__version__}


def _dihyfo1_start(hn, spec, model, start: str, seed: int) -> tuple[torch.Tensor, dict]:
    """DiHyFo-1's starting classifier by `start` -> (P,) params, a record of where it came from."""
    if start == "model":
        if model is None:
            raise ValueError("start='model' needs a model: pass model= (an nn.Module or flat (P,) params)")
        theta = flat_params(model, spec) if isinstance(model, nn.Module) else check_flat(model, spec, "model")[0]
        return theta, {"source": "user model"}
    if model is not None:
        raise ValueError(f"a model was given but start={start!r}; DiHyFo-1 starts from the given model "
                         "(start='model') or, without one, from 'best' or 'random'")
    if start == "best":
        return best_checkpoint(hn.data_dir, hn.meta.get("heldout_runs", ()))
    return random_start(spec, seed), {"source": "random initialisation (PyTorch default nn.Linear init)",
                                      "seed": int(seed)}


def forget(hypernet, forget_classes, data, k: int = 256, sampler: str = "ddim", steps: int = 50,
           model: nn.Module | torch.Tensor | None = None, seed: int = 0, high=None, low=None,
           keep_candidates: bool = True, guidance=None, prompt: str = "forget",
           retain_min: float = RETAIN_MIN, start: str | None = None, progress: bool = False,
           warn: bool = True) -> ForgetResult:
    """Forget `forget_classes` (digit labels) with a trained hypernetwork (hf.load_hypernet).

    data: the collection's DigitSplits (its validation split scores the candidates); a different
    split is refused (`check_split`).
    guidance: classifier-free guidance weight(s) the K candidates are spread over (`spread`):
    None = the model's grid for a request of this many classes (its card's, chosen on
    validation), a number, or a sequence; 0 is the unconditional branch. The chosen candidate's
    weight and level are `.chosen_guidance` / `.chosen_level`; `.per_guidance` counts the
    qualifying candidates of each weight.
    model / start (DiHyFo-1 only): the starting classifier. start "model" (the default when model
    is given: an nn.Module of the hypernetwork's spec, or flat (P,) params), "best" (the default
    otherwise: `best_checkpoint` of the hypernetwork's dataset, named in `.start`) or "random"
    (`random_start(spec, seed)`, the dissertation's protocol). DiHyFo-1's retained-class targets
    never exceed the start's current validation loss: the prompt never asks it to get worse on D_r.
    high / low: the prompt levels (quantiles of each class's training loss) for the forget and
    the retained classes; None = the model's levels for a request of this size (its card's,
    chosen on validation: `Hypernet.high_levels_for` / `low_levels_for`), else HIGH_LEVELS /
    LOW_LEVELS.
    prompt: "forget" (the request) or "keep" (the keep-every-class control: same K, guidance
    grid, levels, sampler, seed and selection rule, every class prompted low). retain_min: the D_r
    threshold of the forget-and-keep count (it does not change the choice).
    progress: a progress bar over the sampling steps (stderr). warn: a UserWarning when the
    chosen candidate does not meet the forget-and-keep criterion (`.forgot` False).
    """
    hn = hypernet
    spec, classes = hn.spec, list(hn.meta["classes"])
    fidx = class_indices(classes, forget_classes, hn.meta.get("pivots", ()))
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    if tuple(data.classes) != tuple(classes):
        raise ValueError(f"data holds classes {tuple(data.classes)}, the hypernetwork {tuple(classes)}")
    check_split(hn, data)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 1:
        raise ValueError(f"k (number of candidates) must be a positive integer, got {k!r}")
    k = int(k)
    grid = guidance_grid(hn, guidance, len(fidx))     # the keep control too: the request's grid
    high, low = high_levels(hn, high, len(fidx)), low_levels(hn, low, len(fidx))   # ... and the request's levels
    dev = next(hn.model.parameters()).device
    Xv, yv = data.X_val.to(dev), data.y_val.to(dev)
    t0 = time.perf_counter()
    table = loss_quantile_table(hn.meta["loss_ranges"], classes)
    asked = fidx if prompt == "forget" else []
    n_cells = len(high) * len(low) if asked else len(low)
    w, cell = spread(k, grid, n_cells)                                   # (K,), (K,)
    _, levels = forget_prompts(table, classes, asked, n_cells, high, low)
    prompts = torch.cat([forget_prompts(table, classes, asked, int((w == g).sum()), high, low)[0] for g in grid])
    start_info, theta = None, None
    kw = {}
    if hn.cfg.kind == "dihyfo1":
        start = start or ("model" if model is not None else "best")
        if start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {start!r}")
        theta, start_info = _dihyfo1_start(hn, spec, model, start, seed)
        theta = theta.float().to(dev)
        cur = class_metrics(theta[None], spec, Xv, yv).class_loss[0]        # (m,) its validation losses
        start_info = {**start_info, "kind": start, "val_class_loss": [float(x) for x in cur]}
        keep = [c for c in range(len(classes)) if c not in fidx] if prompt == "forget" else list(range(len(classes)))
        prompts[:, keep] = torch.minimum(prompts[:, keep], cur.float().cpu()[keep])   # never worse on D_r
        kw = {"theta": theta, "losses": cur}
    elif model is not None or start is not None:
        raise ValueError("DiHyFo-2 generates from the loss prompt alone; it takes no starting model")
    t1 = time.perf_counter()
    cand = hn.sample(prompts.to(dev), k, sampler=sampler, steps=steps, seed=seed, guidance=w,
                     progress=progress, **kw)                                # (K, P)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    i, cands = choose(cand, spec, data, fidx, retain_min)
    params = cand[i].detach().float().cpu()
    t3 = time.perf_counter()
    ok = (cands["forget_acc"] <= FORGET_MAX) & (cands["retain_acc"] >= retain_min)   # (K,) the criterion
    per = [{"guidance": g, "k": int((w == g).sum()), "forget_keep": int(ok[w == g].sum())} for g in grid]
    cands.update({"guidance": w.float(), "cell": cell})
    c = levels["cells"][int(cell[i])]
    res = ForgetResult(
        model=as_module(params, spec), params=params, forget_classes=tuple(classes[c] for c in fidx), chosen=i,
        candidates=cands, prompt=prompts, prompt_levels={**levels, "kind": prompt},
        timing={"prepare": t1 - t0, "sample": t2 - t1, "score": t3 - t2, "total": t3 - t0},
        start=start_info, candidate_params=cand.detach().cpu() if keep_candidates else None,
        chosen_guidance=float(w[i]), chosen_level={"high": c["high"], "low": c["low"]},
        forget_keep=int(cands["forget_keep"]), per_guidance=per, forgot=bool(ok[i]),
        settings={"forget": [classes[c] for c in fidx], "prompt": prompt, "k": k, "sampler": sampler,
                  "steps": int(steps), "seed": int(seed), "guidance_grid": grid, "high_levels": list(high),
                  "low_levels": list(low), "retain_min": float(retain_min), "forget_max": FORGET_MAX,
                  "start": (start_info or {}).get("kind"), **_provenance(hn, data)},
        start_params=None if theta is None else theta.detach().float().cpu())
    if warn and prompt == "forget" and not res.forgot:
        warnings.warn(res.summary(), UserWarning, stacklevel=2)
    return res


# Geometric, ~sqrt(2) apart above 2: DiHyFo-1's candidates are nearly deterministic given (start,
# prompt, weight), so a forget set works over a narrow band of weights that a factor of 2 can miss.
SWEEP_WEIGHTS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0)


# A sweep from several starts (DiHyFo-1) spreads K over at most K // CELL_CANDIDATES cells: its
# candidates are nearly one network per cell, so a cell needs few, and the breadth is what serves a start
# the sweep did not see (bench/RESULTS.md §18: leaving one start out, 22 of 24 served against 20).
CELL_CANDIDATES = 8


def _best_grid(nets: list[list[dict]], ws: list[str], ls: list[str], hs: list, tolerance: float,
               max_cells: int | None = None) -> tuple[tuple | None, dict, dict]:
    """The run of consecutive weights ws[i:j], of consecutive low levels ls[a:b] and of consecutive
    high levels hs[c:d] that a forget call spreads K over. nets: per set, one {(weight, low, high):
    net count} per start; sets that nothing forgets from any start are left out.

    One start (max_cells None): the grid maximising the worst set's mean net count over the cells
    it spans, the largest within `tolerance` of the best. Several starts (max_cells given): the grid
    serving the most (set, start) pairs (a pair is served when one of the grid's cells has a
    positive net count from that start), then, of at most max_cells cells, the one holding the most
    live cells (cells that serve some pair), then the best worst-set count (the mean over starts);
    when no grid that small has a positive worst count, the one-start rule. -> ((weights, lows,
    highs) or None when nothing forgets, {"w,w|l,l|h,h": worst count}, the pairs the chosen grid
    serves). hs == [None]: a sweep that kept the fixed high levels (its keys "w,w|l,l")."""
    nets = [ns for ns in nets if max(max(n.values()) for n in ns) > 0]   # a set nothing forgets says nothing
    means = [{c: float(np.mean([n[c] for n in ns])) for c in ns[0]} for ns in nets]   # per set, over its starts
    runs = lambda xs: [xs[i:j] for i in range(len(xs)) for j in range(i + 1, len(xs) + 1)]
    alive = {c for ns in nets for n in ns for c, v in n.items() if v > 0}   # cells that serve some pair
    worst, served, live, grids = {}, {}, {}, {}
    for w_run in runs(ws):
        for l_run in runs(ls):
            for h_run in runs(hs):
                cells = [(w, q, h) for w in w_run for q in l_run for h in h_run]
                g = ",".join(w_run) + "|" + ",".join(l_run) + ("" if h_run == [None] else "|" + ",".join(h_run))
                worst[g] = min(float(np.mean([m[c] for c in cells])) for m in means) if means else 0.0
                served[g] = sum(any(n[c] > 0 for c in cells) for ns in nets for n in ns)
                live[g] = sum(c in alive for c in cells)
                grids[g] = (w_run, l_run, None if h_run == [None] else h_run)
    if max(worst.values()) <= 0:
        return None, worst, 0
    size = lambda g: len(grids[g][0]) * len(grids[g][1]) * len(grids[g][2] or [None])
    fits = [g for g in grids if max_cells is not None and size(g) <= max_cells and worst[g] > 0]
    if not fits:
        best = max(worst.values())
        near = [g for g, v in worst.items() if v >= (1 - tolerance) * best]
        g = max(near, key=lambda g: (size(g), worst[g]))
    else:
        most = max(served[g] for g in fits)
        g = max((g for g in fits if served[g] == most), key=lambda g: (live[g], worst[g]))
    return grids[g], worst, served[g]


def _count_by_cell(res, highs: Sequence[float], lows: Sequence[float]) -> dict:
    """{"high|low": [forget-and-keep candidates, candidates]} of one forget call, by each
    candidate's prompt cell; a keep-prompt call (no high level) counts by low level, and each
    high level of that low level gets its count."""
    c = res.candidates
    ok = (c["forget_acc"] <= FORGET_MAX) & (c["retain_acc"] >= res.settings["retain_min"])   # (K,)
    cells = res.prompt_levels["cells"]
    low_of = torch.tensor([cell["low"] for cell in cells], dtype=torch.float64)[c["cell"]]             # (K,)
    high_of = torch.tensor([-1.0 if cell["high"] is None else cell["high"] for cell in cells],
                           dtype=torch.float64)[c["cell"]]                                                 # (K,)
    out = {}
    for h in highs:
        for q in lows:
            at = (low_of == q) & ((high_of == h) | (high_of == -1.0))
            out[f"{float(h)}|{float(q)}"] = [int(ok[at].sum()), int(at.sum())]
    return out


def sweep_guidance(hypernet, data, forget_sets, weights=SWEEP_WEIGHTS, lows=SWEEP_LOW_LEVELS,
                   highs=SWEEP_HIGH_LEVELS, k: int = 256, sampler: str = "ddim", steps: int = 50, seed: int = 100,
                   tolerance: float = 0.02, starts: dict | None = None, **kw) -> dict:
    """Choose a model's default guidance grids and prompt levels on the VALIDATION split (run at
    release; they go into the model card's `sampling`).

    For each weight alone, K candidates for every forget set under the forget prompt and under the
    keep-every-class control (skipped where the forget prompt yields none: its net count cannot
    be positive), spread over the prompt cells (high, low) of every level in `highs` x `lows`; then
    `choose_sampling` picks the grids from those counts. kw go to `forget` (e.g. start=).

    starts (DiHyFo-1): {label: forget kwargs} of several starting classifiers, e.g. {"best":
    {"start": "best"}, "fresh": {"model": params}}: each set is counted from each start, and the
    rule serves as many (set, start) pairs as it can (`choose_sampling`).
    -> {"guidance_grid", "guidance_by_size": {n: grid}, "low_levels", "low_levels_by_size",
        "high_levels", "high_levels_by_size", "weights", "lows", "highs", "starts", "counts": {key:
        {w: {"forget", "keep", "by_cell": {"high|low": {"forget": [ok, n], "keep": [ok, n]}}}}},
        "worst": {"w,..|l,..|h,..": count}, "k", "steps", "sampler", "seed", "rule", "split":
        "validation"}; a count's key is the set ("2,3"), or with several starts the set and start
        ("2,3 from best")."""
    lows, highs = check_levels(lows, "low"), check_levels(highs, "high")
    if starts is not None and (not isinstance(starts, dict) or not starts):
        raise ValueError(f"starts must be a non-empty dict {{label: forget kwargs}}, got {type(starts).__name__}")
    starts = starts if starts is not None else {"": {}}
    counts: dict = {}
    for fs, (label, start_kw) in ((fs, st) for fs in forget_sets for st in starts.items()):
        key = sweep_count_key(fs, label if len(starts) > 1 else "")
        counts[key] = {}
        for w in weights:
            run = dict(k=k, sampler=sampler, steps=steps, seed=seed, guidance=float(w), low=lows, high=highs,
                       keep_candidates=False, warn=False, **kw, **start_kw)
            f = forget(hypernet, list(fs), data, prompt="forget", **run)
            kp = forget(hypernet, list(fs), data, prompt="keep", **run) if f.forget_keep else None
            by_f = _count_by_cell(f, highs, lows)
            by_k = _count_by_cell(kp, highs, lows) if kp is not None else {c: [0, 1] for c in by_f}
            counts[key][str(float(w))] = {"forget": f.forget_keep, "keep": kp.forget_keep if kp is not None else 0,
                                          "by_cell": {c: {"forget": by_f[c], "keep": by_k[c]} for c in by_f}}
    sweep = {"weights": [float(w) for w in weights], "lows": [float(q) for q in lows],
             "highs": [float(h) for h in highs],
             "starts": [label for label in starts if label], "counts": counts,
             "k": int(k), "steps": int(steps), "sampler": sampler, "seed": int(seed), "split": "validation"}
    return choose_sampling(sweep, hypernet.default_guidance, tolerance)


def sweep_count_key(forget_set, start: str = "") -> str:
    """A sweep's count key: the forget set "2,3", with " from <start>" when several starts are swept."""
    return ",".join(map(str, forget_set)) + (f" from {start}" if start else "")


def cell_net(set_counts: dict, w: str, q: str, h: str | None) -> float:
    """One stored count key's (a set from a start) net share at cell (weight w, low q, high h; the
    keys as stored, h None in a sweep without high levels): forget-and-keep share under the forget
    prompt minus that under the keep prompt."""
    at = set_counts[w]
    c = at["by_low"][q] if h is None else at["by_cell"][f"{h}|{q}"]
    return c["forget"][0] / max(c["forget"][1], 1) - c["keep"][0] / max(c["keep"][1], 1)


def choose_sampling(sweep: dict, default_guidance: float, tolerance: float = 0.02) -> dict:
    """The grids a sweep's counts choose (pure: re-choosing a stored sweep needs no sampling).

    A (weight, low level, high level) cell's net count for a set is its forget minus keep share of
    forget-and-keep candidates, times K. A grid (a run of consecutive weights, of consecutive low
    levels and of consecutive high levels) spreads K evenly, so its expected net count for a set
    is the mean over its cells (with several starts, also over them). Sets that nothing forgets
    are skipped. One start (DiHyFo-2): the grid maximising the worst set's expected count; among
    grids within `tolerance` of that best, the largest (robust to requests the sweep did not see).
    Several starts (DiHyFo-1, whose candidates are nearly one network per cell and whose working
    cells move from one start to the next): the grid serving the most (set, start) pairs, then,
    of at most K // CELL_CANDIDATES cells (about CELL_CANDIDATES candidates each), the one holding
    the most cells that serve some pair, then the best worst-set count: breadth is what serves a
    start the sweep did not see. When nothing forgets, the model's single default weight and the
    default levels. The same rule over the sets of each size gives
    `guidance_by_size`, `low_levels_by_size` and `high_levels_by_size` (a request to forget n
    classes uses those of size n: a larger edit wants a larger weight); `guidance_grid`,
    `low_levels` and `high_levels` (over every set) serve the sizes not swept. A sweep stored
    before high levels were chosen (no "highs") keeps HIGH_LEVELS and gets no high-level keys.
    -> `sweep` with those keys, "worst" and "rule" added; with several starts also "served":
    {"all": [pairs served, pairs], "by_size": {n: [served, pairs]}} of the chosen grids."""
    counts, k = sweep["counts"], sweep["k"]
    ws, ls = [str(float(w)) for w in sweep["weights"]], [str(float(q)) for q in sweep["lows"]]
    hs = [str(float(h)) for h in sweep["highs"]] if sweep.get("highs") else [None]
    by_set: dict = {}                                   # set "2,3" -> its count keys, one per start
    for key in counts:
        by_set.setdefault(key.split(" from ")[0], []).append(key)

    def net(key):   # {(w, q, h): K x (forget share - keep share)} of one set from one start
        return {(w, q, h): k * cell_net(counts[key], w, q, h) for w in ws for q in ls for h in hs}

    several = len(sweep.get("starts") or []) > 1
    max_cells = max(1, k // CELL_CANDIDATES) if several else None

    def chosen(sets):
        g, worst, served = _best_grid([[net(key) for key in by_set[fs]] for fs in sets], ws, ls, hs, tolerance,
                                      max_cells)
        pairs = [served, sum(len(by_set[fs]) for fs in sets)]
        if g is None:
            return None, None, None, worst, pairs
        return ([float(w) for w in g[0]], [float(q) for q in g[1]],
                [float(h) for h in g[2]] if g[2] is not None else None, worst, pairs)

    grid, low, high, worst, served_all = chosen(list(by_set))
    grid = grid or [float(default_guidance)]
    low = low or [float(q) for q in LOW_LEVELS]
    high = high or [float(h) for h in HIGH_LEVELS]
    by_size, low_by_size, high_by_size, served_by_size = {}, {}, {}, {}
    for n in sorted({len(fs.split(",")) for fs in by_set}):
        g, q, h, _, served_by_size[str(n)] = chosen([fs for fs in by_set if len(fs.split(",")) == n])
        by_size[str(n)], low_by_size[str(n)], high_by_size[str(n)] = g or grid, q or low, h or high
    swept_highs = hs != [None]
    levels = "of consecutive low levels and of consecutive high levels" if swept_highs else "of consecutive low levels"
    out = {**sweep, "guidance_grid": grid, "guidance_by_size": by_size, "low_levels": low,
           "low_levels_by_size": low_by_size, "worst": worst,
           "rule": (f"the run of consecutive weights and {levels} serving the most (set, start) pairs (a cell with a "
                    "positive (forget - keep-prompt) forget-and-keep count from that start), then, of at most "
                    f"K // {CELL_CANDIDATES} cells, the one holding the most cells that serve some pair, then the best "
                    "worst-set expected count "
                    "(the mean over the starts)" if several else
                    f"the run of consecutive weights and {levels} maximising the worst forget set's expected "
                    "(forget - keep-prompt) forget-and-keep count (K spread evenly over the grid they span); the "
                    f"largest within {tolerance:.0%} of it") +
                   "; the same rule over the sets of each size for guidance_by_size and low_levels_by_size"
                   + (" and high_levels_by_size" if swept_highs else "")}
    if several:
        out["served"] = {"all": served_all, "by_size": served_by_size}
    if swept_highs:
        out.update({"high_levels": high, "high_levels_by_size": high_by_size})
    return out
