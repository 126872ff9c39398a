// C++ CPU implementation of gather_pieces / scatter_pieces: parallel over the batch, one
// pass over memory. Row-contiguous pieces (no column permutation) become straight
// vectorizable loops; the first layer, which holds almost all parameters, is always one.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <sys/mman.h>

#include "piece_table.h"

namespace hyforget {
namespace {

void check_table(const at::Tensor& table) {
  TORCH_CHECK(table.dim() == 2 && table.size(1) == NUM_PIECE_COLS && table.scalar_type() == at::kLong &&
                  table.device().is_cpu(),
              "hyforget: piece table must be a CPU int64 tensor of shape (n_pieces, ", int(NUM_PIECE_COLS), ")");
}

// Number of values from the first to one past the last position a piece touches in a row of
// tokens (the rows it writes in gather, reads in scatter).
int64_t token_extent(const int64_t* e, bool gather) {
  const int64_t n = e[ROWS] * e[COLS];
  if (piece_contiguous(e)) return gather ? e[DLEN] : n;
  return n == 0 ? 0 : (e[ROWS] - 1) * e[RS] + (e[COLS] - 1) * e[CS] + 1;
}

// Every piece must read inside a row of `src_width` values and write inside a row of
// `dst_width` values; a contiguous piece owns DLEN output values (gather), others ROWS*COLS at
// their strides. -> the number of token positions the pieces own (== the token row's width
// when they tile it; fewer means some positions belong to no piece and must be zeroed).
int64_t check_pieces(const int64_t* tab, int64_t npieces, int64_t src_width, int64_t dst_width, bool gather) {
  int64_t owned = 0;
  for (int64_t p = 0; p < npieces; ++p) {
    const int64_t* e = tab + p * NUM_PIECE_COLS;
    const int64_t n = e[ROWS] * e[COLS];
    const bool contiguous = piece_contiguous(e);
    TORCH_CHECK(e[DLEN] >= n, "hyforget: piece ", p, " has DLEN < ROWS*COLS");
    TORCH_CHECK(e[RS] >= 1 && e[CS] >= 1, "hyforget: piece ", p, " needs strides RS, CS >= 1");
    TORCH_CHECK(contiguous || (e[DLEN] == n && (e[CS] * e[COLS] <= e[RS] || e[RS] * e[ROWS] <= e[CS])),
                "hyforget: strided piece ", p, " must have DLEN == ROWS*COLS and be row- or column-major");
    const int64_t tok_off = e[DST], flat_off = e[SRC], ext = token_extent(e, gather);
    const int64_t in_off = gather ? flat_off : tok_off, out_off = gather ? tok_off : flat_off;
    const int64_t in_len = gather ? n : ext, out_len = gather ? ext : n;
    TORCH_CHECK(in_off >= 0 && in_off + in_len <= src_width, "hyforget: piece ", p, " reads past a row of ", src_width);
    TORCH_CHECK(out_off >= 0 && out_off + out_len <= dst_width, "hyforget: piece ", p, " writes past a row of ",
                dst_width);
    owned += contiguous ? e[DLEN] : n;
  }
  return owned;
}

const float* norm_ptr(const c10::optional<at::Tensor>& norm, const at::Tensor& table) {
  if (!norm.has_value()) return nullptr;
  TORCH_CHECK(norm->scalar_type() == at::kFloat && norm->dim() == 2 && norm->size(1) == 2 && norm->is_contiguous(),
              "hyforget: norm must be a contiguous float32 (n_pieces, 2) tensor");
  auto t = table.accessor<int64_t, 2>();
  for (int64_t p = 0; p < table.size(0); ++p)
    TORCH_CHECK(t[p][NORM] >= 0 && t[p][NORM] < norm->size(0), "hyforget: norm table has too few rows");
  return norm->data_ptr<float>();
}

template <typename T>
void gather_sample(const T* src, T* dst, const int64_t* perm, const int64_t* tab,
                   int64_t npieces, const float* norm, bool* bad) {
  for (int64_t p = 0; p < npieces; ++p) {
    const int64_t* e = tab + p * NUM_PIECE_COLS;
    const int64_t rows = e[ROWS], cols = e[COLS], rs = e[RS], cs = e[CS];
    const int64_t* rp = (perm && e[RPERM] >= 0) ? perm + e[RPERM] : nullptr;
    const int64_t* cp = (perm && e[CPERM] >= 0) ? perm + e[CPERM] : nullptr;
    const T* s = src + e[SRC];
    T* d = dst + e[DST];
    const float shift = norm ? norm[2 * e[NORM]] : 0.f;
    const float scale = norm ? norm[2 * e[NORM] + 1] : 1.f;
    for (int64_t r = 0; r < rows; ++r) {
      int64_t sr = rp ? rp[r] : r;
      if (static_cast<uint64_t>(sr) >= static_cast<uint64_t>(rows)) { *bad = true; sr = 0; }
      const T* srow = s + sr * cols;
      T* drow = d + r * rs;
      if (cs != 1) {  // strided destination (the neuron layout's outgoing weights): no fast path
        for (int64_t c = 0; c < cols; ++c) {
          int64_t sc = cp ? cp[c] : c;
          if (static_cast<uint64_t>(sc) >= static_cast<uint64_t>(cols)) { *bad = true; sc = 0; }
          drow[c * cs] = norm ? static_cast<T>((static_cast<float>(srow[sc]) - shift) * scale) : srow[sc];
        }
      } else if (cp) {
        for (int64_t c = 0; c < cols; ++c) {
          int64_t sc = cp[c];
          if (static_cast<uint64_t>(sc) >= static_cast<uint64_t>(cols)) { *bad = true; sc = 0; }
          drow[c] = norm ? static_cast<T>((static_cast<float>(srow[sc]) - shift) * scale) : srow[sc];
        }
      } else if (norm) {
        for (int64_t c = 0; c < cols; ++c) drow[c] = static_cast<T>((static_cast<float>(srow[c]) - shift) * scale);
      } else {
        std::copy(srow, srow + cols, drow);
      }
    }
    if (piece_contiguous(e)) std::fill(d + rows * cols, d + e[DLEN], T(0));  // a strided piece has no padding
  }
}

void gather_pieces_out_cpu(const at::Tensor& params, const at::Tensor& table, const c10::optional<at::Tensor>& perms,
                           const c10::optional<at::Tensor>& norm, const at::Tensor& out) {
  check_table(table);
  TORCH_CHECK(params.dim() == 2, "hyforget: params must be (B, P), got ", params.sizes());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == params.size(0) && out.is_contiguous() &&
                  out.scalar_type() == params.scalar_type() && out.device().is_cpu(),
              "hyforget: out must be a contiguous CPU (B, out_width) tensor of the params' dtype");
  const int64_t out_width = out.size(1);
  auto x = params.contiguous();
  const int64_t B = x.size(0), P = x.size(1);
  const int64_t* tab = table.data_ptr<int64_t>();
  const int64_t npieces = table.size(0);
  // pieces that leave positions unowned (a table that does not tile the row): zero the rows first
  const bool prefill = check_pieces(tab, npieces, P, out_width, /*gather=*/true) != out_width;
  const int64_t* pp = nullptr;
  int64_t pw = 0;
  at::Tensor pc;
  if (perms.has_value()) {
    TORCH_CHECK(perms->scalar_type() == at::kLong && perms->dim() == 2 && perms->size(0) == B && perms->device().is_cpu(),
                "hyforget: perms must be a CPU int64 (B, H) tensor");
    pc = perms->contiguous();
    pp = pc.data_ptr<int64_t>();
    pw = pc.size(1);
    for (int64_t p = 0; p < npieces; ++p) {
      const int64_t* e = tab + p * NUM_PIECE_COLS;
      TORCH_CHECK(e[RPERM] < 0 || e[RPERM] + e[ROWS] <= pw, "hyforget: perms too narrow for piece ", p);
      TORCH_CHECK(e[CPERM] < 0 || e[CPERM] + e[COLS] <= pw, "hyforget: perms too narrow for piece ", p);
    }
  }
  const float* np = norm_ptr(norm, table);
  std::atomic<bool> any_bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_pieces_cpu", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      bool bad = false;
      for (int64_t b = b0; b < b1; ++b) {
        if (prefill) std::fill(dst + b * out_width, dst + (b + 1) * out_width, scalar_t(0));
        gather_sample(src + b * P, dst + b * out_width, pp ? pp + b * pw : nullptr, tab, npieces, np, &bad);
      }
      if (bad) any_bad = true;
    });
  });
  TORCH_CHECK(!any_bad.load(), "hyforget: perms contains an index out of range for its hidden layer");
}

