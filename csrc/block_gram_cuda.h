// Launchers of the CUDA kernels (block_gram_cuda.cu), callable from ATen host code.
// Kept free of ATen headers so that nvcc compiles the kernels quickly.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace neuslice {
namespace cuda {

enum class InType { F32, F16, BF16, F64 };

constexpr int kTile = 64;  // neurons per M tile (each side)

// Fused feature route. xt: positions-major copy of x, shape (s, n, d), contiguous, of type t.
// partial: (splits, d, d) in float (double for F64); split z holds the sum over its share of
// position pairs (a, b), written for every (i, j) (both triangles). Returns the launch error.
cudaError_t launch_feature(const void* xt, InType t, void* partial, int64_t n, int64_t d,
                           int64_t s, int64_t splits, cudaStream_t stream);

}  // namespace cuda
}  // namespace neuslice
