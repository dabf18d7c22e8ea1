// CUDA implementation of block_gram_norms (built only with -DWITH_CUDA).
//  * feature: the fused kernel of block_gram_cuda.cu on a positions-major copy of x.
//  * sample: per-neuron Grams by batched cuBLAS GEMM (at::bmm), then M = V V^T (at::mm),
//    by neuron blocks with bounded temporaries; only blocks j >= i are computed.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "block_gram.h"
#include "block_gram_cuda.h"

namespace neuslice {
namespace {

constexpr int64_t kPartialElems = int64_t(1) << 26;  // bound on the per-share partials
constexpr int64_t kBlockElems = int64_t(1) << 27;    // bound on a block of Grams (sample)

cuda::InType in_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::InType::F32;
    case at::kHalf: return cuda::InType::F16;
    case at::kBFloat16: return cuda::InType::BF16;
    case at::kDouble: return cuda::InType::F64;
    default: TORCH_CHECK(false, "block_gram_norms (CUDA): unsupported dtype ", t);
  }
}

at::Tensor feature_cuda(const at::Tensor& x, at::ScalarType acc) {
  const int64_t n = x.size(0), d = x.size(1), s = x.size(2);
  const at::Tensor xt = x.permute({2, 0, 1}).contiguous();  // (s, n, d), input dtype kept
  const int64_t nb = (d + cuda::kTile - 1) / cuda::kTile;
  const int64_t tiles = nb * (nb + 1) / 2;
  int dev = 0, sms = 1;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  // Split the (a, b) pairs so that about 4 blocks per SM run, within the partials' bound.
  int64_t splits = std::max<int64_t>(1, (4 * sms + tiles - 1) / tiles);
  splits = std::min({splits, s * s, std::max<int64_t>(1, kPartialElems / (d * d)),
                     int64_t(65535)});
  const int64_t per = (s * s + splits - 1) / splits;
  splits = (s * s + per - 1) / per;  // no empty share
  at::Tensor partial = at::empty({splits, d, d}, x.options().dtype(acc));
  C10_CUDA_CHECK(cuda::launch_feature(xt.const_data_ptr(), in_type(x.scalar_type()),
                                      partial.data_ptr(), n, d, s, splits,
                                      c10::cuda::getCurrentCUDAStream()));
  return splits == 1 ? partial.select(0, 0) : partial.sum(0);
}

at::Tensor sample_cuda(const at::Tensor& x_in, at::ScalarType acc) {
  const at::Tensor x = x_in.to(acc);
  const int64_t n = x.size(0), d = x.size(1);
  const at::Tensor per = x.permute({1, 0, 2});  // (d, n, s)
  const int64_t blk = std::clamp<int64_t>(kBlockElems / (n * n), 1, d);
  auto grams = [&](int64_t a0, int64_t a1) {
    const at::Tensor p = per.narrow(0, a0, a1 - a0);
    return at::bmm(p, p.transpose(1, 2)).view({a1 - a0, n * n});
  };
  at::Tensor m = at::empty({d, d}, x.options());
  for (int64_t a0 = 0; a0 < d; a0 += blk) {
    const int64_t a1 = std::min(d, a0 + blk);
    const at::Tensor va = grams(a0, a1);
    m.narrow(0, a0, a1 - a0).narrow(1, a0, a1 - a0).copy_(at::mm(va, va.t()));
    for (int64_t b0 = a1; b0 < d; b0 += blk) {
      const int64_t b1 = std::min(d, b0 + blk);
      const at::Tensor c = at::mm(va, grams(b0, b1).t());
      m.narrow(0, a0, a1 - a0).narrow(1, b0, b1 - b0).copy_(c);
      m.narrow(0, b0, b1 - b0).narrow(1, a0, a1 - a0).copy_(c.t());
    }
  }
  return m;
}

at::Tensor block_gram_norms_cuda(const at::Tensor& x_in, c10::string_view route_name) {
  const Route route = check_inputs(x_in, route_name);
  TORCH_CHECK(x_in.is_cuda(), "block_gram_norms_cuda: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.detach().contiguous();
  const auto acc = acc_dtype(x.scalar_type());
  const int64_t n = x.size(0), d = x.size(1), s = x.size(2);
  if (d == 0) return at::empty({0, 0}, x.options().dtype(acc));
  if (n == 0 || s == 0) return at::zeros({d, d}, x.options().dtype(acc));
  return route == Route::Feature ? feature_cuda(x, acc) : sample_cuda(x, acc);
}

}  // namespace
}  // namespace neuslice

TORCH_LIBRARY_IMPL(neuslice, CUDA, m) {
  m.impl("block_gram_norms", &neuslice::block_gram_norms_cuda);
}
