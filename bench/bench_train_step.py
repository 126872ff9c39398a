"""One DiHyFo training step, ours vs G.pt's way, side by side in one run (bench/RESULTS.md §5).

Both providers run the SAME architecture from the SAME initial weights, the same diffusion loss,
gradient clip (0.75) and AdamW step (lr 4e-4, wd 0.1, no decay on biases, norms, positions); each
has its own copy of the model and optimizer. A step includes assembling the batch:
- ours:        pair indices drawn on the device, θ/θ* (and losses) gathered from device-resident
               arrays, fresh permutations by hf.sample_perms on the device, fused hf.tokenize into
               reused buffers; model with batched per-token einsums, SDPA, bf16 autocast on a GPU.
- G.pt's way:  per-sample CPU loader (row fetch, numpy permutation, normalize, tokenize, in a
               Python loop; gpt_style_batch), stacked and copied to the device; model with per-token
               Python-loop linears and manual fp32 attention (GptStyleDiHyFo), no autocast.
Data are synthetic random checkpoints of the right spec (runs of --run-len contiguous checkpoints),
so nothing has to be collected. Reported: samples/s, ours / G.pt, model FLOPs per sample
(DiHyFo.num_flops_per_sample() x 3 for forward + backward), achieved TFLOP/s, and MFU against a
GEMM measured in the same run (bf16 on a GPU, fp32 on the CPU) and, when known, the nominal dense
bf16 peak. Providers and the GEMM are timed in interleaved rounds, so that load from other
processes hits all of them alike (on this shared 2-core CPU, --threads 1 is also much steadier).

  python bench/bench_train_step.py --model dihyfo2 --preset tiny --batch 256 [--spec mnist4] [--md FILE]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine, markdown_table, median_time, sync  # noqa: E402

import hyforget_fast as hf  # noqa: E402
from hyforget_fast.hypernet.diffusion import GaussianDiffusion  # noqa: E402
from hyforget_fast.hypernet.models import DiHyFo, HypernetConfig  # noqa: E402
from gpt_reference import GptStyleDiHyFo, gpt_style_batch  # noqa: E402  (bench/gpt_reference.py)

SPECS = {"mnist4": [784, 2, 4], "mnist10": [784, 7, 10]}
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched on the device name.
NOMINAL_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12)]


def parse_spec(s: str) -> hf.MLPSpec:
    if s in SPECS:
        return hf.MLPSpec(SPECS[s])
    try:
        return hf.MLPSpec([int(v) for v in s.split(",")])
    except ValueError as e:
        raise SystemExit(f"--spec must be one of {sorted(SPECS)} or comma-separated layer sizes: {e}")


def nominal_peak(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in NOMINAL_BF16 if k in name), None)


def gemm_rate(device: str, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of one n x n x n matmul, median of a few: the hardware reference of this run."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = median_time(lambda: a @ b, device, repeats=10 if device.startswith("cuda") else 3, warmup=2)
    return 2 * n ** 3 / t


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    """G.pt's optimizer: AdamW lr 4e-4, wd 0.1, no decay on biases, norms or the positional embedding."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name.endswith("bias") or name.endswith("pos") else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=4e-4, betas=(0.9, 0.999))


