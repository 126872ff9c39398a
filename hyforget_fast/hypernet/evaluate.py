"""Prompt alignment of a DiHyFo on held-out runs (dissertation §2.3.2 Eq. 2.22, §3.2).

For each evaluated class c:
  prompts   `num_prompts` (20) regularly spaced values across c's observed validation loss
            range in the held-out runs: from its `percentiles[0]` to its `percentiles[1]`
            percentile (default 2nd..98th, so a few outlier checkpoints do not stretch the
            grid; (0, 100) gives min..max).
  items     for every prompt, `per_prompt` held-out checkpoints chosen with a seeded RNG (fresh
            draws for each prompt). The other classes are prompted "as in the data": the
            target vector is the item's own per-class losses L* with L*_c replaced by the
            prompt. DiHyFo-1 also gets a starting point (θ, L) from the same run:
              start="pair"  a held-out pair, θ strictly earlier in the run than θ* (the
                            training distribution: a run uniformly, then two checkpoints);
              start="init"  θ the run's initial (random) parameters, as in the dissertation's
                            "randomly-initialized input parameters".
  sampling  one network per item; all prompts x items of a class in ONE `hn.sample` call (or
            slices of `sample_batch`), seed derived from (seed, class).
  observed  per-class loss of each sampled network on the collection's VALIDATION split
            (rebuilt from the store manifest), by the fused evaluator `class_metrics`.
  refine    (DiHyFo-1, refine = R > 0) closed loop: after the draw, R more edits, each from the
            current networks conditioned on their losses measured on feedback data
            (`Hypernet.refine`). By default the feedback is one stratified half of the validation
            split (`validation_halves`) and every observed loss is measured on the OTHER half, so
            the feedback never sees the data that scores it.
  metrics   R²_c = 1 - Σ(L_obs - L_target)² / (Σ(L_target - mean L_target)² + ε), POOLED over
            all (prompt, item) pairs of class c. Every set of one network per prompt has the
            same targets (the grid), so this equals G.pt's mean over sets of the per-set R²
            (up to ε, when no loss is non-finite). Pearson r of observed vs target, pooled. Non-finite observed losses (NaN parameters) are left
            out of both and counted in `nonfinite`; dead networks have finite losses and count.

  retrieval the control: for each (prompt, item) target vector, the stored checkpoint of a
            TRAINING run (never a held-out one) nearest to it in log-loss space (Euclidean over
            every class of log(L + 1e-3), the hypernetworks' own loss representation up to scale),
            scored by its stored validation losses: `r2_retrieval` / `pearson_retrieval`. It is
            what a lookup in the store achieves on the same prompts; a hypernetwork that does not
            beat it has not learned more than its training data holds. It ignores DiHyFo-1's start.

Nothing here reads the test split.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch

from ..collection.data import load_splits
from ..collection.store import CheckpointStore
from ..ops.functional import class_metrics
from .checkpoint import manifest_sha256
from .models import LOG_EPS

R2_EPS = 1e-8


# ----------------------------------------------------------------------------- metrics
def prompt_alignment_r2(observed, target, eps: float = R2_EPS) -> float:
    """Eq. 2.22: 1 - Σ(obs - tgt)² / (Σ(tgt - mean tgt)² + eps), float64. obs, tgt (n,).
    NaN when n == 0."""
    o = np.asarray(observed, dtype=np.float64).reshape(-1)
    t = np.asarray(target, dtype=np.float64).reshape(-1)
    if o.shape != t.shape:
        raise ValueError(f"observed and target must have the same length, got {o.shape} and {t.shape}")
    if o.size == 0:
        return float("nan")
    return float(1.0 - ((o - t) ** 2).sum() / (((t - t.mean()) ** 2).sum() + eps))


def pearson(observed, target) -> float:
    """Pearson correlation of obs and tgt (n,), float64; NaN when n < 2 or either is constant."""
    o = np.asarray(observed, dtype=np.float64).reshape(-1)
    t = np.asarray(target, dtype=np.float64).reshape(-1)
    if o.shape != t.shape:
        raise ValueError(f"observed and target must have the same length, got {o.shape} and {t.shape}")
    if o.size < 2:
        return float("nan")
    do, dt = o - o.mean(), t - t.mean()
    den = math.sqrt((do ** 2).sum() * (dt ** 2).sum())
    return float((do * dt).sum() / den) if den > 0 else float("nan")


def prompt_grid(losses, num_prompts: int = 20, percentiles: tuple[float, float] = (2.0, 98.0)) -> np.ndarray:
    """`num_prompts` evenly spaced values from the lo to the hi percentile of the finite `losses`."""
    x = np.asarray(losses, dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise ValueError("no finite held-out loss to span prompts over")
    lo, hi = np.percentile(x, percentiles)
    return np.linspace(lo, hi, int(num_prompts))


# ----------------------------------------------------------------------------- data
def validation_split(store: CheckpointStore):
    """The collection's validation split (X_val (N, 784) float32, y_val (N,) int64 in 0..m-1),
    rebuilt from the manifest's split record and checked against its recorded sizes."""
    try:
        splits = load_splits(store)
    except ValueError as e:
        raise ValueError(f"{e}; pass splits= explicitly") from None
    return splits.X_val, splits.y_val


