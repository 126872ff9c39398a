"""`hyforget evaluate`: every method, every metric, on the same data; tables shaped like the
dissertation's Tables 3.1-3.4, with the controls and fair baselines that make them evidence,
plus edit locality, memorization and relearning.

For each forget set and seed, on one collection (its split, its store):
  original     the starting classifier: the user's (`model=`) or the most accurate stored checkpoint
               on validation (`forget.best_checkpoint`)
  DiHyFo-1/2   forget() with K candidates chosen on VALIDATION (DiHyFo-1 edits `original`)
  controls     the same model, K, sampler, seed and selection rule, NOT asked to forget: the
               keep-every-class prompt (`:keep`), and the unconditional branch (`:uncond`, guidance 0)
               where the model was trained with target dropout. Neither depends on the forget set,
               so their K candidates are sampled once per model and seed and rescored per set.
  store        the selection rule applied straight to the stored checkpoints' validation metrics,
               over the whole store (no model at all)
  retrieval    equal budget: the K stored checkpoints nearest to the K prompts (distinct), chosen
               by the same rule on their stored validation metrics
  retrain      S seeds at once without D_f, best on validation (the gold standard); its median too
  finetune, neggrad_plus, random_labels, ssd   edits of `original`, each TUNED on validation over
               a small grid (baselines.TUNING_GRIDS); the search time is their time
  user methods `methods={name: fn}` with the baselines' signature, edits of `original`
For every candidate source the report counts how many of its candidates meet the forget-and-keep
criterion (selection.FORGET_MAX / RETAIN_MIN on validation). Every reported metric is then
computed on the held-out TEST split (MIA also reads the retain TRAIN samples, as its definition
requires). Nothing on the test split feeds back into a choice.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Sequence

import numpy as np
import torch

from ..collection.store import CheckpointStore, write_json_atomic
from . import baselines as B
from . import metrics as M
from .forget import best_checkpoint, choose, forget, forget_prompts, guidance_grid, loss_quantile_table, low_levels
from .mlp import batched_logits, check_flat, flat_params, module_spec
from .selection import FORGET_MAX, RETAIN_MIN, class_indices, forget_keep_count, group_accuracy, select

EDIT_METHODS = ("dihyfo1", "finetune", "neggrad_plus", "random_labels", "ssd")
GENERATED = ("dihyfo1", "dihyfo2")
CONTROLS = ("keep", "uncond")
POST_HOC = ("finetune", "neggrad_plus", "random_labels", "ssd")
LABELS = {"original": "Original model", "dihyfo1": "DiHyFo-1", "dihyfo1:keep": "DiHyFo-1, keep-every-class prompt",
          "dihyfo1:uncond": "DiHyFo-1, unconditional", "dihyfo2": "DiHyFo-2",
          "dihyfo2:keep": "DiHyFo-2, keep-every-class prompt", "dihyfo2:uncond": "DiHyFo-2, unconditional",
          "store": "Store (selection rule over every stored checkpoint)",
          "retrieval": "Retrieval (K nearest stored, same rule)",
          "retrain": "Retrained (best of S, val)", "retrain_median": "Retrained (median seed)",
          "finetune": "Fine-tune (tuned)", "neggrad_plus": "NegGrad+ (tuned)", "random_labels": "Random labels (tuned)",
          "ssd": "SSD (tuned)"}

# The dissertation's Tables 3.1-3.4 (φ in the bad-teacher convention), by classes and forget set.
DISSERTATION = {
    (0, 1, 2, 3): {
        "2": {"dihyfo1": dict(acc_retain=0.9838, acc_forget=0.0, mia=0.6310, overlap_forget=0.3499,
                              activation_distance=0.4467, phi_bt=0.8537),
              "dihyfo2": dict(acc_retain=0.9844, acc_forget=0.0, mia=0.4432, overlap_forget=0.6657,
                              activation_distance=0.1657, phi_bt=0.9630),
              "retrain": dict(acc_retain=0.9938, acc_forget=0.0, mia=0.4171)},
        "2,3": {"dihyfo1": dict(acc_retain=0.9967, acc_forget=0.0, mia=0.6338, overlap_forget=0.6812,
                                activation_distance=0.3597, phi_bt=0.9272),
                "dihyfo2": dict(acc_retain=0.9995, acc_forget=0.0, mia=0.3994, overlap_forget=0.7988,
                                activation_distance=0.1555, phi_bt=0.9723),
                "retrain": dict(acc_retain=0.9991, acc_forget=0.0, mia=0.3398)}},
    tuple(range(10)): {
        "2": {"dihyfo1": dict(acc_retain=0.9110, acc_forget=0.0, mia=0.3376, overlap_forget=0.5731,
                              activation_distance=0.1760, phi_bt=0.9876),
              "dihyfo2": dict(acc_retain=0.7281, acc_forget=0.0, mia=0.3604, overlap_forget=0.4035,
                              activation_distance=0.9508, phi_bt=0.4124),
              "retrain": dict(acc_retain=0.9193, acc_forget=0.0, mia=0.3562)},
        "2,3,4": {"dihyfo1": dict(acc_retain=0.9411, acc_forget=0.0, mia=0.3992, overlap_forget=0.7946,
                                  activation_distance=0.1282, phi_bt=0.9952),
                  "dihyfo2": dict(acc_retain=0.9460, acc_forget=0.0, mia=0.3241, overlap_forget=0.7067,
                                  activation_distance=0.1878, phi_bt=0.9852),
                  "retrain": dict(acc_retain=0.9479, acc_forget=0.0, mia=0.3406)},
        "0,1,2,3,4": {"dihyfo1": dict(acc_retain=0.9362, acc_forget=0.0, mia=0.4379, overlap_forget=0.7891,
                                      activation_distance=0.1715, phi_bt=0.9943),
                      "dihyfo2": dict(acc_retain=0.9519, acc_forget=0.0, mia=0.3270, overlap_forget=0.6331,
                                      activation_distance=0.2928, phi_bt=0.9535),
                      "retrain": dict(acc_retain=0.9504, acc_forget=0.0, mia=0.3798)}},
}


def splits_of(store: CheckpointStore):
    """The collection's own train / val / test split, rebuilt from its manifest."""
    from ..collection.data import load_splits
    return load_splits(store)