class Synthetic:
    """n random checkpoints (n, P) with per-class losses (n, m), runs of `run_len` contiguous rows.

    Kept on the CPU (G.pt's loader reads host memory) and on the device (ours).
    """

    def __init__(self, spec: hf.MLPSpec, n: int, run_len: int, device: str, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.spec, self.n, self.run_len = spec, n - n % run_len, run_len
        self.params = torch.randn(self.n, spec.num_params, generator=g) * 0.1          # (n, P)
        self.losses = torch.rand(self.n, spec.num_classes, generator=g) * 2.5          # (n, m)
        self.params_dev, self.losses_dev = self.params.to(device), self.losses.to(device)
        self.norm = hf.ParamNorm.fit(self.params[:1024], spec)
        self.norm_dev = self.norm.to(device)

    def pair_indices(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u (B, 3) uniforms -> (i, j) with i < j two distinct checkpoints of one run, both (B,)."""
        R, nr = self.run_len, self.n // self.run_len
        r = (u[:, 0] * nr).long().clamp_(max=nr - 1)
        a = (u[:, 1] * R).long().clamp_(max=R - 1)
        b = (u[:, 2] * (R - 1)).long().clamp_(max=R - 2)
        b = b + (b >= a).long()
        return r * R + torch.minimum(a, b), r * R + torch.maximum(a, b)


def ours_batch_fn(data: Synthetic, layout: hf.TokenLayout, kind: str, B: int, device: str):
    """Batch assembly on the device: index draw, gather, perms, fused permute+normalize+tokenize."""
    gen = torch.Generator(device=device).manual_seed(1)
    bufs = [torch.empty(B, layout.num_tokens, layout.chunk, device=device) for _ in range(2)]

    def fn() -> dict:
        i, j = data.pair_indices(torch.rand(B, 3, generator=gen, device=device))
        perms = hf.sample_perms(data.spec, B, generator=gen)
        star = hf.tokenize(data.params_dev[j], layout, perms, data.norm_dev, validate=False, out=bufs[0])
        out = {"x0": star, "target": data.losses_dev[j]}
        if kind == "dihyfo1":   # the same permutation for θ and θ*
            out["theta"] = hf.tokenize(data.params_dev[i], layout, perms, data.norm_dev, validate=False, out=bufs[1])
            out["loss"] = data.losses_dev[i]
        return out
    return fn


def gpt_batch_fn(data: Synthetic, layout: hf.TokenLayout, kind: str, B: int, device: str):
    """G.pt's loader: per-sample index draw and row fetch on the CPU, per-sample permute+tokenize, stack, copy."""
    rng = np.random.default_rng(1)

    def fn() -> dict:
        i, j = data.pair_indices(torch.from_numpy(rng.random((B, 3))))
        star = torch.stack([data.params[k] for k in j.tolist()])                         # (B, P)
        target = torch.stack([data.losses[k] for k in j.tolist()]).to(device)
        if kind == "dihyfo1":
            theta = torch.stack([data.params[k] for k in i.tolist()])
            loss = torch.stack([data.losses[k] for k in i.tolist()]).to(device)
            tok_theta, tok_star = gpt_style_batch((theta, star), layout, None, data.norm, device=device,
                                                  seed=int(rng.integers(2 ** 31)))
            return {"x0": tok_star, "target": target, "theta": tok_theta, "loss": loss}
        tok_star = gpt_style_batch(star, layout, None, data.norm, device=device, seed=int(rng.integers(2 ** 31)))
        return {"x0": tok_star, "target": target}
    return fn


def step_fn(net, opt, batch_fn, diffusion: GaussianDiffusion, mask: torch.Tensor, device: str):
    """One training step: batch, diffusion MSE loss, backward, clip 0.75, AdamW."""
    gen = torch.Generator(device=device).manual_seed(2)

    def fn():
        b = batch_fn()
        loss = diffusion.training_loss(
            lambda x_t, t: net(x_t, t, b["target"], b.get("theta"), b.get("loss")), b["x0"], mask, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.75)
        opt.step()
        return loss
    return fn


def compute_dtype(net, batch_fn) -> str:
    """The dtype the transformer's matmuls really run in (a hook on the first block's qkv), for the label."""
    blocks = net.model.blocks if isinstance(net, GptStyleDiHyFo) else net.blocks
    seen = []
    h = blocks[0].qkv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    try:
        b = batch_fn()
        with torch.no_grad():
            net(b["x0"], torch.zeros(b["x0"].shape[0], dtype=torch.long, device=b["x0"].device), b["target"],
                b.get("theta"), b.get("loss"))
    finally:
        h.remove()
    return str(seen[0]).split(".")[-1]


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def measure(providers: dict, gemm, a) -> tuple[dict, float]:
    """Interleaved rounds: each round times one batch assembly and one full step of every provider
    and one reference GEMM, so that load from other processes on a shared machine hits all of them
    alike; medians over rounds. providers: name -> (batch_fn, step_fn). A provider that runs out of
    GPU memory is reported as OOM and dropped. Returns ({name: result}, median GEMM seconds)."""
    cuda = a.device.startswith("cuda")
    res = {name: {"oom": False, "batch": [], "step": [], "peak_gib": None} for name in providers}
    live = dict(providers)
    for name, (batch_fn, step) in providers.items():    # warm-up: allocations, optimizer state, autotuning
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            batch_fn()
            for _ in range(a.warmup):
                step()
            sync(a.device)
            if cuda:
                res[name]["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        except torch.cuda.OutOfMemoryError:
            res[name]["oom"] = True
            del live[name]
            gc.collect()
            torch.cuda.empty_cache()
    gemm_t = []
    start = time.perf_counter()
    for r in range(a.repeats):
        gemm_t.append(timed(gemm, a.device))
        for name, (batch_fn, step) in live.items():
            res[name]["batch"].append(timed(batch_fn, a.device))
            res[name]["step"].append(timed(step, a.device))
        print(f"round {r + 1}/{a.repeats}: " + ", ".join(
            f"{n} {v['step'][-1] * 1e3:.1f} ms" for n, v in res.items() if v["step"]), flush=True)
        if time.perf_counter() - start > a.budget and r >= 2:
            break
    for v in res.values():
        if v["step"]:
            v["t_batch"], v["t_step"] = statistics.median(v["batch"]), statistics.median(v["step"])
            v["rounds"] = len(v["step"])
    return res, statistics.median(gemm_t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["dihyfo1", "dihyfo2"], default="dihyfo2")
    ap.add_argument("--preset", choices=["tiny", "paper"], default="tiny")
    ap.add_argument("--spec", default="mnist4", help=f"{sorted(SPECS)} or layer sizes like 784,7,10")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per provider (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocations, optimizer state)")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per measurement before cutting repeats")
    ap.add_argument("--ckpts", type=int, default=4096, help="synthetic checkpoints in the dataset")
    ap.add_argument("--run-len", type=int, default=16, help="checkpoints per synthetic run")
    ap.add_argument("--gemm-n", type=int, help="size of the reference GEMM (default 8192 GPU, 2048 CPU)")
    ap.add_argument("--skip-gpt", action="store_true", help="measure ours only (e.g. a batch G.pt's way cannot fit)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a loaded shared machine)")
    ap.add_argument("--md", help="append the markdown section to this file")
    a = ap.parse_args()
    if a.batch < 1 or a.repeats < 1 or a.run_len < 2 or a.ckpts < a.run_len:
        raise SystemExit("need --batch >= 1, --repeats >= 1, --run-len >= 2 and --ckpts >= --run-len")
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = a.device.startswith("cuda")
    spec = parse_spec(a.spec)
    # the G.pt-way reference (gpt_reference.py) reproduces the in-context token design only
    cfg = HypernetConfig.preset(a.model, spec, a.preset, cond="tokens", target_repr="raw")
    torch.manual_seed(0)
    model = DiHyFo(cfg).to(a.device)
    layout, B = model.layout, a.batch
    data = Synthetic(spec, a.ckpts, a.run_len, a.device)
    diffusion = GaussianDiffusion(model.num_steps, device=a.device)
    mask = model.token_mask
    flops = 3 * model.num_flops_per_sample()   # forward + backward (2x forward) per sample

    # hardware reference: a GEMM timed once per round, interleaved with the providers
    gemm_dtype = torch.bfloat16 if cuda else torch.float32
    n = a.gemm_n or (8192 if cuda else 2048)
    ga, gb = (torch.randn(n, n, device=a.device, dtype=gemm_dtype) for _ in range(2))
    fp32_rate = gemm_rate(a.device, torch.float32, n) if cuda else None
    peak = nominal_peak(a.device)

    providers = {"ours": (ours_batch_fn(data, layout, a.model, B, a.device), model)}
    if not a.skip_gpt:   # its own copy: same initial weights, its own optimizer
        providers["G.pt's way"] = (gpt_batch_fn(data, layout, a.model, B, a.device), GptStyleDiHyFo(model, copy=True))
    precision = {name: compute_dtype(net, bf) for name, (bf, net) in providers.items()}
    providers = {name: (bf, step_fn(net, adamw(net), bf, diffusion, mask, a.device))
                 for name, (bf, net) in providers.items()}
    res, t_gemm = measure(providers, lambda: ga @ gb, a)
    ref_rate = 2 * n ** 3 / t_gemm

    gpt = res.get("G.pt's way")
    gpt_t = gpt["t_step"] if gpt and not gpt["oom"] else None
    rows = []
    for name, r in res.items():
        prec = precision[name]
        if r["oom"]:
            rows.append([name, prec, "OOM"] + [""] * 8)
            continue
        achieved = flops * B / r["t_step"]
        rows.append([name, prec, f"{r['t_batch'] * 1e3:.2f}", f"{r['t_step'] * 1e3:.1f}",
                     f"{B / r['t_step']:.1f}", f"{gpt_t / r['t_step']:.2f}×" if gpt_t else "n/a",
                     f"{achieved / 1e12:.3f}", f"{achieved / ref_rate:.1%}",
                     f"{achieved / peak:.1%}" if peak else "n/a",
                     f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"])
    rounds = max((r.get("rounds", 0) for r in res.values()), default=0)
    T = layout.num_tokens
    S = 1 + (3 if a.model == "dihyfo1" else 1) * spec.num_classes
    md = (f"### Training step, {a.model} preset `{a.preset}` (width {cfg.width}, depth {cfg.depth}, heads "
          f"{cfg.heads}, chunk {cfg.chunk}), spec {list(spec.layer_sizes)}, B={B}, {machine(a.device)}\n\n"
          f"Sequence {S} scalar + {T} parameter tokens; model FLOPs {flops / 1e9:.3f} GFLOP per sample "
          f"(matmuls, forward + backward = 3 × forward). Reference GEMM {n}³ measured in this run: "
          f"{str(gemm_dtype).split('.')[-1]} {ref_rate / 1e12:.2f} TFLOP/s"
          + (f" (fp32, measured once: {fp32_rate / 1e12:.2f} TFLOP/s)" if cuda else "")
          + (f"; nominal dense bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else "")
          + f". Step = batch assembly + forward + MSE + backward + clip + AdamW. Medians of {rounds} interleaved "
          f"rounds (each: one GEMM, then per provider one batch assembly and one step) after {a.warmup} "
          f"warm-up steps. *batch ms*: batch assembly alone. *peak GiB*: process peak during that provider's warm-up (both models resident).\n\n"
          + markdown_table(["provider", "matmul dtype", "batch ms", "step ms", "samples/s", "vs G.pt",
                            "TFLOP/s", f"MFU vs {str(gemm_dtype).split('.')[-1]} GEMM", "MFU vs nominal bf16",
                            "peak GiB"], rows))
    emit(md, a.md)


if __name__ == "__main__":
    main()
