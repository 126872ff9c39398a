"""Where a hypernetwork's prompt-alignment error sits (`evaluate_hypernet`, free classes).

Two breakdowns of the same evaluation (same prompts, items, seed and guidance):

  support   A target row is OFF-SUPPORT when it meets a holdout rule of the collection
            (`CollectConfig.holdout`): the collection saved no checkpoint like it, so neither a
            hypernetwork nor the retrieval control has seen one. The prompted class's accuracy is
            read from the store: the median accuracy of the `neighbours` stored checkpoints whose
            loss of that class is nearest the prompt. The other classes' accuracies are the item's
            stored ones. R² is given on every row and on the on-support rows alone, for the model
            and for the retrieval control.
  moves     DiHyFo-1 only: rows binned by the move asked of the start, prompt - L_c(θ), with the
            median of achieved / asked (observed - L_c(θ) over prompt - L_c(θ)) and the bin's share
            of the squared error.

    python bench/alignment_breakdown.py --model mnist10-dihyfo1 --data D --guidance 2 --seed 0
    python bench/alignment_breakdown.py --model RUN_DIR --data D --guidance 1 --seed 0

--model: a shipped name (`hf.pretrained()`) or a training run's folder. Nothing reads the test split.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hyforget_fast as hf  # noqa: E402
from hyforget_fast.cli import open_hypernet  # noqa: E402
from hyforget_fast.collection.collect import held_out_mask  # noqa: E402
from hyforget_fast.hypernet.evaluate import evaluate_hypernet, prompt_alignment_r2  # noqa: E402

MOVE_EDGES = (-np.inf, -4.0, -1.0, 1.0, 4.0, np.inf)


def accuracy_at_loss(store_loss: np.ndarray, store_acc: np.ndarray, loss: np.ndarray, neighbours: int = 256) -> np.ndarray:
    """Median stored accuracy of the `neighbours` checkpoints whose loss (one class, (N,)) is
    nearest each value of `loss` (k,) -> (k,) float32."""
    finite = np.isfinite(store_loss) & np.isfinite(store_acc)
    sl, sa = store_loss[finite].astype(np.float64), store_acc[finite]
    n = min(int(neighbours), len(sl))
    if n < 1:
        raise ValueError("the store has no checkpoint with a finite loss and accuracy for this class")
    out = np.empty(len(loss), np.float32)
    for i, v in enumerate(np.asarray(loss, np.float64)):
        near = np.argpartition(np.abs(sl - v), n - 1)[:n]                 # the n nearest losses
        out[i] = np.median(sa[near])
    return out


def off_support(rules, classes, c: int, target: np.ndarray, item_acc: np.ndarray, store_loss: np.ndarray,
                store_acc: np.ndarray, neighbours: int = 256) -> np.ndarray:
    """(k,) bool: target rows (k, m) that meet a holdout rule, class c's accuracy read from the
    store at its prompted loss, the others' from item_acc (k, m)."""
    ci = [int(x) for x in classes].index(int(c))
    acc = np.array(item_acc, dtype=np.float32, copy=True)
    acc[:, ci] = accuracy_at_loss(store_loss[:, ci], store_acc[:, ci], target[:, ci], neighbours)
    return held_out_mask(rules, classes, target, acc)


def move_table(asked: np.ndarray, achieved: np.ndarray, err: np.ndarray, edges=MOVE_EDGES) -> list[dict]:
    """Rows binned by the asked move -> [{lo, hi, n, achieved_over_asked (median), sse_share}]."""
    sse = float((err ** 2).sum())
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (asked >= lo) & (asked < hi)
        if not m.any():
            continue
        ratio = float(np.median(achieved[m] / asked[m])) if (np.abs(asked[m]) > 0).all() else float("nan")
        rows.append({"lo": lo, "hi": hi, "n": int(m.sum()), "achieved_over_asked": ratio,
                     "sse_share": float((err[m] ** 2).sum() / sse) if sse > 0 else float("nan")})
    return rows


def breakdown(hn, store, *, guidance, seed: int = 0, classes=None, neighbours: int = 256) -> dict:
    """Run `evaluate_hypernet` on the free classes (or `classes`) and break its R² down (module
    docstring) -> {"eval": the evaluation, "support": {c: {...}}, "moves": [...] or None}."""
    free = [c for c in store.classes if c not in store.manifest.get("pivots", [])]
    classes = free if classes is None else [int(c) for c in classes]
    res = evaluate_hypernet(hn, store, None, seed=seed, guidance=guidance, classes=classes)
    rules = (store.manifest.get("config") or {}).get("holdout") or []
    sl, sa = store.load("class_loss"), store.load("class_acc")
    support, asked, achieved, err = {}, [], [], []
    for c in classes:
        rows = np.asarray(res["rows"][c])
        t, o = np.asarray(res["target"][c]), np.asarray(res["observed"][c])
        look = np.asarray(res["retrieved"][c])
        target = store.take("class_loss", rows).astype(np.float64)
        ci = list(store.classes).index(c)
        target[:, ci] = t
        off = off_support(rules, store.classes, c, target, store.take("class_acc", rows), sl, sa, neighbours) \
            if rules else np.zeros(len(t), bool)
        on = ~off & np.isfinite(o)
        support[c] = {"off": int(off.sum()), "n": int(len(t)),
                      "r2": res["r2"][c], "r2_on": prompt_alignment_r2(o[on], t[on]),
                      "r2_retrieval": res["r2_retrieval"][c], "r2_retrieval_on": prompt_alignment_r2(look[~off], t[~off])}
        if res["start_rows"][c] is not None:
            l0 = store.take("class_loss", np.asarray(res["start_rows"][c]))[:, ci].astype(np.float64)
            ok = np.isfinite(o)
            asked.append((t - l0)[ok]); achieved.append((o - l0)[ok]); err.append((o - t)[ok])
    moves = move_table(*map(np.concatenate, (asked, achieved, err))) if asked else None
    return {"eval": res, "support": support, "moves": moves}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a shipped name or a training run's folder")
    ap.add_argument("--data", required=True, help="the model's collection")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", type=int, nargs="*", default=None, help="default: the free classes")
    ap.add_argument("--neighbours", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    hn = open_hypernet(a.model, device="cpu", data=a.data)
    store = hf.CheckpointStore(a.data)
    out = breakdown(hn, store, guidance=a.guidance, seed=a.seed, classes=a.classes, neighbours=a.neighbours)
    g = out["eval"]["settings"]["guidance"]
    print(f"{a.model}, guidance {g}, evaluation seed {a.seed}: free-class R² {out['eval']['r2_free_mean']:.3f} "
          f"(retrieval {out['eval']['r2_retrieval_free_mean']:.3f})\n")
    print("| class | off-support rows | R² all / on-support | retrieval all / on-support |\n|---|---|---|---|")
    for c, s in out["support"].items():
        print(f"| {c} | {s['off']} of {s['n']} | {s['r2']:.2f} / {s['r2_on']:.2f} | "
              f"{s['r2_retrieval']:.2f} / {s['r2_retrieval_on']:.2f} |")
    if out["moves"]:
        print("\n| asked move (prompt − L_c(θ)) | rows | achieved / asked (median) | share of squared error |\n|---|---|---|---|")
        for r in out["moves"]:
            print(f"| {r['lo']:g} .. {r['hi']:g} | {r['n']} | {r['achieved_over_asked']:.2f} | {r['sse_share']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
