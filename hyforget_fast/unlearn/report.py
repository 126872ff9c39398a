"""`hyforget evaluate`: every method, every metric, on the same data; tables shaped like the
dissertation's Tables 3.1-3.4, plus edit locality, memorization and relearning.

For each forget set and seed, on one collection (its split, its store):
  original     the starting classifier: the stored checkpoint with the lowest mean validation loss
  DiHyFo-1/2   forget() with K candidates chosen on VALIDATION (DiHyFo-1 edits `original`)
  retrain      S seeds at once without D_f, best on validation (the gold standard); its median too
  finetune, neggrad_plus, random_labels, ssd   edits of `original`
  retrieval    the stored checkpoint nearest to each cell of the same prompt grid, chosen among
               those by the same validation rule as the hypernetworks
Every reported number is then computed on the held-out TEST split (MIA also reads the retain
TRAIN samples, as its definition requires). Nothing here feeds back into a choice.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Sequence

import numpy as np
import torch

from ..collection.store import CheckpointStore, write_json_atomic
from ..ops.functional import class_metrics, class_outputs
from . import baselines as B
from . import metrics as M
from .forget import best_checkpoint, class_indices, forget, group_accuracy, loss_quantile_table, prompt_grid, select

EDIT_METHODS = ("dihyfo1", "finetune", "neggrad_plus", "random_labels", "ssd")
GENERATED = ("dihyfo1", "dihyfo2")
LABELS = {"original": "Original model", "dihyfo1": "DiHyFo-1", "dihyfo2": "DiHyFo-2", "retrain": "Retrained (best of S, val)",
          "retrain_median": "Retrained (median seed)", "finetune": "Fine-tune", "neggrad_plus": "NegGrad+",
          "random_labels": "Random labels", "ssd": "SSD", "retrieval": "Retrieval (store kNN)"}


def splits_of(store: CheckpointStore):
    """The collection's own train / val / test split, rebuilt from its manifest."""
    from ..collection.data import splits_from_manifest
    return splits_from_manifest(store.manifest)


def _retrieval_choice(index: B.RetrievalIndex, prompts: torch.Tensor, spec, splits, fidx, ridx) -> B.BaselineResult:
    """Nearest stored checkpoint for each distinct prompt row, then the hypernetworks' val rule."""
    t0 = time.perf_counter()
    rows = torch.unique(prompts, dim=0)
    hits = [index.query(r.double().numpy()) for r in rows]
    P = torch.stack([h.params for h in hits]).float()                       # (G, P)
    met = class_metrics(P, spec, splits.X_val, splits.y_val)
    cnt = torch.bincount(splits.y_val, minlength=spec.num_classes)
    i = select(group_accuracy(met.class_acc, cnt, fidx), group_accuracy(met.class_acc, cnt, ridx))
    return B.BaselineResult("retrieval", P[i].clone(), time.perf_counter() - t0,
                            {"prompts": len(rows), "metric": "squared L2 over per-class validation losses",
                             "selection": "lowest val forget acc, then highest val retain acc"},
                            {"index": hits[i].index, "class_loss": hits[i].class_loss.tolist(),
                             "target": rows[i].tolist(), "store_size": len(index)})


