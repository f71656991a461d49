// Fused routing: one warp per token. The lanes hold the token's logits (lane + 32 j for j < PER_LANE), reduce
// max and sum with shuffles for the softmax, then run k rounds of a warp argmax (ties to the lower id).
// Probability sums go through registers and a fixed-order block reduction into one partial row per block,
// so the column sums are deterministic; the integer counts use atomics, whose result is order-independent.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>

#include "sparsedoctor_kernels.h"

namespace sparsedoctor {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kTokensPerWarp = 16;
constexpr int kTokensPerBlock = kWarpsPerBlock * kTokensPerWarp;

__device__ __forceinline__ float to_float(float value) { return value; }
__device__ __forceinline__ float to_float(__half value) { return __half2float(value); }
__device__ __forceinline__ float to_float(__nv_bfloat16 value) { return __bfloat162float(value); }

__device__ __forceinline__ float warp_max(float value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// The larger probability wins; equal probabilities go to the lower expert id.
__device__ __forceinline__ void warp_argmax(float& best, int& best_id) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(0xffffffffu, best, offset);
    const int other_id = __shfl_xor_sync(0xffffffffu, best_id, offset);
    if (other > best || (other == best && other_id < best_id)) {
      best = other;
      best_id = other_id;
    }
  }
}

template <typename T, int PER_LANE>
__global__ void route_forward_kernel(const T* __restrict__ logits, int64_t row_stride, int64_t num_tokens,
                                     int num_experts, int top_k, bool renormalize, float* __restrict__ weights,
                                     int32_t* __restrict__ experts, int32_t* __restrict__ counts,
                                     float* __restrict__ partial_probs) {
  __shared__ float warp_sums[kWarpsPerBlock][PER_LANE * kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  float prob_sum[PER_LANE];
#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) prob_sum[j] = 0.0f;

  const int64_t first = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock + warp * kTokensPerWarp;
  for (int i = 0; i < kTokensPerWarp; ++i) {
    const int64_t token = first + i;
    if (token >= num_tokens) break;  // uniform across the warp
    const T* row = logits + token * row_stride;
    float prob[PER_LANE];
    float row_max = -INFINITY;
    bool nan_or_inf = false;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      const int expert = lane + kWarpSize * j;
      prob[j] = expert < num_experts ? to_float(row[expert]) : -INFINITY;
      nan_or_inf |= isnan(prob[j]) || prob[j] == INFINITY;
      row_max = fmaxf(row_max, prob[j]);  // fmaxf ignores NaN: the row is flagged instead
    }
    row_max = warp_max(row_max);
    // A row with a NaN or +inf, or only -inf, has no finite softmax: like torch's, its probabilities are all
    // NaN, and its top-k (below) picks experts 0..k-1, as torch's stable sort of equal NaNs does.
    const bool non_finite = __any_sync(0xffffffffu, nan_or_inf) || row_max == -INFINITY;
    float denom = 0.0f;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      const int expert = lane + kWarpSize * j;
      prob[j] = expert < num_experts && !non_finite ? expf(prob[j] - row_max) : 0.0f;
      denom += prob[j];
    }
    denom = non_finite ? 1.0f : warp_sum(denom);
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      const int expert = lane + kWarpSize * j;
      prob[j] = non_finite && expert < num_experts ? NAN : prob[j] / denom;
      prob_sum[j] += prob[j];
    }

    bool taken[PER_LANE];
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) taken[j] = false;
    float total = 0.0f;
    float* row_weights = weights + token * top_k;
    int32_t* row_experts = experts + token * top_k;
    for (int slot = 0; slot < top_k; ++slot) {
      float best = -1.0f;
      int best_id = INT_MAX;
#pragma unroll
      for (int j = 0; j < PER_LANE; ++j) {
        const int expert = lane + kWarpSize * j;
        const float score = non_finite ? 0.0f : prob[j];  // equal scores: the lowest free ids win
        if (expert < num_experts && !taken[j] && (score > best || (score == best && expert < best_id))) {
          best = score;
          best_id = expert;
        }
      }
      warp_argmax(best, best_id);
      // top_k <= E leaves a free expert in every round; the clamp keeps `counts` in bounds regardless.
      best_id = min(best_id, num_experts - 1);
      if (non_finite) best = NAN;
#pragma unroll
      for (int j = 0; j < PER_LANE; ++j) {  // compile-time indices keep `taken` in registers
        if (lane + kWarpSize * j == best_id) taken[j] = true;
      }
      total += best;
      if (lane == 0) {
        row_weights[slot] = best;
        row_experts[slot] = best_id;
        atomicAdd(counts + best_id, 1);
      }
    }
    if (renormalize && lane == 0) {
      for (int slot = 0; slot < top_k; ++slot) row_weights[slot] /= total;
    }
  }

