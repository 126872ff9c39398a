"""Checkpoint collection: naive single-run PyTorch loop vs the batched engine, same schedule.

Both sides follow the same run plan (init params, learning rate, per-class undersampling,
forgetting phase, offer probabilities, pivot rule, bin caps) drawn by BlockTrainer, and the
same objective: a minibatch that walks a random permutation of the training set each epoch and
the weighted mean cross-entropy with per-example weights keep[r, y] (0 for forgotten classes).
The naive side trains one nn.Module with one optimizer per run (its own minibatches) and
evaluates then saves each offer.
Reports MLP-SGD-steps/s, checkpoints/s and FLOP rate vs a GEMM measured in the same process.

    PYTHONPATH=. python bench/bench_collect.py --preset mnist10 --runs 256 --naive-runs 3
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from common import median_time, sync  # bench/ is on sys.path when run as a script
from hyforget_fast.collection.collect import BlockTrainer, offer_probs, preset
from hyforget_fast.collection.data import load_digits


def mlp_flops(spec, n):
    """Forward FLOPs of one MLP on n inputs."""
    return 2 * n * sum(a * b for a, b in zip(spec.layer_sizes[:-1], spec.layer_sizes[1:]))


def step_flops(spec, B):
    """Forward + weight grads + input grads of hidden layers (not of the input layer)."""
    sizes = list(zip(spec.layer_sizes[:-1], spec.layer_sizes[1:]))
    return 2 * B * (2 * sum(a * b for a, b in sizes) + sum(a * b for a, b in sizes[1:]))


def gemm_rate(device, n=1024, reps=10):
    """Median fp32 GEMM rate (FLOP/s) of an n x n x n product on `device`."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return 2 * n ** 3 / median_time(lambda: a @ b, str(device), repeats=reps)


