// CPU implementation of the sparse-input first layer (ops csr_linear, csr_linear_sub_grad_):
//   csr_linear:           out (M, C) = X[rows] @ weight_t + bias
//   csr_linear_sub_grad_: weight_t -= X[rows]^T @ grad            (an SGD step on the layer)
// X is a CSR matrix (crow, col, val); weight_t is the layer's weight TRANSPOSED, (D, C), so
// that every nonzero x[i, j] touches one contiguous weight row. Only the rows in `rows` are
// read, so a minibatch needs no gathered copy of X, and only their nonzeros are validated.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/csr_matmul.h"

namespace hyforget {
namespace {

constexpr int64_t kRowBlock = 64;  // rows per work item of csr_linear

// Checks the CSR arrays and the rows taken from them; returns the number of those rows.
// Cost: O(taken rows + their nonzeros), the same order as reading them once.
int64_t check_csr(const char* op, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                  const c10::optional<at::Tensor>& rows, int64_t ncols) {
  TORCH_CHECK(crow.device().is_cpu() && col.device().is_cpu() && val.device().is_cpu(), op,
              ": the CSR tensors must be on the CPU");
  TORCH_CHECK(crow.dim() == 1 && crow.size(0) >= 1 && crow.scalar_type() == at::kLong && crow.is_contiguous(), op,
              ": crow must be a contiguous int64 (nrows + 1,) tensor, got ", crow.scalar_type(), " ", crow.sizes());
  TORCH_CHECK(col.dim() == 1 && col.scalar_type() == at::kLong && col.is_contiguous(), op,
              ": col must be a contiguous int64 (nnz,) tensor");
  TORCH_CHECK(val.dim() == 1 && val.size(0) == col.size(0) && val.is_contiguous(), op,
              ": val must be a contiguous (nnz,) tensor like col, got ", val.sizes(), " and ", col.sizes());
  const int64_t nrows = crow.size(0) - 1, nnz = col.size(0);
  const int64_t* cp = crow.data_ptr<int64_t>();
  const int64_t* cc = col.data_ptr<int64_t>();
  TORCH_CHECK(cp[0] >= 0, op, ": crow[0] must be >= 0");
  auto check_row = [&](int64_t r) {
    TORCH_CHECK(r >= 0 && r < nrows, op, ": row index ", r, " out of range [0, ", nrows, ")");
    TORCH_CHECK(0 <= cp[r] && cp[r] <= cp[r + 1] && cp[r + 1] <= nnz, op, ": crow is not a valid CSR row pointer at row ",
                r);
    if (!indices_in_range(cc + cp[r], cp[r + 1] - cp[r], ncols))  // find it only to name it
      for (int64_t p = cp[r]; p < cp[r + 1]; ++p)
        TORCH_CHECK(cc[p] >= 0 && cc[p] < ncols, op, ": column index ", cc[p], " in row ", r, " out of range [0, ",
                    ncols, ")");
  };
  if (!rows.has_value()) {
    for (int64_t r = 0; r < nrows; ++r) check_row(r);
    return nrows;
  }
  TORCH_CHECK(rows->dim() == 1 && rows->scalar_type() == at::kLong && rows->device().is_cpu() && rows->is_contiguous(),
              op, ": rows must be a contiguous int64 CPU vector");
  const int64_t* rp = rows->data_ptr<int64_t>();
  for (int64_t i = 0; i < rows->size(0); ++i) check_row(rp[i]);
  return rows->size(0);
}

void check_dense(const char* op, const char* what, const at::Tensor& t, const at::Tensor& val, int64_t rows_expected,
                 int64_t cols_expected) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", what, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == val.scalar_type(), op, ": ", what, " is ", t.scalar_type(), " but the CSR values are ",
              val.scalar_type());
  TORCH_CHECK(t.dim() == 2 && (rows_expected < 0 || t.size(0) == rows_expected) &&
                  (cols_expected < 0 || t.size(1) == cols_expected),
              op, ": ", what, " must be 2-D (", rows_expected, ", ", cols_expected, "), got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1, op, ": ", what, " must have unit column stride");
}

// The checks both ops open with: float values, a (D, C) weight_t with unit column stride, and
// the CSR rows taken. Returns the number M of those rows.
int64_t check_layer(const char* op, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                    const c10::optional<at::Tensor>& rows, const at::Tensor& weight_t) {
  TORCH_CHECK(val.scalar_type() == at::kFloat || val.scalar_type() == at::kDouble, op,
              ": values must be float32 or float64, got ", val.scalar_type());
  check_dense(op, "weight_t", weight_t, val, -1, -1);
  return check_csr(op, crow, col, val, rows, weight_t.size(0));
}

at::Tensor csr_linear_cpu(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                          const c10::optional<at::Tensor>& rows, const at::Tensor& weight_t,
                          const c10::optional<at::Tensor>& bias) {
  const char* op = "hyforget.csr_linear";
  const int64_t M = check_layer(op, crow, col, val, rows, weight_t), C = weight_t.size(1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C && bias->is_contiguous() &&
                    bias->scalar_type() == val.scalar_type() && bias->device().is_cpu(),
                op, ": bias must be a contiguous (", C, ",) CPU tensor of the values' dtype");
  }
  auto out = at::empty({M, C}, weight_t.options());
  if (M == 0 || C == 0) return out;
  const int64_t nrb = (M + kRowBlock - 1) / kRowBlock, nct = (C + kCsrColTile - 1) / kCsrColTile;
  const int64_t* rp = rows.has_value() ? rows->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(val.scalar_type(), "csr_linear", [&] {
    const scalar_t* bp = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    // Work items ordered column tile major, so consecutive items share a weight tile.
    at::parallel_for(0, nrb * nct, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t ct = w / nrb, rb = w % nrb;
        csr_rows_times_dense(crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(), val.data_ptr<scalar_t>(), rp,
                             rb * kRowBlock, std::min(M, (rb + 1) * kRowBlock), weight_t.data_ptr<scalar_t>(),
                             weight_t.stride(0), ct * kCsrColTile, std::min(C, (ct + 1) * kCsrColTile), bp,
                             out.data_ptr<scalar_t>(), C);
      }
    });
  });
  return out;
}

