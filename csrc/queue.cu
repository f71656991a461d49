// Expert memory queue enqueue: a one-block position scan, then a parallel copy of the surviving rows.
//
// The scan walks the batch in chunks of one row per thread. Inside a warp, lanes with the same expert find
// each other with __match_any_sync; their rank is the number of such lanes below them. Each warp's per-expert
// count goes to shared memory, so a row's rank among its expert's rows is: rows of that expert in earlier
// chunks + in earlier warps of this chunk + earlier lanes of its warp. That is row order, as the contract's
// sequential writes need. A row survives when it is among its expert's last Q rows of the call; survivors
// have distinct slots, so the copy needs no ordering.
#include <cstdint>

#include "sparsedoctor_kernels.h"

namespace sparsedoctor {
namespace {

constexpr int kScanThreads = 1024;
constexpr int kScanWarps = kScanThreads / 32;
constexpr int kCopyThreads = 256;

template <typename Id>
__global__ void __launch_bounds__(kScanThreads)
    enqueue_destinations_kernel(const Id* __restrict__ experts, int64_t num_rows, int num_experts,
                                int64_t capacity, int64_t* __restrict__ ptr, int64_t* __restrict__ size,
                                int64_t* __restrict__ dest) {
  __shared__ int counts[kMaxEnqueueExperts];
  __shared__ int earlier_chunks[kMaxEnqueueExperts];
  __shared__ int warp_counts[kScanWarps][kMaxEnqueueExperts];
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  for (int e = tid; e < num_experts; e += kScanThreads) {
    counts[e] = 0;
    earlier_chunks[e] = 0;
  }
  for (int i = tid; i < kScanWarps * num_experts; i += kScanThreads) warp_counts[i / num_experts][i % num_experts] = 0;
  __syncthreads();
  for (int64_t row = tid; row < num_rows; row += kScanThreads) {
    const int64_t expert = static_cast<int64_t>(experts[row]);
    if (expert >= 0 && expert < num_experts) atomicAdd(&counts[expert], 1);  // integer: order-independent
  }
  __syncthreads();

  for (int64_t chunk = 0; chunk < num_rows; chunk += kScanThreads) {
    const int64_t row = chunk + tid;
    int expert = -1;  // rows past the end and ids outside [0, E) group together and are never written
    if (row < num_rows) {
      const int64_t id = static_cast<int64_t>(experts[row]);
      if (id >= 0 && id < num_experts) expert = static_cast<int>(id);
    }
    const unsigned peers = __match_any_sync(0xffffffffu, expert);
    const unsigned lower_peers = peers & ((1u << lane) - 1u);
    if (expert >= 0 && lower_peers == 0) warp_counts[warp][expert] = __popc(peers);
    __syncthreads();
    if (row < num_rows) {
      int64_t slot = -1;
      if (expert >= 0) {
        int rank = earlier_chunks[expert] + __popc(lower_peers);
        for (int w = 0; w < warp; ++w) rank += warp_counts[w][expert];
        if (rank >= counts[expert] - capacity) {
          slot = expert * capacity + (ptr[expert] + rank) % capacity;
        }
      }
      dest[row] = slot;
    }
    __syncthreads();
    for (int e = tid; e < num_experts; e += kScanThreads) {
      int chunk_rows = 0;
      for (int w = 0; w < kScanWarps; ++w) {
        chunk_rows += warp_counts[w][e];
        warp_counts[w][e] = 0;
      }
      earlier_chunks[e] += chunk_rows;
    }
    __syncthreads();
  }

  for (int e = tid; e < num_experts; e += kScanThreads) {  // every read of ptr above is done
    ptr[e] = (ptr[e] + counts[e]) % capacity;
    size[e] = min(capacity, size[e] + static_cast<int64_t>(counts[e]));
  }
}

template <typename Word>
__global__ void enqueue_copy_kernel(const Word* __restrict__ keys, int64_t key_row_stride, Word* __restrict__ queue,
                                    int64_t num_rows, int64_t dim, const int64_t* __restrict__ dest) {
  const int64_t total = num_rows * dim;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = index / dim;
    const int64_t col = index - row * dim;
    const int64_t slot = dest[row];
    if (slot >= 0) queue[slot * dim + col] = keys[row * key_row_stride + col];
  }
}

template <typename Word>
cudaError_t launch_copy(const void* keys, int64_t key_row_stride, void* queue, int64_t num_rows, int64_t dim,
                        const int64_t* dest, cudaStream_t stream) {
  const int64_t total = num_rows * dim;
  const int64_t wanted = (total + kCopyThreads - 1) / kCopyThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < 65535 * 4 ? wanted : 65535 * 4);
  enqueue_copy_kernel<Word><<<blocks, kCopyThreads, 0, stream>>>(
      static_cast<const Word*>(keys), key_row_stride, static_cast<Word*>(queue), num_rows, dim, dest);
  return cudaGetLastError();
}

}  // namespace

cudaError_t enqueue_destinations(const void* experts, bool experts_are_int64, int64_t num_rows, int num_experts,
                                 int64_t capacity, int64_t* ptr, int64_t* size, int64_t* dest,
                                 cudaStream_t stream) {
  if (num_rows == 0 || capacity == 0) return cudaSuccess;
  if (num_experts < 1 || num_experts > kMaxEnqueueExperts) return cudaErrorInvalidValue;
  if (experts_are_int64) {
    enqueue_destinations_kernel<int64_t><<<1, kScanThreads, 0, stream>>>(
        static_cast<const int64_t*>(experts), num_rows, num_experts, capacity, ptr, size, dest);
  } else {
    enqueue_destinations_kernel<int32_t><<<1, kScanThreads, 0, stream>>>(
        static_cast<const int32_t*>(experts), num_rows, num_experts, capacity, ptr, size, dest);
  }
  return cudaGetLastError();
}

cudaError_t enqueue_copy(const void* keys, int64_t key_row_stride, void* queue, int64_t num_rows, int64_t dim,
                         int element_size, const int64_t* dest, cudaStream_t stream) {
  if (num_rows == 0 || dim == 0) return cudaSuccess;
  switch (element_size) {
    case 2:
      return launch_copy<uint16_t>(keys, key_row_stride, queue, num_rows, dim, dest, stream);
    case 4:
      return launch_copy<uint32_t>(keys, key_row_stride, queue, num_rows, dim, dest, stream);
    case 8:
      return launch_copy<uint64_t>(keys, key_row_stride, queue, num_rows, dim, dest, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace sparsedoctor
