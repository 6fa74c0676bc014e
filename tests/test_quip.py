"""QuIP#'s BlockLDLQ and incoherence, against slow float64 references."""

import pytest
import torch

from spinquant import e8p
from spinquant.errors import UserError
from spinquant.quip import CODEBOOK_SCALE, block_ldlq, incoherence_rotations, quip_e8p


def correlated_hessian(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, dtype=torch.float64, generator=gen) @ torch.randn(n, n, dtype=torch.float64, generator=gen)
    return 2 * x.T @ x / x.shape[0]


def schur_reference(w: torch.Tensor, h: torch.Tensor, quantize, block: int, damp: float) -> torch.Tensor:
    """Optimal Brain Surgeon a block at a time, from the damped inverse Hessian itself: quantize a block, move the
    remaining columns by −E·(H⁻¹_bb)⁻¹·H⁻¹_b,rest, take the Schur complement as the remaining columns' inverse Hessian."""
    w = w.clone()
    h_inv = torch.linalg.inv(h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype))
    q = torch.empty_like(w)
    for b0 in range(0, w.shape[1], block):
        b1 = b0 + block
        q[:, b0:b1] = quantize(w[:, b0:b1])
        inv_bb = torch.linalg.inv(h_inv[:block, :block])
        w[:, b1:] -= (w[:, b0:b1] - q[:, b0:b1]) @ inv_bb @ h_inv[:block, block:]
        h_inv = h_inv[block:, block:] - h_inv[block:, :block] @ inv_bb @ h_inv[:block, block:]
    return q


@pytest.mark.parametrize("block", [1, 8])
def test_block_ldlq_is_optimal_brain_surgeon_block_by_block(block):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(12, 48, dtype=torch.float64, generator=gen)
    h = correlated_hessian(48)

    def to_grid(x):
        return torch.round(x * 2) / 2

    ours = block_ldlq(w, h, to_grid, block=block)
    assert torch.equal(ours, schur_reference(w, h, to_grid, block, 0.01))
    assert not torch.equal(ours, to_grid(w))  # the feedback moved some roundings


def test_quip_e8p_holds_codewords_in_the_incoherent_basis_and_beats_nearest_rounding():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(64, 192, dtype=torch.float64, generator=gen)
    w[:, 7] *= 30  # an outlier input, which incoherence spreads
    h = correlated_hessian(192, seed=3)
    ours = quip_e8p(w, h, seed=5)
    r_out, r_in = incoherence_rotations(64, 192, 5)
    turned = r_out.T @ w @ r_in
    scale = turned.pow(2).mean().sqrt() * CODEBOOK_SCALE
    codes = (r_out.T @ ours @ r_in) / scale
    assert (e8p.quantize(codes) - codes).abs().max() < 1e-9  # every group of 8 is a codeword

    def proxy(q):  # the layer's output error on its calibration inputs, tr(ΔHΔᵀ)
        d = q - w
        return torch.trace(d @ h @ d.T).item()

    nearest = r_out @ (e8p.quantize(turned / scale) * scale) @ r_in.T
    assert proxy(ours) < 0.8 * proxy(nearest)


def test_codebook_scale_is_the_least_squared_error_for_a_gaussian():
    x = torch.randn(4000, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    errors = {s: ((x - s * e8p.quantize(x / s)) ** 2).mean().item() for s in (0.85, CODEBOOK_SCALE, 1.1)}
    assert errors[CODEBOOK_SCALE] < min(errors[0.85], errors[1.1])


def test_a_weight_whose_inputs_are_not_a_multiple_of_eight_is_refused():
    with pytest.raises(UserError, match="this weight has 12: a multiple of 8 is needed"):
        quip_e8p(torch.zeros(4, 12), torch.eye(12))