class StoreView:
    """The store's per-class VALIDATION accuracies and losses, read once, and its parameters on demand."""

    def __init__(self, store: CheckpointStore, splits):
        self.store = store
        self.class_acc = torch.from_numpy(store.load("class_acc"))            # (N, m)
        self.index = B.RetrievalIndex.from_store(store)
        self.val_counts = torch.bincount(splits.y_val, minlength=len(store.classes))

    def accuracies(self, rows, fidx) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.class_acc if rows is None else self.class_acc[torch.as_tensor(rows)]
        ridx = [c for c in range(a.shape[1]) if c not in fidx]
        return group_accuracy(a, self.val_counts, fidx), group_accuracy(a, self.val_counts, ridx)

    def params(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.store.take("params", np.array([int(i)]))[0].copy())


def store_choice(view: StoreView, fidx, retain_min: float = RETAIN_MIN) -> tuple[B.BaselineResult, int]:
    """The selection rule over every stored checkpoint's validation metrics -> (its pick, how many
    stored checkpoints meet the forget-and-keep criterion)."""
    t0 = time.perf_counter()
    f, r = view.accuracies(None, fidx)
    i = select(f, r)
    res = B.BaselineResult("store", view.params(i), time.perf_counter() - t0,
                           {"selection": "lowest stored val forget acc, then highest val retain acc"},
                           {"index": i, "store_size": len(f)})
    return res, forget_keep_count(f, r, retain_min=retain_min)


def retrieval_choice(view: StoreView, prompts: torch.Tensor, fidx,
                     retain_min: float = RETAIN_MIN) -> tuple[B.BaselineResult, int]:
    """Equal budget: the K stored checkpoints nearest the K prompts (distinct), then the hypernetworks'
    rule on their stored validation metrics -> (its pick, how many of the K meet the criterion)."""
    t0 = time.perf_counter()
    rows = view.index.nearest_distinct(prompts.double().numpy())                # (K,)
    f, r = view.accuracies(rows, fidx)
    i = select(f, r)
    res = B.BaselineResult("retrieval", view.params(rows[i]), time.perf_counter() - t0,
                           {"candidates": len(rows), "metric": "squared L2 over per-class validation losses",
                            "selection": "lowest stored val forget acc, then highest val retain acc"},
                           {"index": int(rows[i]), "target": prompts[i].tolist(), "store_size": len(view.index)})
    return res, forget_keep_count(f, r, retain_min=retain_min)


def softmax64(params: torch.Tensor, spec, X: torch.Tensor) -> torch.Tensor:
    """(P,) one network on X (N, D) -> (N, m) float64 softmax. In float64 a probability underflows
    to 0 only at a logit gap above ~745 (float32: ~104), so the bad-teacher φ, whose KL(M||P) term
    grows with -log P, is computed from the true value rather than from an underflowed 0."""
    with torch.no_grad():
        return batched_logits(params.double()[None], spec, X.double())[0].softmax(-1)


def _test_metrics(name: str, params: torch.Tensor, ref: dict, ctx: dict) -> dict:
    """Every metric of one method's model on the test split (and MIA's retain-train rows);
    ref["retrain"]: the retrained model's test softmax (N, m), the paired metrics' reference."""
    spec, sp, fidx = ctx["spec"], ctx["splits"], ctx["fidx"]
    probs = ctx["probs"][name] = softmax64(params, spec, sp.X_test)                              # (N, m)
    acc = M.accuracies(probs, sp.y_test, fidx)
    tr_f = torch.isin(sp.y_train, torch.tensor(fidx))
    p_train = softmax64(params, spec, sp.X_train)
    mia = M.mia(p_train[~tr_f], probs, p_train[tr_f], attack=ctx["mia_attack"], seed=ctx["seed"])
    row = {"acc_retain": acc["retain"], "acc_forget": acc["forget"], "acc_all": acc["all"], "mia": mia.score}
    pr = ref["retrain"]
    ov = M.split_overlaps(probs, pr, sp.y_test, fidx)
    row.update({"overlap_retain": ov["retain"], "overlap_forget": ov["forget"], "overlap_all": ov["all"],
                "activation_distance": M.activation_distance(probs, pr), "phi": M.unlearning_score(probs, pr),
                "phi_bt": M.unlearning_score(probs, pr, "bad_teacher")})
    starts = ctx.get("start_of", {})
    if (name in EDIT_METHODS or name in ctx.get("user_methods", ()) or name in starts) and \
            starts.get(name, ctx["original"]) is not None:      # a random start has nothing to stay close to
        te_r = ~torch.isin(sp.y_test, torch.tensor(fidx))
        el = M.edit_locality(params, starts.get(name, ctx["original"]), spec, sp.X_test[te_r])
        row.update({"edit_overlap_retain": el.retain_overlap, "edit_l2": el.param_distance})
    if base_method(name) in GENERATED and ":" not in name and ctx.get("ckpt_index") is not None:
        nn_ = ctx["ckpt_index"].query(params)
        row["nearest_stored_distance"] = float(np.asarray(nn_.distance).reshape(-1)[0])
    return row


def _anamnesis(params, ctx) -> dict:
    sp, fidx = ctx["splits"], ctx["fidx"]
    f_tr, f_va = torch.isin(sp.y_train, torch.tensor(fidx)), torch.isin(sp.y_val, torch.tensor(fidx))
    r = M.anamnesis_index(params, ctx["retrain_params"], ctx["original"], ctx["spec"], sp.X_train[f_tr],
                          sp.y_train[f_tr], sp.X_val[f_va], sp.y_val[f_va], max_steps=300, seed=ctx["seed"])
    return {"relearn_steps": r.steps_unlearned, "relearn_steps_retrained": r.steps_retrained,
            "anamnesis_index": r.ratio}


def _as_flat(model, spec, name: str) -> torch.Tensor:
    if isinstance(model, torch.nn.Module):
        return flat_params(model, spec).float()
    return check_flat(model, spec, name)[0].float()


