"""The damped Cholesky factorizations GPTQ (spinquant/gptq.py) and QuIP#'s BlockLDLQ (spinquant/quip.py) share."""

from collections.abc import Iterator

import torch

from spinquant.errors import UserError

# Each failed Cholesky multiplies the damping by 10; after this many, the Hessian is hopeless.
CHOLESKY_TRIES = 8


def damped(h: torch.Tensor, damp: float) -> Iterator[torch.Tensor]:
    """H + λI, λ = damp · mean diag(H), growing tenfold at each try the caller asks for; too many is an error."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = h.diagonal().mean()
    ratio = damp
    for _ in range(CHOLESKY_TRIES):
        yield h + ratio * mean_diag * eye
        ratio = ratio * 10 if ratio > 0 else 1e-4
    raise UserError(f"the Hessian stays singular even with damping {ratio / 10:g} × its mean diagonal")


def upper_cholesky_of_inverse(h: torch.Tensor, damp: float) -> torch.Tensor:
    """U with UᵀU = (H + λI)⁻¹; λ grows until both factorizations succeed."""
    for h_damped in damped(h, damp):
        lower, info = torch.linalg.cholesky_ex(h_damped)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0 and torch.isfinite(upper).all():
                return upper
