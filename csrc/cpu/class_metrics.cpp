// Fused CPU evaluation of B ReLU MLPs on one labelled set: per-class sums of
// cross-entropy and of correct predictions, (B, m) each, without ever materializing a
// (B, N, hidden) or (B, N, m) tensor.
//
// Work is split into blocks of `nb` networks; each block belongs to one thread, which walks
// all N rows in tiles of kRowTile rows:
//   1. G = W1_block (nb*h1, D) @ X_tile^T (D, R): one MKL GEMM per tile (single-threaded,
//      since we are inside at::parallel_for), into a cache-resident (nb*h1, R) buffer. Rows
//      of G are contiguous over the R inputs, so everything after it vectorizes over inputs.
//   2. Epilogue per network, 16 inputs at a time in registers (AVX-512 / AVX2 clones chosen at
//      load time): bias + ReLU, later layers, max / argmax, logsumexp, CE, then a per-class
//      reduction. X rows are sorted by label once, so a tile holds a few runs of one class
//      each and the per-class scatter becomes a contiguous, vectorized sum.
// Nested parallelism: at::parallel_for owns the threads; MKL called inside an OpenMP parallel
// region runs single-threaded, so the threads never oversubscribe the cores (measured: the
// tiled GEMMs together take the time of one big multi-threaded GEMM).
// Input columns that are zero in every row are left out of the GEMM (exact: they add 0; a
// NaN/Inf weight on one still gives that network NaN sums, as 0 * Inf does in the reference).
// Half and bfloat16 params compute in float32; float64 computes in float64. Sums accumulate
// in double per network and class.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/csr_matmul.h"
#include "cpu/mathfun.h"
#include "cpu/vec.h"

