"""The CUDA class_metrics kernel's logic, run on the CPU (tests/cuda_emulation.py): dynamic
shared memory is pre-filled with NaN so reads of unwritten values show up.
"""
import subprocess

import numpy as np
import pytest
import torch
from cuda_emulation import build, load_kernel_source

from hyforget_fast.ops import reference as ref
from hyforget_fast.ops.spec import MLPSpec

MAIN = r"""
namespace hyforget { namespace {
template <typename T, bool DEEP>
void run(const char* dir, const std::vector<int64_t>& sizes, int64_t B, int64_t N, int numc) {
  LayerMeta meta{};
  meta.L = (int)sizes.size() - 1;
  int64_t off = 0;
  for (int l = 0; l < meta.L; ++l) {
    meta.woff[l] = off; meta.boff[l] = off + sizes[l] * sizes[l + 1];
    meta.fin[l] = (int)sizes[l]; meta.fout[l] = (int)sizes[l + 1];
    off += sizes[l] * sizes[l + 1] + sizes[l + 1];
  }
  const int64_t D = sizes[0], P = off;
  auto rd = [&](const char* name, size_t bytes) {
    std::vector<char> v(bytes); std::string f = std::string(dir) + "/" + name;
    FILE* fp = fopen(f.c_str(), "rb"); if (fread(v.data(), 1, bytes, fp) != bytes) abort(); fclose(fp); return v;
  };
  auto pv = rd("params.bin", B * P * sizeof(T)), xv = rd("X.bin", N * D * sizeof(T)), yv = rd("y.bin", N * 8);
  std::vector<float> loss(B * numc, 0.f), corr(B * numc, 0.f);
  const int G = kBN / meta.fout[0];
  const int ntiles = (int)((N + kBM - 1) / kBM);
  const int64_t blocks = ntiles * ((B + G - 1) / G);
  std::vector<float4> smem(kSmemBytes / sizeof(float4));
  for (int64_t bid = 0; bid < blocks; ++bid) {
    std::fill((float*)smem.data(), (float*)smem.data() + kSmemBytes / 4, NAN);  // catch unwritten reads
    std::barrier<> bar(kThreads); g_bar = &bar; g_smem = smem.data();
    std::vector<std::thread> th;
    for (int t = 0; t < kThreads; ++t) th.emplace_back([&, t] {
      threadIdx.x = t; blockIdx.x = (unsigned)bid;
      class_metrics_kernel<T, DEEP>((const T*)pv.data(), (const T*)xv.data(), (const int64_t*)yv.data(),
                                    loss.data(), corr.data(), meta, B, (int)N, (int)D, P, numc, G, ntiles);
    });
    for (auto& x : th) x.join();
  }
  std::string f = std::string(dir) + "/out.bin";
  FILE* fp = fopen(f.c_str(), "wb"); fwrite(loss.data(), 4, loss.size(), fp); fwrite(corr.data(), 4, corr.size(), fp); fclose(fp);
}
template <typename T>
void run_d(const char* dir, const std::vector<int64_t>& s, int64_t B, int64_t N, int numc) {
  if (s.size() == 3) run<T, false>(dir, s, B, N, numc); else run<T, true>(dir, s, B, N, numc);
}
}}  // namespace hyforget::(anonymous)
int main(int argc, char** argv) {  // dir dtype B N numc sizes...
  std::vector<int64_t> s;
  for (int i = 6; i < argc; ++i) s.push_back(atoll(argv[i]));
  int dt = atoi(argv[2]); int64_t B = atoll(argv[3]), N = atoll(argv[4]); int numc = atoi(argv[5]);
  if (dt == 0) hyforget::run_d<float>(argv[1], s, B, N, numc);
  else if (dt == 1) hyforget::run_d<__half>(argv[1], s, B, N, numc);
  else hyforget::run_d<__nv_bfloat16>(argv[1], s, B, N, numc);
}
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    src = load_kernel_source("class_metrics.cu", "template <typename T, bool DEEP>\ncudaError_t launch_t")
    src = src.replace("extern __shared__ float4 smem4[];", "float4* smem4 = g_smem;")
    return build(tmp_path_factory.mktemp("cuda_emu"), src + "}  // namespace\n}  // namespace hyforget\n" + MAIN)


def run_emulated(exe, tmp_path, p, sizes, X, y, numc):
    """params (B, P), X (N, D), y (N,) -> (loss_sum, correct_sum) (B, numc) from the emulated kernel."""
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[p.dtype]
    for name, t in (("params.bin", p), ("X.bin", X), ("y.bin", y.long())):
        t.contiguous().view(torch.uint8).numpy().tofile(tmp_path / name)
    B, N = p.shape[0], X.shape[0]
    subprocess.run([str(exe), str(tmp_path), str(code), str(B), str(N), str(numc), *map(str, sizes)], check=True)
    out = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype="float32"))
    return out[:B * numc].view(B, numc), out[B * numc:].view(B, numc)


CASES = [  # (sizes, B, N, dtype): packed columns, partial groups and tiles, deep path, fp16/bf16
    ((13, 7, 10), 19, 300, torch.float32),
    ((33, 3, 5), 3, 97, torch.float16),
    ((20, 2, 4), 70, 129, torch.bfloat16),
    ((13, 64, 10), 2, 97, torch.float32),
    ((13, 5, 9, 6, 4), 3, 97, torch.float32),
]


@pytest.mark.parametrize("sizes,B,N,dtype", CASES)
def test_emulated_cuda_kernel_matches_reference(emulator, tmp_path, sizes, B, N, dtype):
    g = torch.Generator().manual_seed(B * N)
    spec = MLPSpec(sizes)
    p = torch.randn(B, spec.num_params, generator=g).to(dtype)
    X = torch.randn(N, sizes[0], generator=g).to(dtype)
    y = torch.randint(0, sizes[-1], (N,), generator=g)
    loss, corr = run_emulated(emulator, tmp_path, p, sizes, X, y, sizes[-1])
    l64, c64 = ref.class_sums(p.double(), spec, X.double(), y, sizes[-1])
    torch.testing.assert_close(loss.double(), l64.double(), rtol=1e-4, atol=1e-3)
    logits = ref.mlp_logits(p.double(), spec, X.double())
    top2 = logits.topk(2, dim=-1).values
    near = torch.zeros(B, sizes[-1], dtype=torch.float64).index_add_(
        1, y, ((top2[..., 0] - top2[..., 1]) <= 1e-4 * (1 + top2[..., 0].abs())).double())
    assert torch.all((corr.double() - c64.double()).abs() <= near)


def test_emulated_cuda_kernel_isolates_nan_networks(emulator, tmp_path):
    sizes, B, N = (13, 7, 10), 20, 140
    g = torch.Generator().manual_seed(0)
    p = torch.randn(B, MLPSpec(sizes).num_params, generator=g)
    X = torch.randn(N, 13, generator=g)
    y = torch.randint(0, 10, (N,), generator=g)
    clean = run_emulated(emulator, tmp_path, p, sizes, X, y, 10)
    p[4, 3] = float("nan")
    loss, corr = run_emulated(emulator, tmp_path, p, sizes, X, y, 10)
    assert torch.isnan(loss[4]).all() and torch.isfinite(corr[4]).all()
    keep = [b for b in range(B) if b != 4]
    torch.testing.assert_close(loss[keep], clean[0][keep])
    torch.testing.assert_close(corr[keep], clean[1][keep])


def tied_case(sizes=(13, 7, 6), B=3, N=97):
    """Classes 1 and 4 have identical output rows and a large bias: their logits tie exactly.

    Small integers everywhere, so every sum is exact in any order and precision."""
    g = torch.Generator().manual_seed(1)
    spec = MLPSpec(sizes)
    p = torch.randint(-3, 4, (B, spec.num_params), generator=g).float()
    W, b = spec.layer_slices(spec.num_layers - 1)
    h = sizes[-2]
    Wv = p[:, W].view(B, sizes[-1], h)
    Wv[:, 4] = Wv[:, 1]
    p[:, b.start + 1] = p[:, b.start + 4] = 1000.0
    X = torch.randint(-2, 3, (N, sizes[0]), generator=g).float()
    y = torch.randint(0, sizes[-1], (N,), generator=g)
    y[::2] = 4  # the second of the tied classes: never predicted
    y[1::4] = 1
    return spec, p, X, y


def test_emulated_cuda_kernel_breaks_ties_like_argmax(emulator, tmp_path):
    spec, p, X, y = tied_case()
    loss, corr = run_emulated(emulator, tmp_path, p, spec.layer_sizes, X, y, spec.num_classes)
    _, c64 = ref.class_sums(p.double(), spec, X.double(), y, spec.num_classes)
    assert c64[:, 1].sum() > 0 and c64[:, 4].sum() == 0
    torch.testing.assert_close(corr, c64.float())