#pragma unroll
  for (int j = 0; j < PER_LANE; ++j) warp_sums[warp][lane + kWarpSize * j] = prob_sum[j];
  __syncthreads();
  for (int expert = threadIdx.x; expert < num_experts; expert += blockDim.x) {
    float sum = 0.0f;
    for (int w = 0; w < kWarpsPerBlock; ++w) sum += warp_sums[w][expert];  // fixed order: deterministic
    partial_probs[static_cast<int64_t>(blockIdx.x) * num_experts + expert] = sum;
  }
}

template <typename T>
cudaError_t launch(const void* logits, int64_t row_stride, int64_t num_tokens, int num_experts, int top_k,
                   bool renormalize, float* weights, int32_t* experts, int32_t* counts, float* partial_probs,
                   cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(route_forward_partial_rows(num_tokens)));
  const dim3 block(kWarpsPerBlock * kWarpSize);
  const T* typed = static_cast<const T*>(logits);
#define SPARSEDOCTOR_ROUTE_LAUNCH(PER_LANE)                                                               \
  route_forward_kernel<T, PER_LANE><<<grid, block, 0, stream>>>(typed, row_stride, num_tokens, num_experts, \
                                                                top_k, renormalize, weights, experts,     \
                                                                counts, partial_probs)
  if (num_experts <= 32) {
    SPARSEDOCTOR_ROUTE_LAUNCH(1);
  } else if (num_experts <= 64) {
    SPARSEDOCTOR_ROUTE_LAUNCH(2);
  } else if (num_experts <= 128) {
    SPARSEDOCTOR_ROUTE_LAUNCH(4);
  } else {
    SPARSEDOCTOR_ROUTE_LAUNCH(8);
  }
#undef SPARSEDOCTOR_ROUTE_LAUNCH
  return cudaGetLastError();
}

}  // namespace

int64_t route_forward_partial_rows(int64_t num_tokens) {
  return (num_tokens + kTokensPerBlock - 1) / kTokensPerBlock;
}

cudaError_t route_forward(const void* logits, FloatKind kind, int64_t row_stride, int64_t num_tokens,
                          int num_experts, int top_k, bool renormalize, float* weights, int32_t* experts,
                          int32_t* counts, float* partial_probs, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  if (num_experts < 1 || num_experts > kMaxRouteExperts || top_k < 1 || top_k > num_experts) {
    return cudaErrorInvalidValue;
  }
  switch (kind) {
    case FloatKind::kFloat32:
      return launch<float>(logits, row_stride, num_tokens, num_experts, top_k, renormalize, weights, experts,
                           counts, partial_probs, stream);
    case FloatKind::kFloat16:
      return launch<__half>(logits, row_stride, num_tokens, num_experts, top_k, renormalize, weights, experts,
                            counts, partial_probs, stream);
    case FloatKind::kBFloat16:
      return launch<__nv_bfloat16>(logits, row_stride, num_tokens, num_experts, top_k, renormalize, weights,
                                   experts, counts, partial_probs, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace sparsedoctor