namespace hyforget {
namespace {

// Every helper of the epilogue is force-inlined so each target clone of epilogue_f32 gets its
// own vectorized copy (a plain `inline` helper would be compiled once, for baseline x86-64).
#ifndef HF_INLINE
#define HF_INLINE inline __attribute__((always_inline))
#endif

// Tile sizes, measured on a 2-core AMD EPYC (1 MiB L2 per core): 256 or 512 rows with ~512
// columns keep the tile epilogue within ~5-15% of the GEMM; 1024 columns or 128 rows are slower.
constexpr int64_t kRowTile = 256;     // inputs per tile (the G buffer's row length)
constexpr int64_t kTargetCols = 512;  // first-layer outputs (networks x h1) per block

// Dimensions shared by every network in a call.
struct Net {
  const int64_t* sizes;  // layer_sizes, L + 1 entries
  int64_t L;             // number of layers
  int64_t rest;          // parameters per network after W1 (b1, W2, b2, ...)
  int64_t maxw;          // widest layer after the input
};

// Vector width of the epilogue: inputs processed together, one AVX-512 register of floats.
template <typename T>
constexpr int64_t kV = 64 / sizeof(T);

// Thread-local scratch: activations of V inputs (ping-pong), and per-input loss / correct
// of the current tile.
template <typename T>
struct Scratch {
  std::vector<T> act, tmp, loss, corr;
  explicit Scratch(int64_t maxw) : act(maxw * kV<T>), tmp(maxw * kV<T>), loss(kRowTile), corr(kRowTile) {}
};

// Forward of one network on V inputs, from the first layer's outputs g (h1 rows of stride
// ldg, before bias) to the logits (m_out, V), which it returns (in `a` or `t`). Bias is added
// after each dot product, as the reference does. ReLU keeps NaN, like torch.relu.
template <typename T>
static HF_INLINE const T* forward_v(const Net& net, const T* __restrict__ g, int64_t ldg, const T* __restrict__ rp,
                                 T* __restrict__ a, T* __restrict__ t) {
  // Explicit vectors: GCC's auto-vectorizer turned the per-lane loops of the later layers
  // into 16 scalar multiply / add chains (measured: ~2/3 of the epilogue's time).
  using VT = typename Vec<T>::type;
  constexpr int64_t V = kV<T>;
  static_assert(V == kLanes<T>, "one epilogue vector is one Vec");
  const int64_t h1 = net.sizes[1];
  const VT zero{};
  for (int64_t k = 0; k < h1; ++k) {
    const VT x = vload(g + k * ldg) + rp[k];
    vstore(a + k * V, x < zero ? zero : x);  // ReLU that keeps NaN, like torch.relu
  }
  const T* p = rp + h1;
  T* in = a;
  T* out = t;
  for (int64_t l = 1; l < net.L; ++l) {
    const int64_t fi = net.sizes[l], fo = net.sizes[l + 1];
    const T* W = p;
    const T* b = p + fo * fi;
    const bool last = l == net.L - 1;
    for (int64_t o = 0; o < fo; ++o) {
      VT acc = W[o * fi] * vload(in);
      for (int64_t i = 1; i < fi; ++i) acc += W[o * fi + i] * vload(in + i * V);
      const VT x = acc + b[o];
      vstore(out + o * V, last ? x : (x < zero ? zero : x));
    }
    p = b + fo;
    std::swap(in, out);
  }
  return in;
}

// Cross-entropy and correctness of V inputs with labels yl from logits z (m_out, V).
// Prediction = torch.argmax: first maximum, and a NaN beats everything (first NaN wins).
// loss = log(sum exp(z - max)) - (z_y - max), as log_softmax computes it.
template <typename T>
static HF_INLINE void ce_v(const T* __restrict__ z, int64_t m_out, const int32_t* __restrict__ yl, T* __restrict__ loss,
                        T* __restrict__ corr) {
  constexpr int64_t V = kV<T>;
  T best[V], sum[V], zy[V];
  int32_t idx[V];
  for (int64_t v = 0; v < V; ++v) { best[v] = z[v]; idx[v] = 0; zy[v] = z[v]; }
  for (int64_t c = 1; c < m_out; ++c) {
    for (int64_t v = 0; v < V; ++v) {
      const T x = z[c * V + v], b = best[v];
      const bool gt = x > b || (x != x && b == b);
      best[v] = gt ? x : b;
      idx[v] = gt ? static_cast<int32_t>(c) : idx[v];
      zy[v] = yl[v] == c ? x : zy[v];
    }
  }
  for (int64_t v = 0; v < V; ++v) sum[v] = T(0);
  for (int64_t c = 0; c < m_out; ++c)
    for (int64_t v = 0; v < V; ++v) sum[v] += exp_nonpos(z[c * V + v] - best[v]);
  for (int64_t v = 0; v < V; ++v) {
    loss[v] = log_ge1(sum[v]) - (zy[v] - best[v]);
    corr[v] = idx[v] == yl[v] ? T(1) : T(0);
  }
}

// Sum of x[lo:hi) with V independent lanes, so the loop vectorizes without -ffast-math.
template <typename T>
static HF_INLINE double lane_sum(const T* __restrict__ x, int64_t lo, int64_t hi) {
  constexpr int64_t V = kV<T>;
  T acc[V] = {};
  int64_t r = lo;
  for (; r + V <= hi; r += V)
    for (int64_t v = 0; v < V; ++v) acc[v] += x[r + v];
  double s = 0;
  for (; r < hi; ++r) s += x[r];
  for (int64_t v = 0; v < V; ++v) s += acc[v];
  return s;
}

// The epilogue for one network on one tile: first-layer outputs g (h1 rows of stride ldg,
// Rp >= R columns, a multiple of V), labels yl (Rp,). Rows [seg[3q], seg[3q+1]) of the tile
// have class seg[3q+2] (rows are sorted by label). Adds into acc_loss / acc_corr (m each).
template <typename T>
static HF_INLINE void epilogue_impl(const Net& net, const T* g, int64_t ldg, const T* rp, const int32_t* yl, int64_t R,
                                 const int64_t* seg, int64_t nseg, Scratch<T>& s, double* acc_loss, double* acc_corr) {
  constexpr int64_t V = kV<T>;
  const int64_t m_out = net.sizes[net.L];
  for (int64_t r0 = 0; r0 < R; r0 += V) {
    const T* z = forward_v(net, g + r0, ldg, rp, s.act.data(), s.tmp.data());
    ce_v(z, m_out, yl + r0, s.loss.data() + r0, s.corr.data() + r0);
  }
  for (int64_t q = 0; q < nseg; ++q) {
    const int64_t lo = seg[3 * q], hi = seg[3 * q + 1], c = seg[3 * q + 2];
    acc_loss[c] += lane_sum(s.loss.data(), lo, hi);
    acc_corr[c] += lane_sum(s.corr.data(), lo, hi);
  }
}

// float32 epilogue compiled for AVX-512, AVX2 and baseline x86-64, chosen at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void epilogue_f32(const Net& net, const float* g, int64_t ldg, const float* rp, const int32_t* yl, int64_t R,
                  const int64_t* seg, int64_t nseg, Scratch<float>& s, double* acc_loss, double* acc_corr) {
  epilogue_impl<float>(net, g, ldg, rp, yl, R, seg, nseg, s, acc_loss, acc_corr);
}

void epilogue(const Net& net, const float* g, int64_t ldg, const float* rp, const int32_t* yl, int64_t R,
              const int64_t* seg, int64_t nseg, Scratch<float>& s, double* acc_loss, double* acc_corr) {
  epilogue_f32(net, g, ldg, rp, yl, R, seg, nseg, s, acc_loss, acc_corr);
}
void epilogue(const Net& net, const double* g, int64_t ldg, const double* rp, const int32_t* yl, int64_t R,
              const int64_t* seg, int64_t nseg, Scratch<double>& s, double* acc_loss, double* acc_corr) {
  epilogue_impl<double>(net, g, ldg, rp, yl, R, seg, nseg, s, acc_loss, acc_corr);
}


// Class runs of the label-sorted rows inside every tile: for tile t, entries
// [tile_start[t], tile_start[t+1]) of `segs` are (lo, hi, class) triples, tile-relative.
struct TileSegments {
  std::vector<int64_t> segs, tile_start;
};

TileSegments tile_segments(const int64_t* ys, int64_t N) {
  TileSegments ts;
  for (int64_t t0 = 0; t0 < N; t0 += kRowTile) {
    ts.tile_start.push_back(static_cast<int64_t>(ts.segs.size() / 3));
    const int64_t t1 = std::min(N, t0 + kRowTile);
    for (int64_t r = t0; r < t1;) {
      int64_t e = r + 1;
      while (e < t1 && ys[e] == ys[r]) ++e;
      ts.segs.insert(ts.segs.end(), {r - t0, e - t0, ys[r]});
      r = e;
    }
  }
  ts.tile_start.push_back(static_cast<int64_t>(ts.segs.size() / 3));
  return ts;
}

// Networks per block: about kTargetCols first-layer outputs each (an efficient GEMM width),
// and a whole multiple of the thread count in blocks so no thread idles at the end (B=256,
// h1=10 would otherwise make 5 blocks for 2 threads).
int64_t block_size(int64_t B, int64_t h1, int64_t nthreads) {
  const int64_t target = std::max<int64_t>(1, (kTargetCols + h1 - 1) / h1);
  int64_t nblocks = (B + target - 1) / target;
  nblocks = std::min(B, (nblocks + nthreads - 1) / nthreads * nthreads);
  return std::max<int64_t>(1, (B + nblocks - 1) / nblocks);
}

// Input columns that are zero in every row add nothing to the first layer, so the GEMM skips
// them (MNIST's blank border: 121 of the bundled digits' 784 pixels, 15% of the work).
// `used` and `dropped` hold int64 column indices; `dropped` is empty when all are used.
struct Columns {
  at::Tensor used, dropped;
};

Columns split_columns(const at::Tensor& X) {
  auto nz = X.ne(0).any(0);  // (D,) bool
  return {nz.nonzero().squeeze(1), nz.logical_not().nonzero().squeeze(1)};
}

// The block's first layers (nbc, h1, D0) -> W1v (nbc*h1, D) over the used columns, cast to T.
// Returns (nbc,) bool: networks with a NaN/Inf weight on a skipped column. The reference
// gets NaN there (0 * Inf), so those networks' sums are set to NaN.
at::Tensor load_first_layers(const at::Tensor& W1in, const Columns& cols, at::Tensor& W1v) {
  const int64_t nbc = W1in.size(0), h1 = W1in.size(1);
  if (cols.dropped.numel() == 0) {
    W1v.view({nbc, h1, W1in.size(2)}).copy_(W1in);
    return at::zeros({nbc}, W1in.options().dtype(at::kBool));
  }
  auto dst = W1v.view({nbc, h1, cols.used.numel()});
  if (W1in.scalar_type() == dst.scalar_type())
    at::index_select_out(dst, W1in, 2, cols.used);  // straight into the buffer: no per-block temporary
  else
    dst.copy_(W1in.index_select(2, cols.used));
  return at::isfinite(W1in.index_select(2, cols.dropped)).logical_not().flatten(1).any(1).contiguous();
}

template <typename T>
void run_blocks(const at::Tensor& params, const at::Tensor& Xs, const Columns& cols, const int32_t* yl,
                const TileSegments& ts, const Net& net, int64_t nb, int64_t num_classes, float* loss_out,
                float* corr_out) {
  const int64_t B = params.size(0), N = Xs.size(0), D = Xs.size(1), h1 = net.sizes[1], D0 = net.sizes[0];
  const int64_t nblocks = (B + nb - 1) / nb;
  const auto opts = Xs.options();
  at::parallel_for(0, nblocks, 1, [&](int64_t blk0, int64_t blk1) {
    Scratch<T> s(net.maxw);
    auto W1 = at::empty({nb * h1, D}, opts);           // (nb*h1, D) first layers of the block
    auto rest = at::empty({nb, net.rest}, opts);       // (nb, rest) everything after W1
    auto G = at::zeros({nb * h1, kRowTile}, opts);     // (nb*h1, R) first-layer outputs of a tile
    std::vector<double> acc_loss(nb * num_classes), acc_corr(nb * num_classes);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t b0 = blk * nb, nbc = std::min(nb, B - b0);
      auto pb = params.narrow(0, b0, nbc);
      auto W1v = W1.narrow(0, 0, nbc * h1);
      const auto skipped_bad = load_first_layers(pb.narrow(1, 0, h1 * D0).view({nbc, h1, D0}), cols, W1v);
      rest.narrow(0, 0, nbc).copy_(pb.narrow(1, h1 * D0, net.rest));
      std::fill(acc_loss.begin(), acc_loss.end(), 0.0);
      std::fill(acc_corr.begin(), acc_corr.end(), 0.0);
      for (int64_t t = 0, t0 = 0; t0 < N; ++t, t0 += kRowTile) {
        const int64_t R = std::min(kRowTile, N - t0);
        auto Gv = G.narrow(0, 0, nbc * h1).narrow(1, 0, R);  // (nbc*h1, R), row stride kRowTile
        at::mm_out(Gv, W1v, Xs.narrow(0, t0, R).t());
        const T* g = G.data_ptr<T>();
        const T* rp = rest.data_ptr<T>();
        const int64_t* seg = ts.segs.data() + 3 * ts.tile_start[t];
        const int64_t nseg = ts.tile_start[t + 1] - ts.tile_start[t];
        for (int64_t j = 0; j < nbc; ++j)
          epilogue(net, g + j * h1 * kRowTile, kRowTile, rp + j * net.rest, yl + t0, R, seg, nseg, s,
                   acc_loss.data() + j * num_classes, acc_corr.data() + j * num_classes);
      }
      const bool* sb = skipped_bad.data_ptr<bool>();
      for (int64_t i = 0; i < nbc * num_classes; ++i) {
        const bool nan = sb[i / num_classes];
        loss_out[b0 * num_classes + i] = nan ? NAN : static_cast<float>(acc_loss[i]);
        corr_out[b0 * num_classes + i] = nan ? NAN : static_cast<float>(acc_corr[i]);
      }
    }
  });
}