def validation_halves(X: torch.Tensor, y: torch.Tensor):
    """Two disjoint halves of a split, stratified by class: within each class, examples 0, 2, 4,
    ... (in split order) form the feedback half A and 1, 3, 5, ... the scoring half B.
    -> ((X_A, y_A), (X_B, y_B))."""
    if y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise ValueError(f"X (N, d) and y (N,) must have the same N, got {tuple(X.shape)} and {tuple(y.shape)}")
    a = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    for c in torch.unique(y):
        idx = (y == c).nonzero().flatten()
        a[idx[0::2]] = True
    return (X[a], y[a]), (X[~a], y[~a])


def _heldout_rows(store: CheckpointStore, heldout_runs) -> tuple[dict, np.ndarray]:
    """-> ({run id: its global rows sorted by step}, all held-out rows); rows whose stored losses
    are not all finite are left out (a NaN prompt is refused by the sampler)."""
    run, step = store.load("run"), store.load("step")
    finite = np.isfinite(store.load("class_loss")).all(1)                      # (n,)
    ids = np.unique(np.asarray(list(heldout_runs), dtype=np.int64))
    if ids.size == 0:
        raise ValueError("heldout_runs is empty: the evaluation needs at least one held-out run")
    missing = np.setdiff1d(ids, run)
    if missing.size:
        raise ValueError(f"held-out runs {missing[:10].tolist()} are not in the store {store.root}")
    per_run = {}
    for r in ids.tolist():
        rows = np.flatnonzero((run == r) & finite)
        per_run[r] = rows[np.argsort(step[rows], kind="stable")]
    rows = np.sort(np.concatenate(list(per_run.values())))
    if rows.size == 0:
        raise ValueError("the held-out runs hold no checkpoint with finite losses")
    return per_run, rows


def _training_lookup(store: CheckpointStore, per_run: dict):
    """The retrieval control's index: (log(L + LOG_EPS) of every stored checkpoint of a training run
    with finite losses (n, m) float64 tensor, their stored validation losses (n, m) float64)."""
    loss = store.load("class_loss").astype(np.float64)                          # (N, m)
    train = ~np.isin(store.load("run"), np.fromiter(per_run, np.int64)) & np.isfinite(loss).all(1)
    if not train.any():
        raise ValueError("the store has no checkpoint of a training run with finite losses to retrieve from")
    loss = loss[train]                                                          # (n, m)
    return torch.from_numpy(np.log(loss + LOG_EPS)), loss


def _retrieve(lookup, target: np.ndarray, ci: int) -> np.ndarray:
    """Class ci's stored validation loss (k,) of the training checkpoint nearest each target row."""
    log_loss, loss = lookup
    q = torch.from_numpy(np.log(np.maximum(target.astype(np.float64), 0) + LOG_EPS))   # (k, m)
    nearest = torch.cdist(q, log_loss).argmin(1).numpy()                                # (k,)
    return loss[nearest, ci]


