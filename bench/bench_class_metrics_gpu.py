"""GPU benchmark of class_metrics: CUDA kernel, Triton kernel, batched einsum reference, and the
bound, the first-layer GEMM alone (X (N, D) @ W1_all^T (D, B*h)), same B, N, spec.

  python bench/bench_class_metrics_gpu.py [--reps 10] [--dtype float32]

Times are CUDA-event medians. TFLOP/s counts first-layer FLOPs only (2*B*h*N*D), so every
provider is measured against the same work; "of GEMM" is that rate over the GEMM's own rate
measured in this run (target: >= 0.5). Synthetic X (N = 5000, D = 784, like the bundled digits).
"""
import argparse
import statistics
import sys

import torch


def timeit(fn, reps):
    """Median milliseconds of fn() over reps runs (after one warm-up), by CUDA events."""
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--N", type=int, default=5000)
    ap.add_argument("--B", type=int, nargs="*", default=[256, 4096, 16384])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_class_metrics_gpu: no CUDA device visible; this benchmark needs a GPU "
                 "(the CPU benchmark is bench/bench_class_metrics.py)")

    import hyforget_fast
    from hyforget_fast.ops import reference as ref
    from hyforget_fast.ops.backends import _has_kernel, import_kernels
    from hyforget_fast.ops.spec import MLPSpec

    status = hyforget_fast.backends()
    has_cuda = status["cuda"].available and _has_kernel("class_metrics", "CUDA")
    try:
        tri = import_kernels().class_metrics
    except Exception as e:  # noqa: BLE001
        print(f"triton unavailable: {e}")
        tri = None
    dtype = getattr(torch, args.dtype)
    dev = "cuda"
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {args.dtype}, N {args.N}, "
          f"allow_tf32 {torch.backends.cuda.matmul.allow_tf32}")
    print(f"{'spec':>14} {'B':>6} {'provider':>10} {'ms':>9} {'TFLOP/s':>8} {'of GEMM':>8} {'peak MiB':>9}")
    g = torch.Generator(device=dev).manual_seed(0)
    for sizes in ([784, 2, 4], [784, 7, 10], [784, 10, 10]):
        spec = MLPSpec(sizes)
        D, h, m = sizes[0], sizes[1], sizes[-1]
        X = torch.rand(args.N, D, device=dev, generator=g).to(dtype)
        y = torch.randint(0, m, (args.N,), device=dev, generator=g)
        for B in args.B:
            p = (torch.randn(B, spec.num_params, device=dev, generator=g) * 0.05).to(dtype)
            W1 = p[:, :h * D].reshape(B * h, D)  # (B*h, D), all first layers stacked
            flops = 2.0 * B * h * args.N * D
            providers = {"gemm": lambda: X @ W1.T}
            if has_cuda:
                providers["cuda"] = lambda: torch.ops.hyforget.class_metrics(p, X, y, sizes, m)
            if tri is not None:
                providers["triton"] = lambda: tri.class_sums(p, sizes, X, y, m)
            # The einsum reference materializes (B, N, h) and (B, N, m); skip it where that cannot fit.
            if B * args.N * (h + 3 * m) * p.element_size() < 0.5 * torch.cuda.mem_get_info()[0]:
                providers["einsum"] = lambda: ref.class_sums(p, spec, X, y, m)
            gemm_ms = None
            for name, fn in providers.items():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                try:
                    ms = timeit(fn, args.reps)
                except Exception as e:  # noqa: BLE001 -- report and go on with the others
                    print(f"{str(sizes):>14} {B:>6} {name:>10}  failed: {type(e).__name__}: {e}")
                    continue
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                gemm_ms = ms if name == "gemm" else gemm_ms
                rate = flops / ms / 1e9
                frac = f"{gemm_ms / ms:8.2f}" if gemm_ms else f"{'-':>8}"
                print(f"{str(sizes):>14} {B:>6} {name:>10} {ms:9.3f} {rate:8.2f} {frac} {peak:9.1f}")


if __name__ == "__main__":
    main()
