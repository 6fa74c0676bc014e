"""Orthonormal Hadamard matrices of size n = K·2^m and a fast transform by them.

H_n = H_K ⊗ Sylvester(2^m) / √n. The K×K tables come from torchao (a checked source, see
LANDSCAPE.md), and orders torchao lacks are built by Paley's second construction (76 for
Qwen2.5-0.5B's MLP of 4,864 = 76·2^6, 148 for Qwen2.5-7B's 18,944 = 148·2^7); every table is
verified by H·Hᵀ = K·I before use. The transform is defined as
`x @ hadamard_matrix(n)` over the last dimension, and every fused weight uses that same matrix.
"""

import functools
import json
import math
from importlib.util import find_spec
from pathlib import Path

import torch

from spinquant.errors import UserError

TORCHAO_K = (12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 156, 172)
# Order 2(q + 1) from a prime q ≡ 1 (mod 4). None of them is a torchao order times a power of two, so every
# size the torchao orders cover keeps its factorization (and its fused weights) unchanged.
PALEY_K = {76: 37, 148: 73}
SUPPORTED_K = tuple(sorted((1, *TORCHAO_K, *PALEY_K)))


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@functools.cache
def _torchao_tables() -> dict[str, list[list[int]]]:
    # Read the file without importing torchao.prototype.spinquant, which prints a GPU notice.
    root = Path(find_spec("torchao").origin).parent
    path = root / "prototype" / "spinquant" / "_hadamard_matrices.json"
    return json.loads(path.read_text())


@functools.cache
def hadamard_k(k: int) -> torch.Tensor:
    """The unnormalized ±1 Hadamard matrix of order k (float64), checked by H·Hᵀ = k·I."""
    if k == 1:
        h = torch.ones(1, 1, dtype=torch.float64)
    elif k in PALEY_K:
        h = paley_hadamard(PALEY_K[k])
    elif k in TORCHAO_K:
        # Stored transposed: QuaRot, SpinQuant and torchao apply their tables as x @ (Tᵀ ⊗ S), and on
        # SmolLM2 that convention matters (W4A8 perplexity 34.9 with Tᵀ, 38.8 with T on 3 windows).
        h = torch.tensor(_torchao_tables()[f"had{k}"], dtype=torch.float64).T.contiguous()
    else:
        raise UserError(f"no Hadamard table of order {k}; orders available: {SUPPORTED_K}")
    if not torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64)):
        raise RuntimeError(f"Hadamard table of order {k} fails H·Hᵀ = {k}·I")
    return h


def paley_hadamard(q: int) -> torch.Tensor:
    """Paley's second construction: a symmetric ±1 Hadamard matrix of order 2(q + 1) from a prime q ≡ 1 (mod 4).

    Q[i, j] = χ(j − i), χ the quadratic character mod q, is symmetric with a zero diagonal, so
    C = [[0, 1ᵀ], [1, Q]] is a symmetric conference matrix (C² = q·I), and with A = [[1, 1], [1, −1]],
    B = [[1, −1], [−1, −1]] (A² = B² = 2I, AB + BA = 0): H = C ⊗ A + I ⊗ B has H·Hᵀ = 2(q + 1)·I.
    """
    if q < 5 or q % 4 != 1 or any(q % d == 0 for d in range(2, math.isqrt(q) + 1)):
        raise ValueError(f"Paley's second construction needs a prime q ≡ 1 (mod 4), not {q}")
    squares = {i * i % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if r in squares else -1.0 for r in range(1, q)], dtype=torch.float64)
    i = torch.arange(q)
    conference = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    conference[0, 1:] = conference[1:, 0] = 1
    conference[1:, 1:] = chi[(i[None, :] - i[:, None]) % q]
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(conference, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def factor_size(n: int) -> tuple[int, int]:
    """(K, 2^m) with n = K·2^m for the smallest supported K; a clear error when none exists."""
    for k in SUPPORTED_K:
        if n % k == 0 and _is_pow2(n // k):
            return k, n // k
    raise UserError(
        f"no Hadamard matrix of size {n}: supported sizes are K·2^m with K in {SUPPORTED_K} "
        "(use the block-diagonal fallback to rotate it in supported blocks)"
    )


def is_supported_size(n: int) -> bool:
    return any(n % k == 0 and _is_pow2(n // k) for k in SUPPORTED_K)


def block_size_for(n: int) -> int:
    """The largest supported Hadamard size dividing n: the block of the block-diagonal fallback."""
    return max(b for b in range(1, n + 1) if n % b == 0 and is_supported_size(b))


def sylvester(m: int) -> torch.Tensor:
    """Unnormalized Sylvester Hadamard matrix of order m = 2^j (float64), symmetric."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int, block_fallback: bool = False) -> torch.Tensor:
    """Orthonormal H (float64) such that hadamard_transform(x) == x @ H."""
    if block_fallback and not is_supported_size(n):
        b = block_size_for(n)
        return torch.block_diag(*[hadamard_matrix(b)] * (n // b))
    k, m = factor_size(n)
    return torch.kron(hadamard_k(k), sylvester(m)) / math.sqrt(n)


def _butterfly(x: torch.Tensor) -> torch.Tensor:
    """x @ sylvester(M) over the last dimension in log2(M) add/subtract stages."""
    shape, m = x.shape, x.shape[-1]
    h = 1
    while h < m:
        pairs = x.reshape(-1, m // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        x = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return x.reshape(shape)


def hadamard_transform(x: torch.Tensor, block_fallback: bool = False) -> torch.Tensor:
    """x @ hadamard_matrix(n) over the last dimension: butterfly on 2^m, dense K×K on the rest."""
    n = x.shape[-1]
    if block_fallback and not is_supported_size(n):
        b = block_size_for(n)
        return hadamard_transform(x.reshape(*x.shape[:-1], n // b, b)).reshape(x.shape)
    k, m = factor_size(n)
    y = _butterfly(x.reshape(*x.shape[:-1], k, m))
    if k > 1:
        # (H_K ⊗ S)[(a,b),(c,d)] = H_K[a,c]·S[b,d], so the K axis is multiplied by H_Kᵀ.
        y = torch.einsum("...am,ac->...cm", y, hadamard_k(k).to(y.device, y.dtype))
    return (y / math.sqrt(n)).reshape(x.shape)


def random_hadamard_matrix(n: int, generator: torch.Generator) -> torch.Tensor:
    """diag(±1)·H: the random Hadamard rotation of QuaRot (float64, orthonormal)."""
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs[:, None] * hadamard_matrix(n)


def random_orthogonal_matrix(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal matrix (float64) by QR with the sign of R's diagonal fixed."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]