def evaluate_model(model, splits, forget=None, *, spec=None, reference=None, original=None, mia_attack: str = "logreg",
                   seed: int = 0, retrain_seeds: int = 5) -> dict:
    """Every unlearning metric of ONE model, without running the whole report: test-split
    accuracies and MIA, the paired metrics (overlaps, activation distance, φ in both conventions)
    against `reference`, and edit locality against `original` when given.

    model / reference / original: nn.Module or flat (P,) parameters of `spec` (taken from an
    nn.Sequential model when None), or a ForgetResult: then its chosen model, its forget classes
    when forget is None, its DiHyFo-1 start as the original, and `splits` must be the split it was
    chosen on (refused otherwise: the test split of another split may hold its training digits).
    forget: digit labels (as in splits.classes). reference None = retraining without D_f (best of
    `retrain_seeds` on validation, the report's gold standard).
    -> {metric: float}, the same keys as a row of the report."""
    from .forget import ForgetResult
    if isinstance(model, ForgetResult):
        res = model
        want = (res.settings.get("data") or {}).get("split")
        if want:
            from ..hypernet.checkpoint import split_differences
            diff = split_differences(want, splits.describe())
            if diff:
                raise ValueError("splits is not the split this forget result was chosen on: "
                                 + "; ".join(f"{k}: chosen on {a}, given {b}" for k, (a, b) in diff.items())
                                 + ". Build it from the collection folder with hf.load_splits(folder)")
        if forget is None:
            forget = list(res.forget_classes)
        elif sorted(forget) != sorted(res.forget_classes):
            raise ValueError(f"forget {list(forget)} differs from the result's forget classes {list(res.forget_classes)}")
        if original is None and res.start_params is not None and res.start.get("kind") != "random":
            original = res.start_params
        model = res.model
    if spec is None:
        if not isinstance(model, torch.nn.Module):
            raise ValueError("pass spec= (an MLPSpec) with flat parameters")
        spec = module_spec(model)
    fidx = B.forget_indices(splits, forget)
    params = _as_flat(model, spec, "model")
    ref = B.retrain(None, spec, forget, splits, seeds=retrain_seeds, seed=seed).params if reference is None else \
        _as_flat(reference, spec, "reference")
    ctx = {"spec": spec, "splits": splits, "fidx": fidx, "seed": seed, "probs": {}, "mia_attack": mia_attack,
           "original": None if original is None else _as_flat(original, spec, "original"),
           "user_methods": ("model",) if original is not None else ()}
    probs_ref = softmax64(ref, spec, splits.X_test)
    return _test_metrics("model", params, {"retrain": probs_ref}, ctx)


START_LABELS = {"model": "from the user's model", "best": "from the best stored checkpoint",
                "random": "from a random initialisation"}


def base_method(name: str) -> str:
    """A report row's method: "dihyfo1@random:keep" -> "dihyfo1"."""
    return name.split(":")[0].split("@")[0]


def generated_rows(hypernets: dict, starts: Sequence[str], model_given: bool) -> list[tuple[str, str, str | None]]:
    """(row name, kind, DiHyFo-1 start) of every hypernetwork row. DiHyFo-1 gets one row per start:
    "dihyfo1" for the report's original model (the user's when given, else the best stored
    checkpoint), "dihyfo1@best" / "dihyfo1@random" for the other starts."""
    rows = []
    for kind in hypernets:
        if kind != "dihyfo1":
            rows.append((kind, kind, None))
            continue
        for st in starts:
            main = st == "model" or (st == "best" and not model_given)
            rows.append(("dihyfo1" if main else f"dihyfo1@{st}", kind, st))
    return rows


def row_label(name: str, report: dict | None = None) -> str:
    """Readable label of a report row, with DiHyFo-1's start and the controls spelled out. A
    report made without tuning (its tuning_grids None) labels the post-hoc baselines "(defaults)"."""
    if name in POST_HOC and report is not None and "tuning_grids" in report and report["tuning_grids"] is None:
        return LABELS[name].replace("(tuned)", "(defaults)")
    if name in LABELS:
        return LABELS[name]
    meth, _, ctl = name.partition(":")
    base, _, st = meth.partition("@")
    if base in GENERATED and st in START_LABELS:
        lab = f"{LABELS[base]} {START_LABELS[st]}"
        return lab + {"keep": ", keep-every-class prompt", "uncond": ", unconditional", "": ""}[ctl]
    return f"{name} (user method)"


def _sample_rows(hypernets, rows, fs, fidx, splits, seed, original, orig_kind, orig_info, control_cache, out, *, k,
                 sampler, steps, guidance, retain_min) -> None:
    """Every hypernetwork row and its controls for one forget set and seed, into out = (params,
    seconds, extra, counts, start_of). The controls (keep-every-class prompt over the same guidance
    grid; the unconditional branch, guidance 0) are sampled once per row, seed and grid, rescored per set."""
    params, seconds, extra, counts, start_of = out
    for name, kind, st in rows:
        hn = hypernets[kind]
        kw = {}
        if kind == "dihyfo1":   # the report's original (the baselines' start too) by value, the others by name
            kw = {"model": original, "start": "model"} if st == orig_kind else {"start": st}
        res = forget(hn, list(fs), splits, k=k, sampler=sampler, steps=steps, seed=seed, guidance=guidance,
                     retain_min=retain_min, warn=False, **kw)
        if kind == "dihyfo1" and st == orig_kind:
            res.start = {**orig_info, **{a: b for a, b in res.start.items() if a != "source"}, "kind": st}
        params[name], seconds[name], counts[name] = res.params, res.timing["total"], res.forget_keep
        if kind == "dihyfo1":
            start_of[name] = None if st == "random" else res.start_params
        extra[name] = {"timing": res.timing, "chosen": res.chosen, "start": res.start,
                       "chosen_guidance": res.chosen_guidance, "chosen_level": res.chosen_level,
                       "per_guidance": res.per_guidance, "forgot_on_val": res.forgot, "settings": res.settings,
                       "prompt_levels": res.prompt_levels,
                       "val_forget_acc": res.candidates["forget_acc"].tolist(),
                       "val_retain_acc": res.candidates["retain_acc"].tolist(),
                       "val_class_loss": res.candidates["class_loss"].tolist(),
                       "guidance": res.candidates["guidance"].tolist(), "prompt": res.prompt.tolist()}
        for ctl in CONTROLS:
            if ctl == "uncond" and hn.cfg.cond_dropout <= 0:
                continue                                      # no unconditional branch was trained
            # sampled once per grid and levels (a model card's depend on the request's size), rescored per set
            key = (name, seed, ctl, () if ctl == "uncond" else (tuple(guidance_grid(hn, guidance, len(fidx))),
                                                                 low_levels(hn, None, len(fidx))))
            t0 = time.perf_counter()
            if key not in control_cache:
                c = forget(hn, list(fs), splits, k=k, sampler=sampler, steps=steps, seed=seed,
                           guidance=0.0 if ctl == "uncond" else guidance,
                           prompt="keep" if ctl == "keep" else "forget", warn=False, **kw)
                control_cache[key] = (c.candidate_params, c.timing["total"], c.candidates["guidance"],
                                      c.settings["guidance_grid"], c.settings["low_levels"])
            cand, t_sample, w, grid, lows = control_cache[key]
            i, cm = choose(cand, hn.spec, splits, fidx, retain_min)
            ok = (cm["forget_acc"] <= FORGET_MAX) & (cm["retain_acc"] >= retain_min)
            cname = f"{name}:{ctl}"
            params[cname], seconds[cname], counts[cname] = cand[i].clone(), t_sample + time.perf_counter() - t0, \
                cm["forget_keep"]
            extra[cname] = {"chosen": i, "prompt": ctl, "guidance_grid": grid, "low_levels": lows,
                            "chosen_guidance": float(w[i]),
                            "per_guidance": [{"guidance": g, "k": int((w == g).sum()),
                                              "forget_keep": int(ok[w == g].sum())} for g in grid]}


