"""Linears whose weights are QuIP#'s E8P codes (spinquant/quip.py), as the program runs them.

W = R_out·(scale·decode(codes))·R_inᵀ with R_in = diag(s_in)·H and R_outᵀ = diag(s_out)·H, so x·Wᵀ is: the input's
signs flipped and our Hadamard transform (x·R_in), our `spinquant::e8p_linear` on the codes (kernels/e8p_linear_op.py,
decoding as it multiplies), then the output's signs and the Hadamard transform again (·R_outᵀ). Linears that read one
input (q, k, v; gate, up) share R_in, so the input is turned once for all of them. A 4-bit weight's residual codes are
E8P codes too: a second `e8p_linear` on them, its scale divided by the residual's gain, adds to the first before the
output is turned (W is linear in its codewords).
"""

import torch
from torch import nn

import kernels.e8p_linear_op  # noqa: F401  (registers torch.ops.spinquant.e8p_linear)
from spinquant.quip import RESIDUAL_GAIN, E8PWeight, incoherence_signs
from spinquant.torchao_quant import E8P_QLINEAR


def has_e8p_codes(linear: nn.Module) -> bool:
    return isinstance(getattr(linear, "e8p", None), E8PWeight)


class E8PLinears(nn.Module):
    """One or more linears of one input, each on E8P codes; their outputs concatenated (biases too, where any has one)."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        weights = [linear.e8p for linear in linears]
        seeds = {w.seed for w in weights}
        if len(seeds) != 1:
            raise ValueError(f"linears of one input share R_in: one seed, not {sorted(seeds)}")
        if bits := sorted({w.bits for w in weights} - set(E8P_QLINEAR.values())):
            raise ValueError(f"the program runs 2- and 4-bit E8P codes (E8P residuals), not {bits[0]}-bit ones")
        for i, (linear, w) in enumerate(zip(linears, weights)):
            if w.residual is not None:
                self.register_buffer(f"residual{i}", w.residual.contiguous())
                self.register_buffer(f"residual_scale{i}", (w.scale.float() / RESIDUAL_GAIN[w.bits]).reshape(()))
            out_signs, in_signs = incoherence_signs(linear.out_features, linear.in_features, w.seed)  # one seed: one R_in
            self.register_buffer(f"codes{i}", w.codes.contiguous())
            self.register_buffer(f"scale{i}", w.scale.float().reshape(()))
            self.register_buffer(f"out_signs{i}", out_signs.float())
        self.register_buffer("in_signs", in_signs.float())
        self.parts = len(linears)
        bias = [linear.bias.detach() if linear.bias is not None else torch.zeros(linear.out_features) for linear in linears]
        self.bias = nn.Parameter(torch.cat(bias).float(), requires_grad=False) if any(linear.bias is not None for linear in linears) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        turned = torch.ops.spinquant.hadamard_transform(x * self.in_signs)
        outs = []
        for i in range(self.parts):
            z = torch.ops.spinquant.e8p_linear(turned, getattr(self, f"codes{i}"), getattr(self, f"scale{i}"))
            if hasattr(self, f"residual{i}"):
                z = z + torch.ops.spinquant.e8p_linear(turned, getattr(self, f"residual{i}"), getattr(self, f"residual_scale{i}"))
            outs.append(torch.ops.spinquant.hadamard_transform(z * getattr(self, f"out_signs{i}")))
        y = outs[0] if self.parts == 1 else torch.cat(outs, -1)
        return y if self.bias is None else y + self.bias
