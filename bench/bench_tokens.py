"""Layer-wise vs neuron tokens, side by side in one run: training-step rate and the latency of
sampling K candidates (bench/RESULTS.md §4, "Neuron tokens").

Both layouts use the same `tiny` DiT (width, depth, heads, adaLN-Zero, log targets); only
HypernetConfig.tokens differs (layer-wise G.pt chunks of 64 values vs one token per hidden unit).
  train step  forward + backward + AdamW of the diffusion loss on a batch of B random token
              tensors (an untrained model has the same compute), as hypernet.train runs it
  sample      one K-candidate DDIM call as Hypernet.sample runs it (bench_sample.make_sampler)
Providers are timed in interleaved rounds (load from other processes hits both alike), medians;
a float32 GEMM measured in the same run gives the hardware rate the step's FLOPs are set against.

  python bench/bench_tokens.py --specs mnist4,mnist10 --models dihyfo2,dihyfo1 --threads 1 [--md FILE]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sample import SPECS, make_sampler  # noqa: E402
from common import emit, machine, markdown_table  # noqa: E402

import hyforget_fast as hf  # noqa: E402
from hyforget_fast.hypernet.diffusion import GaussianDiffusion  # noqa: E402
from hyforget_fast.hypernet.models import DiHyFo, HypernetConfig  # noqa: E402

LAYOUTS = ("layer", "neuron")


def build(kind: str, sizes, tokens: str, seed: int = 0) -> DiHyFo:
    torch.manual_seed(seed)
    return DiHyFo(HypernetConfig.preset(kind, hf.MLPSpec(sizes), "tiny", tokens=tokens), 1000)


def train_step_fn(model: DiHyFo, diffusion: GaussianDiffusion, B: int):
    """A closure running one optimizer step on fixed random inputs of the model's token shape."""
    g = torch.Generator().manual_seed(1)
    mask = model.token_mask                                                        # (T, C)
    x0 = torch.randn(B, *mask.shape, generator=g) * mask                           # (B, T, C)
    m = model.cfg.num_classes
    target = torch.rand(B, m, generator=g) * 2
    cond = ()
    if model.conditional_on_theta:
        cond = (torch.randn(B, *mask.shape, generator=g) * mask, torch.rand(B, m, generator=g) * 2)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)

    def step():
        loss = diffusion.training_loss(lambda x, t: model(x, t, target, *cond), x0, mask, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.75)
        opt.step()
    return step


def gemm_rate(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(ts)


def interleaved(fns: dict, rounds: int) -> dict:
    """{name: fn} -> {name: median seconds}, one call of each per round (after one warm-up)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--specs", default="mnist4,mnist10")
    ap.add_argument("--models", default="dihyfo2,dihyfo1")
    ap.add_argument("--batch", type=int, default=64, help="training batch (the tiny preset's)")
    ap.add_argument("--k", type=int, default=256, help="candidates per sample call")
    ap.add_argument("--ddim", type=int, default=50)
    ap.add_argument("--step-rounds", type=int, default=30)
    ap.add_argument("--sample-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--md")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    diffusion = GaussianDiffusion(1000)
    rate = gemm_rate()
    rows = []
    for spec_name in a.specs.split(","):
        sizes = SPECS[spec_name]
        spec = hf.MLPSpec(sizes)
        norm = hf.ParamNorm(spec, torch.tensor([[0.0, 1.0]] * (2 * spec.num_layers)))
        for kind in a.models.split(","):
            models = {t: build(kind, sizes, t) for t in LAYOUTS}
            steps = interleaved({t: train_step_fn(mod, diffusion, a.batch) for t, mod in models.items()},
                                a.step_rounds)
            samplers = {t: make_sampler(mod.eval(), diffusion, norm, a.k, "cpu") for t, mod in models.items()}
            lat = interleaved({t: (lambda s=s: s("ddim", a.ddim)) for t, s in samplers.items()}, a.sample_rounds)
            for t, mod in models.items():
                flops = 3 * mod.num_flops_per_sample() * a.batch
                rows.append([spec_name, kind, t, mod.layout.num_tokens, f"{1 / steps[t]:.1f}",
                             f"{steps['layer'] / steps[t]:.2f}x", f"{flops / steps[t] / rate:.1%}",
                             f"{lat[t]:.2f}", f"{lat['layer'] / lat[t]:.2f}x"])
            print(rows[-2], rows[-1], file=sys.stderr, flush=True)
    header = ["spec", "model", "tokens", "T", "train steps/s", "vs layer-wise", "of fp32 GEMM rate",
              f"sample K={a.k} DDIM-{a.ddim} (s)", "vs layer-wise"]
    cmd = "python bench/bench_tokens.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = (f"\n### bench_tokens: layer-wise vs neuron tokens, tiny preset, batch {a.batch}, {a.threads} thread(s) "
          f"({machine('cpu')}; fp32 GEMM {rate / 1e9:.1f} GFLOP/s in the same run)\n\n"
          f"`{cmd}`\n\n" + markdown_table(header, rows) + "\n")
    emit(md, a.md)


if __name__ == "__main__":
    main()
