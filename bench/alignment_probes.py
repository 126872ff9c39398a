"""Prompt-alignment probes: `evaluate_hypernet` (free classes) under one change at a time.

    --runs train        evaluate on as many TRAINING runs as the model holds out (drawn with
                        --runs-seed), to split the gap into fitting (train) and generalisation
                        (held-out - train)
    --start init        DiHyFo-1 edits the run's initial parameters instead of an earlier
                        checkpoint of the run (the dissertation's protocol)
    --calibrate A       DiHyFo-1: feed s + 1 + A (t - s - 1) for a prompt t more than 1 above the
                        start's own loss s (asks for more of a large move than the user does)
    --noise-scale T     scale the initial diffusion noise by T (T < 1: a lower-temperature draw)
    --refine R          DiHyFo-1 in closed loop: R more edits, each from the previous draw conditioned
                        on its measured losses (`Hypernet.refine`); feedback on one half of the
                        validation split, R² on the other (--half-b scores the open loop there too)
    --feedback train    ... feedback on the training split instead, R² on the whole validation split
    --sample-steps N    DDIM steps per draw (the evaluation's default is 20; forget calls use 50)

    python bench/alignment_probes.py --model mnist10-dihyfo1 --data D --guidance 2 --seeds 0 1 2
    python bench/alignment_probes.py --model RUN_DIR --data D --guidance 2 --seeds 0 1 --runs train

--model: a shipped name (`hf.pretrained()`) or a training run's folder; --data its collection or a
rebuild by the card's collect command (held-out runs are passed by id). Prints the free-class R²
per evaluation seed, per class, and the mean. Nothing reads the test split.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hyforget_fast as hf  # noqa: E402
from hyforget_fast.cli import open_hypernet  # noqa: E402
import hyforget_fast.hypernet.diffusion as diffusion  # noqa: E402
from hyforget_fast.hypernet.evaluate import evaluate_hypernet, validation_halves, validation_split  # noqa: E402

CALIBRATE_FROM = 1.0   # moves up to this far above the start's loss are fed unchanged


def calibrated_prompts(target: torch.Tensor, start_loss: torch.Tensor, a: float,
                       d0: float = CALIBRATE_FROM) -> torch.Tensor:
    """target, start_loss (k, m) -> (k, m): s + d0 + a (t - s - d0) where t - s > d0, else t."""
    d = target - start_loss
    return torch.where(d > d0, start_loss + d0 + a * (d - d0), target)


def training_runs_like(store: hf.CheckpointStore, heldout_runs, seed: int) -> list[int]:
    """As many training runs (not held out) as `heldout_runs`, drawn without replacement."""
    held = {int(r) for r in heldout_runs}
    train = [int(r) for r in np.unique(store.load("run")) if int(r) not in held]
    if len(train) < len(held):
        raise ValueError(f"the store has {len(train)} training runs, fewer than the {len(held)} held out")
    rng = np.random.default_rng(int(seed))
    return sorted(int(r) for r in rng.choice(train, len(held), replace=False))


class CalibratedPrompts:
    """A DiHyFo-1 `Hypernet` whose `sample` feeds `calibrated_prompts` (the evaluation still scores
    against the user's prompt)."""

    def __init__(self, hn, a: float):
        self.hn, self.a = hn, float(a)
        self.spec, self.cfg, self.meta = hn.spec, hn.cfg, hn.meta

    def sample(self, target_losses, k, **kw):
        t = torch.as_tensor(target_losses).float()
        s = torch.as_tensor(kw["losses"]).float()
        return self.hn.sample(calibrated_prompts(t, s, self.a), k, **kw)


@contextlib.contextmanager
def noise_scaled(scale: float):
    """Every Gaussian draw of the samplers times `scale` (with DDIM eta = 0 only x_T is drawn)."""
    plain = diffusion._randn
    diffusion._randn = lambda *a, **k: plain(*a, **k) * float(scale)
    try:
        yield
    finally:
        diffusion._randn = plain


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="the model's collection")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--runs", choices=("heldout", "train"), default="heldout")
    ap.add_argument("--runs-seed", type=int, default=123)
    ap.add_argument("--start", choices=("pair", "init"), default="pair")
    ap.add_argument("--calibrate", type=float, default=None)
    ap.add_argument("--noise-scale", type=float, default=1.0)
    ap.add_argument("--refine", type=int, default=0)
    ap.add_argument("--feedback", choices=("val-half", "train"), default="val-half")
    ap.add_argument("--half-b", action="store_true", help="score on validation half B (as --refine does)")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.half_b and args.refine:
        ap.error("--refine already scores on validation half B; --half-b is for the open loop")
    if args.refine and args.calibrate is not None:
        ap.error("--refine and --calibrate are separate probes; use one")
    if args.refine < 0:
        ap.error(f"--refine must be at least 0, got {args.refine}")
    if args.sample_steps < 1:
        ap.error(f"--sample-steps must be at least 1, got {args.sample_steps}")
    if not args.noise_scale > 0:
        ap.error(f"--noise-scale must be positive, got {args.noise_scale}")
    if args.calibrate is not None and not args.calibrate > 0:
        ap.error(f"--calibrate must be positive, got {args.calibrate}")
    torch.set_num_threads(args.threads)
    hn = open_hypernet(args.model, device="cpu", data=args.data)
    store = hf.CheckpointStore(args.data)
    # held-out runs by id: a rebuild of the collection by the card's collect command holds the same runs,
    # though on another CPU its floats (and so its manifest hash) may differ
    held = hn.meta["heldout_runs"]
    runs = held if args.runs == "heldout" else training_runs_like(store, held, args.runs_seed)
    if args.calibrate is not None:
        if hn.cfg.kind != "dihyfo1":
            raise SystemExit("--calibrate is for DiHyFo-1 (it moves prompts relative to the start's losses)")
        hn = CalibratedPrompts(hn, args.calibrate)
    kw = {}
    if args.refine:
        if hn.cfg.kind != "dihyfo1":
            raise SystemExit("--refine is for DiHyFo-1 (it edits a start network)")
        kw["refine"] = args.refine
        if args.feedback == "train":
            sp = hf.load_splits(store)
            kw["feedback"] = (sp.X_train, sp.y_train)
    elif args.half_b:
        kw["splits"] = validation_halves(*validation_split(store))[1]
    free = [c for c in store.classes if c not in store.manifest.get("pivots", [])]
    r2s = []
    with noise_scaled(args.noise_scale):
        for s in args.seeds:
            r = evaluate_hypernet(hn, store, runs, seed=s, guidance=args.guidance, start=args.start, classes=free,
                                  steps=args.sample_steps, **kw)
            r2s.append(r["r2_free_mean"])
            print(f"seed {s}: free R2 {r['r2_free_mean']:.3f}  Pearson {r['pearson_free_mean']:.3f}  per class "
                  + " ".join(f"{c}:{v:.2f}" for c, v in r["r2"].items())
                  + f"  retrieval {r['r2_retrieval_free_mean']:.3f}", flush=True)
    print(f"mean over seeds {args.seeds}: free R2 {np.mean(r2s):.3f}")


if __name__ == "__main__":
    main()
