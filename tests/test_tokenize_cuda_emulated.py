"""The CUDA gather_pieces / scatter_pieces kernels' logic, run on the CPU (tests/cuda_emulation.py),
equal to the PyTorch reference bit for bit, with full grids and with grids small enough that
every grid-stride loop wraps.
"""
import subprocess

import numpy as np
import pytest
import torch
from cuda_emulation import build, load_kernel_source
from hypothesis import given, settings
from hypothesis import strategies as st

import hyforget_fast as hf
from hyforget_fast.ops import reference as ref

from conftest import mlp_specs

MAIN = r"""
namespace hyforget { namespace {
template <typename T>
std::vector<char> rd(const std::string& dir, const char* name) {
  std::string f = dir + "/" + name; FILE* fp = fopen(f.c_str(), "rb");
  std::vector<char> v; if (!fp) return v;
  fseek(fp, 0, SEEK_END); v.resize(ftell(fp)); fseek(fp, 0, SEEK_SET);
  if (fread(v.data(), 1, v.size(), fp) != v.size()) abort(); fclose(fp); return v;
}
template <typename F>
void launch(unsigned gx, unsigned gy, unsigned threads, F&& body) {
  gridDim.x = gx; gridDim.y = gy; blockDim.x = threads;
  for (unsigned by = 0; by < gy; ++by)
    for (unsigned bx = 0; bx < gx; ++bx) {
      std::barrier<> bar(threads); g_bar = &bar;
      std::vector<std::thread> th;
      for (unsigned t = 0; t < threads; ++t) th.emplace_back([&, t] {
        threadIdx.x = t; blockIdx.x = bx; blockIdx.y = by; body();
      });
      for (auto& x : th) x.join();
    }
}
template <typename T>
void run(const std::string& dir, int64_t B, int64_t P, int64_t W, int np, int64_t pw, unsigned gx, unsigned gy,
         unsigned threads) {
  auto src = rd<T>(dir, "params.bin"), tok = rd<T>(dir, "tokens.bin"), tab = rd<T>(dir, "table.bin");
  auto perm = rd<T>(dir, "perms.bin"), norm = rd<T>(dir, "norm.bin");
  std::vector<T> out(B * W), back(B * P);
  const int64_t* pp = perm.empty() ? nullptr : (const int64_t*)perm.data();
  const float* nn = norm.empty() ? nullptr : (const float*)norm.data();
  launch(gx, gy, threads, [&] {
    gather_pieces_kernel<T>((const T*)src.data(), out.data(), (const int64_t*)tab.data(), np, pp, pw, nn, B, P, W);
  });
  launch(gx, gy, threads, [&] {
    scatter_pieces_kernel<T>((const T*)tok.data(), back.data(), (const int64_t*)tab.data(), np, nn, B, W, P);
  });
  FILE* fp = fopen((dir + "/out.bin").c_str(), "wb");
  fwrite(out.data(), sizeof(T), out.size(), fp); fwrite(back.data(), sizeof(T), back.size(), fp); fclose(fp);
}
}}  // namespace hyforget::(anonymous)
int main(int argc, char** argv) {  // dir dtype B P W npieces perm_width grid_x grid_y threads
  std::string dir = argv[1]; int dt = atoi(argv[2]);
  int64_t B = atoll(argv[3]), P = atoll(argv[4]), W = atoll(argv[5]), pw = atoll(argv[7]);
  int np = atoi(argv[6]); unsigned gx = atoi(argv[8]), gy = atoi(argv[9]), th = atoi(argv[10]);
  if (dt == 0) hyforget::run<float>(dir, B, P, W, np, pw, gx, gy, th);
  else if (dt == 1) hyforget::run<__half>(dir, B, P, W, np, pw, gx, gy, th);
  else hyforget::run<__nv_bfloat16>(dir, B, P, W, np, pw, gx, gy, th);
}
"""

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    src = load_kernel_source("tokenize.cu", "}  // namespace\n\nint max_pieces()")
    return build(tmp_path_factory.mktemp("cuda_emu_tok"), src + "}  // namespace\n}  // namespace hyforget\n" + MAIN)


def run_emulated(exe, d, x, tokens, table, perms, norm, width, grid, threads):
    """-> (gather_pieces(x), scatter_pieces(tokens)) as the CUDA kernels compute them."""
    for name in ("perms.bin", "norm.bin"):
        (d / name).unlink(missing_ok=True)
    x.contiguous().view(torch.uint8).numpy().tofile(d / "params.bin")
    tokens.contiguous().view(torch.uint8).numpy().tofile(d / "tokens.bin")
    table.numpy().tofile(d / "table.bin")
    if perms is not None:
        perms.numpy().tofile(d / "perms.bin")
    if norm is not None:
        norm.numpy().tofile(d / "norm.bin")
    B, P = x.shape
    subprocess.run([str(exe), str(d), str(DTYPES[x.dtype]), str(B), str(P), str(width), str(table.shape[0]),
                    str(perms.shape[1] if perms is not None else 0), str(grid[0]), str(grid[1]), str(threads)],
                   check=True)
    raw = torch.from_numpy(np.fromfile(d / "out.bin", dtype=np.uint8)).view(x.dtype)
    return raw[:B * width].view(B, width), raw[B * width:].view(B, P)


@settings(max_examples=16)
@given(spec=mlp_specs(max_hidden_layers=3, max_in=19), chunk=st.integers(1, 23), neuron=st.booleans(),
       batch=st.sampled_from([1, 3]), seed=st.integers(0, 2**16), dtype=st.sampled_from(list(DTYPES)),
       use_perm=st.booleans(), use_norm=st.booleans(), small_grid=st.booleans())
def test_emulated_cuda_gather_and_scatter_equal_reference(emulator, tmp_path_factory, spec, chunk, neuron, batch, seed,
                                                          dtype, use_perm, use_norm, small_grid):
    """Layer-wise layouts (contiguous pieces) and neuron layouts (strided pieces, the first
    hidden layer of the drawn spec) alike."""
    if neuron:
        spec = hf.MLPSpec([spec.in_features, spec.hidden_sizes[0], spec.num_classes])
        layout = hf.TokenLayout(spec, kind="neuron")
    else:
        layout = hf.TokenLayout(spec, chunk)
    chunk = layout.token_width
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.num_params, generator=g).to(dtype)
    perms = hf.sample_perms(spec, batch, seed=seed) if use_perm else None
    norm = hf.ParamNorm.fit(torch.randn(5, spec.num_params, generator=g) * 2 + 1, spec) if use_norm else None
    W = layout.num_tokens * chunk
    tokens = torch.randn(batch, layout.num_tokens, chunk, generator=g).to(dtype)
    threads = 32
    grid = (1, 1) if small_grid else (-(-W // threads), batch)  # (1, 1): every loop strides
    got_tok, got_back = run_emulated(emulator, tmp_path_factory.mktemp("t"), x, tokens, layout.table, perms,
                                     norm.stats if norm else None, W, grid, threads)
    assert torch.equal(got_tok.view(batch, layout.num_tokens, chunk), ref.tokenize(x, layout, perms, norm))
    assert torch.equal(got_back, ref.detokenize(tokens, layout, norm))
