// Sparse-rows x dense kernels (see csr_matmul.h). Both walk the output in column tiles of
// kCsrColTile values held in registers (GCC vector extensions: one 64-byte vector is one
// AVX-512 register, or two AVX2 / four SSE registers in the other target clones), so each
// nonzero of X costs one broadcast and kCsrColTile / lanes loads and fused multiply-adds from
// a weight row that stays in L1/L2 across the rows of a tile. Compiled with
// -ffp-contract=fast (CMakeLists.txt): the multiply-adds fuse.
#include "cpu/csr_matmul.h"
#include "cpu/vec.h"

namespace hyforget {
namespace {

#define HF_INLINE inline __attribute__((always_inline))

// Rows [i0, i1) of the product over columns [c, c + NV * lanes), NV vectors per row. Two sets
// of accumulators (even and odd nonzeros) give 2*NV independent multiply-add chains, enough to
// hide the FMA latency.
template <typename T, int NV>
static HF_INLINE void rows_tile(const int64_t* crow, const int64_t* col, const T* val, const int64_t* rows, int64_t i0,
                                int64_t i1, const T* W, int64_t ldw, int64_t c, const T* bias, T* out, int64_t ldo) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = kLanes<T>;
  V b[NV];
  for (int k = 0; k < NV; ++k) b[k] = bias ? *reinterpret_cast<const V*>(bias + c + k * L) : V{};
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t r = rows ? rows[i] : i;
    V acc[NV], acc2[NV];
    for (int k = 0; k < NV; ++k) { acc[k] = b[k]; acc2[k] = V{}; }
    int64_t p = crow[r];
    const int64_t pe = crow[r + 1];
    for (; p + 1 < pe; p += 2) {
      const T v = val[p], v2 = val[p + 1];
      const T* w = W + col[p] * ldw + c;
      const T* w2 = W + col[p + 1] * ldw + c;
      for (int k = 0; k < NV; ++k) {
        acc[k] += v * *reinterpret_cast<const V*>(w + k * L);
        acc2[k] += v2 * *reinterpret_cast<const V*>(w2 + k * L);
      }
    }
    if (p < pe) {
      const T v = val[p];
      const T* w = W + col[p] * ldw + c;
      for (int k = 0; k < NV; ++k) acc[k] += v * *reinterpret_cast<const V*>(w + k * L);
    }
    for (int k = 0; k < NV; ++k) *reinterpret_cast<V*>(out + i * ldo + c + k * L) = acc[k] + acc2[k];
  }
}

// The last < lanes columns [c, c1), with the nonzero loop outside the column loop.
template <typename T>
static HF_INLINE void rows_scalar(const int64_t* crow, const int64_t* col, const T* val, const int64_t* rows,
                                  int64_t i0, int64_t i1, const T* W, int64_t ldw, int64_t c, int64_t c1,
                                  const T* bias, T* out, int64_t ldo) {
  const int64_t n = c1 - c;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t r = rows ? rows[i] : i;
    T acc[kLanes<T>];
    for (int64_t j = 0; j < n; ++j) acc[j] = bias ? bias[c + j] : T(0);
    for (int64_t p = crow[r], pe = crow[r + 1]; p < pe; ++p) {
      const T v = val[p];
      const T* w = W + col[p] * ldw + c;
      for (int64_t j = 0; j < n; ++j) acc[j] += v * w[j];
    }
    for (int64_t j = 0; j < n; ++j) out[i * ldo + c + j] = acc[j];
  }
}

template <typename T>
static HF_INLINE void rows_impl(const int64_t* crow, const int64_t* col, const T* val, const int64_t* rows, int64_t i0,
                                int64_t i1, const T* W, int64_t ldw, int64_t c0, int64_t c1, const T* bias, T* out,
                                int64_t ldo) {
  constexpr int64_t L = kLanes<T>, NV = kCsrColTile / kLanes<float>;  // same vector count for both types
  static_assert(NV == 4, "the tail below handles 1..3 vectors");
  int64_t c = c0;
  for (; c + NV * L <= c1; c += NV * L) rows_tile<T, NV>(crow, col, val, rows, i0, i1, W, ldw, c, bias, out, ldo);
  switch ((c1 - c) / L) {  // the remaining whole vectors in one tile
    case 3: rows_tile<T, 3>(crow, col, val, rows, i0, i1, W, ldw, c, bias, out, ldo); c += 3 * L; break;
    case 2: rows_tile<T, 2>(crow, col, val, rows, i0, i1, W, ldw, c, bias, out, ldo); c += 2 * L; break;
    case 1: rows_tile<T, 1>(crow, col, val, rows, i0, i1, W, ldw, c, bias, out, ldo); c += L; break;
    default: break;
  }
  if (c < c1) rows_scalar<T>(crow, col, val, rows, i0, i1, W, ldw, c, c1, bias, out, ldo);
}

// W[j, c : c + NV*lanes] -= sum over the CSC list of column j of v * G[i, same columns].
template <typename T, int NV>
static HF_INLINE void outer_tile(const int64_t* cptr, const int64_t* cols, int64_t ncols, const int64_t* crow_of,
                                 const T* cval, const T* G, int64_t ldg, T* W, int64_t ldw, int64_t c) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = kLanes<T>;
  for (int64_t jj = 0; jj < ncols; ++jj) {
    const int64_t j = cols[jj];
    T* w = W + j * ldw + c;
    V acc[NV];
    for (int k = 0; k < NV; ++k) acc[k] = *reinterpret_cast<const V*>(w + k * L);
    for (int64_t q = cptr[j], qe = cptr[j + 1]; q < qe; ++q) {
      const T v = cval[q];
      const T* g = G + crow_of[q] * ldg + c;
      for (int k = 0; k < NV; ++k) acc[k] -= v * *reinterpret_cast<const V*>(g + k * L);
    }
    for (int k = 0; k < NV; ++k) *reinterpret_cast<V*>(w + k * L) = acc[k];
  }
}

