// Launchers of the CUDA kernels: the boundary between torch-free .cu files and the
// *_cuda.cpp files that register them with torch. Raw pointers, explicit sizes, a stream.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace hyforget {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

int max_pieces();

cudaError_t launch_gather_pieces(DType dtype, const void* src, void* dst, const int64_t* table, int npieces,
                                 const int64_t* perms, int64_t perm_width, const float* norm, int64_t B, int64_t P,
                                 int64_t W, cudaStream_t stream);
cudaError_t launch_scatter_pieces(DType dtype, const void* src, void* dst, const int64_t* table, int npieces,
                                  const float* norm, int64_t B, int64_t W, int64_t P, cudaStream_t stream);

// class_metrics: per-class loss / correct sums (B, num_classes) float32 of B ReLU MLPs on X (N, D).
// The sums must be zero-filled by the caller. Hidden widths and classes <= kClassMetricsMaxWidth,
// at most kClassMetricsMaxLayers layers; labels outside [0, min(m, num_classes)) are skipped.
constexpr int kClassMetricsMaxLayers = 16;
constexpr int kClassMetricsMaxWidth = 64;
cudaError_t launch_class_metrics(DType dtype, const void* params, const void* X, const int64_t* y, float* loss_sum,
                                 float* correct_sum, const int64_t* layer_sizes, int num_sizes, int64_t B, int64_t N,
                                 int num_classes, cudaStream_t stream);

}  // namespace hyforget