def _test_metrics(name: str, params: torch.Tensor, ref: dict, ctx: dict) -> dict:
    """Every metric of one method's model on the test split (and MIA's retain-train rows);
    ref["retrain"]: the retrained model's test softmax (N, m), the paired metrics' reference."""
    spec, sp, fidx = ctx["spec"], ctx["splits"], ctx["fidx"]
    probs = ctx["probs"][name] = class_outputs(params[None], spec, sp.X_test)[0][0].double()      # (N, m)
    acc = M.accuracies(probs, sp.y_test, fidx)
    tr_f = torch.isin(sp.y_train, torch.tensor(fidx))
    p_train = class_outputs(params[None], spec, sp.X_train)[0][0].double()
    mia = M.mia(p_train[~tr_f], probs, p_train[tr_f], attack=ctx["mia_attack"], seed=ctx["seed"])
    row = {"acc_retain": acc["retain"], "acc_forget": acc["forget"], "acc_all": acc["all"], "mia": mia.score}
    pr = ref["retrain"]
    ov = M.split_overlaps(probs, pr, sp.y_test, fidx)
    row.update({"overlap_retain": ov["retain"], "overlap_forget": ov["forget"], "overlap_all": ov["all"],
                "activation_distance": M.activation_distance(probs, pr), "phi": M.unlearning_score(probs, pr)})
    if name in EDIT_METHODS:
        te_r = ~torch.isin(sp.y_test, torch.tensor(fidx))
        el = M.edit_locality(params, ctx["original"], spec, sp.X_test[te_r])
        row.update({"edit_overlap_retain": el.retain_overlap, "edit_l2": el.param_distance})
    if name in GENERATED and ctx.get("ckpt_index") is not None:
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


def evaluate_forgetting(data_dir: str, hypernets: dict, forget_sets: Sequence[Sequence[int]], seeds=(0,), k: int = 256,
                        sampler: str = "ddim", steps: int = 50, retrain_seeds: int = 5, mia_attack: str = "logreg",
                        out_dir: str | None = None, log=print, memorization: bool = True, holdout=None,
                        guidance: float | None = None) -> dict:
    """Run every method on every forget set and seed; -> the JSON-able report (also saved to out_dir).

    hypernets: {"dihyfo1": Hypernet, "dihyfo2": Hypernet} (either may be missing).
    holdout: the collection's held-out combination rules (reported beside the forget set they match).
    """
    store = CheckpointStore(data_dir, verify="size")
    splits = splits_of(store)
    classes = list(store.classes)
    pivots = list(store.manifest.get("pivots", []))
    spec = next(iter(hypernets.values())).spec if hypernets else None
    from ..ops.spec import MLPSpec
    spec = spec or MLPSpec(store.layer_sizes)
    for name, hn in hypernets.items():
        hn.check_dataset(store)
    heldout = sorted({r for hn in hypernets.values() for r in hn.heldout_runs})
    original, orig_info = best_checkpoint(data_dir, heldout)
    ranges = next(iter(hypernets.values())).meta["loss_ranges"] if hypernets else None
    rindex = B.RetrievalIndex.from_store(store)
    ckpt_index, neigh = None, None
    if memorization and hypernets:
        log("memorization: indexing the store up to hidden-unit permutations")
        stored = store.load("params")
        ckpt_index = M.CheckpointIndex(stored, spec)
        nd = M.neighbour_distance(stored, spec, n_sample=32, seed=0, groups=store.load("run"), index=ckpt_index)
        neigh = {"median": nd.median, "n_sample": len(nd.distances),
                 "note": "each sampled stored checkpoint's distance to its nearest stored checkpoint of another run"}
    report = {"data_dir": os.path.abspath(data_dir), "classes": classes, "pivots": pivots, "k": k, "sampler": sampler,
              "steps": steps, "retrain_seeds": retrain_seeds, "mia_attack": mia_attack,
              "mia_description": M.MIA_VARIANTS[mia_attack] + "; " + M.MIA_SCORING, "original": orig_info,
              "neighbour_distance": neigh, "holdout": holdout, "runs": []}
    for fs in forget_sets:
        fidx = class_indices(classes, list(fs), pivots)
        ridx = [c for c in range(len(classes)) if c not in fidx]
        for seed in seeds:
            log(f"forget {list(fs)} seed {seed}")
            ctx = {"spec": spec, "splits": splits, "fidx": fidx, "original": original, "seed": seed, "probs": {},
                   "mia_attack": mia_attack, "ckpt_index": ckpt_index}
            params, seconds, extra = {"original": original}, {"original": 0.0}, {}
            rt = B.retrain(None, spec, list(fs), splits, seeds=retrain_seeds, seed=seed)
            params["retrain"], seconds["retrain"] = rt.params, rt.seconds
            params["retrain_median"], seconds["retrain_median"] = rt.extra["median_params"], rt.seconds
            extra["retrain"] = {"hparams": rt.hparams, "chosen": rt.extra["chosen"], "val": rt.extra["val"]}
            ctx["retrain_params"] = rt.params
            for kind, hn in hypernets.items():
                res = forget(hn, list(fs), splits, k=k, sampler=sampler, steps=steps,
                             model=original if kind == "dihyfo1" else None, seed=seed, guidance=guidance)
                params[kind], seconds[kind] = res.params, res.timing["total"]
                extra[kind] = {"timing": res.timing, "chosen": res.chosen, "start": res.start,
                               "prompt_levels": res.prompt_levels,
                               "val_forget_acc": res.candidates["forget_acc"].tolist(),
                               "val_retain_acc": res.candidates["retain_acc"].tolist(),
                               "val_class_loss": res.candidates["class_loss"].tolist(),
                               "prompt": res.prompt.tolist()}
            for name in ("finetune", "neggrad_plus", "random_labels", "ssd"):
                r = B.BASELINES[name](original, spec, list(fs), splits, seed=seed)
                params[name], seconds[name] = r.params, r.seconds
                extra[name] = {"hparams": r.hparams}
            if ranges is not None:
                prompts, _ = prompt_grid(loss_quantile_table(ranges, classes), classes, fidx, 64)
                r = _retrieval_choice(rindex, prompts, spec, splits, fidx, ridx)
                params["retrieval"], seconds["retrieval"] = r.params, r.seconds
                extra["retrieval"] = {"hparams": r.hparams, **r.extra}
            ref = {"retrain": class_outputs(params["retrain"][None], spec, splits.X_test)[0][0].double()}
            rows = {name: _test_metrics(name, p, ref, ctx) for name, p in params.items()}
            report.setdefault("confusion", []).append(
                {"forget": list(fs), "seed": seed, "y_test": splits.y_test.tolist(),
                 "preds": {n: ctx["probs"][n].argmax(1).tolist() for n in params}})
            for name in params:
                rows[name]["seconds"] = seconds[name]
                if name not in ("retrain", "original"):
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
          ("activation_distance", "Act. distance"), ("phi", "φ")]