def _edit_rows(original, spec, fs, splits, seed: int, first_seed: int, tune: bool, methods: dict, tuned_cache: dict,
               out) -> None:
    """The post-hoc baselines and the user's methods, each editing `original`, into out = (params,
    seconds, extra). Baselines are tuned on validation once per forget set (at the first seed);
    later seeds rerun the chosen point with their own seed, their time including the search."""
    params, seconds, extra = out
    for name in POST_HOC:
        key = (name, tuple(fs))
        if tune and key not in tuned_cache:
            r = B.tuned(name, original, spec, list(fs), splits, seed=seed)
            tuned_cache[key] = (r.extra["tuning"], r.seconds)
            secs = r.seconds
        elif tune:
            tun, search = tuned_cache[key]
            r = B.BASELINES[name](original, spec, list(fs), splits, seed=seed, **tun["chosen"])
            r.extra["tuning"] = {**tun, "searched_at_seed": first_seed}
            secs = r.seconds + search
        else:
            r = B.BASELINES[name](original, spec, list(fs), splits, seed=seed)
            secs = r.seconds
        params[name], seconds[name] = r.params, secs
        extra[name] = {"hparams": r.hparams, "tuning": r.extra.get("tuning")}
    for name, fn in methods.items():
        t0 = time.perf_counter()
        r = fn(original.clone(), spec, list(fs), splits, seed=seed)
        p = r.params if isinstance(r, B.BaselineResult) else check_flat(r, spec, name)[0]
        params[name], seconds[name] = p.detach().float().clone(), time.perf_counter() - t0
        extra[name] = {"hparams": getattr(r, "hparams", {})}


def _row_extras(name: str, seconds: dict, counts: dict, extra: dict) -> dict:
    """A row's time, its forget-and-keep count (total and per guidance weight) and chosen weight."""
    e = extra.get(name) or {}
    out = {"seconds": seconds[name]}
    if name in counts:
        out["forget_keep"] = counts[name]
    for g in e.get("per_guidance") or ():
        out[f"forget_keep@{g['guidance']:g}"] = g["forget_keep"]
    if "chosen_guidance" in e:
        out["chosen_guidance"] = e["chosen_guidance"]
    return out


def _starting_model(model, spec, data_dir, heldout) -> tuple[torch.Tensor, dict]:
    if model is None:
        return best_checkpoint(data_dir, heldout)
    return _as_flat(model, spec, "model"), {"source": "user model"}