// ---------------------------------------------------------------------------------------
// X given as CSR (class_metrics_csr): the first layer of a tile is a sparse product instead of
// a GEMM. Each network block's first layers are transposed to W1T (D, nb*h1) so that every
// nonzero x[i, j] reads one contiguous weight row; the tile's outputs (R, nb*h1) are then
// transposed to the (nb*h1, R) layout the epilogue reads. Rows are visited in label order
// through an index (the CSR arrays are never permuted).
//
// Work items are (block, chunk of tiles), so a call with few networks (the 16 offers of a
// collection step) still uses every core. Chunking depends only on (B, N), never on the
// thread count, and partial sums are added in chunk order, so results do not depend on it.
constexpr int64_t kMinItems = 16;

// Whether x[0:n) holds no NaN / Inf: x * 0 is NaN exactly for those, summed in vector lanes.
template <typename T>
bool all_finite(const T* x, int64_t n) {
  using VT = typename Vec<T>::type;
  VT acc{};
  int64_t k = 0;
  for (; k + kLanes<T> <= n; k += kLanes<T>) acc += vload(x + k) * T(0);
  T s = T(0);
  for (; k < n; ++k) s += x[k] * T(0);
  for (int64_t v = 0; v < kLanes<T>; ++v) s += acc[v];
  return s == s;
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols, in 16 x 16 blocks so both sides
// stay in cache lines (a plain double loop strides one of them by a whole row per element).
template <typename T>
void transpose(const T* __restrict__ src, int64_t lds, T* __restrict__ dst, int64_t ldd, int64_t rows, int64_t cols) {
  constexpr int64_t kB = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kB)
    for (int64_t c0 = 0; c0 < cols; c0 += kB) {
      const int64_t r1 = std::min(rows, r0 + kB), c1 = std::min(cols, c0 + kB);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = src[r * lds + c];
    }
}

