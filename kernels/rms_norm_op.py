"""`spinquant::rms_norm`: Llama's RMSNorm as one operator, x · rsqrt(mean(x²) + eps) over the last dimension, times an
optional gain. This is its eager side, the expression itself; kernels/cpu/op_rms_norm.cpp runs its out variant in the
program, one kernel call per norm where ExecuTorch's CPU kernels take five."""

import torch

_lib = torch.library.Library("spinquant", "FRAGMENT")
_lib.define("rms_norm(Tensor x, Tensor? weight, float eps) -> Tensor")
_lib.define("rms_norm.out(Tensor x, Tensor? weight, float eps, *, Tensor(a!) out) -> Tensor(a!)")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    # x * x, not x.pow(2): the same correctly rounded square, without pow's slower kernel.
    y = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def _check(x: torch.Tensor, weight: torch.Tensor | None) -> None:
    if x.dtype != torch.float32 or (weight is not None and (weight.dtype != torch.float32 or weight.numel() != x.shape[-1])):
        raise ValueError(f"spinquant::rms_norm: x must be float32 and the gain {x.shape[-1]} float32 values")


@torch.library.impl(_lib, "rms_norm", "CompositeExplicitAutograd")
def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    _check(x, weight)
    return rms_norm(x, weight, eps)


@torch.library.impl(_lib, "rms_norm.out", "CompositeExplicitAutograd")
def _rms_norm_out(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, out: torch.Tensor) -> torch.Tensor:
    _check(x, weight)
    return out.copy_(rms_norm(x, weight, eps))


@torch.library.register_fake("spinquant::rms_norm")
def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    _check(x, weight)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("spinquant::rms_norm.out")
def _rms_norm_out_fake(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, out: torch.Tensor) -> torch.Tensor:
    return out