// A fresh output of many MiB is faulted in 4 KiB page by page on first write, which costs as
// much as the gather itself. Where transparent huge pages are in "madvise" mode, asking for
// them on the still-untouched buffer cuts the faults 512-fold. Only a hint: failure is harmless.
void advise_huge_pages(void* p, size_t nbytes) {
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (nbytes < 4 * kHuge) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + nbytes) & ~(kHuge - 1);
  if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
}

at::Tensor gather_pieces_cpu(const at::Tensor& params, const at::Tensor& table, const c10::optional<at::Tensor>& perms,
                             const c10::optional<at::Tensor>& norm, int64_t out_width) {
  TORCH_CHECK(params.dim() == 2, "hyforget: params must be (B, P), got ", params.sizes());
  auto out = at::empty({params.size(0), out_width}, params.options().memory_format(at::MemoryFormat::Contiguous));
  advise_huge_pages(out.data_ptr(), out.nbytes());
  gather_pieces_out_cpu(params, table, perms, norm, out);
  return out;
}

at::Tensor scatter_pieces_cpu(const at::Tensor& tokens, const at::Tensor& table, const c10::optional<at::Tensor>& norm,
                              int64_t out_width) {
  check_table(table);
  TORCH_CHECK(tokens.dim() == 2, "hyforget: tokens must be (B, T*chunk), got ", tokens.sizes());
  auto x = tokens.contiguous();
  const int64_t B = x.size(0), W = x.size(1);
  const int64_t* tab = table.data_ptr<int64_t>();
  const int64_t npieces = table.size(0);
  check_pieces(tab, npieces, W, out_width, /*gather=*/false);
  const float* np = norm_ptr(norm, table);
  auto out = at::empty({B, out_width}, x.options());
  advise_huge_pages(out.data_ptr(), out.nbytes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scatter_pieces_cpu", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t p = 0; p < npieces; ++p) {
          const int64_t* e = tab + p * NUM_PIECE_COLS;
          const int64_t n = e[ROWS] * e[COLS];
          const scalar_t* s = src + b * W + e[DST];
          scalar_t* d = dst + b * out_width + e[SRC];
          const float shift = np ? np[2 * e[NORM]] : 0.f, scale = np ? np[2 * e[NORM] + 1] : 1.f;
          if (!piece_contiguous(e)) {  // strided: element (r, c) sits at r*RS + c*CS
            const int64_t rows = e[ROWS], cols = e[COLS], rs = e[RS], cs = e[CS];
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t c = 0; c < cols; ++c) {
                const scalar_t v = s[r * rs + c * cs];
                d[r * cols + c] = np ? static_cast<scalar_t>(static_cast<float>(v) / scale + shift) : v;
              }
          } else if (np) {
            for (int64_t i = 0; i < n; ++i) d[i] = static_cast<scalar_t>(static_cast<float>(s[i]) / scale + shift);
          } else {
            std::copy(s, s + n, d);
          }
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hyforget, CPU, m) {
  m.impl("gather_pieces", &gather_pieces_cpu);
  m.impl("gather_pieces_out", &gather_pieces_out_cpu);
  m.impl("scatter_pieces", &scatter_pieces_cpu);
}

}  // namespace hyforget
