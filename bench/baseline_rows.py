"""The demo's baseline rows alone (no hypernetwork): retraining and every tuned post-hoc baseline on
the MNIST-4 collection, from the demo's starting model, over 3 seeds, through the report's own
`evaluate_forgetting` (same metrics, same tuning, search time counted as the method's time).

    hyforget collect --preset mnist4 --runs 512 \
        --holdout 3:acc_low:0.2,0:acc_high:0.8,1:acc_high:0.8,2:acc_high:0.8 --out DATA --threads 1 --quiet
    OMP_NUM_THREADS=1 python bench/baseline_rows.py --data DATA --out OUT

The starting model is the demo's: the most accurate stored checkpoint on validation (ties: lowest loss)
outside the runs the shipped hypernetworks hold out (their model cards). Prints one markdown row
per (forget set, method) with mean ± std over the seeds; writes OUT/report.json and report.md.
"""
import argparse
import json
import os

import torch

from hyforget_fast.unlearn.forget import best_checkpoint
from hyforget_fast.unlearn.report import LABELS, evaluate_forgetting, save_report

CARD = os.path.join(os.path.dirname(__file__), "..", "hyforget_fast", "pretrained", "mnist4-dihyfo2", "card.json")
COLS = ("acc_retain", "acc_forget", "mia", "phi", "phi_bt", "seconds")


def heldout_runs(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            got = v if k == "heldout_runs" else heldout_runs(v)
            if got is not None:
                return got
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    with open(CARD) as f:
        held = heldout_runs(json.load(f)) or []
    model, info = best_checkpoint(args.data, held)
    print("starting model:", info)
    rep = evaluate_forgetting(args.data, {}, [(2,), (2, 3), (3,)], seeds=args.seeds, model=model, out_dir=None,
                              memorization=False, relearning=False, holdout={"forget_set": [3]})
    os.makedirs(args.out, exist_ok=True)
    save_report(rep, args.out)
    print("| D_f | method | acc D_r | acc D_f | MIA | φ per-sample | φ bad-teacher | time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for key, meths in rep["summary"].items():
        for m in ("retrain", "finetune", "neggrad_plus", "random_labels", "ssd"):
            if m in meths:
                cells = [f"{meths[m][c][0]:.3f} ± {meths[m][c][1]:.3f}" for c in COLS]
                print(f"| {{{key}}} | {LABELS[m]} | " + " | ".join(cells) + " |")
    for run in rep["runs"]:
        print(run["forget"], run["seed"], {m: (run["extra"][m].get("tuning") or {}).get("chosen")
                                           for m in ("finetune", "neggrad_plus", "random_labels", "ssd")})


if __name__ == "__main__":
    main()
