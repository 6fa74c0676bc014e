"""`spinquant::silu_mul` (kernels/silu_mul_op.py, kernels/cpu/op_silu_mul.cpp) against a float64 reference."""

import pytest
import torch
from torch import nn

import kernels


def reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.double().chunk(2, dim=-1)
    return gate / (1 + torch.exp(-gate)) * up


def relative_error(y: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest |error| in a row over that row's norm, worst row: rows of every scale count alike."""
    return float(((y.double() - expected).abs().amax(-1) / expected.norm(dim=-1)).max())


def gate_up() -> torch.Tensor:
    """Rows from 1e-3 to 1e3: both branches of the sigmoid, its saturation, and e^-|g| underflowing."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 30, 2 * 1536, generator=g) * torch.logspace(-3, 3, 30)[:, None]


def test_eager_op_matches_float64():
    x = gate_up()
    assert relative_error(torch.ops.spinquant.silu_mul(x), reference(x)) <= 1e-6


def test_an_odd_width_names_the_op():
    with pytest.raises(ValueError, match="spinquant::silu_mul"):
        torch.ops.spinquant.silu_mul(torch.randn(2, 7))


class SiluMul(nn.Module):
    def forward(self, x):
        return torch.ops.spinquant.silu_mul(x)


def test_cpp_kernel_in_a_program_matches_float64():
    from executorch.exir import to_edge

    kernels.load_into_executorch_runtime()
    x = gate_up()
    program = to_edge(torch.export.export(SiluMul(), (x,))).to_executorch().buffer
    y = kernels.load_program(program).methods["forward"].execute([x])[0]
    assert y.shape == (2, 30, 1536) and relative_error(y, reference(x)) <= 1e-6
