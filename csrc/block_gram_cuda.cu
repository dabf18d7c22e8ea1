// CUDA kernel of the fused feature route of block_gram_norms:
//
//   M[i, j] = sum_{a,b} (sum_n x[n,i,a] x[n,j,b])^2.
//
// One thread block owns a 64x64 tile (i-block <= j-block) of M and a share of the position
// pairs (a, b). For each pair it accumulates the 64x64 covariance tile C_ab = X_a^T X_b over
// n in registers (operands staged through shared memory), squares it and adds it into the
// register-held M tile: the covariance never reaches global memory. Shares of (a, b) pairs
// (blockIdx.y) keep the GPU busy when d is small; the host sums the per-share partials.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "block_gram_cuda.h"

namespace neuslice {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
constexpr int kMicro = 4;
constexpr int kBK = 16;        // samples per shared-memory stage

template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
feature_kernel(const in_t* __restrict__ xt, acc_t* __restrict__ partial, int64_t n, int64_t d,
               int64_t s, int64_t nb, int64_t pairs_per_split) {
  // Upper-triangular tile index -> (bi, bj), bi <= bj.
  int64_t t = blockIdx.x, bi = 0;
  while (t >= nb - bi) {
    t -= nb - bi;
    ++bi;
  }
  const int64_t bj = bi + t;
  const int64_t i0 = bi * kTile, j0 = bj * kTile;

  __shared__ __align__(16) acc_t as[kBK][kTile];
  __shared__ __align__(16) acc_t bs[kBK][kTile];

  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;  // this thread: rows ty*4.., cols tx*4..

  acc_t m[kMicro][kMicro];
#pragma unroll
  for (int r = 0; r < kMicro; ++r)
#pragma unroll
    for (int c = 0; c < kMicro; ++c) m[r][c] = acc_t(0);

  const int64_t ab_begin = blockIdx.y * pairs_per_split;
  const int64_t ab_end = min(s * s, ab_begin + pairs_per_split);
  for (int64_t ab = ab_begin; ab < ab_end; ++ab) {
    const in_t* xa = xt + (ab / s) * n * d;  // X_a: (n, d), row-major
    const in_t* xb = xt + (ab % s) * n * d;
    acc_t c[kMicro][kMicro];
#pragma unroll
    for (int r = 0; r < kMicro; ++r)
#pragma unroll
      for (int q = 0; q < kMicro; ++q) c[r][q] = acc_t(0);

    for (int64_t k0 = 0; k0 < n; k0 += kBK) {
      // Stage kBK samples of both 64-column panels; consecutive threads read consecutive
      // neurons (coalesced). Out-of-range entries are zero.
#pragma unroll
      for (int e = tid; e < kBK * kTile; e += kThreads) {
        const int kk = e / kTile, col = e % kTile;
        const int64_t row = k0 + kk;
        const bool in_n = row < n;
        const in_t* ra = xa + row * d + i0 + col;
        const in_t* rb = xb + row * d + j0 + col;
        as[kk][col] = (in_n && i0 + col < d) ? static_cast<acc_t>(*ra) : acc_t(0);
        bs[kk][col] = (in_n && j0 + col < d) ? static_cast<acc_t>(*rb) : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        acc_t ra[kMicro], rb[kMicro];
#pragma unroll
        for (int r = 0; r < kMicro; ++r) ra[r] = as[kk][ty * kMicro + r];
#pragma unroll
        for (int q = 0; q < kMicro; ++q) rb[q] = bs[kk][tx * kMicro + q];
#pragma unroll
        for (int r = 0; r < kMicro; ++r)
#pragma unroll
          for (int q = 0; q < kMicro; ++q) c[r][q] += ra[r] * rb[q];
      }
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < kMicro; ++r)
#pragma unroll
      for (int q = 0; q < kMicro; ++q) m[r][q] += c[r][q] * c[r][q];
  }

  // Partial of this share, both triangles (each (i, j) belongs to exactly one tile).
  acc_t* out = partial + static_cast<int64_t>(blockIdx.y) * d * d;
#pragma unroll
  for (int r = 0; r < kMicro; ++r) {
    const int64_t i = i0 + ty * kMicro + r;
#pragma unroll
    for (int q = 0; q < kMicro; ++q) {
      const int64_t j = j0 + tx * kMicro + q;
      if (i < d && j < d) {
        out[i * d + j] = m[r][q];
        if (bi != bj) out[j * d + i] = m[r][q];
      }
    }
  }
}

template <typename in_t, typename acc_t>
cudaError_t launch(const void* xt, void* partial, int64_t n, int64_t d, int64_t s,
                   int64_t splits, cudaStream_t stream) {
  const int64_t nb = (d + kTile - 1) / kTile;
  const int64_t per = (s * s + splits - 1) / splits;
  const dim3 grid(static_cast<unsigned>(nb * (nb + 1) / 2), static_cast<unsigned>(splits));
  feature_kernel<in_t, acc_t><<<grid, kThreads, 0, stream>>>(
      static_cast<const in_t*>(xt), static_cast<acc_t*>(partial), n, d, s, nb, per);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_feature(const void* xt, InType t, void* partial, int64_t n, int64_t d,
                           int64_t s, int64_t splits, cudaStream_t stream) {
  switch (t) {
    case InType::F32: return launch<float, float>(xt, partial, n, d, s, splits, stream);
    case InType::F16: return launch<c10::Half, float>(xt, partial, n, d, s, splits, stream);
    case InType::BF16: return launch<c10::BFloat16, float>(xt, partial, n, d, s, splits, stream);
    case InType::F64: return launch<double, double>(xt, partial, n, d, s, splits, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace neuslice
