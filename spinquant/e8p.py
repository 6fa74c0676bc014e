"""QuIP#'s E8P codebook (Tseng et al., ICML 2024): 8 weights in one 16-bit code, 2 bits per weight.

The codewords are points of E8 shifted by ±¼. E8's half-integer coset D̂8 = D8 + ½ (vectors of half-odd integers with an
even sum) within radius √10 has 227 distinct absolute-value patterns; with 29 patterns of norm² 12 (five entries 3/2,
three 1/2: the lexicographically first 29 of those 56, whose choice does not matter to an exchangeable source such
as an incoherent weight) they make 256. A codeword is a pattern, signed so that its sum stays even (so seven signs
choose the eighth), shifted by +¼ or −¼: 256 · 2⁷ · 2 = 2¹⁶ codewords, every coordinate an odd multiple of ¼.

Code layout (ours): bits 0-7 the pattern, bits 8-14 the signs of coordinates 1-7 (set: negative), bit 15 the shift
(set: +¼). Coordinate 0's sign is whatever makes the number of negative coordinates as even or odd as the pattern's sum.
Decoding is a table lookup, sign flips and a shift; encoding finds the nearest codeword exactly (encode()).
"""

import itertools
from functools import cache

import torch

DIM = 8
PATTERNS = 256
SHIFT = 0.25
CHUNK = 1 << 10  # rows encoded at a time: (rows, 256, 8) float64 intermediates of 16 MiB, cache-sized (4x faster than 256 MiB here)


@cache
def abs_patterns() -> torch.Tensor:
    """(256, 8) float64: the absolute values of D̂8's points of norm² ≤ 10, then 29 of norm² 12, each set sorted."""
    halves = (0.5, 1.5, 2.5)  # |x| ≥ 3.5 has norm² > 10 already
    inside = sorted(p for p in itertools.product(halves, repeat=DIM) if sum(v * v for v in p) <= 10)
    norm12 = sorted(set(itertools.permutations((1.5,) * 5 + (0.5,) * 3)))[:PATTERNS - len(inside)]
    return torch.tensor(inside + norm12, dtype=torch.float64)


def quarter_patterns() -> torch.Tensor:
    """(256, 8) int8: abs_patterns() in quarter units (2, 6, 10), the table the C++ decoder holds (kernels/cpu/e8p_tables.h)."""
    return (4 * abs_patterns()).to(torch.int8)


def negatives_parity(patterns: torch.Tensor) -> torch.Tensor:
    """Per pattern, the parity the number of negative coordinates must have for the signed sum to be even:
    flipping x_i changes the sum by 2x_i, an odd integer, so (#negative) ≡ Σ|x| (mod 2)."""
    return patterns.sum(-1).round().long() % 2


def decode(codes: torch.Tensor) -> torch.Tensor:
    """(...,) integer codes → (..., 8) float64 codewords."""
    codes = codes.long()
    patterns = abs_patterns().to(codes.device)
    index = codes & 0xFF
    flips = (codes[..., None] >> (torch.arange(1, DIM, device=codes.device) + 7)) & 1  # coordinates 1-7
    first = (flips.sum(-1) + negatives_parity(patterns)[index]) % 2
    negative = torch.cat([first[..., None], flips], -1)
    shift = torch.where((codes >> 15) & 1 == 1, SHIFT, -SHIFT)
    return patterns[index] * (1 - 2 * negative) + shift[..., None]


def encode(x: torch.Tensor) -> torch.Tensor:
    """(..., 8) → (...,) int32 codes of the nearest codewords (squared distance; the first of equals).

    For a shift and a pattern s, the best signs are x's own, unless their count of negatives has the wrong parity:
    then the cheapest single flip, coordinate i costing 4|y_i|s_i over the unconstrained (|y| − s)². So the exact
    nearest point is a minimum over 2 shifts × 256 patterns, not over 2¹⁶ codewords."""
    rows = x.reshape(-1, DIM).double()
    codes = torch.cat([_encode_rows(chunk) for chunk in rows.split(CHUNK)]) if rows.numel() else rows.new_zeros(0, dtype=torch.int32)
    return codes.reshape(x.shape[:-1])


def _encode_rows(x: torch.Tensor) -> torch.Tensor:
    minus_cost, minus_code = _nearest_with_shift(x, 0)
    plus_cost, plus_code = _nearest_with_shift(x, 1)
    return torch.where(plus_cost < minus_cost, plus_code, minus_code).int()


def _nearest_with_shift(x: torch.Tensor, shift_bit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The squared distance to, and the code of, the nearest codeword with this shift (bit 15), per row."""
    s = abs_patterns().to(x.device)
    y = x - (SHIFT if shift_bit else -SHIFT)
    a, negative = y.abs(), y < 0
    base = (a * a).sum(-1, keepdim=True) - 2 * a @ s.T + (s * s).sum(-1)  # (rows, 256): Σ(|y| − s)²
    penalty, cheapest = (4 * a[:, None, :] * s[None]).min(-1)  # (rows, 256)
    wrong = (negative.sum(-1, keepdim=True) % 2) != negatives_parity(s)  # (rows, 256)
    cost, pattern = (base + torch.where(wrong, penalty, torch.zeros_like(penalty))).min(-1)
    signs = negative.long()
    fix = wrong.gather(1, pattern[:, None])[:, 0]
    flip = cheapest.gather(1, pattern[:, None])[:, 0]
    signs[fix, flip[fix]] ^= 1
    return cost, pattern | (signs[:, 1:] << (torch.arange(1, DIM, device=x.device) + 7)).sum(-1) | (shift_bit << 15)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """x (..., 8k) with each group of 8 along the last dimension replaced by its nearest codeword (float64)."""
    groups = x.unflatten(-1, (-1, DIM))
    return decode(encode(groups)).flatten(-2)
