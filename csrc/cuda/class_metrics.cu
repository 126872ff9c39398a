// CUDA class_metrics: per-class cross-entropy and correct-prediction sums of B ReLU MLPs on
// one shared input set, fused. No torch headers; csrc/cuda/class_metrics_cuda.cpp registers it.
// Mirrors hyforget_fast.reference.class_sums.
//
// Shape of the computation. The first layer of all B networks is one GEMM:
//   Z (N, B*H1) = X (N, D) @ W1_all^T, W1_all row c = hidden unit c % H1 of network c / H1.
// A block owns a kBM x kBN tile of Z: kBM input rows and G = kBN / H1 whole networks, packed
// without padding (h = 7 -> 18 networks, 126 of 128 columns). The tile is an fp32 SIMT GEMM:
// double-buffered shared-memory tiles over D, one __syncthreads per step, an 8x8 register
// micro-tile per thread (16 FMAs per shared-memory load), fp32 accumulation for every input
// dtype (fp16/bf16 are widened on the way into shared memory).
// Epilogue, in two halves of kBM/2 rows so the tile fits in shared memory: bias + ReLU in
// registers, the tile goes to shared memory, then one thread per (row, network) runs the
// remaining layers, a streaming (online) log-softmax, CE and the first-max argmax, and adds
// into per-block (network, class) sums with shared atomics; one global atomicAdd per
// (network, class) at the end. Nothing of size (B, N, hidden) or (B, N, m) reaches memory.
// Each (row, network) is computed by its own thread from its own columns only, so NaN/Inf
// parameters of one network never touch another's results.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace hyforget {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 8, kThreads = 256;
constexpr int kXsStride = kBM + 4;  // +4: transposed stores hit distinct banks, rows stay float4-aligned
constexpr int kWsStride = kBN + 4;
constexpr int kHalf = kBM / 2;      // epilogue rows per pass
constexpr int kHsStride = kBN + 1;  // lanes read one column of 32 consecutive rows: odd stride, no conflicts
constexpr int kTileFloats = 2 * kBK * kXsStride + 2 * kBK * kWsStride;
constexpr int kHsFloats = kHalf * kHsStride;
constexpr int kUnionFloats = kTileFloats > kHsFloats ? kTileFloats : kHsFloats;
constexpr int kSmemAccMax = 2048;  // G*m (network, class) sums kept in shared memory; else global atomics
constexpr size_t kSmemBytes = (kUnionFloats + 2 * kSmemAccMax) * sizeof(float);
static_assert(kThreads == 256 && kBM == 128 && kBN == 128 && kBK == 8, "thread mappings below assume these");

struct LayerMeta {
  int64_t woff[kClassMetricsMaxLayers];  // offset of W_l in a flat parameter vector
  int64_t boff[kClassMetricsMaxLayers];  // offset of b_l
  int fin[kClassMetricsMaxLayers];
  int fout[kClassMetricsMaxLayers];
  int L;  // number of layers
};

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }  // keeps NaN, like torch.relu

// Last layer + log-softmax + CE + argmax of one (row, network), streaming over classes so no
// (m,) array is held: running max, running sum of exp, first index of the maximum.
template <typename T, typename H>
__device__ __forceinline__ void head(const T* __restrict__ W, const T* __restrict__ bias, const H* h, int fin, int m,
                                     int label, float& loss, float& corr) {
  float mx = 0.f, s = 0.f, ylog = 0.f;
  int arg = 0;
  for (int c = 0; c < m; ++c) {
    float v = to_f(bias[c]);
    const T* w = W + (int64_t)c * fin;
    for (int k = 0; k < fin; ++k) v = fmaf(to_f(w[k]), h[k], v);
    if (c == 0) {
      mx = v;
      s = 1.f;
    } else if (v > mx) {  // strict: the first maximum wins ties, like torch.argmax
      s = fmaf(s, expf(mx - v), 1.f);
      mx = v;
      arg = c;
    } else {
      s += expf(v - mx);  // NaN anywhere makes s (and the loss) NaN
    }
    if (c == label) ylog = v;
  }
  loss = mx + logf(s) - ylog;
  corr = arg == label ? 1.f : 0.f;
}

