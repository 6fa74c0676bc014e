"""`spinquant::silu_mul`: a Llama MLP's activation on its fused gate/up output, silu(gate) · up for a last dimension
[gate | up]. This is its eager side, torch's own silu; kernels/cpu/op_silu_mul.cpp runs its out variant in the program,
one kernel call per layer where ExecuTorch's CPU kernels take four."""

import torch

_lib = torch.library.Library("spinquant", "FRAGMENT")
_lib.define("silu_mul(Tensor gate_up) -> Tensor")
_lib.define("silu_mul.out(Tensor gate_up, *, Tensor(a!) out) -> Tensor(a!)")


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def _check(gate_up: torch.Tensor) -> None:
    if gate_up.dtype != torch.float32 or gate_up.shape[-1] % 2:
        raise ValueError(f"spinquant::silu_mul: the input must be float32 with an even last dimension, is {gate_up.dtype} {tuple(gate_up.shape)}")


@torch.library.impl(_lib, "silu_mul", "CompositeExplicitAutograd")
def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    _check(gate_up)
    return silu_mul(gate_up)


@torch.library.impl(_lib, "silu_mul.out", "CompositeExplicitAutograd")
def _silu_mul_out(gate_up: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    _check(gate_up)
    return out.copy_(silu_mul(gate_up))


@torch.library.register_fake("spinquant::silu_mul")
def _silu_mul_fake(gate_up: torch.Tensor) -> torch.Tensor:
    _check(gate_up)
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.register_fake("spinquant::silu_mul.out")
def _silu_mul_out_fake(gate_up: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    return out
