// Registers the CUDA gather_pieces / scatter_pieces with torch (compiled by the host compiler).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launchers.h"
#include "piece_table.h"

namespace hyforget {

DType cuda_dtype(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "hyforget: ", what, " must be float32, float16 or bfloat16 on CUDA, got ", t);
  }
}

namespace {

void check_table_cuda(const at::Tensor& table, const at::Tensor& x) {
  TORCH_CHECK(table.dim() == 2 && table.size(1) == NUM_PIECE_COLS && table.scalar_type() == at::kLong,
              "hyforget: piece table must be int64 (n_pieces, ", int(NUM_PIECE_COLS), ")");
  TORCH_CHECK(table.device() == x.device(), "hyforget: piece table must be on ", x.device());
  TORCH_CHECK(table.size(0) <= max_pieces(), "hyforget: at most ", max_pieces(), " pieces on CUDA");
}

void gather_pieces_out_cuda(const at::Tensor& params, const at::Tensor& table, const c10::optional<at::Tensor>& perms,
                            const c10::optional<at::Tensor>& norm, const at::Tensor& out) {
  TORCH_CHECK(params.dim() == 2, "hyforget: params must be (B, P)");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == params.size(0) && out.is_contiguous() &&
                  out.scalar_type() == params.scalar_type() && out.device() == params.device(),
              "hyforget: out must be a contiguous (B, out_width) tensor of the params' dtype on ", params.device());
  const int64_t out_width = out.size(1);
  TORCH_CHECK(out_width < (int64_t(1) << 31) && params.size(1) < (int64_t(1) << 31),
              "hyforget: CUDA gather supports rows of fewer than 2^31 values");
  check_table_cuda(table, params);
  c10::cuda::CUDAGuard guard(params.device());
  auto x = params.contiguous();
  auto tab = table.contiguous();
  at::Tensor pc, nc;
  if (perms.has_value()) {
    TORCH_CHECK(perms->scalar_type() == at::kLong && perms->dim() == 2 && perms->size(0) == x.size(0) &&
                    perms->device() == x.device(), "hyforget: perms must be int64 (B, H) on ", x.device());
    pc = perms->contiguous();
  }
  if (norm.has_value()) {
    TORCH_CHECK(norm->scalar_type() == at::kFloat && norm->dim() == 2 && norm->size(1) == 2 &&
                    norm->device() == x.device(), "hyforget: norm must be float32 (n_pieces, 2) on ", x.device());
    nc = norm->contiguous();
  }
  if (out.numel() == 0) return;
  auto err = launch_gather_pieces(cuda_dtype(x.scalar_type(), "params"), x.data_ptr(), out.data_ptr(),
                                  tab.data_ptr<int64_t>(), static_cast<int>(tab.size(0)),
                                  pc.defined() ? pc.data_ptr<int64_t>() : nullptr, pc.defined() ? pc.size(1) : 0,
                                  nc.defined() ? nc.data_ptr<float>() : nullptr, x.size(0), x.size(1), out_width,
                                  c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "hyforget: gather_pieces CUDA launch failed: ", cudaGetErrorString(err));
}

at::Tensor gather_pieces_cuda(const at::Tensor& params, const at::Tensor& table, const c10::optional<at::Tensor>& perms,
                              const c10::optional<at::Tensor>& norm, int64_t out_width) {
  TORCH_CHECK(params.dim() == 2, "hyforget: params must be (B, P)");
  auto out = at::empty({params.size(0), out_width}, params.options().memory_format(at::MemoryFormat::Contiguous));
  gather_pieces_out_cuda(params, table, perms, norm, out);
  return out;
}

at::Tensor scatter_pieces_cuda(const at::Tensor& tokens, const at::Tensor& table, const c10::optional<at::Tensor>& norm,
                               int64_t out_width) {
  TORCH_CHECK(tokens.dim() == 2, "hyforget: tokens must be (B, T*chunk)");
  TORCH_CHECK(tokens.size(1) < (int64_t(1) << 31) && out_width < (int64_t(1) << 31),
              "hyforget: CUDA gather supports rows of fewer than 2^31 values");
  check_table_cuda(table, tokens);
  c10::cuda::CUDAGuard guard(tokens.device());
  auto x = tokens.contiguous();
  auto tab = table.contiguous();
  at::Tensor nc;
  if (norm.has_value()) {
    TORCH_CHECK(norm->scalar_type() == at::kFloat && norm->device() == x.device(),
                "hyforget: norm must be float32 on ", x.device());
    nc = norm->contiguous();
  }
  auto out = at::empty({x.size(0), out_width}, x.options());
  if (out.numel() == 0) return out;
  auto err = launch_scatter_pieces(cuda_dtype(x.scalar_type(), "tokens"), x.data_ptr(), out.data_ptr(),
                                   tab.data_ptr<int64_t>(), static_cast<int>(tab.size(0)),
                                   nc.defined() ? nc.data_ptr<float>() : nullptr, x.size(0), x.size(1), out_width,
                                   c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "hyforget: scatter_pieces CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hyforget, CUDA, m) {
  m.impl("gather_pieces", &gather_pieces_cuda);
  m.impl("gather_pieces_out", &gather_pieces_out_cuda);
  m.impl("scatter_pieces", &scatter_pieces_cuda);
}

}  // namespace hyforget
