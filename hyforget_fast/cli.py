"""`hyforget` command line. Subcommands: collect, plot-coverage (train and forget come later)."""
from __future__ import annotations

import argparse
import sys


def _add_collect(sub):
    p = sub.add_parser("collect", help="train many MLP runs at once and store scored checkpoints")
    p.add_argument("--preset", default="mnist4", help="mnist4, mnist10, mnist4-dihyfo2, mnist10-dihyfo2")
    p.add_argument("--out", required=True, help="collection folder (re-running resumes it)")
    p.add_argument("--runs", type=int, help="total number of runs")
    p.add_argument("--block-runs", type=int, help="runs per batched block (= per shard)")
    p.add_argument("--seed", type=int)
    p.add_argument("--split-seed", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--ckpts-per-run", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--schedule", choices=["uniform", "early_late"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is often fastest on a busy machine)")
    p.add_argument("--figures", action="store_true", help="write coverage.png into --out when done")
    p.add_argument("--quiet", action="store_true")


def cmd_collect(a) -> int:
    import torch

    from .collection.collect import collect, preset
    if a.threads:
        torch.set_num_threads(a.threads)
    over = {k: v for k, v in {"runs": a.runs, "block_runs": a.block_runs, "seed": a.seed, "split_seed": a.split_seed,
                              "epochs": a.epochs, "ckpts_per_run": a.ckpts_per_run, "batch_size": a.batch_size,
                              "schedule": a.schedule}.items() if v is not None}
    cfg = preset(a.preset, **over)
    log = (lambda *_: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    manifest = collect(cfg, a.out, device=a.device, log=log)
    if manifest is not None and a.figures:
        from .collection.figures import plot_coverage
        log(f"coverage figure: {plot_coverage(a.out)}")
    return 0


def cmd_plot(a) -> int:
    from .collection.figures import plot_coverage
    print(plot_coverage(a.dir, a.png))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="hyforget", description="HyperForget: unlearning with diffusion hypernetworks")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_collect(sub)
    p = sub.add_parser("plot-coverage", help="histograms of per-class loss coverage of a collection")
    p.add_argument("dir")
    p.add_argument("--png", help="output path (default DIR/coverage.png)")
    a = ap.parse_args(argv)
    try:
        return {"collect": cmd_collect, "plot-coverage": cmd_plot}[a.cmd](a)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"hyforget {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
