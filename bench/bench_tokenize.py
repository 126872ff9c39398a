"""Fused permute + normalize + tokenize: providers side by side, against a memory copy.

Providers: the per-sample Python loop of a G.pt-style loader, the vectorized PyTorch
reference, the C++ kernel, and the CUDA / Triton kernels when a GPU exists. Each reports
GB/s (bytes read + written) and the ratio to a plain copy of the same bytes measured in the
same run, both into a fresh tensor (clone: allocation included, like every op that returns
a new tensor) and into a preallocated one (copy_).

  python bench/bench_tokenize.py [--quick] [--out bench/RESULTS.md]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine, markdown_table, median_time  # noqa: E402

import hyforget_fast as hf  # noqa: E402
from hyforget_fast.ops import reference as ref  # noqa: E402

SPECS = {"[784,2,4]": [784, 2, 4], "[784,7,10]": [784, 7, 10], "[784,10,10]": [784, 10, 10],
         "[784,32,32,10] (wide, 2 hidden)": [784, 32, 32, 10]}
CHUNK = 256


def loop_tokenize(params, layout, perms, norm):
    """The per-sample loop of a G.pt-style loader: per-layer slicing, per-sample index gather."""
    spec, chunk = layout.spec, layout.chunk
    out = []
    for b in range(params.shape[0]):
        tokens = []
        for l in range(spec.num_layers):
            ws, bs = spec.layer_slices(l)
            W = params[b, ws].view(spec.layer_sizes[l + 1], spec.layer_sizes[l])
            bias = params[b, bs]
            rperm, cperm = spec._perm_offsets(l)
            if rperm >= 0:
                idx = perms[b, rperm:rperm + W.shape[0]]
                W, bias = W[idx], bias[idx]
            if cperm >= 0:
                W = W[:, perms[b, cperm:cperm + W.shape[1]]]
            for p, piece in ((2 * l, W.reshape(-1)), (2 * l + 1, bias)):
                piece = (piece - norm.stats[p, 0]) * norm.stats[p, 1]
                n = piece.numel()
                tokens.append(F.pad(piece, (0, -(-n // chunk) * chunk - n)).view(-1, chunk))
        out.append(torch.cat(tokens))
    return torch.stack(out)


def run(batches, specs, device, loop_max):
    rows = []
    for name, sizes in specs.items():
        spec = hf.MLPSpec(sizes)
        layout = hf.TokenLayout(spec, CHUNK)
        for B in batches:
            x = torch.randn(B, spec.num_params, device=device)
            perms = hf.sample_perms(spec, B, seed=0, device=device)
            norm = hf.ParamNorm.fit(x[:256], spec)
            es = x.element_size()
            nbytes = B * spec.num_params * es + B * layout.num_tokens * CHUNK * es + perms.numel() * 8
            copy_bytes = 2 * B * spec.num_params * es
            dst = torch.empty_like(x)
            t_clone = median_time(lambda: x.clone(), device)
            t_copy = median_time(lambda: dst.copy_(x), device)
            gbs_clone, gbs_copy = copy_bytes / t_clone / 1e9, copy_bytes / t_copy / 1e9
            providers = {}
            nl = min(B, loop_max)
            t = median_time(lambda: loop_tokenize(x[:nl], layout, perms[:nl], norm), device, repeats=3)
            providers["per-sample loop (G.pt style)"] = (t * B / nl, nl < B)
            providers["PyTorch reference (vectorized)"] = (
                median_time(lambda: ref.tokenize(x, layout, perms, norm), device), False)
            bes = ["cpp"] if device == "cpu" else ["cuda", "triton"]
            buf = torch.empty(B, layout.num_tokens, CHUNK, device=device)
            for be in bes:
                if hf.backends()[be].available:
                    providers[f"{be} fused kernel"] = (median_time(
                        lambda: hf.tokenize(x, layout, perms, norm, validate=False, backend=be), device), False)
                    providers[f"{be} fused kernel, out= buffer"] = (median_time(
                        lambda: hf.tokenize(x, layout, perms, norm, validate=False, backend=be, out=buf), device),
                        False)
            t_loop = providers["per-sample loop (G.pt style)"][0]
            for prov, (t, extrap) in providers.items():
                gbs = nbytes / t / 1e9
                rows.append([name, B, prov, f"{t * 1e3:.2f}" + (" (extrapolated)" if extrap else ""),
                             f"{gbs:.2f}", f"{gbs / gbs_clone:.2f}", f"{gbs / gbs_copy:.2f}", f"{t_loop / t:.1f}×"])
            rows.append([name, B, "memory copy: clone / copy_", f"{t_clone * 1e3:.2f} / {t_copy * 1e3:.2f}",
                         f"{gbs_clone:.2f} / {gbs_copy:.2f}", "1.00", "1.00", ""])
            print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="B=1024 and the [784,7,10] spec only")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--loop-max", type=int, default=1024, help="samples the per-sample loop really runs")
    ap.add_argument("--out", help="append the markdown section to this file")
    a = ap.parse_args()
    batches = [1024] if a.quick else [1024, 16384]
    specs = {"[784,7,10]": SPECS["[784,7,10]"]} if a.quick else SPECS
    rows = run(batches, specs, a.device, a.loop_max)
    md = (f"### tokenize + permute + normalize (chunk {CHUNK}), {machine(a.device)}\n\n"
          "GB/s counts params read + tokens written + perms read. *vs clone*: ratio to a copy into a fresh "
          "tensor (allocation included, as for any op returning a new tensor); *vs copy_*: into a "
          "preallocated tensor. Medians.\n\n"
          + markdown_table(["spec", "B", "provider", "ms", "GB/s", "vs clone", "vs copy_", "speed-up vs loop"], rows))
    emit(md, a.out)


if __name__ == "__main__":
    main()