def _draw_items(rng, n: int, kind: str, start: str, per_run: dict, rows: np.ndarray, phase: np.ndarray):
    """n items -> (star rows (n,), start rows (n,) or None). DiHyFo-2: checkpoints uniformly
    among held-out rows. DiHyFo-1: a run uniformly, then (θ, θ*) with θ earlier in that run."""
    if kind != "dihyfo1":
        return rows[rng.integers(0, len(rows), n)], None
    if start == "pair":
        runs = [r for r in per_run.values() if len(r) >= 2]
        if not runs:
            raise ValueError("no held-out run has two checkpoints: DiHyFo-1 needs (θ, θ*) pairs")
        a_idx, b_idx = np.empty(n, np.int64), np.empty(n, np.int64)
        for i, k in enumerate(rng.integers(0, len(runs), n)):
            a, b = np.sort(rng.choice(len(runs[k]), 2, replace=False))
            a_idx[i], b_idx[i] = runs[k][a], runs[k][b]
        return b_idx, a_idx
    runs = [(r[phase[r] == 0], r[phase[r] != 0]) for r in per_run.values()]
    runs = [(i[0], rest) for i, rest in runs if len(i) and len(rest)]
    if not runs:
        raise ValueError("no held-out run has both its initial parameters and a later checkpoint (start='init')")
    ks = rng.integers(0, len(runs), n)
    return (np.array([runs[k][1][rng.integers(0, len(runs[k][1]))] for k in ks], np.int64),
            np.array([runs[k][0] for k in ks], np.int64))


# ----------------------------------------------------------------------------- evaluation
def _as_params(out, k: int, P: int) -> torch.Tensor:
    p = torch.as_tensor(out)
    if p.shape != (k, P):
        raise ValueError(f"hn.sample returned shape {tuple(p.shape)}, expected ({k}, {P})")
    return p.float()


