// Launchers of the CUDA kernels in *.cu, callable without PyTorch: plain pointers, sizes and a stream.
// bindings.cpp checks the tensors, allocates nothing the caller did not pass and calls these.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sparsedoctor {

enum class FloatKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Routing keeps a token's row in one warp's registers: 8 experts a lane.
constexpr int kMaxRouteExperts = 256;
// The enqueue scan keeps per-warp, per-expert counts in shared memory.
constexpr int kMaxEnqueueExperts = 256;

// Rows of per-block probability sums that route_forward writes ([rows, num_experts] floats).
int64_t route_forward_partial_rows(int64_t num_tokens);

// Softmax (fp32) + top-k (ties to the lower id) + renormalisation of each row of `logits` [num_tokens, row
// stride], writing weights [T, k] f32, experts [T, k] i32, adding into counts [E] i32 (zeroed by the caller)
// and writing partial_probs [route_forward_partial_rows(T), E], whose column sums are sum_t p[t, e].
cudaError_t route_forward(const void* logits, FloatKind kind, int64_t row_stride, int64_t num_tokens,
                          int num_experts, int top_k, bool renormalize, float* weights, int32_t* experts,
                          int32_t* counts, float* partial_probs, cudaStream_t stream);

// One block: dest[i] = e * capacity + slot for every row i that sequential ring writes would leave in the
// queue, -1 for the others (overwritten in this call, or an id outside [0, E)); then advances ptr and size.
cudaError_t enqueue_destinations(const void* experts, bool experts_are_int64, int64_t num_rows, int num_experts,
                                 int64_t capacity, int64_t* ptr, int64_t* size, int64_t* dest,
                                 cudaStream_t stream);

// queue[dest[i], :] = keys[i, :] for dest[i] >= 0; keys already in the queue's dtype, `element_size` bytes.
cudaError_t enqueue_copy(const void* keys, int64_t key_row_stride, void* queue, int64_t num_rows, int64_t dim,
                         int element_size, const int64_t* dest, cudaStream_t stream);

}  // namespace sparsedoctor
