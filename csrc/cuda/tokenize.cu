// CUDA gather_pieces / scatter_pieces. No torch headers: plain kernels plus launchers that
// csrc/cuda/tokenize_cuda.cpp calls. One thread per output value (grid.y = sample); the piece
// table (a few dozen int64) sits in shared memory. Tables of contiguous pieces only (the
// layer-wise layout) find a value's piece by a scan over the sorted DST column; a table with
// strided pieces (the neuron layout, see csrc/piece_table.h) decodes the position against
// every piece instead. Normalization uses __fsub_rn/__fmul_rn/
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

// Does piece e own output position d (uint32, in-row)? -> 0 no, 1 a real value at (r, c),
// 2 zero padding. The ownership rule of csrc/piece_table.h: a contiguous piece owns
// [DST, DST + DLEN); a strided one its ROWS*COLS positions, decoded along its major stride.
__device__ __forceinline__ int piece_owns(const int64_t* e, uint32_t d, uint32_t* r, uint32_t* c) {
  if (d < (uint32_t)e[DST]) return 0;
  const uint32_t pos = d - (uint32_t)e[DST], rows = (uint32_t)e[ROWS], cols = (uint32_t)e[COLS];
  if (piece_contiguous(e)) {
    if (pos >= (uint32_t)e[DLEN]) return 0;
    if (pos >= rows * cols) return 2;
    *r = pos / cols;
    *c = pos - *r * cols;
    return 1;
  }
  const uint32_t rs = (uint32_t)e[RS], cs = (uint32_t)e[CS];
  if ((uint64_t)cs * cols <= rs) {  // row-major: r from the row stride, c from the rest
    const uint32_t rr = pos / rs, rem = pos - rr * rs, cc = rem / cs;
    if (rr >= rows || cc >= cols || rem != cc * cs) return 0;
    *r = rr;
    *c = cc;
  } else {  // column-major
    const uint32_t cc = pos / cs, rem = pos - cc * cs, rr = rem / rs;
    if (rr >= rows || cc >= cols || rem != rr * rs) return 0;
    *r = rr;
    *c = cc;
  }
  return 1;
}

template <typename T>
__device__ __forceinline__ T gather_value(const int64_t* e, uint32_t r, uint32_t c, const T* s,
                                          const int64_t* prow, const float* norm) {
  const uint32_t rows = (uint32_t)e[ROWS], cols = (uint32_t)e[COLS];
  if (prow && e[RPERM] >= 0) r = (uint32_t)prow[e[RPERM] + r];
  if (prow && e[CPERM] >= 0) c = (uint32_t)prow[e[CPERM] + c];
  // validate=False with a broken permutation gives unspecified values, never a wild read
  // (a negative index wraps to a huge unsigned one and is clamped too).
  r = r < rows ? r : 0;
  c = c < cols ? c : 0;
  T v = s[e[SRC] + (int64_t)r * cols + c];
  if (norm) v = from_f<T>(__fmul_rn(__fsub_rn(to_f(v), norm[2 * e[NORM]]), norm[2 * e[NORM] + 1]));
  return v;
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
  bool strided = false;  // every thread reads the same few table rows: a uniform branch
  for (int p = 0; p < npieces; ++p) strided = strided || !piece_contiguous(tab + p * NUM_PIECE_COLS);
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const T* s = src + b * P;
    T* o = dst + b * W;
    const int64_t* prow = perms ? perms + b * pw : nullptr;
    for (uint32_t d = blockIdx.x * blockDim.x + threadIdx.x; d < (uint32_t)W; d += gridDim.x * blockDim.x) {
      T v = from_f<T>(0.f);
      uint32_t r = 0, c = 0;
      if (!strided) {
        const int64_t* e = tab + find_piece(tab, npieces, d, DST) * NUM_PIECE_COLS;
        if (piece_owns(e, d, &r, &c) == 1) v = gather_value(e, r, c, s, prow, norm);
      } else {
        for (int p = 0; p < npieces; ++p) {
          const int64_t* e = tab + p * NUM_PIECE_COLS;
          const int own = piece_owns(e, d, &r, &c);
          if (own == 1) v = gather_value(e, r, c, s, prow, norm);
          if (own) break;
        }
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
      uint32_t off = i - (uint32_t)e[SRC];
      if (!piece_contiguous(e)) {  // strided: element (r, c) sits at r*RS + c*CS
        const uint32_t cols = (uint32_t)e[COLS], r = off / cols, c = off - r * cols;
        off = r * (uint32_t)e[RS] + c * (uint32_t)e[CS];
      }
      T v = src[b * W + e[DST] + off];
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