// Where run_csr reads its B networks from. FlatNets: the public layout, params (B, P).
// first_layer_t(b, dst, ld) writes network b's first layer transposed into dst (D rows of
// stride ld, h1 columns) and returns whether ALL of b's parameters are finite.
template <typename T>
struct FlatNets {
  const T* p;
  int64_t P, D, h1;
  bool first_layer_t(int64_t b, T* dst, int64_t ld) const {
    transpose(p + b * P, D, dst, ld, h1, D);
    return all_finite(p + b * P, P);
  }
  const T* rest(int64_t b) const { return p + b * P + h1 * D; }  // b1, W2, b2, ...
};

// A batched trainer's layout (hyforget_fast/collection/collect.py): the first layers of all R runs as one
// transposed matrix W1T (D, R*h1), b1 (R, h1), the later layers packed in head (R, P_head);
// network b is run runs[b]. Its first layer is h1 contiguous values per row of W1T, so no
// flat parameter vector and no transpose is ever made.
template <typename T>
struct TransposedNets {
  const T* w1t;
  int64_t ldw, D, h1, rest_len;
  const int64_t* runs;
  std::vector<T> rest_buf;       // (B, h1 + P_head): b1 then head, per network
  std::vector<uint8_t> rest_ok;  // (B,) those are finite
  TransposedNets(const T* w1t_, int64_t ldw_, const T* b1, const T* head, int64_t P_head, const int64_t* runs_,
                 int64_t B, int64_t D_, int64_t h1_)
      : w1t(w1t_), ldw(ldw_), D(D_), h1(h1_), rest_len(h1_ + P_head), runs(runs_), rest_buf(B * rest_len),
        rest_ok(B) {
    for (int64_t b = 0; b < B; ++b) {
      T* r = rest_buf.data() + b * rest_len;
      std::copy(b1 + runs[b] * h1, b1 + runs[b] * h1 + h1, r);
      std::copy(head + runs[b] * P_head, head + (runs[b] + 1) * P_head, r + h1);
      rest_ok[b] = all_finite(r, rest_len);
    }
  }
  bool first_layer_t(int64_t b, T* dst, int64_t ld) const {
    const T* src = w1t + runs[b] * h1;
    T nan_if_bad = T(0);  // x * 0 is NaN exactly for NaN / Inf x
    for (int64_t j = 0; j < D; ++j)
      for (int64_t k = 0; k < h1; ++k) {
        const T v = src[j * ldw + k];
        dst[j * ld + k] = v;
        nan_if_bad += v * T(0);
      }
    return rest_ok[b] && nan_if_bad == nan_if_bad;
  }
  const T* rest(int64_t b) const { return rest_buf.data() + b * rest_len; }
};

