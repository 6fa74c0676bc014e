// What our ExecuTorch kernels share: the runtime's headers and names, and the checks and resizes they all make.
#pragma once

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

namespace spinquant::native {

using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::resize_tensor;
using executorch::runtime::tensor_is_contiguous;
using executorch::runtime::tensor_is_default_dim_order;
using executorch::runtime::toString;

inline bool is_plain(const Tensor& t) {
  return tensor_is_contiguous(t) && tensor_is_default_dim_order(t);
}

// out resized to like's shape with its last dimension `last`.
inline Error resize_with_last_dim(Tensor& out, const Tensor& like, int64_t last) {
  SizesType sizes[executorch::runtime::kTensorDimensionLimit];
  for (int64_t d = 0; d < like.dim(); ++d) sizes[d] = like.size(d);
  sizes[like.dim() - 1] = static_cast<SizesType>(last);
  return resize_tensor(out, {sizes, static_cast<size_t>(like.dim())});
}

}  // namespace spinquant::native