def naive(cfg, splits, n_runs):
    """One nn.Module + one optimizer per run, the plan of block 0's first n_runs runs."""
    bt = BlockTrainer(cfg, splits, 0)
    spec, m = bt.spec, bt.m
    order = torch.argsort(splits.y_train, stable=True)                # same order as the engine's
    Xtr, ytr, Xv, yv = splits.X_train[order], bt.ytr, splits.X_val, bt.yv  # all 784 pixels
    p_offer = offer_probs(cfg, bt.total_steps)
    cnt_v = torch.bincount(yv, minlength=m).float()
    bin_count = torch.zeros(cfg.num_bins ** len(bt.free_idx), dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    steps = saved_total = evals = 0
    saved_list = []
    t0 = time.perf_counter()
    for r in range(n_runs):
        layers = []
        for l, (a, b) in enumerate(zip(spec.layer_sizes[:-1], spec.layer_sizes[1:])):
            lin = torch.nn.Linear(a, b)
            with torch.no_grad():
                lin.weight.copy_(bt.W0_full[r] if l == 0 else bt.W[l][r])
                lin.bias.copy_(bt.b[l][r])
            layers += [lin, torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers[:-1])
        opt = torch.optim.SGD(model.parameters(), lr=float(bt.lr[r]))
        w_keep = bt.keep[r]                                        # per-class loss weights
        w_forget = torch.where(bt.forget_mask[r], 0.0, w_keep)
        saved, B = 0, cfg.batch_size
        for step in range(1, bt.total_steps + 1):
            e = (step - 1) % bt.steps_per_epoch
            if e == 0:
                perm = torch.randperm(len(ytr), generator=g)
            idx = perm[e * B:(e + 1) * B]
            yb = ytr[idx]
            w = (w_forget if step >= float(bt.forget_step[r]) else w_keep)[yb]
            ce = F.cross_entropy(model(Xtr[idx]), yb, reduction="none")
            loss = (ce * w).sum() / w.sum().clamp_min(1e-30)       # weighted mean CE
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if torch.rand((), generator=g) >= p_offer[step - 1]:
                continue
            evals += 1
            with torch.no_grad():                                  # evaluate then save
                logits = model(Xv)
                ce = F.cross_entropy(logits, yv, reduction="none")
                cl = torch.zeros(m).index_add_(0, yv, ce) / cnt_v
                ca = torch.zeros(m).index_add_(0, yv, (logits.argmax(1) == yv).float()) / cnt_v
            if (ca[bt.pivot_idx] >= cfg.gamma).all() and torch.isfinite(cl).all():
                cell = int(bt.bin_cells(cl[None])[0])
                if bin_count[cell] < cfg.bin_cap:
                    bin_count[cell] += 1
                    saved_list.append((torch.cat([p.detach().flatten() for p in model.parameters()]).clone(),
                                       cl, ca, r, step))
                    saved += 1
                    if saved >= cfg.ckpts_per_run:
                        break
        saved_total += saved
    dt = time.perf_counter() - t0
    return {"runs": n_runs, "steps": steps, "evals": evals, "saved": saved_total, "time": dt}


def batched(cfg, splits, device):
    sync(device)
    t0 = time.perf_counter()
    bt = BlockTrainer(cfg, splits, 0, device)
    res = bt.run()
    sync(device)
    dt = time.perf_counter() - t0
    saved = int((res.phase != 0).sum())
    out = {"runs": bt.R, "steps": bt.R * res.stats["steps"], "evals": res.stats["scored"], "saved": saved, "time": dt}
    if bt.sparse:   # executed first-layer FLOPs: 2 per nonzero input and first-layer unit
        spec, H, S = bt.spec, bt.H, cfg.batch_size
        nnz_row = float((bt.Xtr != 0).sum(1).float().mean())            # mean nonzeros of a training row
        dense_first = 2 * 784 * H
        out["executed"] = (out["steps"] * (step_flops(spec, S) - 2 * S * dense_first + 2 * S * 2 * nnz_row * H)
                           + out["evals"] * (mlp_flops(spec, len(bt.yv)) - len(bt.yv) * dense_first
                                             + 2 * float((bt.Xv != 0).sum()) * H))
    return out


def median_run(fn, repeats: int) -> dict:
    """The run with the median time of `repeats` runs of fn (each returns a dict with "time")."""
    runs = sorted((fn() for _ in range(max(1, repeats))), key=lambda r: r["time"])
    return runs[len(runs) // 2]


def report(name, r, spec, cfg, n_val, gemm):
    """One table row. Model FLOPs: the dense MLP work of the schedule (forward + backward of every
    SGD step, one forward per scored network); executed FLOPs: what the provider actually
    multiplies (the sparse engine skips zero inputs, the dense providers do not)."""
    flops = r["steps"] * step_flops(spec, cfg.batch_size) + r["evals"] * mlp_flops(spec, n_val)
    rate, done = flops / r["time"], r.get("executed", flops) / r["time"]
    print(f"| {name} | {r['runs']} | {r['time']:.2f} | {r['steps'] / r['time']:,.0f} | {r['saved']} | "
          f"{r['saved'] / r['time']:,.1f} | {rate / 1e9:.1f} | {done / 1e9:.1f} | {100 * done / gemm:.0f}% |",
          flush=True)
    return r["saved"] / r["time"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mnist10")
    ap.add_argument("--runs", type=int, default=256, help="runs of the batched block")
    ap.add_argument("--naive-runs", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2],
                    help="CPU thread counts to run the naive loop and the CPU engine at (none: GPU only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs per provider; the median is reported (the first also warms caches and, on a VM, "
                         "first-touch host memory)")
    a = ap.parse_args()
    cfg = preset(a.preset, runs=a.runs, block_runs=a.runs)
    splits = load_digits(cfg.classes, cfg.split_seed, fractions=cfg.fractions)
    spec, n_val = cfg.spec(), len(splits.y_val)
    print(f"preset {a.preset}: spec {spec.layer_sizes}, batch {cfg.batch_size}, epochs {cfg.epochs}, "
          f"{cfg.ckpts_per_run} ckpts/run, train {len(splits.y_train)}, val {n_val}")
    print("| provider | runs | s | MLP-SGD-steps/s | ckpts saved | ckpts/s | model GFLOP/s | executed GFLOP/s "
          "| executed of GEMM |")
    print("|---|---|---|---|---|---|---|---|---|")
    best = {}
    for th in a.threads:
        torch.set_num_threads(th)
        gemm = gemm_rate("cpu")
        print(f"| GEMM 1024³ fp32, {th} thread(s) | | | | | | | {gemm / 1e9:.1f} | 100% |")
        best["naive"] = max(best.get("naive", 0), report(
            f"naive loop, {th} thr", median_run(lambda: naive(cfg, splits, a.naive_runs), a.repeats),
            spec, cfg, n_val, gemm))
        best["batched"] = max(best.get("batched", 0), report(
            f"batched engine CPU, {th} thr", median_run(lambda: batched(cfg, splits, "cpu"), a.repeats),
            spec, cfg, n_val, gemm))
    if a.device.startswith("cuda"):
        gemm = gemm_rate(a.device)
        print(f"| GEMM 1024³ fp32 GPU | | | | | | | {gemm / 1e9:.1f} | 100% |")
        report("batched engine GPU", median_run(lambda: batched(cfg, splits, a.device), a.repeats), spec, cfg, n_val,
               gemm)
    if best:
        print(f"\nbest batched CPU / best naive: {best['batched'] / best['naive']:.1f}x checkpoints/s")


if __name__ == "__main__":
    main()
