// Every hyforget op is declared once, here. Each backend registers its implementation in
// its own file (csrc/cpu/*.cpp for CPU, csrc/cuda/*_cuda.cpp for CUDA); the Python
// wrappers in hyforget_fast/ops/functional.py validate inputs and register fake (meta) kernels.
#include <torch/library.h>

TORCH_LIBRARY(hyforget, m) {
  // Fused permute + normalize + tokenize: element (r, c) of each piece,
  // out[b, DST + r*RS + c*CS] = norm(params[b, SRC + perm(r)*COLS + perm(c)]), zero where no
  // piece holds a value. `table` is a piece table (see hyforget_fast/ops/spec.py, PIECE_COLUMNS).
  m.def("gather_pieces(Tensor params, Tensor table, Tensor? perms, Tensor? norm, int out_width) -> Tensor");
  // The same into a caller's buffer (B, out_width): no allocation, so no page faults on a
  // fresh buffer every call, which on the CPU cost as much as the gather itself.
  m.def("gather_pieces_out(Tensor params, Tensor table, Tensor? perms, Tensor? norm, Tensor(a!) out) -> ()");
  // Inverse of gather_pieces without permutation: out[b, SRC + r*COLS + c] = denorm(tokens[b, DST + r*RS + c*CS]).
  m.def("scatter_pieces(Tensor tokens, Tensor table, Tensor? norm, int out_width) -> Tensor");
  // Fused evaluation of B ReLU MLPs on one labelled set: per-class sums of cross-entropy
  // and of correct predictions, both (B, num_classes) float32.
  m.def("class_metrics(Tensor params, Tensor X, Tensor y, int[] layer_sizes, int num_classes) -> (Tensor, Tensor)");
  // The same with X given as CSR arrays (crow, col, val): the first layer is a sparse product.
  // A network with any NaN / Inf parameter gets NaN sums.
  m.def("class_metrics_csr(Tensor params, Tensor crow, Tensor col, Tensor val, Tensor y, int[] layer_sizes, "
        "int num_classes) -> (Tensor, Tensor)");
  // The same for runs `runs` of a batched trainer's layout (hyforget_fast/collection/collect.py): first layers
  // of all R runs as one transposed matrix w1t (D, R*h1), b1 (R, h1), later layers packed in head
  // (R, P_head) in spec order. Scores straight from that layout: no flat parameter vectors.
  m.def("class_metrics_runs_csr(Tensor w1t, Tensor b1, Tensor head, Tensor runs, Tensor crow, Tensor col, Tensor val, "
        "Tensor y, int[] layer_sizes, int num_classes) -> (Tensor, Tensor)");
  // Sparse-input linear layer with the weight stored transposed, weight_t (D, C), and X given as
  // CSR arrays; `rows` (optional) picks the rows of X that take part, in order.
  // out (M, C) = X[rows] @ weight_t + bias.
  m.def("csr_linear(Tensor crow, Tensor col, Tensor val, Tensor? rows, Tensor weight_t, Tensor? bias) -> Tensor");
  // One SGD step of the layers after the first of R MLPs on a shared minibatch, from the first
  // layer's pre-activations z1 (S, R*H1): head (R, P_head) packs each run's later layers in spec
  // order, b1 (R, H1); per-example loss weights wn (R, S), learning rates lr (R,). Updates head
  // and b1 in place; returns G (S, R*H1), the lr-scaled gradient of z1.
  m.def("mlp_head_sgd_(Tensor z1, Tensor(a!) head, Tensor(b!) b1, Tensor y, Tensor wn, Tensor lr, int[] layer_sizes) "
        "-> Tensor");
  // weight_t -= X[rows]^T @ grad, in place (grad (M, C)): the layer's SGD step, lr folded into grad.
  m.def("csr_linear_sub_grad_(Tensor crow, Tensor col, Tensor val, Tensor? rows, Tensor grad, Tensor(a!) weight_t) -> ()");
}
