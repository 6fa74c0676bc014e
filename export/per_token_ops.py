"""torchao's 8-bit dynamic-activation linear, traced with ExecuTorch's per-token quantization ops.

torchao's choose_qparams/quantize/dequantize_affine are CompositeImplicitAutograd: torch.export
and each of ExecuTorch's whole-graph re-traces run their Python bodies, a dozen symbolic-shape ops
apiece, which was a third of the export's time. `quantized_decomposed`'s per-token ops (shipped
with torch, lowered by XNNPACK's partitioner the same way) have Meta kernels: one shape rule each.
Inside the delegate XNNPACK chooses the activation scales itself, so the program computes the
same thing either way; the weight stays torchao's tensor and its dequantize.
"""

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed
import torch.nn.functional as F
from torch import nn
from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
    IntxUnpackedToInt8Tensor,
    IntxUnpackedToInt8TensorActivationQuantization,
)

from export.e8p_linear import E8PLinears, has_e8p_codes
from spinquant.rotation import OnlineHadamardLinear

PER_TOKEN = torch.ops.quantized_decomposed


class PerTokenInt8Linear(nn.Module):
    """What torchao's linear does for this weight: int8 asymmetric per-token activations, then F.linear."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None = None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = PER_TOKEN.choose_qparams_per_token_asymmetric(x, torch.int8)
        q = PER_TOKEN.quantize_per_token(x, scale, zero, -128, 127, torch.int8)
        x = PER_TOKEN.dequantize_per_token(q, scale, zero, -128, 127, torch.int8, x.dtype)
        return F.linear(x, self.weight.dequantize(), self.bias)


def has_per_token_int8_activations(linear: nn.Module) -> bool:
    weight = getattr(linear, "weight", None)
    return (
        isinstance(linear, nn.Linear) and isinstance(weight, IntxUnpackedToInt8Tensor)
        and weight.activation_quantization == IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN
    )


def per_token_linear(module: nn.Module) -> nn.Module:
    """The module to export in `module`'s place; new wrappers, so the model itself is left as it was."""
    if isinstance(module, OnlineHadamardLinear):
        return OnlineHadamardLinear(per_token_linear(module.linear))
    if has_e8p_codes(module):
        return E8PLinears([module])
    return PerTokenInt8Linear(module.weight, module.bias) if has_per_token_int8_activations(module) else module
