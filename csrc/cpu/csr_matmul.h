// Sparse-rows x dense products for the first layer of MLPs on sparse inputs (MNIST: ~23% of
// the used pixels are nonzero). Plain functions, no torch types, so class_metrics.cpp and
// csr_linear.cpp share them; compiled in csr_matmul.cpp with fused multiply-adds allowed
// (a different summation order from a dense GEMM anyway, so bit equality is not on offer).
//
// X is a CSR matrix (crow, col, val) over D columns; a "row list" `rows` (nullable: rows
// 0..M-1) picks and orders the rows that take part. Dense matrices are row-major with a row
// stride (ld) and unit column stride. All indices are validated by the callers.
#pragma once
#include <cstdint>

namespace hyforget {

// out[i, 0:C] = (bias ? bias[0:C] : 0) + sum_{p in row rows[i]} val[p] * W[col[p], 0:C]
// for i in [i0, i1). W (D, C) row stride ldw, out row stride ldo.
void csr_rows_times_dense(const int64_t* crow, const int64_t* col, const float* val, const int64_t* rows,
                          int64_t i0, int64_t i1, const float* W, int64_t ldw, int64_t c0, int64_t c1,
                          const float* bias, float* out, int64_t ldo);
void csr_rows_times_dense(const int64_t* crow, const int64_t* col, const double* val, const int64_t* rows,
                          int64_t i0, int64_t i1, const double* W, int64_t ldw, int64_t c0, int64_t c1,
                          const double* bias, double* out, int64_t ldo);

// Columns [c0, c1) of W (D, C) -= X[rows]^T G, G (M, C) row stride ldg, given the transpose
// of X[rows] as CSC lists: for column j of X, entries [cptr[j], cptr[j+1]) of (crow_of, cval)
// are the (row of G, value) pairs, in increasing row order. Only nonempty columns `cols`
// (ncols of them) are visited.
void csc_sub_outer(const int64_t* cptr, const int64_t* cols, int64_t ncols, const int64_t* crow_of,
                   const float* cval, const float* G, int64_t ldg, float* W, int64_t ldw, int64_t c0, int64_t c1);
void csc_sub_outer(const int64_t* cptr, const int64_t* cols, int64_t ncols, const int64_t* crow_of,
                   const double* cval, const double* G, int64_t ldg, double* W, int64_t ldw, int64_t c0, int64_t c1);

// Whether every idx[0:n) lies in [0, bound): one vectorized pass (validating the column
// indices of a CSR matrix costs about as much as one read of them).
bool indices_in_range(const int64_t* idx, int64_t n, int64_t bound);

// Column tile of both kernels: this many output columns are held in registers per row.
// 64 floats (32 doubles) = 4 AVX-512 registers per row.
constexpr int64_t kCsrColTile = 64;

}  // namespace hyforget
