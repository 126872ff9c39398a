// Fused CPU evaluation of B ReLU MLPs on one labelled set (issue 3): per-class sums of
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
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace hyforget {
namespace {

// Every helper of the epilogue is force-inlined so each target clone of epilogue_f32 gets its
// own vectorized copy (a plain `inline` helper would be compiled once, for baseline x86-64).
#define HF_INLINE inline __attribute__((always_inline))

// Tile sizes, measured on a 2-core AMD EPYC (1 MiB L2 per core): 256 or 512 rows with ~512
// columns keep the tile epilogue within ~5-15% of the GEMM; 1024 columns or 128 rows are slower.
constexpr int64_t kRowTile = 256;     // inputs per tile (the G buffer's row length)
constexpr int64_t kTargetCols = 512;  // first-layer outputs (networks x h1) per block

// exp(x) for x <= 0 or NaN, Cephes expf (about 1 ulp), branch-free so loops vectorize.
// Arguments below -87.3 return ~1e-38 instead of 0: harmless inside a sum that is >= 1.
static HF_INLINE float exp_nonpos(float x) {
  x = x < -87.3f ? -87.3f : x;                    // a NaN compares false and stays NaN
  const float xs = x == x ? x : 0.f;              // NaN-free copy for the integer exponent
  const float n = (xs * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.f;
  const uint32_t e = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;  // 2^n, n >= -126
  return p * std::bit_cast<float>(e);
}
static HF_INLINE double exp_nonpos(double x) { return std::exp(x); }

// Dimensions shared by every network in a call.
struct Net {
  const int64_t* sizes;  // layer_sizes, L + 1 entries
  int64_t L;             // number of layers
  int64_t rest;          // parameters per network after W1 (b1, W2, b2, ...)
  int64_t maxw;          // widest layer after the input
};

// log(x) for x >= 1 or NaN (a softmax denominator), Cephes logf (about 1 ulp), branch-free.
static HF_INLINE float log_ge1(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 127);
  float m = std::bit_cast<float>((bits & 0x007fffffu) | 0x3f800000u);  // mantissa in [1, 2)
  const bool big = m > 1.41421356f;                                     // fold to [sqrt(1/2), sqrt(2))
  m = big ? m * 0.5f : m;
  e = big ? e + 1.f : e;
  const float f = m - 1.f, z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float r = p * f * z;
  r = r + e * -2.12194440e-4f;
  r = r - 0.5f * z;
  r = f + r;
  r = r + e * 0.693359375f;
  return x == x ? r : x;
}
static HF_INLINE double log_ge1(double x) { return std::log(x); }

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
  constexpr int64_t V = kV<T>;
  const int64_t h1 = net.sizes[1];
  for (int64_t k = 0; k < h1; ++k) {
    const T bk = rp[k];
    for (int64_t v = 0; v < V; ++v) {
      const T x = g[k * ldg + v] + bk;
      a[k * V + v] = x < T(0) ? T(0) : x;
    }
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
      T acc[V];
      for (int64_t v = 0; v < V; ++v) acc[v] = W[o * fi] * in[v];
      for (int64_t i = 1; i < fi; ++i) {
        const T w = W[o * fi + i];
        for (int64_t v = 0; v < V; ++v) acc[v] += w * in[i * V + v];
      }
      const T bo = b[o];
      for (int64_t v = 0; v < V; ++v) {
        const T x = acc[v] + bo;
        out[o * V + v] = (last || !(x < T(0))) ? x : T(0);
      }
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

std::tuple<at::Tensor, at::Tensor> class_metrics_cpu(const at::Tensor& params, const at::Tensor& X,
                                                     const at::Tensor& y, at::IntArrayRef layer_sizes,
                                                     int64_t num_classes) {
  const int64_t L = static_cast<int64_t>(layer_sizes.size()) - 1;
  TORCH_CHECK(L >= 2, "hyforget.class_metrics: layer_sizes needs input, hidden and output sizes, got ", layer_sizes);
  int64_t P = 0, maxw = 0;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(layer_sizes[l] > 0 && layer_sizes[l + 1] > 0, "hyforget.class_metrics: layer sizes must be positive");
    P += layer_sizes[l + 1] * (layer_sizes[l] + 1);
    maxw = std::max(maxw, layer_sizes[l + 1]);
  }
  const int64_t D = layer_sizes[0], h1 = layer_sizes[1], m_out = layer_sizes[L];
  TORCH_CHECK(params.dim() == 2 && params.size(1) == P, "hyforget.class_metrics: params must be (B, ", P,
              ") for layer_sizes ", layer_sizes, ", got ", params.sizes());
  TORCH_CHECK(X.dim() == 2 && X.size(1) == D, "hyforget.class_metrics: X must be (N, ", D, "), got ", X.sizes());
  TORCH_CHECK(y.dim() == 1 && y.size(0) == X.size(0) && y.scalar_type() == at::kLong,
              "hyforget.class_metrics: y must be int64 of shape (N,) = (", X.size(0), ",)");
  TORCH_CHECK(params.scalar_type() == X.scalar_type(), "hyforget.class_metrics: params (", params.scalar_type(),
              ") and X (", X.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(num_classes > 0 && num_classes <= m_out, "hyforget.class_metrics: num_classes must be in [1, ", m_out,
              "], got ", num_classes);
  const int64_t B = params.size(0), N = X.size(0);
  if (N > 0) {
    const int64_t lo = y.min().item<int64_t>(), hi = y.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < num_classes, "hyforget.class_metrics: labels must be in [0, ", num_classes,
                "), got range [", lo, ", ", hi, "]");
  }
  auto loss = at::zeros({B, num_classes}, params.options().dtype(at::kFloat));
  auto corr = at::zeros({B, num_classes}, params.options().dtype(at::kFloat));
  if (B == 0 || N == 0) return {loss, corr};

  const auto cdt = params.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto order = std::get<1>(y.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  auto ys = y.index_select(0, order).contiguous();
  auto Xs = X.index_select(0, order).to(cdt);  // (N, D) rows grouped by label
  const Columns cols = split_columns(Xs);
  if (cols.dropped.numel() > 0) Xs = Xs.index_select(1, cols.used);  // (N, D_used)
  Xs = Xs.contiguous();
  const TileSegments ts = tile_segments(ys.data_ptr<int64_t>(), N);
  // int32 labels padded to a whole number of vectors; padded inputs are computed, never summed.
  std::vector<int32_t> yl(N + kRowTile, 0);
  for (int64_t i = 0; i < N; ++i) yl[i] = static_cast<int32_t>(ys.data_ptr<int64_t>()[i]);
  const Net net{layer_sizes.data(), L, P - h1 * D, maxw};
  const int64_t nb = block_size(B, h1, at::get_num_threads());
  auto pc = params.contiguous();
  if (cdt == at::kDouble)
    run_blocks<double>(pc, Xs, cols, yl.data(), ts, net, nb, num_classes, loss.data_ptr<float>(), corr.data_ptr<float>());
  else
    run_blocks<float>(pc, Xs, cols, yl.data(), ts, net, nb, num_classes, loss.data_ptr<float>(), corr.data_ptr<float>());
  return {loss, corr};
}

}  // namespace

TORCH_LIBRARY_IMPL(hyforget, CPU, m) { m.impl("class_metrics", &class_metrics_cpu); }

}  // namespace hyforget