def evaluate_forgetting(data_dir: str, hypernets: dict, forget_sets: Sequence[Sequence[int]], seeds=(0, 1, 2),
                        k: int = 256, sampler: str = "ddim", steps: int = 50, retrain_seeds: int = 5,
                        mia_attack: str = "logreg", out_dir: str | None = None, log=print, memorization: bool = True,
                        holdout=None, guidance=None, model=None, model_info: dict | None = None,
                        starts: Sequence[str] | None = None,
                        methods: dict[str, Callable] | None = None, tune: bool = True,
                        relearning: bool = True, retain_min: float = RETAIN_MIN) -> dict:
    """Run every method on every forget set (digit labels) and seed; -> the JSON-able report (also
    saved to out_dir).

    hypernets: {"dihyfo1": Hypernet, "dihyfo2": Hypernet} (either may be missing).
    holdout: {"forget_set": [...], "rules": ... (default: the collection's holdout rules)}: the
    held-out forget set, reported with the store's count of acceptable checkpoints for it.
    model: the starting classifier (nn.Module or flat params); None = the best stored checkpoint.
    model_info: how `model` was made (recorded as the report's original).
    guidance: the guidance grid every hypernetwork row and its keep-prompt control spread their K
    candidates over (None: each model's own grid, from its card); the unconditional control is
    guidance 0. starts: DiHyFo-1's starting classifiers, each its own row ("model", "best",
    "random"; default: "model" when a model is given, else "best").
    methods: extra unlearning methods {name: fn(params, spec, forget, splits, seed=...) ->
    BaselineResult or flat params}, run on `model` like the baselines. The post-hoc baselines are
    tuned on validation once per forget set (at the first seed); the other seeds rerun the chosen
    point with their own seed, and every seed's time includes the search. tune=False runs them at
    their defaults instead. relearning=False skips the
    relearning (anamnesis) columns. retain_min: the D_r threshold of the forget-and-keep counts
    (0.95 suits MNIST-4; a 784-7-10 MNIST network retrains to about 0.92 on D_r).
    """
    store = CheckpointStore(data_dir, verify="size")
    splits = splits_of(store)
    classes = list(store.classes)
    pivots = list(store.manifest.get("pivots", []))
    from ..ops.spec import MLPSpec
    spec = next(iter(hypernets.values())).spec if hypernets else MLPSpec(store.layer_sizes)
    for hn in hypernets.values():
        hn.check_dataset(store)
    methods = dict(methods or {})
    clash = set(methods) & set(LABELS)
    if clash:
        raise ValueError(f"user method names {sorted(clash)} clash with built-in rows; rename them")
    heldout = sorted({r for hn in hypernets.values() for r in hn.heldout_runs})
    original, orig_info = _starting_model(model, spec, data_dir, heldout)
    if model is not None and model_info:
        orig_info = {**orig_info, **model_info}
    orig_kind = "model" if model is not None else "best"
    starts = list(starts or [orig_kind])
    bad = [st for st in starts if st not in START_LABELS] + (["model (no model given)"]
                                                             if "model" in starts and model is None else [])
    if bad or len(set(starts)) != len(starts):
        raise ValueError(f"starts must be distinct values of {tuple(START_LABELS)} ('model' needs model=); got {starts}")
    gen_rows = generated_rows(hypernets, starts, model is not None)
    ranges = next(iter(hypernets.values())).meta["loss_ranges"] if hypernets else None
    view = StoreView(store, splits)
    ckpt_index, neigh = None, None
    if memorization and hypernets:
        log("memorization: indexing the store up to hidden-unit permutations")
        stored = store.load("params")
        ckpt_index = M.CheckpointIndex(stored, spec)
        nd = M.neighbour_distance(stored, spec, n_sample=32, seed=0, groups=store.load("run"), index=ckpt_index)
        neigh = {"median": nd.median, "n_sample": len(nd.distances),
                 "note": "each sampled stored checkpoint's distance to its nearest stored checkpoint of another run"}
    if holdout is not None and not holdout.get("rules"):     # the rules the collection was made with
        holdout = {**holdout, "rules": store.manifest.get("config", {}).get("holdout")}
    report = {"data_dir": os.path.abspath(data_dir), "classes": classes, "pivots": pivots, "k": k, "sampler": sampler,
              "steps": steps, "seeds": list(seeds), "retrain_seeds": retrain_seeds, "mia_attack": mia_attack,
              "mia_description": M.MIA_VARIANTS[mia_attack] + "; " + M.MIA_SCORING, "original": orig_info,
              "criterion": {"forget_max": FORGET_MAX, "retain_min": retain_min, "split": "validation",
                            "text": f"validation accuracy <= {FORGET_MAX} on D_f (pooled) and >= {retain_min} on D_r"},
              "phi_conventions": M.JSD_CONVENTIONS, "tuning_grids": B.TUNING_GRIDS if tune else None,
              "neighbour_distance": neigh, "holdout": holdout, "store_size": len(view.index), "runs": []}
    control_cache: dict = {}
    tuned_cache: dict = {}     # (baseline, forget set) -> (its tuning record, search seconds)
    for fs in forget_sets:
        fidx = class_indices(classes, list(fs), pivots)
        store_pick, store_count = store_choice(view, fidx, retain_min)
        for seed in seeds:
            log(f"forget {list(fs)} seed {seed}")
            ctx = {"spec": spec, "splits": splits, "fidx": fidx, "original": original, "seed": seed, "probs": {},
                   "mia_attack": mia_attack, "ckpt_index": ckpt_index, "user_methods": tuple(methods)}
            params, seconds, extra, counts = {"original": original}, {"original": 0.0}, {}, {}
            rt = B.retrain(None, spec, list(fs), splits, seeds=retrain_seeds, seed=seed)
            params["retrain"], seconds["retrain"] = rt.params, rt.seconds
            params["retrain_median"], seconds["retrain_median"] = rt.extra["median_params"], rt.seconds
            extra["retrain"] = {"hparams": rt.hparams, "chosen": rt.extra["chosen"], "val": rt.extra["val"]}
            ctx["retrain_params"] = rt.params
            start_of: dict = {}
            ctx["start_of"] = start_of
            _sample_rows(hypernets, gen_rows, fs, fidx, splits, seed, original, orig_kind, orig_info, control_cache,
                         (params, seconds, extra, counts, start_of), k=k, sampler=sampler, steps=steps,
                         guidance=guidance, retain_min=retain_min)
            _edit_rows(original, spec, fs, splits, seed, seeds[0], tune, methods, tuned_cache, (params, seconds, extra))
            params["store"], seconds["store"], counts["store"] = store_pick.params, store_pick.seconds, store_count
            extra["store"] = {"hparams": store_pick.hparams, **store_pick.extra}
            if ranges is not None:
                prompts, _ = forget_prompts(loss_quantile_table(ranges, classes), classes, fidx, k)
                r, n_ok = retrieval_choice(view, prompts, fidx, retain_min)
                params["retrieval"], seconds["retrieval"], counts["retrieval"] = r.params, r.seconds, n_ok
                extra["retrieval"] = {"hparams": r.hparams, **r.extra}
            ref = {"retrain": softmax64(params["retrain"], spec, splits.X_test)}
            rows = {name: _test_metrics(name, p, ref, ctx) for name, p in params.items()}
            report.setdefault("confusion", []).append(
                {"forget": list(fs), "seed": seed, "y_test": splits.y_test.tolist(),
                 "preds": {n: ctx["probs"][n].argmax(1).tolist() for n in params if ":" not in n}})
            for name in params:
                rows[name].update(_row_extras(name, seconds, counts, extra))
                if relearning and name not in ("retrain", "original", "store") and ":" not in name:
                    rows[name].update(_anamnesis(params[name], ctx))
            report["runs"].append({"forget": list(fs), "seed": seed, "methods": rows, "extra": extra,
                                   "params": {n: p.tolist() for n, p in params.items()}})
    report["summary"] = summarize(report)
    if out_dir:
        save_report(report, out_dir)
    return report


# ------------------------------------------------------------------ tables
INDIVIDUAL = [("acc_retain", "Acc D_r"), ("acc_forget", "Acc D_f"), ("acc_all", "Acc test"), ("mia", "MIA"),
              ("seconds", "Time (s)")]
PAIRED = [("overlap_retain", "Overlap D_r"), ("overlap_forget", "Overlap D_f"), ("overlap_all", "Overlap test"),
          ("activation_distance", "Act. distance"), ("phi", "φ per-sample"), ("phi_bt", "φ bad-teacher (dissertation)")]
EDIT = [("edit_overlap_retain", "Overlap w/ original on D_r"), ("edit_l2", "L2 to original")]
RELEARN = [("relearn_steps", "Relearn steps on D_f"), ("anamnesis_index", "Anamnesis index")]
COUNTS = {"relearn_steps", "forget_keep"}