template <typename T, bool DEEP>
__global__ void __launch_bounds__(kThreads, 2)
class_metrics_kernel(const T* __restrict__ params, const T* __restrict__ X, const int64_t* __restrict__ y,
                     float* __restrict__ loss_out, float* __restrict__ corr_out, const LayerMeta meta, int64_t B,
                     int N, int D, int64_t P, int numc, int G, int ntiles) {
  extern __shared__ float4 smem4[];  // float4: 16-byte alignment for the vector loads below
  float* smem = reinterpret_cast<float*>(smem4);
  float* Xs = smem;                          // [2][kBK][kXsStride], X tile transposed (k-major)
  float* Ws = smem + 2 * kBK * kXsStride;    // [2][kBK][kWsStride], packed W1 tile (k-major)
  float* Hs = smem;                          // [kHalf][kHsStride], reused after the GEMM
  float* accL = smem + kUnionFloats;         // [G][m] per-block loss sums
  float* accC = accL + kSmemAccMax;          // [G][m] per-block correct sums

  const int tid = threadIdx.x;
  // N tiles vary fastest: consecutive blocks reuse one group's W1 (in L2) while X stays in L2.
  const int tile = (int)(blockIdx.x % (unsigned)ntiles);
  const int64_t b0 = (int64_t)(blockIdx.x / (unsigned)ntiles) * G;
  const int n0 = tile * kBM;
  const int H1 = meta.fout[0];
  const int m = meta.fout[meta.L - 1];
  const int ncols = G * H1;
  const bool smem_acc = G * m <= kSmemAccMax;
  if (smem_acc) {
    for (int i = tid; i < G * m; i += kThreads) accL[i] = accC[i] = 0.f;
  }

  // ---- global -> shared mapping: thread loads k = tid % 8 of rows/columns tid / 8 + 32 i.
  // 8 consecutive threads read 8 consecutive values (one 32-byte sector) of one row/column.
  const int lk = tid & 7;
  const T* xp[4];
  const T* wp[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = (tid >> 3) + 32 * i;
    xp[i] = (n0 + r < N) ? X + (int64_t)(n0 + r) * D : nullptr;
    const int c = r;  // column of the packed W1 tile
    const int64_t b = b0 + c / H1;
    wp[i] = (c < ncols && b < B) ? params + b * P + (int64_t)(c % H1) * D : nullptr;
  }
  float xr[4], wr[4];
  auto load_global = [&](int d0) {
    const int d = d0 + lk;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      xr[i] = (xp[i] && d < D) ? to_f(xp[i][d]) : 0.f;
      wr[i] = (wp[i] && d < D) ? to_f(wp[i][d]) : 0.f;
    }
  };
  auto store_shared = [&](int buf) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      Xs[buf * kBK * kXsStride + lk * kXsStride + (tid >> 3) + 32 * i] = xr[i];
      Ws[buf * kBK * kWsStride + lk * kWsStride + (tid >> 3) + 32 * i] = wr[i];
    }
  };

  // ---- first layer: 8x8 micro-tile, rows ty*4+{0..3} and 64+ty*4+{0..3}, same for columns
  const int tx = tid & 15, ty = tid >> 4;
  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

  const int ktiles = (D + kBK - 1) / kBK;
  load_global(0);
  store_shared(0);
  __syncthreads();
  for (int kt = 0; kt < ktiles; ++kt) {
    const int cur = kt & 1;
    if (kt + 1 < ktiles) load_global((kt + 1) * kBK);  // in flight while this tile is multiplied
    const float* xs = Xs + cur * kBK * kXsStride;
    const float* ws = Ws + cur * kBK * kWsStride;
#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      const float4 a0 = *reinterpret_cast<const float4*>(xs + k * kXsStride + ty * 4);
      const float4 a1 = *reinterpret_cast<const float4*>(xs + k * kXsStride + 64 + ty * 4);
      const float4 w0 = *reinterpret_cast<const float4*>(ws + k * kWsStride + tx * 4);
      const float4 w1 = *reinterpret_cast<const float4*>(ws + k * kWsStride + 64 + tx * 4);
      const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float w[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], w[j], acc[i][j]);
    }
    // The other buffer was last read before the previous barrier, so it is free to refill.
    if (kt + 1 < ktiles) store_shared(cur ^ 1);
    __syncthreads();
  }

  // ---- epilogue: first-layer bias, ReLU in registers
  int col[8];
  float bias[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    col[j] = (j < 4 ? 0 : 64) + tx * 4 + (j & 3);
    const int64_t b = b0 + col[j] / H1;
    bias[j] = (col[j] < ncols && b < B) ? to_f(params[b * P + meta.boff[0] + col[j] % H1]) : 0.f;
  }
  for (int half = 0; half < 2; ++half) {
    if (half) __syncthreads();  // the first half's tasks are done reading Hs
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) Hs[(ty * 4 + i) * kHsStride + col[j]] = relu(acc[half * 4 + i][j] + bias[j]);
    __syncthreads();
    // One thread per (row, network); a warp holds 32 consecutive rows of one network, so
    // its weight loads are broadcasts and its Hs reads are conflict-free.
    for (int t = tid; t < G * kHalf; t += kThreads) {
      const int r = t % kHalf, g = t / kHalf;
      const int n = n0 + half * kHalf + r;
      const int64_t b = b0 + g;
      if (n >= N || b >= B) continue;
      const int64_t label = y[n];
      if (label < 0 || label >= m || label >= numc) continue;  // the public op rejects these first
      const float* hrow = Hs + r * kHsStride + g * H1;
      const T* pb = params + b * P;
      float loss, corr;
      if (!DEEP) {
        head(pb + meta.woff[1], pb + meta.boff[1], hrow, H1, m, (int)label, loss, corr);
      } else {
        // Generic path for 2+ hidden layers: activations in per-thread (local) arrays.
        float a[kClassMetricsMaxWidth], nb[kClassMetricsMaxWidth];
        for (int k = 0; k < H1; ++k) a[k] = hrow[k];
        for (int l = 1; l < meta.L - 1; ++l) {
          const T* W = pb + meta.woff[l];
          const T* bb = pb + meta.boff[l];
          const int fin = meta.fin[l], fout = meta.fout[l];
          for (int o = 0; o < fout; ++o) {
            float v = to_f(bb[o]);
            for (int k = 0; k < fin; ++k) v = fmaf(to_f(W[(int64_t)o * fin + k]), a[k], v);
            nb[o] = relu(v);
          }
          for (int o = 0; o < fout; ++o) a[o] = nb[o];
        }
        head(pb + meta.woff[meta.L - 1], pb + meta.boff[meta.L - 1], a, meta.fin[meta.L - 1], m, (int)label, loss,
             corr);
      }
      if (smem_acc) {
        atomicAdd(&accL[g * m + label], loss);
        atomicAdd(&accC[g * m + label], corr);
      } else {
        atomicAdd(&loss_out[b * numc + label], loss);
        atomicAdd(&corr_out[b * numc + label], corr);
      }
    }
  }
  if (smem_acc) {
    __syncthreads();
    for (int e = tid; e < G * m; e += kThreads) {
      const int g = e / m, c = e % m;
      const int64_t b = b0 + g;
      // Skip classes absent from this tile (both sums exactly 0; NaN != 0 so NaN is kept).
      if (b < B && c < numc && (accL[e] != 0.f || accC[e] != 0.f)) {
        atomicAdd(&loss_out[b * numc + c], accL[e]);
        atomicAdd(&corr_out[b * numc + c], accC[e]);
      }
    }
  }
}

