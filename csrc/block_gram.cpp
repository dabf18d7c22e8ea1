// CPU implementation of block_gram_norms.
//
//   M[i, j] = sum_{a,b} (sum_n x[n,i,a] x[n,j,b])^2 = tr(G_i G_j),   G_i = x_i x_i^T.
//
// Both routes exploit the symmetry of M (only tiles with j >= i are computed, then mirrored)
// and run as one at::parallel_for over independent tiles, each calling a single-threaded
// BLAS GEMM into a small per-thread buffer that stays in cache:
//  * feature: for a tile (i-block, j-block) the covariance rows X_I^T X_J are computed in
//    cache-sized pieces and immediately squared and block-summed into M; the covariance is
//    never stored whole.
//  * sample: the per-neuron Grams are packed as their upper triangles (off-diagonal entries
//    scaled by sqrt 2, so tr(G_i G_j) is a plain dot product of packed rows), a block of
//    sample rows at a time, and M accumulates V V^T tile by tile.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "block_gram.h"

namespace neuslice {
namespace {

constexpr int64_t kTileCols = 256;      // covariance columns per feature tile (L2-sized buffer)
constexpr int64_t kBufElems = 1 << 16;  // elements of a per-thread covariance piece
#ifndef NEUSLICE_SAMPLE_BLOCK_ELEMS  // overridable to exercise the multi-block path
#define NEUSLICE_SAMPLE_BLOCK_ELEMS (1 << 25)
#endif
constexpr int64_t kBlockElems = NEUSLICE_SAMPLE_BLOCK_ELEMS;  // packed-Gram block bound (sample)

// Elementwise kernels kept separate so the compiler vectorises them; on GCC/x86-64 they are
// cloned for AVX-512/AVX2 and chosen at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define NEUSLICE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NEUSLICE_CLONES
#endif

NEUSLICE_CLONES void sq_set(float* __restrict o, const float* __restrict r, int64_t k) {
  for (int64_t t = 0; t < k; ++t) o[t] = r[t] * r[t];
}
NEUSLICE_CLONES void sq_set(double* __restrict o, const double* __restrict r, int64_t k) {
  for (int64_t t = 0; t < k; ++t) o[t] = r[t] * r[t];
}
NEUSLICE_CLONES void sq_add(float* __restrict o, const float* __restrict r, int64_t k) {
  for (int64_t t = 0; t < k; ++t) o[t] += r[t] * r[t];
}
NEUSLICE_CLONES void sq_add(double* __restrict o, const double* __restrict r, int64_t k) {
  for (int64_t t = 0; t < k; ++t) o[t] += r[t] * r[t];
}

// Upper-triangular pairs (bi <= bj) of nb blocks.
std::vector<std::pair<int64_t, int64_t>> upper_pairs(int64_t nb) {
  std::vector<std::pair<int64_t, int64_t>> p;
  p.reserve(nb * (nb + 1) / 2);
  for (int64_t bi = 0; bi < nb; ++bi)
    for (int64_t bj = bi; bj < nb; ++bj) p.emplace_back(bi, bj);
  return p;
}

// Copy the upper triangle of the square matrix m onto its lower triangle (64x64 blocks).
template <typename T>
void mirror_upper(at::Tensor& m) {
  constexpr int64_t kB = 64;
  const int64_t d = m.size(0), nb = (d + kB - 1) / kB;
  T* p = m.data_ptr<T>();
  at::parallel_for(0, nb, 1, [&](int64_t b, int64_t e) {
    for (int64_t bi = b; bi < e; ++bi)      // lower block row bi
      for (int64_t bj = 0; bj <= bi; ++bj)  // from upper block (bj, bi)
        for (int64_t i = bi * kB; i < std::min(d, (bi + 1) * kB); ++i)
          for (int64_t j = bj * kB; j < std::min(i, (bj + 1) * kB); ++j)
            p[i * d + j] = p[j * d + i];
  });
}

// ---------------------------------------------------------------- feature route, s == 1
// M is the elementwise square of the covariance x^T x. Rows are done in blocks, each only
// against the columns at and right of the block (multi-threaded GEMM written straight into
// M, then squared in place); the lower triangle is mirrored. Small d: one GEMM.
template <typename T>
void dense_route(const at::Tensor& x, at::Tensor& m) {
  const int64_t n = x.size(0), d = x.size(1);
  const at::Tensor flat = x.view({n, d});
  if (d <= 512) {  // measured: the halved flops do not pay for the smaller GEMMs here
    at::mm_out(m, flat.t(), flat);
    m.square_();
    return;
  }
  const int64_t row_block = std::clamp<int64_t>(d / 8, 128, 512);
  for (int64_t i0 = 0; i0 < d; i0 += row_block) {
    const int64_t ni = std::min(row_block, d - i0);
    at::Tensor blk = m.narrow(0, i0, ni).narrow(1, i0, d - i0);  // row stride d: BLAS-ready
    at::mm_out(blk, flat.narrow(1, i0, ni).t(), flat.narrow(1, i0, d - i0));
    blk.square_();
  }
  mirror_upper<T>(m);
}

// ---------------------------------------------------------------- feature route
template <typename T>
void feature_route(const at::Tensor& x, at::Tensor& m) {
  const int64_t n = x.size(0), d = x.size(1), s = x.size(2);
  const at::Tensor flat = x.view({n, d * s});
  T* mp = m.data_ptr<T>();

  const int64_t tb = std::max<int64_t>(1, kTileCols / s);  // neurons per tile
  const int64_t nb = (d + tb - 1) / tb;
  // Rows of the covariance per GEMM: a whole tile when neurons are small, else a slice.
  const int64_t max_cols = std::min(tb, d) * s;
  const int64_t rows_cap = tb > 1 ? max_cols : std::max<int64_t>(1, std::min(s, kBufElems / s));
  const auto pairs = upper_pairs(nb);

  at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t pb, int64_t pe) {
    at::AutoDispatchBelowADInplaceOrView guard;  // thread-local state is not inherited
    at::Tensor buf = at::empty({rows_cap * max_cols}, x.options());
    std::vector<T> acc(max_cols);
    for (int64_t p = pb; p < pe; ++p) {
      const int64_t i0 = pairs[p].first * tb, j0 = pairs[p].second * tb;
      const int64_t ni = std::min(tb, d - i0), nj = std::min(tb, d - j0);
      const int64_t cols = nj * s;
      const at::Tensor a_blk = flat.narrow(1, i0 * s, ni * s);
      const at::Tensor b_blk = flat.narrow(1, j0 * s, cols);
      for (int64_t r0 = 0; r0 < ni * s; r0 += rows_cap) {
        const int64_t rows = std::min(rows_cap, ni * s - r0);
        at::Tensor c = buf.narrow(0, 0, rows * cols).view({rows, cols});
        at::mm_out(c, a_blk.narrow(1, r0, rows).t(), b_blk);  // (rows, cols) covariance piece
        const T* cp = c.const_data_ptr<T>();
        for (int64_t r = r0; r < r0 + rows; ++r) {
          const T* row = cp + (r - r0) * cols;
          const int64_t i = i0 + r / s, a = r % s;
          if (a == 0) sq_set(acc.data(), row, cols); else sq_add(acc.data(), row, cols);
          if (a == s - 1) {  // neuron i done: sum each s-wide segment
            for (int64_t j = 0; j < nj; ++j) {
              const T* seg = acc.data() + j * s;
              T v = 0;
              for (int64_t b = 0; b < s; ++b) v += seg[b];
              mp[i * d + j0 + j] = mp[(j0 + j) * d + i] = v;
            }
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------- sample route
// m += v v^T, computing only upper-triangular neuron tiles (mirrored by the caller).
void add_vvt_upper(const at::Tensor& v, at::Tensor& m) {
  const int64_t d = v.size(0);
  if (d <= 128) {  // too few tiles to pay off: one (multi-threaded) GEMM
    m.addmm_(v, v.t());
    return;
  }
  const int64_t tb = std::clamp<int64_t>(d / 8, 64, 256);
  const int64_t nb = (d + tb - 1) / tb;
  const auto pairs = upper_pairs(nb);
  at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t pb, int64_t pe) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t p = pb; p < pe; ++p) {
      const int64_t i0 = pairs[p].first * tb, j0 = pairs[p].second * tb;
      const int64_t ni = std::min(tb, d - i0), nj = std::min(tb, d - j0);
      at::Tensor blk = m.narrow(0, i0, ni).narrow(1, j0, nj);  // strided view, BLAS-compatible
      blk.addmm_(v.narrow(0, i0, ni), v.narrow(0, j0, nj).t());
    }
  });
}

template <typename T>
void sample_route(const at::Tensor& x, at::Tensor& m) {
  const int64_t n = x.size(0), d = x.size(1);
  const T root2 = static_cast<T>(std::sqrt(2.0));
  m.zero_();
  // Sample rows per block so that the packed block (d, <= rows * n) stays bounded.
  const int64_t rows_blk = std::clamp<int64_t>(kBlockElems / std::max<int64_t>(1, d * n), 1, n);
  for (int64_t r0 = 0; r0 < n; r0 += rows_blk) {
    const int64_t rows = std::min(rows_blk, n - r0);
    // Row r of each Gram contributes its entries c >= r: n - r of them.
    const int64_t len = rows * n - (rows * (2 * r0 + rows - 1)) / 2;
    at::Tensor v = at::empty({d, len}, x.options());
    T* vp = v.data_ptr<T>();
    at::parallel_for(0, d, 1, [&](int64_t ib, int64_t ie) {
      at::AutoDispatchBelowADInplaceOrView guard;
      at::Tensor g = at::empty({rows, n}, x.options());
      const T* gp = g.const_data_ptr<T>();
      for (int64_t i = ib; i < ie; ++i) {
        const at::Tensor xi = x.select(1, i);  // (n, s), row stride d * s
        at::mm_out(g, xi.narrow(0, r0, rows), xi.t());  // rows [r0, r0 + rows) of G_i
        T* out = vp + i * len;
        for (int64_t r = 0; r < rows; ++r) {
          const T* grow = gp + r * n + (r0 + r);  // G_i[r0 + r, c] for c >= r0 + r
          const int64_t k = n - (r0 + r);
          out[0] = grow[0];
          for (int64_t t = 1; t < k; ++t) out[t] = root2 * grow[t];
          out += k;
        }
      }
    });
    add_vvt_upper(v, m);
  }
}

}  // namespace

at::Tensor block_gram_norms_cpu(const at::Tensor& x_in, c10::string_view route_name) {
  const Route route = check_inputs(x_in, route_name);
  TORCH_CHECK(x_in.device().is_cpu(), "block_gram_norms_cpu: x must be on the CPU");
  const auto acc = acc_dtype(x_in.scalar_type());
  // Detached, contiguous, accumulation dtype: the kernels read raw memory.
  const at::Tensor x = x_in.detach().to(acc).contiguous();
  const int64_t n = x.size(0), d = x.size(1), s = x.size(2);
  at::Tensor m = at::empty({d, d}, x.options());
  if (d == 0) return m;
  if (n == 0 || s == 0) return m.zero_();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block_gram_norms_cpu", [&] {
    if (route == Route::Feature && s == 1) {
      dense_route<scalar_t>(x, m);
    } else if (route == Route::Feature) {
      feature_route<scalar_t>(x, m);
    } else {
      sample_route<scalar_t>(x, m);
      mirror_upper<scalar_t>(m);
    }
  });
  return m;
}

}  // namespace neuslice
