"""Conditioning ablation of DiHyFo-1 / DiHyFo-2 (bench/RESULTS.md §4): one change at a time, same data,
seed and STEP budget; prompt alignment and the conditioning controls per variant.

Every variant trains with `hyforget_fast.hypernet.train.train` on the same collection, with the
same seed (initialisation, held-out runs, batches) and the same number of optimizer steps (steps
are robust to CPU contention; the wall time is recorded beside them). Then, on its EMA model:
  - diffusion loss: mean training loss over the last 10% of steps (curves.json);
  - R² and Pearson per free class: `evaluate_hypernet` with the package protocol (20 prompts over
    the held-out 2nd-98th percentile, 8 networks per prompt, DDIM-20, validation split);
  - conditioning controls, K candidates (DDIM-50, same seed), for each D_f: how many candidates
    forget and keep (validation accuracy <= 0.01 on D_f and >= --retain-min on D_r, default 0.95) under
      forget   the forget prompt (`unlearn.forget.forget`, guidance 1),
      keep     the keep-every-class prompt (`forget(..., prompt="keep")`: every class at the low levels),
      uncond   the unconditional branch (`forget(..., guidance=0)`);
    and the mean D_f validation loss under the forget and keep prompts. DiHyFo-1 starts from the
    best stored checkpoint (forget()'s default). With --sweep the forget and keep prompts use the
    guidance grid chosen on validation (`unlearn.forget.sweep_guidance`), as a release does.

Variants (name -> HypernetConfig / TrainConfig fields):
  tokens          cond tokens, target_repr raw, unit_order random   (the design before this ablation)
  tokens-log      cond tokens, target_repr log, unit_order random
  adaln           cond adaln,  target_repr raw, unit_order random
  adaln-log       cond adaln,  target_repr log, unit_order random
  adaln-log-canon cond adaln,  target_repr log, unit_order canonical
  tokens-log-canon cond tokens, target_repr log, unit_order canonical
  adaln-log-canon-match  adaln-log-canon + the loss-matching term, TrainConfig.loss_match 0.1
  adaln-log-canon-match1 the same with loss_match 1.0
  neuron-adaln-log   adaln-log over neuron tokens (HypernetConfig.tokens "neuron": one token per hidden unit)
  neuron-tokens-log  tokens-log over neuron tokens
  neuron-adaln-log-skip    neuron-adaln-log with x0 = sqrt(ab) x_t + sqrt(1 - ab) decoder (HypernetConfig.skip "vp")
  neuron-adaln-log-match1  neuron-adaln-log + the loss-matching term, TrainConfig.loss_match 1.0
  neuron-adaln-log-match3  the same with loss_match 3.0
  neuron-adaln-log-bal     neuron-adaln-log, rare class losses drawn more often (TrainConfig.balance 0.5)

  python bench/bench_alignment.py --data /tmp/abl/data --out /tmp/abl/runs --model dihyfo2 \\
      --variants tokens,adaln,adaln-log,adaln-log-canon --steps 3000 --threads 1 --md bench/RESULTS.md

A variant whose folder already holds a finished run of `--steps` steps is evaluated, not retrained.
Results: one markdown row per variant (printed, appended to --md) and <out>/<model>-<variant>/bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from hyforget_fast.unlearn.forget import SWEEP_WEIGHTS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine, markdown_table  # noqa: E402

NEURON = dict(cond="adaln", target_repr="log", unit_order="random", tokens="neuron")   # the `tiny` preset's design
VARIANTS = {
    "tokens": dict(cond="tokens", target_repr="raw", unit_order="random"),
    "tokens-log": dict(cond="tokens", target_repr="log", unit_order="random"),
    "adaln": dict(cond="adaln", target_repr="raw", unit_order="random"),
    "adaln-log": dict(cond="adaln", target_repr="log", unit_order="random"),
    "adaln-log-canon": dict(cond="adaln", target_repr="log", unit_order="canonical"),
    "tokens-log-canon": dict(cond="tokens", target_repr="log", unit_order="canonical"),
    "adaln-log-canon-match": dict(cond="adaln", target_repr="log", unit_order="canonical", loss_match=0.1),
    "adaln-log-canon-match1": dict(cond="adaln", target_repr="log", unit_order="canonical", loss_match=1.0),
    # neuron tokens (one per hidden unit, an equivariant DiT): unit order is moot, training skips it
    "neuron-adaln-log": NEURON,
    "neuron-tokens-log": {**NEURON, "cond": "tokens"},
    # DiHyFo-2: x0 = sqrt(ab) x_t + sqrt(1 - ab) decoder (the schedule's skip connection)
    "neuron-adaln-log-skip": {**NEURON, "skip": "vp"},
    # + the loss-matching term (TrainConfig.loss_match): weight 1 is MNIST-4's DiHyFo-2 release recipe
    "neuron-adaln-log-match1": {**NEURON, "loss_match": 1.0},
    "neuron-adaln-log-match3": {**NEURON, "loss_match": 3.0},
    # DiHyFo-2: checkpoints with rare class losses drawn more often (TrainConfig.balance 0.5)
    "neuron-adaln-log-bal": {**NEURON, "balance": 0.5},
}
OK_FORGET = 0.01


def train_variant(name: str, args, out_dir: str) -> dict:
    from hyforget_fast.hypernet.train import TrainConfig, train
    v = VARIANTS[name]
    cfg_path = os.path.join(out_dir, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            conf = json.load(f)
        if int(conf["step"]) >= args.steps:
            print(f"{name}: reusing the finished run in {out_dir}", file=sys.stderr)
            return conf
        raise SystemExit(f"{out_dir} holds an unfinished run (step {conf['step']}); remove it or resume it")
    cfg = TrainConfig(model=args.model, preset=args.preset, steps=args.steps, seed=args.seed,
                      unit_order=v["unit_order"], ckpt_every=max(args.steps, 1), log_every=100,
                      loss_match=v.get("loss_match", 0.0), balance=v.get("balance", 0.0),
                      pair_moved_share=args.pair_moved_share,
                      pair_moved_direction=args.pair_moved_direction,
                      overrides={"cond": v["cond"], "target_repr": v["target_repr"],
                                 "tokens": v.get("tokens", "layer"), **({"skip": v["skip"]} if "skip" in v else {})})
    return train(cfg, args.data, out_dir, device="cpu")


def count_ok(f_acc: torch.Tensor, r_acc: torch.Tensor, retain_min: float) -> int:
    return int(((f_acc <= OK_FORGET) & (r_acc >= retain_min)).sum())


def controls(hn, splits, forget_classes, k: int, steps: int, seed: int, grid=(1.0,), retain_min: float = 0.95,
             model=None) -> dict:
    """Counts of forget-and-keep candidates under the forget prompt and the keep prompt, both with
    K spread over the guidance grid, and under guidance 0 (`unlearn.forget.forget`: same K,
    sampler, seed and starting model; validation split). model: DiHyFo-1's start (None: the best
    stored checkpoint). `<prompt>_best_dr`: the highest D_r among candidates with D_f <= OK_FORGET
    (NaN: none), how close a set came when nothing counts."""
    from hyforget_fast.unlearn.forget import forget
    classes = list(hn.meta["classes"])
    fidx = [classes.index(c) for c in forget_classes]
    out = {}
    for name, kw in (("forget", dict(guidance=list(grid))), ("keep", dict(guidance=list(grid), prompt="keep")),
                     ("uncond", dict(guidance=0.0))):
        c = forget(hn, forget_classes, splits, k=k, steps=steps, seed=seed, keep_candidates=False, model=model,
                   **kw).candidates
        out[name] = count_ok(c["forget_acc"], c["retain_acc"], retain_min)
        gone = c["forget_acc"] <= OK_FORGET
        out[f"{name}_best_dr"] = float(c["retain_acc"][gone].max()) if bool(gone.any()) else float("nan")
        out[f"{name}_df_loss"] = float(c["class_loss"][:, fidx].mean())
        out[f"{name}_df_acc_median"] = float(c["forget_acc"].median())
    return out


def final_loss(out_dir: str) -> float:
    with open(os.path.join(out_dir, "curves.json")) as f:
        rows = [r for r in json.load(f) if "loss" in r]
    tail = rows[-max(1, len(rows) // 10):]
    return float(np.mean([r["loss"] for r in tail]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="dihyfo2", choices=["dihyfo1", "dihyfo2"])
    ap.add_argument("--variants", default="tokens,adaln,adaln-log,adaln-log-canon")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--ddim", type=int, default=50, help="DDIM steps of the control sampling")
    ap.add_argument("--forget", default="2;2,3", help="forget sets, ';'-separated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--retain-min", type=float, default=0.95,
                    help="D_r validation accuracy a candidate must keep to count (MNIST-4 0.95, MNIST 0.85)")
    ap.add_argument("--pair-moved-share", type=float, default=0.0, help="DiHyFo-1 training: TrainConfig.pair_moved_share")
    ap.add_argument("--pair-moved-direction", default="any", choices=["any", "up"],
                    help="DiHyFo-1 training: TrainConfig.pair_moved_direction")
    ap.add_argument("--sweep", action="store_true",
                    help="choose the guidance grids on validation (unlearn.forget.sweep_guidance, K candidates, "
                         "seed 100) and run each forget set's controls at the grid of its size; default: guidance 1")
    ap.add_argument("--sweep-weights", default=",".join(f"{w:g}" for w in SWEEP_WEIGHTS),
                    help="the weights --sweep tries (default: the package's)")
    ap.add_argument("--start", choices=["best", "user"], default="best",
                    help="DiHyFo-1's start for the sweep and the controls: the best stored checkpoint, or the "
                         "demo's user model (demo.users_model: trained on every class, outside the store)")
    ap.add_argument("--sweep-release-starts", action="store_true",
                    help="DiHyFo-1: the sweep counts each of a release's starts (demo.sweep_starts: the best stored "
                         "checkpoint and three freshly trained classifiers) instead of --start alone; the controls "
                         "stay at --start")
    ap.add_argument("--md", default=None, help="append the table to this markdown file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # import everything now: a module edited in the working tree during a long run cannot change it midway
    import hyforget_fast.hypernet.train  # noqa: F401
    import hyforget_fast.unlearn.forget  # noqa: F401

    from hyforget_fast.collection.data import splits_from_manifest
    from hyforget_fast.collection.store import CheckpointStore
    from hyforget_fast.demo import sweep_starts, users_model
    from hyforget_fast.hypernet.api import load_hypernet
    from hyforget_fast.hypernet.evaluate import evaluate_hypernet
    from hyforget_fast.unlearn.forget import low_levels, sweep_guidance
    store = CheckpointStore(args.data, verify="size")
    splits = splits_from_manifest(store.manifest)
    forget_sets = [[int(c) for c in s.split(",")] for s in args.forget.split(";")]
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variants {bad}; choose from {sorted(VARIANTS)}")

    if args.start == "user" and args.model != "dihyfo1":
        raise SystemExit("--start user: only DiHyFo-1 edits a given classifier")
    user = users_model(args.data)[0] if args.start == "user" else None
    if args.sweep_release_starts and args.model != "dihyfo1":
        raise SystemExit("--sweep-release-starts: only DiHyFo-1 has starts")
    sweep_kw = {"starts": sweep_starts(args.data)} if args.sweep_release_starts else {"model": user}

    rows = []
    for name in names:
        out_dir = os.path.join(args.out, f"{args.model}-{name}")
        conf = train_variant(name, args, out_dir)
        hn = load_hypernet(out_dir, device="cpu")
        t0 = time.perf_counter()
        free_cls = [int(c) for c in store.classes if int(c) not in set(store.manifest.get("pivots", []))]
        ev = evaluate_hypernet(hn, args.data, classes=free_cls, seed=args.seed, splits=(splits.X_val, splits.y_val))
        free = ev["free_classes"]
        sweep = sweep_guidance(hn, splits, forget_sets, k=args.k, steps=args.ddim, retain_min=args.retain_min,
                               weights=[float(w) for w in args.sweep_weights.split(",")], **sweep_kw) if args.sweep else None
        if sweep:
            hn.meta["sampling"] = sweep     # the controls sample at the levels chosen for each size, like a release
        grids = {tuple(fs): sweep["guidance_by_size"][str(len(fs))] if sweep else [1.0] for fs in forget_sets}
        ctl = {fs: controls(hn, splits, fs, args.k, args.ddim, args.seed, grids[fs], args.retain_min, user)
               for fs in grids}
        rec = {"model": args.model, "variant": name, **VARIANTS[name], "steps": int(conf["step"]),
               "wall_time_s": float(conf["wall_time_s"]), "final_loss": final_loss(out_dir),
               "r2": {int(c): ev["r2"][c] for c in free}, "pearson": {int(c): ev["pearson"][c] for c in free},
               "r2_free_mean": ev["r2_free_mean"], "pearson_free_mean": ev["pearson_free_mean"],
               "controls": {",".join(map(str, k)): v for k, v in ctl.items()}, "guidance_grid": {",".join(map(str, k)): v for k, v in grids.items()},
               "low_levels": {",".join(map(str, fs)): list(low_levels(hn, None, len(fs))) for fs in forget_sets},
               "sweep": sweep, "eval_s": time.perf_counter() - t0,
               "pair_moved_share": args.pair_moved_share, "pair_moved_direction": args.pair_moved_direction,
               "k": args.k, "ddim": args.ddim, "seed": args.seed, "retain_min": args.retain_min, "start": args.start,
               "sweep_release_starts": bool(args.sweep_release_starts)}
        with open(os.path.join(out_dir, "bench.json"), "w") as f:
            json.dump(rec, f, indent=1)
        rows.append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)

    header = ["model", "variant", "steps", "wall min", "diff. loss", "guidance grid; low levels per set"]
    header += ["R² " + " / ".join(str(c) for c in free), "Pearson " + " / ".join(str(c) for c in free)]
    for fs in forget_sets:
        s = "{" + ",".join(map(str, fs)) + "}"
        header += [f"D_f={s} forget / keep / uncond (of {args.k})", f"D_f={s} loss forget / keep"]
    table = []
    for r in rows:
        line = [r["model"], r["variant"], r["steps"], f"{r['wall_time_s'] / 60:.1f}", f"{r['final_loss']:.4f}",
                "; ".join("{" + k + "}: " + ", ".join(f"{w:g}" for w in g) + " (low " + ", ".join(f"{q:g}" for q in r["low_levels"][k]) + ")"
                          for k, g in r["guidance_grid"].items()),
                " / ".join(f"{r['r2'][c]:.2f}" for c in free), " / ".join(f"{r['pearson'][c]:.2f}" for c in free)]
        for fs in forget_sets:
            c = r["controls"][",".join(map(str, fs))]
            line += [f"{c['forget']} / {c['keep']} / {c['uncond']}", f"{c['forget_df_loss']:.2f} / {c['keep_df_loss']:.2f}"]
        table.append(line)
    cmd = "python bench/bench_alignment.py " + " ".join(sys.argv[1:] if argv is None else argv)
    pairs = (f", pairs moved share {args.pair_moved_share:g} ({args.pair_moved_direction})"
             if args.model == "dihyfo1" else "")
    md = (f"\n### bench_alignment: {args.model}, {args.steps} steps, seed {args.seed}{pairs} ({machine('cpu')})\n\n"
          f"`{cmd}`\n\n" + markdown_table(header, table) + "\n")
    emit(md, args.md)


if __name__ == "__main__":
    main()