template <typename T, typename Nets>
void run_csr(const Nets& nets, int64_t B, const int64_t* crow, const int64_t* col, const T* val, const int64_t* order,
             int64_t N, const int32_t* yl, const TileSegments& ts,
             const Net& net, int64_t num_classes, float* loss_out, float* corr_out) {
  const int64_t D = net.sizes[0], h1 = net.sizes[1];
  const int64_t ntiles = static_cast<int64_t>(ts.tile_start.size()) - 1;
  const int64_t nblocks = (B + std::max<int64_t>(1, kTargetCols / h1) - 1) / std::max<int64_t>(1, kTargetCols / h1);
  const int64_t nb = (B + nblocks - 1) / nblocks;  // networks per block, balanced
  const int64_t nsplit = nblocks >= kMinItems ? 1 : std::min(ntiles, (kMinItems + nblocks - 1) / nblocks);
  // Row length of the transposed weights and of the tile outputs: whole vectors, so the sparse
  // product never takes its scalar tail (padding columns are computed and ignored).
  const int64_t ld = (nb * h1 + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
  const int64_t nitems = nblocks * nsplit, cell = nb * num_classes;
  std::vector<double> part_loss(nitems * cell, 0.0), part_corr(nitems * cell, 0.0);
  std::vector<uint8_t> nonfinite(B, 0);  // some parameter is NaN / Inf
  // Block blk's first layers transposed into dst (D, ld): dst[j, q*h1 + k] = W1[k, j] of network b0 + q.
  auto build_block = [&](int64_t blk, T* dst) {
    const int64_t b0 = blk * nb, nbc = std::min(nb, B - b0);
    for (int64_t q = 0; q < nbc; ++q) {
      nonfinite[b0 + q] = !nets.first_layer_t(b0 + q, dst + q * h1, ld);
    }
  };
  // With several items per block, transpose each block once up front (few blocks: small).
  // Scratch buffers live per thread across calls: a collection calls this every step, and
  // fresh buffers of a few hundred KiB cost page faults on every call. Stale values in padding
  // rows / columns are computed and never summed.
  static thread_local std::vector<T> W1T_all;
  if (nsplit > 1 && W1T_all.size() < static_cast<size_t>(nblocks * D * ld)) W1T_all.resize(nblocks * D * ld);
  T* const w1t_all = W1T_all.data();  // the caller's buffer (inside the lambdas the name is the worker's)
  if (nsplit > 1)
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) build_block(blk, w1t_all + blk * D * ld);
    });
  at::parallel_for(0, nitems, 1, [&](int64_t it0, int64_t it1) {
    Scratch<T> s(net.maxw);
    static thread_local std::vector<T> W1T_own, Gt, G;
    for (auto* v : {&W1T_own, &Gt, &G})
      if (v->size() < static_cast<size_t>(D * ld + kRowTile * ld)) v->resize(D * ld + kRowTile * ld);
    for (int64_t it = it0; it < it1; ++it) {
      const int64_t blk = it / nsplit, chunk = it % nsplit;
      const int64_t b0 = blk * nb, nbc = std::min(nb, B - b0), ncol = nbc * h1;
      const T* W1T = w1t_all + blk * D * ld;
      if (nsplit == 1) {
        build_block(blk, W1T_own.data());
        W1T = W1T_own.data();
      }
      double* pl = part_loss.data() + it * cell;
      double* pc = part_corr.data() + it * cell;
      const int64_t tlo = chunk * ntiles / nsplit, thi = (chunk + 1) * ntiles / nsplit;
      for (int64_t t = tlo; t < thi; ++t) {
        const int64_t t0 = t * kRowTile;
        const int64_t R = std::min(kRowTile, N - t0);
        // 64 rows at a time over all columns: their nonzeros and one weight column tile stay in
        // L2 together (a whole 256-row tile measured 2x slower).
        for (int64_t r0 = 0; r0 < R; r0 += 64)
          csr_rows_times_dense(crow, col, val, order + t0, r0, std::min(R, r0 + 64), W1T, ld, 0,
                               (ncol + kLanes<T> - 1) / kLanes<T> * kLanes<T>, nullptr, Gt.data(), ld);
        transpose(Gt.data(), ld, G.data(), kRowTile, R, ncol);  // (R, ncol) -> (ncol, R), row stride kRowTile
        const int64_t* seg = ts.segs.data() + 3 * ts.tile_start[t];
        const int64_t nseg = ts.tile_start[t + 1] - ts.tile_start[t];
        for (int64_t j = 0; j < nbc; ++j)
          epilogue(net, G.data() + j * h1 * kRowTile, kRowTile, nets.rest(b0 + j), yl + t0, R, seg, nseg, s,
                   pl + j * num_classes, pc + j * num_classes);
      }
    }
  });
  // A network with a NaN / Inf parameter gets NaN sums (its neighbours do not), the public
  // class_metrics contract. The sparse product alone would not give it: it skips the zeros that
  // the dense reference multiplies by the bad weight (0 * Inf = NaN), and an Inf later on can
  // still leave a finite loss.
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t b0 = blk * nb, nbc = std::min(nb, B - b0);
    for (int64_t i = 0; i < nbc * num_classes; ++i) {
      double l = 0, c = 0;
      for (int64_t chunk = 0; chunk < nsplit; ++chunk) {
        l += part_loss[(blk * nsplit + chunk) * cell + i];
        c += part_corr[(blk * nsplit + chunk) * cell + i];
      }
      const bool nan = nonfinite[b0 + i / num_classes];
      loss_out[b0 * num_classes + i] = nan ? NAN : static_cast<float>(l);
      corr_out[b0 * num_classes + i] = nan ? NAN : static_cast<float>(c);
    }
  }
}