template <typename T>
static HF_INLINE void outer_impl(const int64_t* cptr, const int64_t* cols, int64_t ncols, const int64_t* crow_of,
                                 const T* cval, const T* G, int64_t ldg, T* W, int64_t ldw, int64_t c0, int64_t c1) {
  constexpr int64_t L = kLanes<T>, NV = kCsrColTile / kLanes<float>;
  int64_t c = c0;
  for (; c + NV * L <= c1; c += NV * L) outer_tile<T, NV>(cptr, cols, ncols, crow_of, cval, G, ldg, W, ldw, c);
  switch ((c1 - c) / L) {
    case 3: outer_tile<T, 3>(cptr, cols, ncols, crow_of, cval, G, ldg, W, ldw, c); c += 3 * L; break;
    case 2: outer_tile<T, 2>(cptr, cols, ncols, crow_of, cval, G, ldg, W, ldw, c); c += 2 * L; break;
    case 1: outer_tile<T, 1>(cptr, cols, ncols, crow_of, cval, G, ldg, W, ldw, c); c += L; break;
    default: break;
  }
  if (c < c1)
    for (int64_t jj = 0; jj < ncols; ++jj) {
      const int64_t j = cols[jj];
      for (int64_t q = cptr[j]; q < cptr[j + 1]; ++q)
        for (int64_t k = c; k < c1; ++k) W[j * ldw + k] -= cval[q] * G[crow_of[q] * ldg + k];
    }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HF_CLONES
#endif

HF_CLONES void rows_f32(const int64_t* crow, const int64_t* col, const float* val, const int64_t* rows, int64_t i0,
                        int64_t i1, const float* W, int64_t ldw, int64_t c0, int64_t c1, const float* bias, float* out,
                        int64_t ldo) {
  rows_impl<float>(crow, col, val, rows, i0, i1, W, ldw, c0, c1, bias, out, ldo);
}
HF_CLONES void rows_f64(const int64_t* crow, const int64_t* col, const double* val, const int64_t* rows, int64_t i0,
                        int64_t i1, const double* W, int64_t ldw, int64_t c0, int64_t c1, const double* bias,
                        double* out, int64_t ldo) {
  rows_impl<double>(crow, col, val, rows, i0, i1, W, ldw, c0, c1, bias, out, ldo);
}
HF_CLONES void outer_f32(const int64_t* cptr, const int64_t* cols, int64_t ncols, const int64_t* crow_of,
                         const float* cval, const float* G, int64_t ldg, float* W, int64_t ldw, int64_t c0, int64_t c1) {
  outer_impl<float>(cptr, cols, ncols, crow_of, cval, G, ldg, W, ldw, c0, c1);
}
HF_CLONES void outer_f64(const int64_t* cptr, const int64_t* cols, int64_t ncols, const int64_t* crow_of,
                         const double* cval, const double* G, int64_t ldg, double* W, int64_t ldw, int64_t c0,
                         int64_t c1) {
  outer_impl<double>(cptr, cols, ncols, crow_of, cval, G, ldg, W, ldw, c0, c1);
}

HF_CLONES bool in_range(const int64_t* idx, int64_t n, int64_t bound) {
  uint64_t bad = 0;  // unsigned compare: a negative index wraps to a huge one
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<uint64_t>(idx[i]) >= static_cast<uint64_t>(bound);
  return bad == 0;
}

}  // namespace

bool indices_in_range(const int64_t* idx, int64_t n, int64_t bound) { return in_range(idx, n, bound); }

void csr_rows_times_dense(const int64_t* crow, const int64_t* col, const float* val, const int64_t* rows, int64_t i0,
                          int64_t i1, const float* W, int64_t ldw, int64_t c0, int64_t c1, const float* bias,
                          float* out, int64_t ldo) {
  rows_f32(crow, col, val, rows, i0, i1, W, ldw, c0, c1, bias, out, ldo);
}
void csr_rows_times_dense(const int64_t* crow, const int64_t* col, const double* val, const int64_t* rows, int64_t i0,
                          int64_t i1, const double* W, int64_t ldw, int64_t c0, int64_t c1, const double* bias,
                          double* out, int64_t ldo) {
  rows_f64(crow, col, val, rows, i0, i1, W, ldw, c0, c1, bias, out, ldo);
}
void csc_sub_outer(const int64_t* cptr, const int64_t* cols, int64_t ncols, const int64_t* crow_of, const float* cval,
                   const float* G, int64_t ldg, float* W, int64_t ldw, int64_t c0, int64_t c1) {
  outer_f32(cptr, cols, ncols, crow_of, cval, G, ldg, W, ldw, c0, c1);
}
void csc_sub_outer(const int64_t* cptr, const int64_t* cols, int64_t ncols, const int64_t* crow_of, const double* cval,
                   const double* G, int64_t ldg, double* W, int64_t ldw, int64_t c0, int64_t c1) {
  outer_f64(cptr, cols, ncols, crow_of, cval, G, ldg, W, ldw, c0, c1);
}

}  // namespace hyforget