def summarize(report: dict) -> dict:
    """{forget set: {method: {metric: [mean, std, n]}}} over seeds: std is the sample standard
    deviation (ddof = 1) of the finite values, None (unknown) when fewer than two are finite."""
    out: dict = {}
    for run in report["runs"]:
        key = ",".join(map(str, run["forget"]))
        for meth, row in run["methods"].items():
            for metric, v in row.items():
                out.setdefault(key, {}).setdefault(meth, {}).setdefault(metric, []).append(v)
    for key, meths in out.items():
        for meth, mets in meths.items():
            for metric, vals in mets.items():
                a = np.asarray([np.nan if v is None else v for v in vals], dtype=np.float64)
                fin = a[np.isfinite(a)]
                mets[metric] = [float(fin.mean()) if len(fin) else float(a.mean()),
                                float(fin.std(ddof=1)) if len(fin) > 1 else None, int(len(a))]
    return out


def _fmt(cell, count: bool = False) -> str:
    mean, std, n = cell
    if not math.isfinite(mean):
        return "inf" if mean == math.inf else "n/a"
    s = f"{mean:.0f}" if count and n == 1 else f"{mean:.1f}" if count else \
        f"{mean:.3f}" if abs(mean) < 100 else f"{mean:.0f}"
    return s + ((f" ± {std:.1f}" if count else f" ± {std:.3f}") if n > 1 and std is not None else "")


def _gen_rows(meths) -> list[str]:
    """The hypernetwork rows (every DiHyFo-1 start, DiHyFo-2) of a summary, without the controls."""
    return [m for m in _order(meths) if base_method(m) in GENERATED and ":" not in m]


def _order(meths) -> list[str]:
    known = [m for m in LABELS if m in meths]
    starts = sorted(m for m in meths if m not in LABELS and base_method(m) in GENERATED)
    return known + starts + sorted(m for m in meths if m not in LABELS and m not in starts)


def _count_table(report: dict, key: str, meths: dict) -> list[str]:
    """The controls: how many candidates of each source meet the forget-and-keep criterion."""
    k, n = report["k"], report.get("store_size")
    gens = _gen_rows(meths)
    lines = [f"### D_f = {{{key}}}: candidates that forget and keep (controls)", "",
             f"Criterion: {report['criterion']['text']}. {_over_seeds(report)}; same K = {k}, "
             f"sampler, seed, guidance grid and selection rule in the first two columns; the unconditional "
             "branch has no prompt to guide (guidance 0).", "",
             "| source | asked to forget | keep-every-class prompt | unconditional (guidance 0) |", "|---|---|---|---|"]
    for g in gens:
        cells = [_fmt(meths[m]["forget_keep"], True) + f" / {k}" if m in meths else "not trained"
                 for m in (g, f"{g}:keep", f"{g}:uncond")]
        lines.append(f"| {row_label(g, report)} | " + " | ".join(cells) + " |")
    if "retrieval" in meths:
        lines.append(f"| Retrieval: K nearest stored checkpoints | {_fmt(meths['retrieval']['forget_keep'], True)} / {k} | | |")
    if "store" in meths:
        lines.append(f"| Whole store | {_fmt(meths['store']['forget_keep'], True)} / {n} | | |")
    return lines + [""] + _guidance_table(report, key, meths)


def _guidance_table(report: dict, key: str, meths: dict) -> list[str]:
    """Forget-and-keep counts per guidance weight of the grid (asked to forget vs keep prompt), and
    the weight of the chosen candidate in each seed."""
    rows = [m for m in _gen_rows(meths) if any(c.startswith("forget_keep@") for c in meths[m])]
    if not rows:
        return []
    lines = [f"### D_f = {{{key}}}: candidates that forget and keep, per guidance weight (asked to forget / "
             "keep-every-class prompt)", "", "| source | per weight w: count of the w's candidates | chosen "
             "candidate's w (per seed) |", "|---|---|---|"]
    for m in rows:
        ws = sorted((float(c.split("@", 1)[1]) for c in meths[m] if c.startswith("forget_keep@")))
        keep = meths.get(f"{m}:keep", {})
        cells = [f"w={w:g}: {_fmt(meths[m][f'forget_keep@{w:g}'], True)} / "
                 f"{_fmt(keep[f'forget_keep@{w:g}'], True) if f'forget_keep@{w:g}' in keep else '-'}" for w in ws]
        chosen = [f"{r['extra'][m]['chosen_guidance']:g}" for r in report["runs"]
                  if ",".join(map(str, r["forget"])) == key and m in r["extra"]]
        lines.append(f"| {row_label(m, report)} | " + "; ".join(cells) + f" | {', '.join(chosen)} |")
    return lines + [""]


def markdown_tables(report: dict) -> str:
    lines = []
    for key, meths in report["summary"].items():
        order = _order(meths)
        if any("forget_keep" in meths[m] for m in meths):
            lines += _count_table(report, key, meths)
        for title, cols, only in (("Individual metrics (test split)", INDIVIDUAL, None),
                                  ("Paired metrics against the retrained model (test split)", PAIRED, None),
                                  ("Edit locality (methods that edit the original model)", EDIT, None),
                                  ("Relearning on D_f", RELEARN, None)):
            rows = [m for m in order if (only is None or m in only) and any(c in meths[m] for c, _ in cols)]
            if not rows:
                continue
            lines += [f"### D_f = {{{key}}}: {title}", "", "| method | " + " | ".join(h for _, h in cols) + " |",
                      "|---|" + "---|" * len(cols)]
            flagged: dict = {}
            for m in rows:
                lines.append(f"| {row_label(m, report)} | " + " | ".join(
                    _fmt(meths[m][c], c in COUNTS) + _range_flag(report, key, m, c, flagged) if c in meths[m] else ""
                    for c, _ in cols) + " |")
            lines += [f"{RANGE_MARK} {row_label(m, report)}, {h}: {why}" for (m, h), why in flagged.items()] + [""]
        gen = [m for m in _gen_rows(meths) if "nearest_stored_distance" in meths[m]]
        if gen and report.get("neighbour_distance"):
            lines += [f"### D_f = {{{key}}}: memorization", "",
                      "| model | distance to nearest stored checkpoint (up to permutation) | typical stored neighbour distance |",
                      "|---|---|---|"]
            for m in gen:
                lines.append(f"| {row_label(m, report)} | {_fmt(meths[m]['nearest_stored_distance'])} | "
                             f"{report['neighbour_distance']['median']:.3f} |")
            lines.append("")
        ref = DISSERTATION.get(tuple(report["classes"]), {}).get(key)
        if ref:
            cols = [("acc_retain", "Acc D_r"), ("acc_forget", "Acc D_f"), ("mia", "MIA"),
                    ("overlap_forget", "Overlap D_f"), ("activation_distance", "Act. distance"),
                    ("phi_bt", "φ (bad-teacher)"), ("phi", "φ per-sample")]
            lines += [f"### D_f = {{{key}}}: against the dissertation's tables (ours / dissertation; the "
                      "dissertation gives φ in the bad-teacher convention only)",
                      "", "| method | " + " | ".join(h for _, h in cols) + " |", "|---|" + "---|" * len(cols)]
            for m in [*_gen_rows(meths), "retrain"]:
                r_ = ref.get(base_method(m))
                if m in meths and r_:
                    lines.append(f"| {row_label(m, report)} | " + " | ".join(
                        (f"{meths[m][c][0]:.3f} / {r_[c]:.3f}" if c in r_ else f"{meths[m][c][0]:.3f} / -")
                        if c in meths[m] else "" for c, _ in cols) + " |")
            lines.append("")
    tun = _tuning_lines(report)
    return "\n".join(lines + tun)


