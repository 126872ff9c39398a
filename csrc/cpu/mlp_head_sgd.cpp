// CPU implementation of mlp_head_sgd_: one SGD step of the layers after the first of R small
// ReLU MLPs on a shared minibatch, for checkpoint collection (hyforget_fast/collection/collect.py).
//
// Given the first layer's pre-activations z1 (S, R*H1) (bias included) of every run, each run
// r does: ReLU, forward through its later layers, softmax cross-entropy against y, gradient
// weighted per example by wn[r, s] * lr[r] (the weighted-mean loss with the learning rate
// folded in), backward, and in place W_l -= gW_l, b_l -= gb_l for l >= 1 and b1 -= gb1. It
// returns G (S, R*H1), the lr-scaled gradient of the first-layer pre-activations, for the
// first layer's own (sparse) update. The same math as BlockTrainer.sgd_step's torch path,
// which is its reference; here the work of a run (~10 KFLOP for [.., 7, 10]) runs in one loop
// nest instead of ~20 batched torch ops whose dispatch cost far exceeds it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/mathfun.h"
#include "cpu/vec.h"

namespace hyforget {
namespace {

// Sums over the S examples in kLanes independent lanes, so they vectorize without letting
// the compiler reassociate (which would also break exp_nonpos's rounding trick). b == nullptr: sum a.
template <typename T>
static inline __attribute__((always_inline)) T lane_dot(const T* a, const T* b, int64_t S) {
  constexpr int64_t V = kLanes<T>;
  T acc[V] = {};
  int64_t s = 0;
  for (; s + V <= S; s += V)
    for (int64_t v = 0; v < V; ++v) acc[v] += b ? a[s + v] * b[s + v] : a[s + v];
  T r = T(0);
  for (; s < S; ++s) r += b ? a[s] * b[s] : a[s];
  for (int64_t v = 0; v < V; ++v) r += acc[v];
  return r;
}

// Every activation and gradient is stored feature-major, [unit][example], so the inner loops
// run over the S examples of the minibatch and vectorize.
template <typename T>
static inline __attribute__((always_inline)) void run_head_impl(int64_t r0, int64_t r1, const T* z1, int64_t ldz,
                                                                T* head, int64_t P_head, T* b1, const int64_t* y,
                                                                const T* wn, const T* lr, const int64_t* sizes,
                                                                int64_t L, int64_t S, T* G) {
  const int64_t H1 = sizes[1], m = sizes[L];
  int64_t maxw = 0;
  for (int64_t l = 1; l <= L; ++l) maxw = std::max(maxw, sizes[l]);
  std::vector<T> zbuf(L * maxw * S), abuf(L * maxw * S), g(maxw * S), gp(maxw * S), mx(S), sum(S), scale(S);
  auto Z = [&](int64_t l) { return zbuf.data() + l * maxw * S; };  // (n_l, S) pre-activations
  auto A = [&](int64_t l) { return abuf.data() + l * maxw * S; };  // (n_l, S) after ReLU
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t k = 0; k < H1; ++k)
      for (int64_t s = 0; s < S; ++s) {
        const T v = z1[s * ldz + r * H1 + k];
        Z(0)[k * S + s] = v;
        A(0)[k * S + s] = v > T(0) ? v : T(0);
      }
    T* hp = head + r * P_head;
    int64_t off = 0;
    for (int64_t l = 1; l < L; ++l) {  // forward
      const int64_t fi = sizes[l], fo = sizes[l + 1];
      const T* W = hp + off;
      const T* b = W + fo * fi;
      const T* ain = A(l - 1);
      T* zo = Z(l);
      T* ao = A(l);
      for (int64_t o = 0; o < fo; ++o) {
        for (int64_t s = 0; s < S; ++s) zo[o * S + s] = b[o];
        for (int64_t i = 0; i < fi; ++i) {
          const T w = W[o * fi + i];
          for (int64_t s = 0; s < S; ++s) zo[o * S + s] += w * ain[i * S + s];
        }
        for (int64_t s = 0; s < S; ++s) {
          const T v = zo[o * S + s];
          ao[o * S + s] = (l < L - 1 && !(v > T(0))) ? T(0) : v;
        }
      }
      off += fo * fi + fo;
    }
    const T* zl = Z(L - 1);  // logits (m, S): dCE/dlogits = softmax - onehot, times wn * lr
    for (int64_t s = 0; s < S; ++s) {
      mx[s] = zl[s];
      sum[s] = T(0);
      scale[s] = wn[r * S + s] * lr[r];
    }
    for (int64_t c = 1; c < m; ++c)
      for (int64_t s = 0; s < S; ++s) mx[s] = zl[c * S + s] > mx[s] ? zl[c * S + s] : mx[s];
    for (int64_t c = 0; c < m; ++c)
      for (int64_t s = 0; s < S; ++s) sum[s] += (g[c * S + s] = exp_nonpos(zl[c * S + s] - mx[s]));
    for (int64_t c = 0; c < m; ++c)
      for (int64_t s = 0; s < S; ++s)
        g[c * S + s] = (g[c * S + s] / sum[s] - (y[s] == c ? T(1) : T(0))) * scale[s];
    for (int64_t l = L - 1; l >= 1; --l) {  // backward; W_l's gradient uses the old W_l
      const int64_t fi = sizes[l], fo = sizes[l + 1];
      off -= fo * fi + fo;
      T* W = hp + off;
      T* b = W + fo * fi;
      const T* ain = A(l - 1);
      const T* zin = Z(l - 1);
      for (int64_t i = 0; i < fi; ++i) {
        for (int64_t s = 0; s < S; ++s) gp[i * S + s] = T(0);
        for (int64_t o = 0; o < fo; ++o) {
          const T w = W[o * fi + i];
          for (int64_t s = 0; s < S; ++s) gp[i * S + s] += w * g[o * S + s];
        }
        for (int64_t s = 0; s < S; ++s) gp[i * S + s] = zin[i * S + s] > T(0) ? gp[i * S + s] : T(0);  // ReLU
      }
      for (int64_t o = 0; o < fo; ++o) {
        for (int64_t i = 0; i < fi; ++i) W[o * fi + i] -= lane_dot(g.data() + o * S, ain + i * S, S);
        b[o] -= lane_dot<T>(g.data() + o * S, nullptr, S);
      }
      g.swap(gp);
    }
    for (int64_t k = 0; k < H1; ++k) {  // g is now (H1, S): the first layer's
      for (int64_t s = 0; s < S; ++s) G[s * ldz + r * H1 + k] = g[k * S + s];
      b1[r * H1 + k] -= lane_dot<T>(g.data() + k * S, nullptr, S);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HF_CLONES
#endif

HF_CLONES void run_head_f32(int64_t r0, int64_t r1, const float* z1, int64_t ldz, float* head, int64_t P_head,
                            float* b1, const int64_t* y, const float* wn, const float* lr, const int64_t* sizes,
                            int64_t L, int64_t S, float* G) {
  run_head_impl<float>(r0, r1, z1, ldz, head, P_head, b1, y, wn, lr, sizes, L, S, G);
}
void run_head(int64_t r0, int64_t r1, const float* z1, int64_t ldz, float* head, int64_t P_head, float* b1,
              const int64_t* y, const float* wn, const float* lr, const int64_t* sizes, int64_t L, int64_t S,
              float* G) {
  run_head_f32(r0, r1, z1, ldz, head, P_head, b1, y, wn, lr, sizes, L, S, G);
}
void run_head(int64_t r0, int64_t r1, const double* z1, int64_t ldz, double* head, int64_t P_head, double* b1,
              const int64_t* y, const double* wn, const double* lr, const int64_t* sizes, int64_t L, int64_t S,
              double* G) {
  run_head_impl<double>(r0, r1, z1, ldz, head, P_head, b1, y, wn, lr, sizes, L, S, G);
}

at::Tensor mlp_head_sgd_cpu(const at::Tensor& z1, const at::Tensor& head, const at::Tensor& b1, const at::Tensor& y,
                            const at::Tensor& wn, const at::Tensor& lr, at::IntArrayRef layer_sizes) {
  const char* op = "hyforget.mlp_head_sgd_";
  const int64_t L = static_cast<int64_t>(layer_sizes.size()) - 1;
  TORCH_CHECK(L >= 2, op, ": layer_sizes needs input, hidden and output sizes, got ", layer_sizes);
  int64_t P_head = 0;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(layer_sizes[l] > 0 && layer_sizes[l + 1] > 0, op, ": layer sizes must be positive");
    if (l >= 1) P_head += layer_sizes[l + 1] * (layer_sizes[l] + 1);
  }
  const int64_t H1 = layer_sizes[1], R = b1.size(0), S = y.size(0);
  for (const auto* t : {&z1, &head, &b1, &y, &wn, &lr})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), op, ": every tensor must be a contiguous CPU tensor");
  const auto dt = z1.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, ": z1 must be float32 or float64, got ", dt);
  TORCH_CHECK(head.scalar_type() == dt && b1.scalar_type() == dt && wn.scalar_type() == dt && lr.scalar_type() == dt,
              op, ": head, b1, wn and lr must have z1's dtype ", dt);
  TORCH_CHECK(b1.dim() == 2 && b1.size(1) == H1, op, ": b1 must be (R, ", H1, "), got ", b1.sizes());
  TORCH_CHECK(z1.dim() == 2 && z1.size(0) == S && z1.size(1) == R * H1, op, ": z1 must be (S, R*H1) = (", S, ", ",
              R * H1, "), got ", z1.sizes());
  TORCH_CHECK(head.dim() == 2 && head.size(0) == R && head.size(1) == P_head, op, ": head must be (R, ", P_head,
              ") for layer_sizes ", layer_sizes, ", got ", head.sizes());
  TORCH_CHECK(y.dim() == 1 && y.scalar_type() == at::kLong, op, ": y must be an int64 vector");
  TORCH_CHECK(wn.dim() == 2 && wn.size(0) == R && wn.size(1) == S, op, ": wn must be (R, S) = (", R, ", ", S,
              "), got ", wn.sizes());
  TORCH_CHECK(lr.dim() == 1 && lr.size(0) == R, op, ": lr must be (R,) = (", R, ",), got ", lr.sizes());
  const int64_t m = layer_sizes[L];
  const int64_t* yp = y.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(yp[s] >= 0 && yp[s] < m, op, ": label ", yp[s], " out of range [0, ", m, ")");
  auto G = at::empty({S, R * H1}, z1.options());
  const std::vector<int64_t> sizes(layer_sizes.begin(), layer_sizes.end());
  AT_DISPATCH_FLOATING_TYPES(dt, "mlp_head_sgd_", [&] {
    at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
      run_head(r0, r1, z1.data_ptr<scalar_t>(), R * H1, head.data_ptr<scalar_t>(), P_head, b1.data_ptr<scalar_t>(),
               yp, wn.data_ptr<scalar_t>(), lr.data_ptr<scalar_t>(), sizes.data(), L, S, G.data_ptr<scalar_t>());
    });
  });
  return G;
}

}  // namespace

TORCH_LIBRARY_IMPL(hyforget, CPU, m) { m.impl("mlp_head_sgd_", &mlp_head_sgd_cpu); }

}  // namespace hyforget
