"""Latency of generating K networks: DDIM at 20/50/100 steps and DDPM at 1000 steps (bench/RESULTS.md §6).

Times one `sample` call as the public API runs it: condition on one prompt (repeated K times; for
DiHyFo-1 also one current θ, tokenized once), run the sampler on the device, detokenize the
x0 tokens to K flat parameter vectors (K, P). An untrained model has the same compute, so the
model is freshly initialised. `--score` adds a separate column: scoring the K networks with
hf.class_metrics on a 400-row validation set (random inputs: same cost as real digits).
Medians over --repeats after one warm-up call, CUDA-synchronized on a GPU.

The full grid (K in {64, 256, 1024} x {ddim20, ddim50, ddim100, ddpm1000}) is for a GPU. On the
2-core CPU, DDPM-1000 at K=1024 with the tiny preset takes minutes; the CPU grid used is
  python bench/bench_sample.py --ks 64,256 --samplers ddim20,ddim50,ddim100 --repeats 3
  python bench/bench_sample.py --ks 64 --samplers ddpm1000 --repeats 1 --warmup 0
and --quick is K=64 with DDIM-20/50 only.

  python bench/bench_sample.py [--models dihyfo1,dihyfo2] [--preset tiny] [--spec mnist4] [--ks ...]
                               [--samplers ...] [--score] [--quick] [--md FILE]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine, markdown_table, median_time  # noqa: E402

import hyforget_fast as hf  # noqa: E402
from hyforget_fast.hypernet.diffusion import GaussianDiffusion  # noqa: E402
from hyforget_fast.hypernet.models import DiHyFo, HypernetConfig  # noqa: E402

SPECS = {"mnist4": [784, 2, 4], "mnist10": [784, 7, 10]}
SAMPLERS = ("ddim20", "ddim50", "ddim100", "ddpm1000")


def parse_sampler(s: str) -> tuple[str, int]:
    for kind in ("ddim", "ddpm"):
        if s.startswith(kind) and s[len(kind):].isdigit():
            steps = int(s[len(kind):])
            if kind == "ddpm" and steps != 1000:
                raise SystemExit(f"DDPM runs all 1000 training steps; got {s!r}")
            return kind, steps
    raise SystemExit(f"unknown sampler {s!r}: use ddimN (e.g. ddim50) or ddpm1000")


def make_sampler(model: DiHyFo, diffusion: GaussianDiffusion, norm: hf.ParamNorm, K: int, device: str):
    """A closure: (kind, steps, seed) -> (K, P) flat parameters, as the public sample() computes them."""
    spec, layout, m = model.cfg.spec, model.layout, model.cfg.num_classes
    g = torch.Generator(device=device).manual_seed(0)
    target = (torch.rand(1, m, generator=g, device=device) * 2).expand(K, m)          # (K, m) one prompt
    cond = {}
    if model.conditional_on_theta:
        theta = torch.randn(1, spec.num_params, generator=g, device=device) * 0.1
        cond["theta"] = hf.tokenize(theta, layout, None, norm).expand(K, -1, -1)        # (K, T, C), once
        cond["loss"] = (torch.rand(1, m, generator=g, device=device) * 2).expand(K, m)
    shape = (K, layout.num_tokens, layout.chunk)

    def fn(x_t, t):
        return model(x_t, t, target, cond.get("theta"), cond.get("loss"))

    @torch.no_grad()
    def sample(kind: str, steps: int, seed: int = 0) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(seed)
        if kind == "ddim":
            x0 = diffusion.ddim_sample(fn, shape, steps=steps, mask=model.token_mask, generator=gen)
        else:
            x0 = diffusion.ddpm_sample(fn, shape, mask=model.token_mask, generator=gen)
        return hf.detokenize(x0, layout, norm)                                        # (K, P)
    return sample


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="dihyfo1,dihyfo2")
    ap.add_argument("--preset", choices=["tiny", "paper"], default="tiny")
    ap.add_argument("--spec", default="mnist4", choices=sorted(SPECS))
    ap.add_argument("--ks", default="64,256,1024", help="comma-separated numbers of networks")
    ap.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated ddimN / ddpm1000")
    ap.add_argument("--quick", action="store_true", help="K=64, DDIM-20 and DDIM-50 only")
    ap.add_argument("--score", action="store_true", help="also time hf.class_metrics of the K nets on 400 rows")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first (0 for a long CPU-only DDPM run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--md", help="append the markdown section to this file")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.ks, a.samplers = "64", "ddim20,ddim50"
    models = a.models.split(",")
    if not set(models) <= {"dihyfo1", "dihyfo2"}:
        raise SystemExit(f"--models must be dihyfo1 and/or dihyfo2, got {a.models!r}")
    ks = [int(k) for k in a.ks.split(",")]
    samplers = [(s, *parse_sampler(s)) for s in a.samplers.split(",")]
    spec = hf.MLPSpec(SPECS[a.spec])
    dev = a.device
    norm = hf.ParamNorm.fit(torch.randn(256, spec.num_params) * 0.1, spec).to(dev)
    g = torch.Generator().manual_seed(0)
    X = torch.rand(400, spec.in_features, generator=g).to(dev)                          # (400, D) val rows
    y = torch.randint(0, spec.num_classes, (400,), generator=g).to(dev)
    rows = []
    for kind in models:
        torch.manual_seed(0)
        model = DiHyFo(HypernetConfig.preset(kind, spec, a.preset)).to(dev).eval()
        diffusion = GaussianDiffusion(model.num_steps, device=dev)
        per_step_flops = model.num_flops_per_sample()
        for K in ks:
            sample = make_sampler(model, diffusion, norm, K, dev)
            t_score = None
            if a.score:
                params = sample("ddim", 1)
                t_score = median_time(lambda: hf.class_metrics(params, spec, X, y), dev, repeats=a.repeats)
            for name, skind, steps in samplers:
                t = median_time(lambda: sample(skind, steps), dev, repeats=a.repeats, warmup=a.warmup, budget_s=60)
                tflops = per_step_flops * K * steps / t / 1e12
                rows.append([kind, K, name, f"{t * 1e3:.1f}", f"{t / steps * 1e3:.2f}", f"{tflops:.3f}"]
                            + ([f"{t_score * 1e3:.1f}"] if a.score else []))
                print(rows[-1], flush=True)
    cfg = model.cfg
    md = (f"### Sampling latency, preset `{a.preset}` (width {cfg.width}, depth {cfg.depth}, heads {cfg.heads}, "
          f"chunk {cfg.chunk}), spec {list(spec.layer_sizes)}, {machine(dev)}\n\n"
          "One call: K networks for one prompt, sampler loop on the device, detokenized to (K, P) flat "
          f"parameters. Medians of up to {a.repeats} calls after {a.warmup} warm-up call(s). TFLOP/s counts model "
          "matmul FLOPs (forward only)."
          + (" *score ms*: hf.class_metrics of the K networks on 400 validation rows, timed separately."
             if a.score else "") + "\n\n"
          + markdown_table(["model", "K", "sampler", "ms", "ms / step", "TFLOP/s"] + (["score ms"] if a.score else []),
                           rows))
    emit(md, a.md)


if __name__ == "__main__":
    main()
