import pytest
import torch

from spinquant.cayley import CayleySGD
from spinquant.hadamard import random_orthogonal_matrix


def orthonormality_error(r: torch.Tensor) -> float:
    r = r.detach().to(torch.float64)
    return (r.T @ r - torch.eye(r.shape[1], dtype=torch.float64)).abs().max().item()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("n", [64, 96])
def test_stays_orthonormal_for_1000_steps_in_float32(n, momentum):
    gen = torch.Generator().manual_seed(n)
    r = torch.nn.Parameter(random_orthogonal_matrix(n, gen).float())
    opt = CayleySGD([r], lr=1.5, momentum=momentum)
    for _ in range(1000):
        r.grad = torch.randn(n, n, generator=gen) * 10  # large, noisy gradients: the step bound is hit every time
        opt.step()
    assert orthonormality_error(r) <= 1e-4


def test_solves_orthogonal_procrustes():
    """min ‖A·R − B‖² over orthogonal R has the closed form R* = U·Vᵀ with U·S·Vᵀ = svd(Aᵀ·B)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=gen, dtype=torch.float64)
    b = a @ random_orthogonal_matrix(16, gen) + 0.01 * torch.randn(200, 16, generator=gen, dtype=torch.float64)
    u, _, vt = torch.linalg.svd(a.T @ b)
    expected = u @ vt
    # Cayley steps never leave SO(n): start in the component of the answer (det ±1).
    start = torch.eye(16, dtype=torch.float64)
    start[-1, -1] = torch.det(expected).sign()
    r = torch.nn.Parameter(start)
    opt = CayleySGD([r], lr=0.002, momentum=0.9)
    for _ in range(500):
        opt.zero_grad()
        (a @ r - b).pow(2).sum().backward()
        opt.step()
    assert (r.detach() - expected).abs().max() < 1e-6


def test_step_is_bounded_by_the_direction_norm():
    gen = torch.Generator().manual_seed(1)
    r = torch.nn.Parameter(torch.eye(32, dtype=torch.float64))
    opt = CayleySGD([r], lr=1e9)
    r.grad = torch.randn(32, 32, generator=gen, dtype=torch.float64) * 1e6
    g = r.grad.clone()
    opt.step()
    # The step is α = 2q/‖W‖₁ (not lr), and the fixed point is the exact Cayley transform:
    # (I − A/2)⁻¹(I + A/2) with A = α·W, W = X·Gᵀ − G·Xᵀ projected as in Li et al. (X = I: W = (Gᵀ − G)/2).
    eye = torch.eye(32, dtype=torch.float64)
    w = (g.T - g) / 2
    a = w / w.abs().sum(0).max()
    expected = torch.linalg.solve(eye - a / 2, eye + a / 2)
    assert (r.detach() - expected).abs().max() < 1e-12
    assert orthonormality_error(r) < 1e-12


def test_a_zero_gradient_leaves_the_rotation_unchanged():
    r = torch.nn.Parameter(random_orthogonal_matrix(8, torch.Generator().manual_seed(2)).float())
    before = r.detach().clone()
    r.grad = torch.zeros_like(r)
    CayleySGD([r], lr=1.0).step()
    assert torch.equal(r.detach(), before)
