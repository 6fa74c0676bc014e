"""SGD on the Stiefel manifold by the Cayley transform (Li, Fuxin & Todorovic, ICLR 2020), SpinQuant's optimizer.

For a parameter X (n × p, XᵀX = I) with Euclidean gradient G, one step is (their Algorithm 2):

    M ← β·M − G                                  (momentum, in the ambient space)
    Ŵ = M·Xᵀ − ½·X·(Xᵀ·M·Xᵀ);  W = Ŵ − Ŵᵀ          (skew-symmetric: the direction on the manifold)
    M ← W·X                                      (momentum projected onto the tangent space)
    α = min(lr, 2q / ‖W‖₁)                       (step bounded by the direction's norm)
    Y = X + α·M;  Y ← X + (α/2)·W·(X + Y) until it stops changing   (fixed point of the Cayley transform)

The Cayley transform (I − α/2·W)⁻¹(I + α/2·W) of a skew-symmetric W is orthogonal, so X stays on the
manifold. ‖W‖₁ bounds W's spectral norm, so α‖W‖₂/2 ≤ q < 1 and the fixed-point iteration contracts.
"""

from collections.abc import Iterable

import torch
from torch.optim import Optimizer

EPS = 1e-8


class CayleySGD(Optimizer):
    """Cayley SGD for parameters with orthonormal columns (here square rotations).

    Each step runs in float64 whatever the parameter's dtype: the fixed point is then reached to
    float64 accuracy, and rounding back to the parameter's dtype is the only drift per step.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        momentum: float = 0.0,
        q: float = 0.5,
        max_fixed_point_iters: int = 100,
    ):
        if lr <= 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not 0 < q < 1:
            raise ValueError(f"q must be in (0, 1), got {q}")
        defaults = dict(lr=lr, momentum=momentum, q=q, max_fixed_point_iters=max_fixed_point_iters)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        x = p.detach().to(torch.float64)
        g = p.grad.detach().to(torch.float64)
        state = self.state[p]
        m = group["momentum"] * state["momentum_buffer"] if "momentum_buffer" in state else torch.zeros_like(x)
        m = m - g
        w = skew_direction(x, m)
        m = w @ x
        alpha = min(group["lr"], 2 * group["q"] / (matrix_norm_1(w) + EPS))
        p.copy_(cayley_fixed_point(x, w, m, alpha, group["max_fixed_point_iters"]).to(p.dtype))
        state["momentum_buffer"] = m.to(p.dtype)


def skew_direction(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """W = Ŵ − Ŵᵀ with Ŵ = M·Xᵀ − ½·X·(Xᵀ·M·Xᵀ): the skew-symmetric generator of the step."""
    w_hat = m @ x.T - 0.5 * x @ (x.T @ m @ x.T)
    return w_hat - w_hat.T


def matrix_norm_1(w: torch.Tensor) -> float:
    """Largest column sum of |W|: cheap, and for skew-symmetric W an upper bound on ‖W‖₂."""
    return w.abs().sum(0).max().item()


def cayley_fixed_point(x: torch.Tensor, w: torch.Tensor, m: torch.Tensor, alpha: float, max_iters: int) -> torch.Tensor:
    """Y = (I − α/2·W)⁻¹(I + α/2·W)·X by fixed-point iteration from Y₀ = X + α·M (= X + α·W·X)."""
    y = x + alpha * m
    for _ in range(max_iters):
        nxt = x + (alpha / 2) * (w @ (x + y))
        converged = (nxt - y).abs().max().item() <= 1e-14 * max(1.0, y.abs().max().item())
        y = nxt
        if converged:
            break
    return y