// Shape / dtype checks shared by both entry points. X's columns: D; its rows: N.
Net check_net(const char* op, const at::Tensor* params, at::IntArrayRef layer_sizes, int64_t D_x, int64_t N,
              const at::Tensor& y, int64_t num_classes) {
  const int64_t L = static_cast<int64_t>(layer_sizes.size()) - 1;
  TORCH_CHECK(L >= 2, op, ": layer_sizes needs input, hidden and output sizes, got ", layer_sizes);
  int64_t P = 0, maxw = 0;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(layer_sizes[l] > 0 && layer_sizes[l + 1] > 0, op, ": layer sizes must be positive");
    P += layer_sizes[l + 1] * (layer_sizes[l] + 1);
    maxw = std::max(maxw, layer_sizes[l + 1]);
  }
  const int64_t D = layer_sizes[0], h1 = layer_sizes[1], m_out = layer_sizes[L];
  TORCH_CHECK(!params || (params->dim() == 2 && params->size(1) == P), op, ": params must be (B, ", P,
              ") for layer_sizes ", layer_sizes, ", got ", params ? params->sizes() : at::IntArrayRef{});
  TORCH_CHECK(D_x == D, op, ": X must be (N, ", D, ") for layer_sizes ", layer_sizes, ", got ", D_x, " columns");
  TORCH_CHECK(y.dim() == 1 && y.size(0) == N && y.scalar_type() == at::kLong, op,
              ": y must be int64 of shape (N,) = (", N, ",)");
  TORCH_CHECK(num_classes > 0 && num_classes <= m_out, op, ": num_classes must be in [1, ", m_out, "], got ",
              num_classes);
  if (N > 0) {
    const auto yc = y.contiguous();
    const int64_t* yp = yc.data_ptr<int64_t>();
    const auto [lo, hi] = std::minmax_element(yp, yp + N);
    TORCH_CHECK(*lo >= 0 && *hi < num_classes, op, ": labels must be in [0, ", num_classes, "), got range [", *lo,
                ", ", *hi, "]");
  }
  return Net{layer_sizes.data(), L, P - h1 * D, maxw};
}

