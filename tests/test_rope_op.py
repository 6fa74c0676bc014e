"""`spinquant::rope` (kernels/rope_op.py, kernels/cpu/op_rope.cpp) against a float64 reference: each pair (d, d + half) of a
head's turned values rotated by its angle, as a complex multiplication."""

import pytest
import torch
from torch import nn

import kernels


def inputs(dim: int, turned: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 7, 12, dim, generator=g)
    angles = torch.rand(1, 7, 1, turned // 2, generator=g) * 100
    return x, torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)


def reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    turned, half = cos.shape[-1], cos.shape[-1] // 2
    x = x.double()
    pairs = torch.complex(x[..., :half], x[..., half:turned]) * torch.complex(cos[..., :half].double(), sin[..., :half].double())
    return torch.cat([pairs.real, pairs.imag, x[..., turned:]], dim=-1)


SHAPES = [(64, 64), (96, 64)]  # full rotary; partial (Phi-4-mini turns part of each head)


@pytest.mark.parametrize("dim, turned", SHAPES, ids=["full", "partial"])
def test_eager_op_matches_float64(dim, turned):
    x, cos, sin = inputs(dim, turned)
    assert torch.allclose(torch.ops.spinquant.rope(x, cos, sin).double(), reference(x, cos, sin), atol=1e-6)


def test_an_odd_rotary_width_names_the_op():
    x, cos, sin = inputs(64, 64)
    with pytest.raises(ValueError, match="spinquant::rope"):
        torch.ops.spinquant.rope(x, cos[..., :63], sin[..., :63])


class Rope(nn.Module):
    def forward(self, x, cos, sin):
        return torch.ops.spinquant.rope(x, cos, sin)


@pytest.mark.parametrize("dim, turned", SHAPES, ids=["full", "partial"])
def test_cpp_kernel_in_a_program_matches_float64(dim, turned):
    from executorch.exir import to_edge

    kernels.load_into_executorch_runtime()
    x, cos, sin = inputs(dim, turned)
    program = to_edge(torch.export.export(Rope(), (x, cos, sin))).to_executorch().buffer
    y = kernels.load_program(program).methods["forward"].execute([x, cos, sin])[0]
    assert y.shape == x.shape and torch.allclose(y.double(), reference(x, cos, sin), atol=1e-6)