EDIT = [("edit_overlap_retain", "Overlap w/ original on D_r"), ("edit_l2", "L2 to original")]
RELEARN = [("relearn_steps", "Relearn steps on D_f"), ("anamnesis_index", "Anamnesis index")]


def summarize(report: dict) -> dict:
    """{forget set: {method: {metric: [mean, std, n]}}} over seeds."""
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
                                float(fin.std()) if len(fin) > 1 else 0.0, int(len(a))]
    return out


COUNTS = {"relearn_steps"}


def _fmt(cell, count: bool = False) -> str:
    mean, std, n = cell
    if not math.isfinite(mean):
        return "inf" if mean == math.inf else "n/a"
    s = f"{mean:.0f}" if count and n == 1 else f"{mean:.3f}" if abs(mean) < 100 else f"{mean:.0f}"
    return s + (f" ± {std:.3f}" if n > 1 else "")


def markdown_tables(report: dict) -> str:
    lines = []
    for key, meths in report["summary"].items():
        order = [m for m in LABELS if m in meths]
        for title, cols, only in (("Individual metrics (test split)", INDIVIDUAL, None),
                                  ("Paired metrics against the retrained model (test split)", PAIRED, None),
                                  ("Edit locality (methods that edit the original model)", EDIT, EDIT_METHODS),
                                  ("Relearning on D_f", RELEARN, None)):
            rows = [m for m in order if (only is None or m in only) and any(c in meths[m] for c, _ in cols)]
            if not rows:
                continue
            lines += [f"### D_f = {{{key}}}: {title}", "", "| method | " + " | ".join(h for _, h in cols) + " |",
                      "|---|" + "---|" * len(cols)]
            for m in rows:
                lines.append(f"| {LABELS[m]} | " + " | ".join(_fmt(meths[m][c], c in COUNTS) if c in meths[m] else "" for c, _ in cols)
                             + " |")
            lines.append("")
        gen = [m for m in GENERATED if m in meths and "nearest_stored_distance" in meths[m]]
        if gen and report.get("neighbour_distance"):
            lines += [f"### D_f = {{{key}}}: memorization", "",
                      "| model | distance to nearest stored checkpoint (up to permutation) | typical stored neighbour distance |",
                      "|---|---|---|"]
            for m in gen:
                lines.append(f"| {LABELS[m]} | {_fmt(meths[m]['nearest_stored_distance'])} | "
                             f"{report['neighbour_distance']['median']:.3f} |")
            lines.append("")
    return "\n".join(lines)