// Labels in sorted order: the row order (stable), the sorted labels as int32 padded to a
// whole number of vectors (padded inputs are computed, never summed), and the tiles' class runs.
struct LabelOrder {
  at::Tensor order;
  std::vector<int32_t> yl;
  TileSegments ts;
};

LabelOrder label_order(const at::Tensor& y) {
  const int64_t N = y.size(0);
  auto order = std::get<1>(y.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false)).contiguous();
  auto ys = y.index_select(0, order).contiguous();
  std::vector<int32_t> yl(N + kRowTile, 0);
  for (int64_t i = 0; i < N; ++i) yl[i] = static_cast<int32_t>(ys.data_ptr<int64_t>()[i]);
  return {order, std::move(yl), tile_segments(ys.data_ptr<int64_t>(), N)};
}

std::tuple<at::Tensor, at::Tensor> class_metrics_cpu(const at::Tensor& params, const at::Tensor& X,
                                                     const at::Tensor& y, at::IntArrayRef layer_sizes,
                                                     int64_t num_classes) {
  TORCH_CHECK(X.dim() == 2, "hyforget.class_metrics: X must be 2-D (N, D), got ", X.sizes());
  const Net net = check_net("hyforget.class_metrics", &params, layer_sizes, X.size(1), X.size(0), y, num_classes);
  TORCH_CHECK(params.scalar_type() == X.scalar_type(), "hyforget.class_metrics: params (", params.scalar_type(),
              ") and X (", X.scalar_type(), ") must have the same dtype");
  const int64_t B = params.size(0), N = X.size(0);
  auto loss = at::zeros({B, num_classes}, params.options().dtype(at::kFloat));
  auto corr = at::zeros({B, num_classes}, params.options().dtype(at::kFloat));
  if (B == 0 || N == 0) return {loss, corr};

  const auto cdt = params.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const LabelOrder lo = label_order(y);
  auto Xs = X.index_select(0, lo.order).to(cdt);  // (N, D) rows grouped by label
  const Columns cols = split_columns(Xs);
  if (cols.dropped.numel() > 0) Xs = Xs.index_select(1, cols.used);  // (N, D_used)
  Xs = Xs.contiguous();
  const int64_t nb = block_size(B, net.sizes[1], at::get_num_threads());
  auto pc = params.contiguous();
  if (cdt == at::kDouble)
    run_blocks<double>(pc, Xs, cols, lo.yl.data(), lo.ts, net, nb, num_classes, loss.data_ptr<float>(),
                       corr.data_ptr<float>());
  else
    run_blocks<float>(pc, Xs, cols, lo.yl.data(), lo.ts, net, nb, num_classes, loss.data_ptr<float>(),
                      corr.data_ptr<float>());
  return {loss, corr};
}

// X as CSR arrays over D columns: shapes, row pointers and column indices.
void check_csr_x(const char* op, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val, int64_t D) {
  TORCH_CHECK(crow.dim() == 1 && crow.size(0) >= 1 && crow.scalar_type() == at::kLong && crow.is_contiguous() &&
                  col.dim() == 1 && col.scalar_type() == at::kLong && col.is_contiguous() && val.dim() == 1 &&
                  val.size(0) == col.size(0) && val.is_contiguous(),
              op, ": X must be CSR arrays crow (N + 1,), col (nnz,), val (nnz,), contiguous, int64 indices");
  const int64_t N = crow.size(0) - 1;
  const int64_t* cp = crow.data_ptr<int64_t>();
  const int64_t* cc = col.data_ptr<int64_t>();
  TORCH_CHECK(cp[0] == 0 && cp[N] == col.size(0), op, ": crow must run from 0 to nnz = ", col.size(0));
  for (int64_t r = 0; r < N; ++r) TORCH_CHECK(cp[r] <= cp[r + 1], op, ": crow must be nondecreasing (row ", r, ")");
  if (!indices_in_range(cc, cp[N], D))  // find it only to name it
    for (int64_t p = 0; p < cp[N]; ++p)
      TORCH_CHECK(cc[p] >= 0 && cc[p] < D, op, ": column index ", cc[p], " out of range [0, ", D, ")");
}

template <typename MakeNets>
std::tuple<at::Tensor, at::Tensor> score_csr(const MakeNets& make_nets, int64_t B, const at::TensorOptions& opts,
                                             const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                                             const at::Tensor& y, const Net& net, int64_t num_classes) {
  const int64_t N = crow.size(0) - 1;
  auto loss = at::zeros({B, num_classes}, opts.dtype(at::kFloat));
  auto corr = at::zeros({B, num_classes}, opts.dtype(at::kFloat));
  if (B == 0 || N == 0) return {loss, corr};
  const LabelOrder lo = label_order(y);
  AT_DISPATCH_FLOATING_TYPES(val.scalar_type(), "class_metrics_csr", [&] {
    const auto nets = make_nets(scalar_t(0));
    run_csr<scalar_t>(nets, B, crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(), val.data_ptr<scalar_t>(),
                      lo.order.data_ptr<int64_t>(), N, lo.yl.data(), lo.ts, net, num_classes, loss.data_ptr<float>(),
                      corr.data_ptr<float>());
  });
  return {loss, corr};
}

