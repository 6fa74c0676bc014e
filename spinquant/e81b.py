"""QuIP#'s 1-bit E8 codebook (E81B): 256 points of E8, one 8-bit code per 8 weights, the residual stage of 3-bit E8P.

The points: zero, E8's 240 roots (norm² 2: the 112 vectors with two entries ±1, the 128 vectors of ±½ with an even
number of minus signs) and 15 of the 16 vectors ±2·e_i (norm² 4; −2·e_7 is left out, as in QuIP#, to make 256).
A code is the point's index in points(); the 256 points are few enough to search all of them (encode()).
"""

import itertools
from functools import cache

import torch

DIM = 8
CHUNK = 1 << 12  # rows encoded at a time: (rows, 256) distances of 8 MiB


@cache
def points() -> torch.Tensor:
    """(256, 8) float64, in a fixed order: zero, the 240 roots, then the ±2·e_i."""
    roots = [p for p in itertools.product((-1, 0, 1), repeat=DIM) if sum(v * v for v in p) == 2]
    roots += [h for h in itertools.product((-0.5, 0.5), repeat=DIM) if sum(v < 0 for v in h) % 2 == 0]
    axes = [tuple(2 * sign * (j == i) for j in range(DIM)) for sign in (1, -1) for i in range(DIM)][:-1]
    return torch.tensor([(0,) * DIM] + roots + axes, dtype=torch.float64)


def decode(codes: torch.Tensor) -> torch.Tensor:
    """(...,) integer codes → (..., 8) float64 points."""
    return points().to(codes.device)[codes.long()]


def encode(x: torch.Tensor) -> torch.Tensor:
    """(..., 8) → (...,) int64 codes of the nearest points (squared distance; the first of equals)."""
    rows = x.reshape(-1, DIM).double()
    grid = points().to(x.device)
    norms = (grid * grid).sum(-1)
    codes = [(norms - 2 * chunk @ grid.T).argmin(-1) for chunk in rows.split(CHUNK)]
    return (torch.cat(codes) if codes else rows.new_zeros(0, dtype=torch.long)).reshape(x.shape[:-1])