def verdicts(report: dict) -> list[str]:
    """Plain statements of where the hypernetworks meet the targets and where a baseline beats them."""
    out = []
    for key, meths in report["summary"].items():
        rt = meths.get("retrain")
        for g in GENERATED:
            if g not in meths or rt is None:
                continue
            r = meths[g]
            checks = [("forget acc <= 0.01", r["acc_forget"][0] <= 0.01),
                      ("retain acc within 0.02 of retrained", r["acc_retain"][0] >= rt["acc_retain"][0] - 0.02),
                      ("phi >= 0.95", r["phi"][0] >= 0.95),
                      ("MIA within 0.1 of retrained", abs(r["mia"][0] - rt["mia"][0]) <= 0.1)]
            failed = [c for c, ok in checks if not ok]
            out.append(f"D_f={{{key}}} {LABELS[g]}: " + ("meets all targets" if not failed else
                                                          "MISSES " + ", ".join(failed)) +
                       f" (acc D_r {r['acc_retain'][0]:.3f} vs retrained {rt['acc_retain'][0]:.3f}, acc D_f "
                       f"{r['acc_forget'][0]:.3f}, φ {r['phi'][0]:.3f}, MIA {r['mia'][0]:.3f} vs {rt['mia'][0]:.3f}).")
            better = [LABELS[b] for b in ("retrieval", "finetune", "neggrad_plus", "random_labels", "ssd")
                      if b in meths and meths[b]["phi"][0] > r["phi"][0] and meths[b]["acc_forget"][0] <= 0.01]
            if better:
                out.append(f"D_f={{{key}}} {LABELS[g]} LOSES on φ to: {', '.join(better)} (which also forget).")
        nd = (report.get("neighbour_distance") or {}).get("median")
        for g in GENERATED:
            if nd and g in meths and "nearest_stored_distance" in meths[g]:
                d = meths[g]["nearest_stored_distance"][0]
                out.append(f"D_f={{{key}}} {LABELS[g]} memorization: nearest stored checkpoint at {d:.3f}, typical "
                           f"distance between stored neighbours {nd:.3f}: "
                           + ("closer than stored checkpoints are to each other, i.e. near a training checkpoint."
                              if d < nd else "not a copy of a stored checkpoint."))
        if "retrieval" in meths:
            for g in GENERATED:
                if g in meths:
                    a, b = meths[g]["phi"][0], meths["retrieval"]["phi"][0]
                    out.append(f"D_f={{{key}}}: {LABELS[g]} φ {a:.3f} vs retrieval φ {b:.3f}: "
                               + ("the hypernetwork is closer to retraining." if a > b else
                                  "retrieval from the store is as close or closer; the hypernetwork does NOT win here."))
    return out


def save_report(report: dict, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    report["verdicts"] = verdicts(report)
    slim = {k: v for k, v in report.items() if k != "runs"}
    slim["runs"] = [{k: v for k, v in r.items() if k != "params"} for r in report["runs"]]
    write_json_atomic(os.path.join(out_dir, "report.json"), json.loads(json.dumps(slim, default=_jsonable)))
    md = ["# HyperForget evaluation", "", f"Data: `{report['data_dir']}`; K = {report['k']}, {report['sampler']} "
          f"{report['steps']} steps; retrain: best of {report['retrain_seeds']} seeds on validation; MIA: "
          f"{report['mia_description']}.", "", f"Original model: {report['original']}", ""]
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