void csr_linear_sub_grad_cpu(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                             const c10::optional<at::Tensor>& rows, const at::Tensor& grad, const at::Tensor& weight_t) {
  const char* op = "hyforget.csr_linear_sub_grad_";
  const int64_t M = check_layer(op, crow, col, val, rows, weight_t);
  const int64_t D = weight_t.size(0), C = weight_t.size(1);
  check_dense(op, "grad", grad, val, M, C);
  if (M == 0 || C == 0) return;
  // CSC lists of X[rows]: for column j, the (row of grad, value) pairs in increasing row order.
  const int64_t* cp = crow.data_ptr<int64_t>();
  const int64_t* cc = col.data_ptr<int64_t>();
  const int64_t* rp = rows.has_value() ? rows->data_ptr<int64_t>() : nullptr;
  std::vector<int64_t> cptr(D + 1, 0);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t r = rp ? rp[i] : i;
    for (int64_t p = cp[r]; p < cp[r + 1]; ++p) ++cptr[cc[p] + 1];
  }
  std::vector<int64_t> used;
  for (int64_t j = 0; j < D; ++j) {
    if (cptr[j + 1] > 0) used.push_back(j);
    cptr[j + 1] += cptr[j];
  }
  const int64_t nnz = cptr[D];
  std::vector<int64_t> fill(cptr.begin(), cptr.end() - 1), row_of(nnz);
  AT_DISPATCH_FLOATING_TYPES(val.scalar_type(), "csr_linear_sub_grad_", [&] {
    const scalar_t* vp = val.data_ptr<scalar_t>();
    std::vector<scalar_t> cval(nnz);
    for (int64_t i = 0; i < M; ++i) {
      const int64_t r = rp ? rp[i] : i;
      for (int64_t p = cp[r]; p < cp[r + 1]; ++p) {
        const int64_t q = fill[cc[p]]++;
        row_of[q] = i;
        cval[q] = vp[p];
      }
    }
    const int64_t nct = (C + kCsrColTile - 1) / kCsrColTile;
    at::parallel_for(0, nct, 1, [&](int64_t t0, int64_t t1) {
      csc_sub_outer(cptr.data(), used.data(), static_cast<int64_t>(used.size()), row_of.data(), cval.data(),
                    grad.data_ptr<scalar_t>(), grad.stride(0), weight_t.data_ptr<scalar_t>(), weight_t.stride(0),
                    t0 * kCsrColTile, std::min(C, t1 * kCsrColTile));
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(hyforget, CPU, m) {
  m.impl("csr_linear", &csr_linear_cpu);
  m.impl("csr_linear_sub_grad_", &csr_linear_sub_grad_cpu);
}

}  // namespace hyforget
