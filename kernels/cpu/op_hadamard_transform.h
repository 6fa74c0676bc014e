// The ExecuTorch kernel of spinquant::hadamard_transform.out, declared for the test and the
// benchmark; op_hadamard_transform.cpp registers it with the runtime.
#pragma once

#include <executorch/runtime/kernel/kernel_includes.h>

namespace spinquant::native {

// out = x @ H_n over the last dimension (n = K·2^m, see hadamard_transform.h). Float, Double,
// Half and BFloat16; x and out contiguous with the same dtype; out is resized to x's shape.
// Rows are spread over ExecuTorch's thread pool.
executorch::aten::Tensor& hadamard_transform_out(executorch::runtime::KernelRuntimeContext& ctx,
                                                 const executorch::aten::Tensor& x,
                                                 executorch::aten::Tensor& out);

}  // namespace spinquant::native
