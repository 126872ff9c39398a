"""DiHyFo-1 forgetting in closed loop: the forget call's K candidates edited once more
(`Hypernet.refine`) from their measured validation losses, then chosen by the same rule.

    python bench/forget_closed_loop.py --model mnist10-dihyfo1 --data D --forget 2 --forget 2,3,4 --forget 0,1,2,3,4 --seeds 0 1 2

For each forget set and seed: `forget` from the demo's user's model (`demo.users_model`, the card's
grids and levels, K = 256, DDIM-50), then the same candidates refined once with feedback on the
validation split (the split that chooses; the test split reports) and chosen again by the
selection rule. Prints both rows: validation forget-and-keep count, and the chosen network's test
accuracy on D_f and D_r. An exploration, not the shipped forget path.
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
from hyforget_fast.demo import users_model  # noqa: E402
from hyforget_fast.unlearn import forget as F  # noqa: E402
from hyforget_fast.unlearn.selection import class_indices, group_accuracy  # noqa: E402


def accuracy_on_test_split(params: torch.Tensor, spec, splits, fidx) -> tuple[float, float]:
    """(test accuracy on D_f, on D_r) of one flat network."""
    met = hf.class_metrics(params[None].float(), spec, splits.X_test, splits.y_test)
    counts = torch.bincount(splits.y_test, minlength=spec.num_classes)
    keep = [c for c in range(spec.num_classes) if c not in fidx]
    return (float(group_accuracy(met.class_acc, counts, fidx)[0]), float(group_accuracy(met.class_acc, counts, keep)[0]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--forget", action="append", required=True, help="a forget set, e.g. 2,3,4 (repeatable)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--retain-min", type=float, default=0.85, help="D_r threshold of the count (the ten-class setting's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    hn = open_hypernet(args.model, device="cpu", data=args.data)
    if hn.kind != "dihyfo1":
        raise SystemExit("closed-loop forgetting edits a start: it needs a DiHyFo-1")
    splits = hf.load_splits(args.data)
    user, _ = users_model(args.data)
    classes = list(hn.meta["classes"])
    for fs in args.forget:
        f = [int(c) for c in fs.split(",")]
        fidx = class_indices(classes, f, hn.meta.get("pivots", ()))
        rows = {"open": [], "closed": []}
        for s in args.seeds:
            res = F.forget(hn, f, splits, k=args.k, model=user, seed=s, retain_min=args.retain_min, warn=False)
            cand = res.candidate_params
            w = res.candidates["guidance"]
            again = hn.refine(res.prompt, cand, splits.X_val, splits.y_val, rounds=1, seed=s, guidance=w.tolist())
            for name, c in (("open", cand), ("closed", again)):
                i, met = F.choose(c, hn.spec, splits, fidx, args.retain_min)
                d_f, d_r = accuracy_on_test_split(c[i], hn.spec, splits, fidx)
                rows[name].append((int(met["forget_keep"]), d_f, d_r))
        for name, r in rows.items():
            a = np.array(r, dtype=np.float64)
            print(f"forget {fs} {name:6s}: forget&keep {a[:, 0].mean():.1f} (of {args.k}); test D_f {a[:, 1].mean():.3f}; "
                  f"test D_r {a[:, 2].mean():.3f}  per seed " + " ".join(f"{x:.0f}/{y:.3f}/{z:.3f}" for x, y, z in r),
                  flush=True)


if __name__ == "__main__":
    main()
