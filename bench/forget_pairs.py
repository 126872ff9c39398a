"""How much forgetting a collection shows DiHyFo-1: per forget set, the runs that hold a checkpoint
which forgets the set while keeping the other classes, and the runs that hold such a checkpoint
AFTER one that still knows the set (a (θ, θ*) training pair of the edit a forget prompt asks for).

    python bench/forget_pairs.py --data D --forget "2;2,3,4;0,1,2,3,4" [--md bench/RESULTS.md]
    python bench/forget_pairs.py --data D --forget "2;2,3,4" --forgot-max 0.01 --levels mnist10-dihyfo2

--levels HYPERNET (a shipped name or a run folder) places the losses of the checkpoints that forget
and keep in that hypernetwork's prompt-level table: per class, the quantile of its training loss
(`loss_ranges`) each checkpoint's validation loss sits at, where a forget prompt's levels point.

Accuracies are the store's validation accuracies per class. A checkpoint *knows* the set when each
of its classes is at >= --known-min; it *forgets and keeps* when each class of the set is at
<= --forgot-max and the other classes average >= --retain-min.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from hyforget_fast.collection.store import CheckpointStore

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table  # noqa: E402


def forget_pair_counts(store: CheckpointStore, forget_classes, known_min: float = 0.8, forgot_max: float = 0.05,
                       retain_min: float = 0.85) -> dict:
    """-> {"runs", "forget_and_keep_runs", "pair_runs"} for one forget set (digit labels)."""
    classes = [int(c) for c in store.classes]
    bad = [c for c in forget_classes if c not in classes]
    if bad or not forget_classes:
        raise ValueError(f"forget classes {bad or list(forget_classes)} are not among the collection's {classes}")
    fi = [classes.index(c) for c in forget_classes]
    ri = [i for i in range(len(classes)) if i not in fi]
    run = store.load("run")
    acc = store.load("class_acc")                                      # (n, m) validation accuracy
    order = np.lexsort((store.load("step"), run))                      # by run, then step
    run, acc = run[order], acc[order]
    knows = (acc[:, fi] >= known_min).all(1)
    forgot = (acc[:, fi] <= forgot_max).all(1) & (acc[:, ri].mean(1) >= retain_min if ri else True)
    uniq, start = np.unique(run, return_index=True)
    # per run: does any forgotten checkpoint come after the run's first checkpoint that knows the set?
    first_known = np.full(len(run), np.iinfo(np.int64).max)
    idx = np.arange(len(run))
    first_known[knows] = idx[knows]
    first_known = np.minimum.reduceat(first_known, start)              # (runs,)
    last_forgot = np.where(forgot, idx, -1)
    last_forgot = np.maximum.reduceat(last_forgot, start)              # (runs,)
    return {"runs": int(len(uniq)), "forget_and_keep_runs": int((last_forgot >= 0).sum()),
            "pair_runs": int((last_forgot > first_known).sum())}


def forget_loss_levels(store: CheckpointStore, forget_classes, table: dict, forgot_max: float = 0.01,
                       retain_min: float = 0.85) -> dict:
    """Where the checkpoints that forget `forget_classes` and keep the rest sit in a prompt-level
    table (`unlearn.forget.loss_quantile_table`: {"q": (Q,), "values": (Q, m)}) -> {"n": how many,
    "median" / "p10" / "p90": (m,) quantile positions of each class's validation loss}."""
    classes = [int(c) for c in store.classes]
    fi = [classes.index(c) for c in forget_classes]
    ri = [i for i in range(len(classes)) if i not in fi]
    acc, loss = store.load("class_acc"), store.load("class_loss")       # (n, m) validation
    ok = (acc[:, fi] <= forgot_max).all(1) & (acc[:, ri].mean(1) >= retain_min)
    q, vals = np.asarray(table["q"], dtype=np.float64), np.asarray(table["values"], dtype=np.float64)
    pos = np.stack([np.interp(loss[ok, c], vals[:, c], q) for c in range(len(classes))], 1)   # (n_ok, m)
    if not len(pos):
        return {"n": 0}
    return {"n": int(ok.sum()), "median": np.median(pos, 0), "p10": np.percentile(pos, 10, 0),
            "p90": np.percentile(pos, 90, 0)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, action="append", help="collection folder (repeatable)")
    ap.add_argument("--forget", required=True, help="forget sets, ';'-separated, e.g. '2;2,3,4'")
    ap.add_argument("--known-min", type=float, default=0.8)
    ap.add_argument("--forgot-max", type=float, default=0.05)
    ap.add_argument("--retain-min", type=float, default=0.85)
    ap.add_argument("--levels", help="a hypernetwork (shipped name or run folder): print where the checkpoints that "
                                     "forget and keep sit in its prompt-level table, per class")
    ap.add_argument("--md", help="append the table to this markdown file")
    a = ap.parse_args(argv)
    sets = [tuple(int(c) for c in s.split(",")) for s in a.forget.split(";") if s.strip()]
    if a.levels:
        levels_table(a, sets)
        return
    rows = []
    for d in a.data:
        st = CheckpointStore(d, verify="size")
        cfg = st.manifest.get("config", {})
        mix = (f"forget {cfg.get('forget_prob')}, ≤{cfg.get('forget_max_classes')} classes; "
               f"undersample {cfg.get('undersample_prob')}")
        cells = []
        for fs in sets:
            c = forget_pair_counts(st, fs, a.known_min, a.forgot_max, a.retain_min)
            cells.append(f"{c['pair_runs']} / {c['forget_and_keep_runs']}")
        rows.append([os.path.basename(os.path.normpath(d)), mix, str(c["runs"]), str(len(st)), *cells])
    header = ["collection", "run mix", "runs", "checkpoints",
              *[f"{{{','.join(map(str, fs))}}}: pair / forget-and-keep runs" for fs in sets]]
    table = markdown_table(header, rows)
    print(table)
    if a.md:
        with open(a.md, "a") as f:
            f.write("\n" + table + "\n")


def levels_table(a, sets) -> None:
    """--levels: one row per collection and forget set, each class's median quantile position (10th-90th)."""
    import hyforget_fast as hf
    from hyforget_fast.unlearn.forget import loss_quantile_table
    rows = []
    for d in a.data:
        hn = (hf.load_hypernet(a.levels, data=d) if os.path.isdir(a.levels) else hf.load_pretrained(a.levels, data=d))
        classes = list(hn.meta["classes"])
        table = loss_quantile_table(hn.meta["loss_ranges"], classes)
        st = CheckpointStore(d, verify="size")
        for fs in sets:
            r = forget_loss_levels(st, fs, table, a.forgot_max, a.retain_min)
            cells = (["-"] * len(classes) if not r["n"] else
                     [f"{r['median'][i]:.2f} ({r['p10'][i]:.2f}-{r['p90'][i]:.2f})" for i in range(len(classes))])
            rows.append([os.path.basename(os.path.normpath(d)), "{" + ",".join(map(str, fs)) + "}", str(r["n"]), *cells])
    table_md = markdown_table(["collection", "forget set", "checkpoints that forget and keep",
                               *[f"class {c}" for c in classes]], rows)
    print(table_md)
    if a.md:
        with open(a.md, "a") as f:
            f.write("\n" + table_md + "\n")


if __name__ == "__main__":
    main()
