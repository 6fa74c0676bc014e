"""`spinquant::rms_norm` (kernels/rms_norm_op.py, kernels/cpu/op_rms_norm.cpp) against a float64 reference."""

import pytest
import torch
from torch import nn

import kernels


def reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    x = x.double()
    y = x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.double()


def relative_error(y: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest |error| in a row over that row's norm, worst row: rows of every scale count alike."""
    return float(((y.double() - expected).abs().amax(-1) / expected.norm(dim=-1)).max())


def inputs(gain: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 576, generator=g) * torch.logspace(-3, 3, 40)[:, None]  # rows of every scale
    return x, (torch.rand(576, generator=g) + 0.5 if gain else None)


@pytest.mark.parametrize("gain", [False, True], ids=["folded-gain", "gain"])
def test_eager_op_matches_float64(gain):
    x, weight = inputs(gain)
    assert relative_error(torch.ops.spinquant.rms_norm(x, weight, 1e-5), reference(x, weight, 1e-5)) <= 1e-6


def test_a_wrong_gain_names_the_op():
    with pytest.raises(ValueError, match="spinquant::rms_norm"):
        torch.ops.spinquant.rms_norm(torch.randn(2, 8), torch.ones(4), 1e-5)


class Norm(nn.Module):
    def __init__(self, weight: torch.Tensor | None):
        super().__init__()
        self.weight = None if weight is None else nn.Parameter(weight, requires_grad=False)

    def forward(self, x):
        return torch.ops.spinquant.rms_norm(x, self.weight, 1e-5)


@pytest.mark.parametrize("gain", [False, True], ids=["folded-gain", "gain"])
def test_cpp_kernel_in_a_program_matches_float64(gain):
    from executorch.exir import to_edge

    kernels.load_into_executorch_runtime()
    x, weight = inputs(gain)
    program = to_edge(torch.export.export(Norm(weight), (x,))).to_executorch().buffer
    y = kernels.load_program(program).methods["forward"].execute([x])[0]
    assert y.shape == x.shape and relative_error(y, reference(x, weight, 1e-5)) <= 1e-6
