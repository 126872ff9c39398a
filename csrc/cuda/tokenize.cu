// CUDA gather_pieces / scatter_pieces. No torch headers: plain kernels plus launchers that
// csrc/cuda/tokenize_cuda.cpp calls. One thread per output value (grid.y = sample); the piece
// table (a few dozen int64) sits in shared memory. Normalization uses __fsub_rn/__fmul_rn/
// __fdiv_rn/__fadd_rn so nvcc cannot contract it into FMAs: results equal the PyTorch
// reference bit for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../piece_table.h"
#include "launchers.h"

namespace hyforget {
namespace {

constexpr int kMaxPieces = 128;

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ int find_piece(const int64_t* tab, int npieces, int64_t d, int col) {
  // Pieces are few and sorted by their column `col`; a linear scan in shared memory is enough.
  int p = 0;
  while (p + 1 < npieces && tab[(p + 1) * NUM_PIECE_COLS + col] <= d) ++p;
  return p;
}

template <typename T>
__global__ void gather_pieces_kernel(const T* __restrict__ src, T* __restrict__ dst, const int64_t* __restrict__ table,
                                     int npieces, const int64_t* __restrict__ perms, int64_t pw,
                                     const float* __restrict__ norm, int64_t B, int64_t P, int64_t W) {
  // grid.y walks samples, grid.x one sample's output row: in-row indices fit 32 bits, so the
  // per-value divisions are cheap 32-bit ones and no 64-bit division by W is needed.
  __shared__ int64_t tab[kMaxPieces * NUM_PIECE_COLS];
  for (int i = threadIdx.x; i < npieces * NUM_PIECE_COLS; i += blockDim.x) tab[i] = table[i];
  __syncthreads();
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const T* s = src + b * P;
    T* o = dst + b * W;
    const int64_t* prow = perms ? perms + b * pw : nullptr;
    for (uint32_t d = blockIdx.x * blockDim.x + threadIdx.x; d < (uint32_t)W; d += gridDim.x * blockDim.x) {
      const int64_t* e = tab + find_piece(tab, npieces, d, DST) * NUM_PIECE_COLS;
      const uint32_t pos = d - (uint32_t)e[DST], rows = (uint32_t)e[ROWS], cols = (uint32_t)e[COLS];
      T v = from_f<T>(0.f);
      if (pos < rows * cols) {
        uint32_t r = pos / cols, c = pos - r * cols;
        if (prow && e[RPERM] >= 0) r = (uint32_t)prow[e[RPERM] + r];
        if (prow && e[CPERM] >= 0) c = (uint32_t)prow[e[CPERM] + c];
        // validate=False with a broken permutation gives unspecified values, never a wild read
        // (a negative index wraps to a huge unsigned one and is clamped too).
        r = r < rows ? r : 0;
        c = c < cols ? c : 0;
        v = s[e[SRC] + (int64_t)r * cols + c];
        if (norm) v = from_f<T>(__fmul_rn(__fsub_rn(to_f(v), norm[2 * e[NORM]]), norm[2 * e[NORM] + 1]));
      }
      o[d] = v;
    }
  }
}

template <typename T>
__global__ void scatter_pieces_kernel(const T* __restrict__ src, T* __restrict__ dst, const int64_t* __restrict__ table,
                                      int npieces, const float* __restrict__ norm, int64_t B, int64_t W, int64_t P) {
  __shared__ int64_t tab[kMaxPieces * NUM_PIECE_COLS];
  for (int i = threadIdx.x; i < npieces * NUM_PIECE_COLS; i += blockDim.x) tab[i] = table[i];
  __syncthreads();
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < (uint32_t)P; i += gridDim.x * blockDim.x) {
      const int64_t* e = tab + find_piece(tab, npieces, i, SRC) * NUM_PIECE_COLS;
      T v = src[b * W + e[DST] + (i - e[SRC])];
      if (norm) v = from_f<T>(__fadd_rn(__fdiv_rn(to_f(v), norm[2 * e[NORM] + 1]), norm[2 * e[NORM]]));
      dst[b * P + i] = v;
    }
  }
}

dim3 grid_for(int64_t B, int64_t width, int threads) {
  const int64_t x = (width + threads - 1) / threads;
  return dim3(static_cast<unsigned>(x > 0 ? x : 1), static_cast<unsigned>(B < 65535 ? (B > 0 ? B : 1) : 65535));
}

}  // namespace

int max_pieces() { return kMaxPieces; }

template <typename F>
cudaError_t with_dtype(DType dtype, F&& launch) {
  switch (dtype) {
    case DType::kFloat32: launch(float{}); break;
    case DType::kFloat16: launch(__half{}); break;
    case DType::kBFloat16: launch(__nv_bfloat16{}); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_gather_pieces(DType dtype, const void* src, void* dst, const int64_t* table, int npieces,
                                 const int64_t* perms, int64_t perm_width, const float* norm, int64_t B, int64_t P,
                                 int64_t W, cudaStream_t stream) {
  const int threads = 256;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    gather_pieces_kernel<T><<<grid_for(B, W, threads), threads, 0, stream>>>(
        static_cast<const T*>(src), static_cast<T*>(dst), table, npieces, perms, perm_width, norm, B, P, W);
  });
}

cudaError_t launch_scatter_pieces(DType dtype, const void* src, void* dst, const int64_t* table, int npieces,
                                  const float* norm, int64_t B, int64_t W, int64_t P, cudaStream_t stream) {
  const int threads = 256;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    scatter_pieces_kernel<T><<<grid_for(B, P, threads), threads, 0, stream>>>(
        static_cast<const T*>(src), static_cast<T*>(dst), table, npieces, norm, B, W, P);
  });
}

}  // namespace hyforget