def _tuning_lines(report: dict) -> list[str]:
    if not report.get("tuning_grids"):
        return []
    lines = ["### Baseline tuning (validation split)", "",
             "Each post-hoc baseline ran at every grid point; kept: the highest validation retain accuracy among "
             f"points with validation forget accuracy <= {FORGET_MAX}, else the lowest forget accuracy. The search "
             "time is the method's time.", "", "| method | grid | chosen (per forget set, seed) |", "|---|---|---|"]
    hit: dict = {}
    for name in POST_HOC:
        grid = report["tuning_grids"].get(name)
        chosen = []
        for r in report["runs"]:
            if name not in r["extra"]:
                continue
            tu = r["extra"][name].get("tuning") or {}
            at = tu.get("at_bound", {})
            hit.setdefault(name, set()).update(at)
            chosen.append(f"{{{','.join(map(str, r['forget']))}}} s{r['seed']}: " + ", ".join(
                f"{a}={b}" + (f" ({at[a]})" if a in at else "") for a, b in tu.get("chosen", {}).items()))
        lines.append(f"| {LABELS[name]} | {grid} | {'; '.join(chosen)} |")
    notes = [f"- {LABELS[n]}, {k}: {B.GRID_BOUNDS[n][k]}." for n in POST_HOC for k in sorted(hit.get(n, ()))
             if k in B.GRID_BOUNDS.get(n, {})]
    if notes:
        lines += ["", "Choices at an end of their grid are marked (lowest / highest); why each grid stops there:",
                  *notes]
    return lines + [""]


def _over_seeds(report: dict) -> str:
    seeds = report.get("seeds")
    if seeds is not None and len(seeds) < 2:
        return f"One seed ({seeds}): single values, the seed-to-seed spread is unknown"
    return f"Mean ± std (ddof 1) over seeds {seeds}"


def _known(*cells) -> bool:
    """Every [mean, std, n] cell has a seed-to-seed spread (two or more finite seeds)."""
    return all(c[1] is not None for c in cells)


# The range of each printed metric and what it means when a seed leaves it (flagged with RANGE_MARK
# beside the mean, the cause under the table; the mean itself is over the finite seeds).
RANGE_MARK = "†"
METRIC_RANGES = {
    **{c: (0.0, 1.0) for c in ("acc_retain", "acc_forget", "acc_all", "mia", "overlap_retain", "overlap_forget",
                               "overlap_all")},
    "phi": (1.0 - math.log(2.0), 1.0),
    "phi_bt": (0.0, 1.0),
}
RANGE_CAUSES = {
    "phi_bt": "φ below 0 in the bad-teacher convention: its KL(M||P) term grows with -log P, so a few "
              "near-zero probabilities (confidently wrong outputs) blow it up; the per-sample φ is bounded "
              "in [1 - ln 2, 1]",
}


def _range_flag(report: dict, key: str, meth: str, metric: str, flagged: dict) -> str:
    """RANGE_MARK when some seed's `metric` of `meth` on forget set `key` is non-finite or outside
    METRIC_RANGES (the cause goes into flagged[(meth, header)])."""
    if metric not in METRIC_RANGES:
        return ""
    lo, hi = METRIC_RANGES[metric]
    vals = [run["methods"][meth].get(metric) for run in report["runs"]
            if ",".join(map(str, run["forget"])) == key and meth in run["methods"]]
    vals = [math.nan if v is None else float(v) for v in vals]
    bad = [v for v in vals if not (math.isfinite(v) and lo - 1e-9 <= v <= hi + 1e-9)]
    if not bad:
        return ""
    head = dict(INDIVIDUAL + PAIRED).get(metric, metric)
    finite = [v for v in bad if math.isfinite(v)]
    what = (f"{len(bad)} of {len(vals)} seeds outside [{lo:.3f}, {hi:.3f}]"
            + (f" (lowest {min(finite):.3f})" if finite else " (non-finite)") + ". ")
    cause = RANGE_CAUSES.get(metric, "out of range") if finite and min(finite) < lo else \
        "a non-finite value (the mean is over the finite seeds)" if not finite else "out of range"
    flagged[(meth, head)] = what + cause
    return RANGE_MARK


def _beyond(a, b) -> bool:
    """a's mean exceeds b's by more than their seed-to-seed spread (std a + std b); False when a
    spread is unknown (one seed)."""
    return _known(a, b) and a[0] - b[0] > a[1] + b[1]