template <typename T, bool DEEP>
cudaError_t launch_t(const void* params, const void* X, const int64_t* y, float* loss, float* corr,
                     const LayerMeta& meta, int64_t B, int64_t N, int64_t D, int64_t P, int numc,
                     cudaStream_t stream) {
  const int G = kBN / meta.fout[0];
  const int64_t ntiles = (N + kBM - 1) / kBM;
  const int64_t ngroups = (B + G - 1) / G;
  if (ntiles * ngroups > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  auto kern = class_metrics_kernel<T, DEEP>;
  // > 48 KiB of dynamic shared memory needs an explicit opt-in (sm_80: up to 163 KiB).
  cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kSmemBytes);
  if (err != cudaSuccess) return err;
  kern<<<(unsigned)(ntiles * ngroups), kThreads, kSmemBytes, stream>>>(
      static_cast<const T*>(params), static_cast<const T*>(X), y, loss, corr, meta, B, (int)N, (int)D, P, numc, G,
      (int)ntiles);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(const void* params, const void* X, const int64_t* y, float* loss, float* corr,
                         const LayerMeta& meta, int64_t B, int64_t N, int64_t D, int64_t P, int numc,
                         cudaStream_t stream) {
  return meta.L == 2 ? launch_t<T, false>(params, X, y, loss, corr, meta, B, N, D, P, numc, stream)
                     : launch_t<T, true>(params, X, y, loss, corr, meta, B, N, D, P, numc, stream);
}

}  // namespace

cudaError_t launch_class_metrics(DType dtype, const void* params, const void* X, const int64_t* y, float* loss_sum,
                                 float* correct_sum, const int64_t* layer_sizes, int num_sizes, int64_t B, int64_t N,
                                 int num_classes, cudaStream_t stream) {
  // The torch glue checks all of this with clear messages; these guards keep the kernel safe.
  if (num_sizes < 3 || num_sizes - 1 > kClassMetricsMaxLayers || num_classes <= 0) return cudaErrorInvalidValue;
  if (layer_sizes[0] <= 0 || layer_sizes[0] > 0x7fffffffLL || N > 0x7fffffffLL) return cudaErrorInvalidValue;
  LayerMeta meta{};
  meta.L = num_sizes - 1;
  int64_t off = 0;
  for (int l = 0; l < meta.L; ++l) {
    const int64_t fin = layer_sizes[l], fout = layer_sizes[l + 1];
    if (fout <= 0 || fout > kClassMetricsMaxWidth) return cudaErrorInvalidValue;
    meta.woff[l] = off;
    meta.boff[l] = off + fin * fout;
    meta.fin[l] = (int)fin;
    meta.fout[l] = (int)fout;
    off += fin * fout + fout;
  }
  if (B == 0 || N == 0) return cudaSuccess;
  const int64_t D = layer_sizes[0], P = off;
  switch (dtype) {
    case DType::kFloat32: return launch_dtype<float>(params, X, y, loss_sum, correct_sum, meta, B, N, D, P, num_classes, stream);
    case DType::kFloat16: return launch_dtype<__half>(params, X, y, loss_sum, correct_sum, meta, B, N, D, P, num_classes, stream);
    case DType::kBFloat16:
      return launch_dtype<__nv_bfloat16>(params, X, y, loss_sum, correct_sum, meta, B, N, D, P, num_classes, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hyforget
