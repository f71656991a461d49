// PyTorch side of the optional CUDA extension `sparsedoctor_kernels._C`.
// The kernels live in *.cu files that include no PyTorch headers (so that plain nvcc compiles them as a CI
// check); this file checks tensors, takes the current stream and registers the ops with TORCH_LIBRARY as
// `torch.ops.sparsedoctor_cuda.*`. Outputs are passed in by the Python launchers (which allocate them, poisoned
// under test), so every op here writes into tensors it was given.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cuda_runtime_api.h>

#include <string>

#include "sparsedoctor_kernels.h"

namespace {

using sparsedoctor::FloatKind;

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "sparsedoctor_kernels._C ", what, " failed: ", cudaGetErrorString(status));
}

void check_cuda_tensor(const at::Tensor& tensor, const char* name, const at::Tensor& reference) {
  TORCH_CHECK(tensor.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(tensor.device() == reference.device(), name, " must be on ", reference.device());
  TORCH_CHECK(tensor.is_contiguous(), name, " must be contiguous");
}

FloatKind float_kind(const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kFloat:
      return FloatKind::kFloat32;
    case at::kHalf:
      return FloatKind::kFloat16;
    case at::kBFloat16:
      return FloatKind::kBFloat16;
    default:
      TORCH_CHECK(false, "logits must be float32, float16 or bfloat16 for the cuda backend, got ",
                  tensor.scalar_type());
  }
}

void route_forward(const at::Tensor& logits, int64_t top_k, bool renormalize, at::Tensor& weights,
                   at::Tensor& experts, at::Tensor& counts, at::Tensor& partial_probs) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [T, E] with unit column stride");
  check_cuda_tensor(logits, "logits", logits);
  const int64_t num_tokens = logits.size(0);
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(num_experts >= 1 && num_experts <= sparsedoctor::kMaxRouteExperts,
              "the cuda routing kernel supports 1 to ", sparsedoctor::kMaxRouteExperts, " experts, got ",
              num_experts);
  TORCH_CHECK(top_k >= 1 && top_k <= num_experts, "top_k must be in [1, E]");
  check_cuda_tensor(weights, "weights", logits);
  check_cuda_tensor(experts, "experts", logits);
  check_cuda_tensor(counts, "counts", logits);
  check_cuda_tensor(partial_probs, "partial_probs", logits);
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.numel() == num_tokens * top_k, "weights: [T, k] f32");
  TORCH_CHECK(experts.scalar_type() == at::kInt && experts.numel() == num_tokens * top_k, "experts: [T, k] i32");
  TORCH_CHECK(counts.scalar_type() == at::kInt && counts.numel() == num_experts, "counts: [E] i32");
  TORCH_CHECK(partial_probs.scalar_type() == at::kFloat &&
                  partial_probs.numel() == sparsedoctor::route_forward_partial_rows(num_tokens) * num_experts,
              "partial_probs: [route_partial_rows(T), E] f32");
  const c10::cuda::CUDAGuard guard(logits.device());
  counts.zero_();
  check_launch(sparsedoctor::route_forward(logits.data_ptr(), float_kind(logits), logits.stride(0), num_tokens,
                                           static_cast<int>(num_experts), static_cast<int>(top_k), renormalize,
                                           weights.data_ptr<float>(), experts.data_ptr<int32_t>(),
                                           counts.data_ptr<int32_t>(), partial_probs.data_ptr<float>(),
                                           c10::cuda::getCurrentCUDAStream().stream()),
               "route_forward");
}

int64_t route_partial_rows(int64_t num_tokens) { return sparsedoctor::route_forward_partial_rows(num_tokens); }

void enqueue(at::Tensor& queue_keys, at::Tensor& ptr, at::Tensor& size, const at::Tensor& keys,
             const at::Tensor& experts, at::Tensor& dest) {
  check_cuda_tensor(queue_keys, "queue_keys", queue_keys);
  check_cuda_tensor(ptr, "ptr", queue_keys);
  check_cuda_tensor(size, "size", queue_keys);
  check_cuda_tensor(experts, "experts", queue_keys);
  check_cuda_tensor(dest, "dest", queue_keys);
  TORCH_CHECK(keys.is_cuda() && keys.device() == queue_keys.device() && keys.dim() == 2 && keys.stride(1) == 1,
              "keys must be [N, dim] on the queue's device with unit column stride");
  TORCH_CHECK(keys.scalar_type() == queue_keys.scalar_type(), "keys must already be in the queue's dtype");
  TORCH_CHECK(queue_keys.dim() == 3 && keys.size(1) == queue_keys.size(2), "queue_keys must be [E, Q, dim]");
  const int64_t num_experts = queue_keys.size(0);
  const int64_t capacity = queue_keys.size(1);
  const int64_t num_rows = keys.size(0);
  TORCH_CHECK(num_experts >= 1 && num_experts <= sparsedoctor::kMaxEnqueueExperts,
              "the cuda enqueue kernel supports 1 to ", sparsedoctor::kMaxEnqueueExperts, " experts, got ",
              num_experts);
  TORCH_CHECK(ptr.scalar_type() == at::kLong && size.scalar_type() == at::kLong && ptr.numel() == num_experts &&
                  size.numel() == num_experts,
              "ptr and size must be [E] int64");
  TORCH_CHECK(experts.scalar_type() == at::kInt || experts.scalar_type() == at::kLong, "experts: int32 or int64");
  TORCH_CHECK(experts.numel() == num_rows && dest.numel() == num_rows && dest.scalar_type() == at::kLong,
              "experts and dest must hold one entry per row");
  if (num_rows == 0 || capacity == 0) return;
  const c10::cuda::CUDAGuard guard(queue_keys.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(sparsedoctor::enqueue_destinations(experts.data_ptr(), experts.scalar_type() == at::kLong, num_rows,
                                                  static_cast<int>(num_experts), capacity, ptr.data_ptr<int64_t>(),
                                                  size.data_ptr<int64_t>(), dest.data_ptr<int64_t>(), stream),
               "enqueue_destinations");
  check_launch(sparsedoctor::enqueue_copy(keys.data_ptr(), keys.stride(0), queue_keys.data_ptr(), num_rows,
                                          keys.size(1), static_cast<int>(keys.element_size()),
                                          dest.data_ptr<int64_t>(), stream),
               "enqueue_copy");
}

int cuda_runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return version;
}

std::string build_info() {
  return "sparsedoctor_kernels._C built with CUDA runtime " + std::to_string(CUDART_VERSION) + ", torch " +
         TORCH_VERSION;
}

}  // namespace

TORCH_LIBRARY(sparsedoctor_cuda, m) {
  m.def(
      "route_forward(Tensor logits, int top_k, bool renormalize, Tensor(a!) weights, Tensor(b!) experts, "
      "Tensor(c!) counts, Tensor(d!) partial_probs) -> ()");
  m.def(
      "enqueue(Tensor(a!) queue_keys, Tensor(b!) ptr, Tensor(c!) size, Tensor keys, Tensor experts, "
      "Tensor(d!) dest) -> ()");
}

TORCH_LIBRARY_IMPL(sparsedoctor_cuda, CUDA, m) {
  m.impl("route_forward", &route_forward);
  m.impl("enqueue", &enqueue);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsedoctor_kernels CUDA extension: ops registered as torch.ops.sparsedoctor_cuda.*";
  m.def("cuda_runtime_version", &cuda_runtime_version, "CUDA runtime version seen at run time");
  m.def("build_info", &build_info, "how this extension was built");
  m.def("route_partial_rows", &route_partial_rows, "rows of per-block probability sums route_forward writes");
}