std::tuple<at::Tensor, at::Tensor> class_metrics_csr_cpu(const at::Tensor& params, const at::Tensor& crow,
                                                         const at::Tensor& col, const at::Tensor& val,
                                                         const at::Tensor& y, at::IntArrayRef layer_sizes,
                                                         int64_t num_classes) {
  const char* op = "hyforget.class_metrics_csr";
  const int64_t D = layer_sizes.empty() ? 0 : layer_sizes[0];
  check_csr_x(op, crow, col, val, D);
  TORCH_CHECK(params.scalar_type() == val.scalar_type() &&
                  (val.scalar_type() == at::kFloat || val.scalar_type() == at::kDouble),
              op, ": params (", params.scalar_type(), ") and X's values (", val.scalar_type(),
              ") must both be float32 or both float64");
  const Net net = check_net(op, &params, layer_sizes, D, crow.size(0) - 1, y, num_classes);
  const auto pc = params.contiguous();
  auto make = [&](auto zero) {
    using T = decltype(zero);
    return FlatNets<T>{pc.data_ptr<T>(), pc.size(1), D, net.sizes[1]};
  };
  return score_csr(make, params.size(0), params.options(), crow, col, val, y, net, num_classes);
}

std::tuple<at::Tensor, at::Tensor> class_metrics_runs_csr_cpu(const at::Tensor& w1t, const at::Tensor& b1,
                                                              const at::Tensor& head, const at::Tensor& runs,
                                                              const at::Tensor& crow, const at::Tensor& col,
                                                              const at::Tensor& val, const at::Tensor& y,
                                                              at::IntArrayRef layer_sizes, int64_t num_classes) {
  const char* op = "hyforget.class_metrics_runs_csr";
  const int64_t D = layer_sizes.empty() ? 0 : layer_sizes[0];
  check_csr_x(op, crow, col, val, D);
  const Net net = check_net(op, nullptr, layer_sizes, D, crow.size(0) - 1, y, num_classes);
  const int64_t h1 = net.sizes[1], P_head = net.rest - h1, R = b1.size(0);
  for (const auto* t : {&w1t, &b1, &head, &runs})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), op, ": w1t, b1, head and runs must be contiguous CPU tensors");
  TORCH_CHECK(w1t.scalar_type() == val.scalar_type() && b1.scalar_type() == val.scalar_type() &&
                  head.scalar_type() == val.scalar_type() &&
                  (val.scalar_type() == at::kFloat || val.scalar_type() == at::kDouble),
              op, ": w1t, b1, head and X's values must all be float32 or all float64");
  TORCH_CHECK(b1.dim() == 2 && b1.size(1) == h1, op, ": b1 must be (R, ", h1, "), got ", b1.sizes());
  TORCH_CHECK(w1t.dim() == 2 && w1t.size(0) == D && w1t.size(1) == R * h1, op, ": w1t must be (", D, ", R*",
              h1, ") = (", D, ", ", R * h1, "), got ", w1t.sizes());
  TORCH_CHECK(head.dim() == 2 && head.size(0) == R && head.size(1) == P_head, op, ": head must be (R, ", P_head,
              ") = (", R, ", ", P_head, "), got ", head.sizes());
  TORCH_CHECK(runs.dim() == 1 && runs.scalar_type() == at::kLong, op, ": runs must be an int64 vector");
  const int64_t* rp = runs.data_ptr<int64_t>();
  for (int64_t b = 0; b < runs.size(0); ++b)
    TORCH_CHECK(rp[b] >= 0 && rp[b] < R, op, ": run ", rp[b], " out of range [0, ", R, ")");
  auto make = [&](auto zero) {
    using T = decltype(zero);
    return TransposedNets<T>(w1t.data_ptr<T>(), R * h1, b1.data_ptr<T>(), head.data_ptr<T>(), P_head, rp,
                             runs.size(0), D, h1);
  };
  return score_csr(make, runs.size(0), w1t.options(), crow, col, val, y, net, num_classes);
}

}  // namespace

TORCH_LIBRARY_IMPL(hyforget, CPU, m) {
  m.impl("class_metrics", &class_metrics_cpu);
  m.impl("class_metrics_csr", &class_metrics_csr_cpu);
  m.impl("class_metrics_runs_csr", &class_metrics_runs_csr_cpu);
}

}  // namespace hyforget