def verdicts(report: dict) -> list[str]:
    """Plain statements: targets met or missed, the controls, the held-out set, and where a
    baseline beats a hypernetwork (only differences larger than the seed-to-seed spread count)."""
    out = []
    hold = report.get("holdout") or {}
    hold_key = ",".join(map(str, hold.get("forget_set", []))) or None
    for key, meths in report["summary"].items():
        rt = meths.get("retrain")
        if key == hold_key and "store" in meths:
            n = meths["store"]["forget_keep"][0]
            out.append(f"D_f={{{key}}} is held out of the collection ({hold.get('rules')}): the store holds {n:.0f} "
                       f"checkpoints that meet the criterion ({report['criterion']['text']})"
                       + (", so neither the store nor retrieval can succeed here by copying one." if n == 0 else
                          ": NOT held out by what forgetting means."))
        for g in _gen_rows(meths):
            if rt is None:
                continue
            r = meths[g]
            checks = [("forget acc <= 0.01", r["acc_forget"][0] <= 0.01),
                      ("retain acc within 0.02 of retrained", r["acc_retain"][0] >= rt["acc_retain"][0] - 0.02),
                      ("phi >= 0.95", r["phi"][0] >= 0.95),
                      ("MIA within 0.1 of retrained", abs(r["mia"][0] - rt["mia"][0]) <= 0.1)]
            failed = [c for c, ok in checks if not ok]
            out.append(f"D_f={{{key}}} {row_label(g, report)}: " + ("meets all targets" if not failed else
                                                          "MISSES " + ", ".join(failed)) +
                       f" (acc D_r {r['acc_retain'][0]:.3f} vs retrained {rt['acc_retain'][0]:.3f}, acc D_f "
                       f"{r['acc_forget'][0]:.3f}, φ {r['phi'][0]:.3f} (bad-teacher {r['phi_bt'][0]:.4f}), MIA "
                       f"{r['mia'][0]:.3f} vs {rt['mia'][0]:.3f}).")
            if key == hold_key:
                ok = r["acc_forget"][0] <= 0.01 and r["acc_retain"][0] >= rt["acc_retain"][0] - 0.02
                out.append(f"D_f={{{key}}} (held out) {row_label(g, report)} " + ("FORGETS it" if ok else "does NOT forget it")
                           + f": test acc D_f {r['acc_forget'][0]:.3f} (target <= 0.01), D_r {r['acc_retain'][0]:.3f} "
                             f"vs retrained {rt['acc_retain'][0]:.3f} (target within 0.02).")
            if "forget_keep" in r:
                ctl = {c: meths[f"{g}:{c}"]["forget_keep"] for c in CONTROLS if f"{g}:{c}" in meths}
                beats = all(_beyond(r["forget_keep"], v) for v in ctl.values())
                desc = ", ".join(f"{c} {_fmt(v, True)}" for c, v in ctl.items())
                if ctl and not _known(r["forget_keep"], *ctl.values()):
                    why = ("one seed, so the seed-to-seed spread is unknown: no verdict on whether the prompt "
                           "beats the controls (run more seeds).")
                elif beats and ctl:
                    why = "the prompt raises the count beyond the controls' seed-to-seed spread."
                elif r["forget_keep"][0] == 0:
                    why = "no candidate forgets and keeps under any prompt: the model does not follow this request."
                else:
                    why = ("the prompt does NOT raise the count beyond the controls' spread; the choice among K, "
                           "not the prompt, does the forgetting.")
                out.append(f"D_f={{{key}}} {row_label(g, report)} controls: {_fmt(r['forget_keep'], True)} "
                           f"of {report['k']} candidates forget and keep when asked, vs {desc}: " + why)
            for b in ("retrieval", "store", *POST_HOC,
                      *[m for m in meths if m not in LABELS and base_method(m) not in GENERATED]):
                if b not in meths or meths[b]["acc_forget"][0] > 0.01:
                    continue
                if not _known(meths[b]["phi"], r["phi"]):
                    out.append(f"D_f={{{key}}} {row_label(g, report)} and {row_label(b, report)}: φ {r['phi'][0]:.3f} vs "
                               f"{meths[b]['phi'][0]:.3f}; one seed, so the seed spread is unknown (no verdict).")
                elif _beyond(meths[b]["phi"], r["phi"]):
                    out.append(f"D_f={{{key}}} {row_label(g, report)} LOSES on φ to {row_label(b, report)} ({meths[b]['phi'][0]:.3f} vs "
                               f"{r['phi'][0]:.3f}, beyond the seed spread; it also forgets).")
                elif _beyond(r["phi"], meths[b]["phi"]):
                    out.append(f"D_f={{{key}}} {row_label(g, report)} wins on φ over {row_label(b, report)} ({r['phi'][0]:.3f} vs "
                               f"{meths[b]['phi'][0]:.3f}, beyond the seed spread).")
                else:
                    out.append(f"D_f={{{key}}} {row_label(g, report)} and {row_label(b, report)}: φ {r['phi'][0]:.3f} vs "
                               f"{meths[b]['phi'][0]:.3f}, within the seed spread (no winner).")
        nd = (report.get("neighbour_distance") or {}).get("median")
        for g in _gen_rows(meths):
            if nd and "nearest_stored_distance" in meths[g]:
                d = meths[g]["nearest_stored_distance"][0]
                out.append(f"D_f={{{key}}} {row_label(g, report)} memorization: nearest stored checkpoint at {d:.3f}, typical "
                           f"distance between stored neighbours {nd:.3f}: "
                           + ("closer than stored checkpoints are to each other, i.e. near a training checkpoint."
                              if d < nd else "not a copy of a stored checkpoint."))
    return out


def save_report(report: dict, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    report["verdicts"] = verdicts(report)
    slim = {k: v for k, v in report.items() if k != "runs"}
    slim["runs"] = [{k: v for k, v in r.items() if k != "params"} for r in report["runs"]]
    write_json_atomic(os.path.join(out_dir, "report.json"), json.loads(json.dumps(slim, default=_jsonable)))
    md = ["# HyperForget evaluation", "", f"Data: `{report['data_dir']}` ({report.get('store_size')} stored "
          f"checkpoints); K = {report['k']}, {report['sampler']} {report['steps']} steps; seeds {report.get('seeds')} "
          f"({'numbers are mean ± std (ddof 1) over them' if len(report.get('seeds') or ()) > 1 else 'one seed: no spread'}); retrain: best of {report['retrain_seeds']} seeds on validation; MIA: "
          f"{report['mia_description']}. MIA and activation distance are computed as in the bad-teacher code "
          "(Chundawat et al. 2023), so one number serves both conventions; φ is given in both: "
          + "; ".join(f"**{k}**: {v}" for k, v in report.get("phi_conventions", {}).items()) + ".", "",
          f"Original model: {report['original']}", ""]
    if report.get("holdout"):
        md += [f"Held out of the collection: {report['holdout']}", ""]
    md += [markdown_tables(report), "## Verdicts", ""] + [f"- {v}" for v in report["verdicts"]] + [""]
    tmp = os.path.join(out_dir, "report.md.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(md))
    os.replace(tmp, os.path.join(out_dir, "report.md"))
    from .figures import forgetting_figures
    forgetting_figures(report, out_dir)
    return report


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)
