// Shared declarations of the block_gram_norms op (CPU, CUDA and Meta implementations).
#pragma once

#include <ATen/core/Tensor.h>  // not ATen/ATen.h: per-operator headers compile ~2x faster
#include <c10/util/string_view.h>

namespace neuslice {

// Validates x (3-D, floating point) and route ("feature" or "sample"); returns the route.
enum class Route { Feature, Sample };
Route check_inputs(const at::Tensor& x, c10::string_view route);

// float64 stays float64; every other floating type accumulates in float32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor block_gram_norms_cpu(const at::Tensor& x, c10::string_view route);

}  // namespace neuslice