def _check_settings(sampler: str, start: str, num_prompts, per_prompt, percentiles, max_items) -> tuple[int, int]:
    """Validate the sampling settings -> (num_prompts, per_prompt), per_prompt lowered to fit max_items."""
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    if start not in ("pair", "init"):
        raise ValueError(f"start must be 'pair' or 'init', got {start!r}")
    if int(num_prompts) < 2 or int(per_prompt) < 1:
        raise ValueError(f"need num_prompts >= 2 and per_prompt >= 1, got {num_prompts}, {per_prompt}")
    lo_q, hi_q = percentiles
    if not 0 <= lo_q < hi_q <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= lo < hi <= 100, got {percentiles}")
    if max_items is not None:
        if int(max_items) < 1:
            raise ValueError(f"max_items must be positive, got {max_items}")
        per_prompt = max(1, min(int(per_prompt), int(max_items) // int(num_prompts)))
    return int(num_prompts), int(per_prompt)


def _open_store(hn, meta: dict, data_dir, runs_from_meta: bool) -> CheckpointStore:
    """The collection, checked against the hypernetwork: the same spec and classes, and (when the
    held-out runs come from the model's meta) the same manifest hash, as run ids name runs of it."""
    store = data_dir if isinstance(data_dir, CheckpointStore) else CheckpointStore(str(data_dir), verify="size")
    want_sha = (meta.get("dataset") or {}).get("manifest_sha256")
    if want_sha is not None and runs_from_meta and manifest_sha256(store.root) != want_sha:
        # held-out run ids name runs of the training dataset; in another collection they are others
        raise ValueError(f"{store.root} is not the collection this hypernetwork was trained on "
                         f"(manifest hash differs): its held-out run ids do not apply there")
    if tuple(hn.spec.layer_sizes) != tuple(store.layer_sizes):
        raise ValueError(f"hypernetwork spec {tuple(hn.spec.layer_sizes)} does not match the collection's "
                         f"{tuple(store.layer_sizes)} ({store.root})")
    all_classes = [int(c) for c in store.classes]
    if meta.get("classes") is not None and [int(c) for c in meta["classes"]] != all_classes:
        raise ValueError(f"hypernetwork classes {list(meta['classes'])} differ from the collection's {all_classes}")
    return store


def _sample_items(hn, tgt: torch.Tensor, kw: dict, sampler: str, steps: int, seed: int, c: int, bs: int,
                  guidance) -> torch.Tensor:
    """One network per item (row of tgt), in slices of `bs` -> (k, P) float32."""
    k, P = tgt.shape[0], hn.spec.num_params
    outs = []
    for b0 in range(0, k, bs):
        sl = slice(b0, min(k, b0 + bs))
        n = sl.stop - sl.start
        outs.append(_as_params(hn.sample(tgt[sl], n, sampler=sampler, steps=steps,
                                         seed=int(seed) * 1_000_003 + c * 1009 + b0,
                                         **({} if guidance is None else {"guidance": guidance}),
                                         **{a: v[sl] for a, v in kw.items()}), n, P))
    return torch.cat(outs)


def _evaluate_class(hn, store: CheckpointStore, c: int, ci: int, held_loss: np.ndarray, per_run: dict,
                    rows: np.ndarray, phase: np.ndarray, X_val, y_val, lookup, *, num_prompts: int,
                    per_prompt: int, percentiles, start: str, sampler: str, steps: int, seed: int, bs: int,
                    guidance, eps: float, refine: int = 0, feedback=None) -> dict:
    """Class c (column ci): its prompt grid, the items (others prompted as in the data), one sampled
    network per item, its validation loss -> {r2, pearson, nonfinite, prompts, target, observed,
    range, reference, r2_retrieval, pearson_retrieval}."""
    kind = hn.cfg.kind
    k = num_prompts * per_prompt
    grid = prompt_grid(held_loss[:, ci], num_prompts, percentiles)       # (num_prompts,)
    rng = np.random.default_rng([int(seed), c])
    star, src = _draw_items(rng, k, kind, start, per_run, rows, phase)    # item j -> prompt j // per_prompt
    target = store.take("class_loss", star).astype(np.float32)           # (k, m) others as in the data
    target[:, ci] = np.repeat(grid, per_prompt)
    kw = {}
    if kind == "dihyfo1":
        kw = {"theta": torch.from_numpy(store.take("params", src)), "losses": torch.from_numpy(store.take("class_loss", src))}
    params = _sample_items(hn, torch.from_numpy(target), kw, sampler, steps, seed, c, bs, guidance)   # (k, P)
    if refine:
        X_fb, y_fb = feedback
        params = hn.refine(torch.from_numpy(target), params, X_fb, y_fb, refine,
                           seed=int(seed) * 1_000_003 + c * 1009 + 7919 * refine, sampler=sampler, steps=steps,
                           batch=bs, **({} if guidance is None else {"guidance": guidance})).float()
    obs = class_metrics(params, hn.spec, X_val.to(params.device), y_val.to(params.device)).class_loss[:, ci]
    obs = obs.double().cpu().numpy()                                       # (k,)
    tc = target[:, ci].astype(np.float64)
    ok = np.isfinite(obs)
    fin = held_loss[:, ci][np.isfinite(held_loss[:, ci])]
    looked_up = _retrieve(lookup, target, ci)                              # (k,) the retrieval control
    return {"r2": prompt_alignment_r2(obs[ok], tc[ok], eps), "pearson": pearson(obs[ok], tc[ok]),
            "r2_retrieval": prompt_alignment_r2(looked_up, tc, eps), "pearson_retrieval": pearson(looked_up, tc),
            "nonfinite": int((~ok).sum()), "prompts": grid.tolist(), "target": tc.tolist(),
            "observed": [float(v) if math.isfinite(v) else float("nan") for v in obs.tolist()],
            "retrieved": looked_up.tolist(), "rows": star.tolist(), "start_rows": None if src is None else src.tolist(),
            "range": [float(fin.min()), float(fin.max())], "reference": float(np.median(fin))}


def _mean(d: dict, keys) -> float:
    v = [d[c] for c in keys if math.isfinite(d[c])]
    return float(np.mean(v)) if v else float("nan")


def evaluate_hypernet(hn, data_dir, heldout_runs=None, num_prompts: int = 20, per_prompt: int = 8,
                      sampler: str = "ddim", steps: int = 20, seed: int = 0, max_items: int | None = None,
                      classes: Sequence[int] | None = None, *, start: str = "pair",
                      percentiles: tuple[float, float] = (2.0, 98.0), splits=None,
                      sample_batch: int | None = None, eps: float = R2_EPS, guidance: float | None = None,
                      refine: int = 0, feedback=None) -> dict:
    """Per-class prompt alignment R² and Pearson r of a hypernetwork on held-out runs.

    hn: anything with .sample(target_losses (k, m), k, sampler=, steps=, seed=, theta=, losses=)
        -> (k, P), .spec (MLPSpec) and .cfg.kind ("dihyfo1" | "dihyfo2"); e.g. a `Hypernet`.
    data_dir: a collection folder or an open CheckpointStore (None: hn.meta['data_dir'], the
    training dataset as `load_hypernet` found it). heldout_runs: run ids (None:
    hn.meta['heldout_runs']). classes: digit labels to evaluate
    (default all). max_items caps the networks sampled per class: per_prompt is lowered to
    max(1, max_items // num_prompts). splits: (X_val, y_val) or a DigitSplits, to skip
    rebuilding the validation split (e.g. every evaluation of a training run).
    refine (DiHyFo-1): closed-loop edits after the draw (module docstring). feedback: (X, y) they
    measure on; None = half A of the validation split, and then every loss is observed on half B
    (`validation_halves`); given, losses are observed on the whole validation split.
    Returns a JSON-able dict (int class keys): r2, pearson, nonfinite,
    r2_mean, r2_free_mean, pearson_mean, pearson_free_mean, prompts / target / observed / range /
    reference (median held-out loss) per class, r2_retrieval / pearson_retrieval per class and
    r2_retrieval_free_mean (the retrieval control, module docstring), and `settings`. Per class and
    item, in the order of target / observed: rows (the store row whose losses prompt the other
    classes), start_rows (DiHyFo-1's θ row; None for DiHyFo-2) and retrieved (the retrieval
    control's loss).
    """
    t0 = time.perf_counter()
    meta = getattr(hn, "meta", None) or {}
    kind = hn.cfg.kind
    if data_dir is None:
        data_dir = meta.get("data_dir")
    runs_from_meta = heldout_runs is None
    if runs_from_meta:
        heldout_runs = meta.get("heldout_runs")
    if data_dir is None or heldout_runs is None:
        raise ValueError("need data_dir and heldout_runs (or a hypernet whose meta records them; a hypernetwork "
                         "whose training dataset was not found needs data_dir)")
    num_prompts, per_prompt = _check_settings(sampler, start, num_prompts, per_prompt, percentiles, max_items)
    store = _open_store(hn, meta, data_dir, runs_from_meta)
    all_classes = [int(c) for c in store.classes]
    pivots = [int(p) for p in store.manifest.get("pivots", meta.get("pivots", []))]
    classes = all_classes if classes is None else [int(c) for c in classes]
    bad = [c for c in classes if c not in all_classes]
    if bad or not classes:
        raise ValueError(f"classes {bad or classes} are not among the collection's classes {all_classes}")

    if splits is None:
        X_val, y_val = validation_split(store)
    elif isinstance(splits, (tuple, list)):
        X_val, y_val = splits
    else:
        X_val, y_val = splits.X_val, splits.y_val
    if isinstance(refine, bool) or int(refine) != refine or refine < 0:
        raise ValueError(f"refine must be a non-negative integer, got {refine!r}")
    refine = int(refine)
    if refine and kind != "dihyfo1":
        raise ValueError("refine is for DiHyFo-1 (closed-loop edits of a start network)")
    measured_on = "validation split"
    if refine and feedback is None:
        feedback, (X_val, y_val) = validation_halves(X_val, y_val)
        measured_on = "validation half B (refine feedback on half A)"
    elif refine:
        measured_on = "validation split (refine feedback on the given data)"
    per_run, rows = _heldout_rows(store, heldout_runs)
    held_loss = store.take("class_loss", rows)                                # (n_held, m)
    phase = np.full(len(store), -1, np.int8)
    phase[rows] = store.take("phase", rows)
    bs = num_prompts * per_prompt if sample_batch is None else int(sample_batch)
    if bs < 1:
        raise ValueError(f"sample_batch must be positive, got {sample_batch}")

    lookup = _training_lookup(store, per_run)
    keys = ("r2", "pearson", "nonfinite", "prompts", "target", "observed", "range", "reference",
            "r2_retrieval", "pearson_retrieval", "retrieved", "rows", "start_rows")
    res = {k_: {} for k_ in keys}
    for c in classes:
        one = _evaluate_class(hn, store, c, all_classes.index(c), held_loss, per_run, rows, phase, X_val, y_val,
                              lookup, num_prompts=num_prompts, per_prompt=per_prompt, percentiles=percentiles, start=start,
                              sampler=sampler, steps=steps, seed=seed, bs=bs, guidance=guidance, eps=eps,
                              refine=refine, feedback=feedback)
        for k_ in keys:
            res[k_][c] = one[k_]

    free = [c for c in classes if c not in pivots]
    lo_q, hi_q = percentiles
    res.update({
        "kind": kind, "classes": all_classes, "pivots": pivots, "evaluated_classes": classes, "free_classes": free,
        "r2_mean": _mean(res["r2"], classes), "r2_free_mean": _mean(res["r2"], free),
        "pearson_mean": _mean(res["pearson"], classes), "pearson_free_mean": _mean(res["pearson"], free),
        "r2_retrieval_free_mean": _mean(res["r2_retrieval"], free),
        "nonfinite_total": int(sum(res["nonfinite"].values())),
        "settings": {"sampler": sampler, "steps": int(steps), "num_prompts": num_prompts, "per_prompt": per_prompt,
                     "seed": int(seed), "start": start if kind == "dihyfo1" else None,
                     "guidance": guidance if guidance is not None else getattr(hn, "default_guidance", None),
                     "percentiles": [float(lo_q), float(hi_q)], "eps": float(eps),
                     "r2": "pooled over all (prompt, item) pairs of the class (= mean per-set R²)",
                     "retrieval": "the training-run checkpoint nearest each target in log(L + 1e-3), its stored "
                                  "validation losses",
                     "refine": refine, "measured_on": measured_on, "heldout_runs": sorted(int(r) for r in per_run),
                     "heldout_checkpoints": int(len(rows)), "data_dir": str(store.root)},
        "seconds": time.perf_counter() - t0,
    })
    return res


# ----------------------------------------------------------------------------- saving
def to_jsonable(obj):
    """Dict keys -> str, numpy scalars / arrays -> Python, NaN / inf -> None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def save_evaluation(result: dict, out_dir: str, name: str = "eval.json") -> dict:
    """Write `result` as out_dir/name (atomic, strict JSON: NaN -> null), the scatter plots
    out_dir/alignment.png and, when out_dir/curves.json exists, out_dir/learning_curves.png.
    -> {"json": path, "alignment": path, "learning_curves": path or None}."""
    import json
    import os

    from ..collection.store import write_json_atomic
    from .figures import plot_alignment, plot_learning_curves
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    write_json_atomic(path, to_jsonable(result))
    out = {"json": path, "alignment": plot_alignment(result, os.path.join(out_dir, "alignment.png")),
           "learning_curves": None}
    cpath = os.path.join(out_dir, "curves.json")
    if os.path.exists(cpath):
        with open(cpath) as f:
            curves = json.load(f)
        out["learning_curves"] = plot_learning_curves(curves, os.path.join(out_dir, "learning_curves.png"))
    return out
