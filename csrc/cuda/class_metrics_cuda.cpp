// Registers the CUDA class_metrics with torch (compiled by the host compiler). Mirrors
// hyforget_fast.reference.class_sums; the kernel is csrc/cuda/class_metrics.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "launchers.h"

namespace hyforget {

DType cuda_dtype(at::ScalarType t, const char* what);  // tokenize_cuda.cpp

namespace {

// params (B, P), X (N, D), y (N,) int -> (loss_sum, correct_sum), each (B, num_classes) float32.
std::tuple<at::Tensor, at::Tensor> class_metrics_cuda(const at::Tensor& params, const at::Tensor& X,
                                                      const at::Tensor& y, at::IntArrayRef layer_sizes,
                                                      int64_t num_classes) {
  const int64_t L = static_cast<int64_t>(layer_sizes.size()) - 1;
  TORCH_CHECK(L >= 2, "hyforget: class_metrics needs layer sizes (in, hidden..., out), got ", layer_sizes);
  TORCH_CHECK(L <= kClassMetricsMaxLayers, "hyforget: CUDA class_metrics supports at most ", kClassMetricsMaxLayers,
              " layers, got ", L);
  int64_t P = 0;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(layer_sizes[l] > 0 && layer_sizes[l + 1] > 0, "hyforget: layer sizes must be positive, got ",
                layer_sizes);
    TORCH_CHECK(layer_sizes[l + 1] <= kClassMetricsMaxWidth, "hyforget: CUDA class_metrics supports hidden widths and ",
                "classes <= ", kClassMetricsMaxWidth, ", got ", layer_sizes);
    P += layer_sizes[l] * layer_sizes[l + 1] + layer_sizes[l + 1];
  }
  TORCH_CHECK(num_classes > 0, "hyforget: num_classes must be positive, got ", num_classes);
  TORCH_CHECK(params.dim() == 2 && params.size(1) == P, "hyforget: params must be (B, ", P, ") for layer sizes ",
              layer_sizes, ", got ", params.sizes());
  TORCH_CHECK(X.dim() == 2 && X.size(1) == layer_sizes[0], "hyforget: X must be (N, ", layer_sizes[0], "), got ",
              X.sizes());
  TORCH_CHECK(y.dim() == 1 && y.size(0) == X.size(0), "hyforget: y must be (", X.size(0), ",), got ", y.sizes());
  TORCH_CHECK(at::isIntegralType(y.scalar_type(), /*includeBool=*/false), "hyforget: y must hold integer labels, got ",
              y.scalar_type());
  TORCH_CHECK(params.scalar_type() == X.scalar_type(), "hyforget: params and X must share a dtype, got ",
              params.scalar_type(), " and ", X.scalar_type());
  TORCH_CHECK(params.is_cuda() && X.device() == params.device() && y.device() == params.device(),
              "hyforget: params, X and y must be on one CUDA device, got ", params.device(), ", ", X.device(), ", ",
              y.device());
  TORCH_CHECK(X.size(0) <= INT32_MAX, "hyforget: CUDA class_metrics supports N < 2^31");
  const DType dt = cuda_dtype(params.scalar_type(), "params");
  c10::cuda::CUDAGuard guard(params.device());
  auto p = params.contiguous();
  auto x = X.contiguous();
  auto yl = y.to(at::kLong).contiguous();
  auto opts = p.options().dtype(at::kFloat);
  auto loss = at::zeros({p.size(0), num_classes}, opts);
  auto corr = at::zeros({p.size(0), num_classes}, opts);
  if (p.size(0) == 0 || x.size(0) == 0) return {loss, corr};
  std::vector<int64_t> sizes(layer_sizes.begin(), layer_sizes.end());
  auto err = launch_class_metrics(dt, p.data_ptr(), x.data_ptr(), yl.data_ptr<int64_t>(), loss.data_ptr<float>(),
                                  corr.data_ptr<float>(), sizes.data(), static_cast<int>(sizes.size()), p.size(0),
                                  x.size(0), static_cast<int>(num_classes), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "hyforget: class_metrics CUDA launch failed: ", cudaGetErrorString(err));
  return {loss, corr};
}

}  // namespace

TORCH_LIBRARY_IMPL(hyforget, CUDA, m) { m.impl("class_metrics", &class_metrics_cuda); }

}  // namespace hyforget
