"""QuIP#'s 2-, 3- and 4-bit weights (Tseng et al., ICML 2024): incoherence, then BlockLDLQ with the E8P codebook
(spinquant/e8p.py), and for 3 and 4 bits a second, residual code per group (E81B, spinquant/e81b.py, or E8P again).

For a weight W (out, in) and its input Hessian H = 2XᵀX/n:
- incoherence: W̃ = R_outᵀ·W·R_in and H̃ = R_inᵀ·H·R_in with random Hadamard rotations (diag(±1)·Hadamard, QuaRot's,
  spinquant/hadamard.py) on both sides. W̃'s entries come out near Gaussian, whatever W's outliers were, which is the
  source E8P's ball of codewords is shaped for; the linear computes the same with x·R_in in and R_outᵀ applied out.
- scale: one per matrix, W̃'s RMS times CODEBOOK_SCALE[bits].
- residual vector quantization (3 and 4 bits): what the first codeword leaves, times RESIDUAL_GAIN[bits], rounded to
  its nearest point of the residual codebook, which adds its value over the gain.
- BlockLDLQ: GPTQ's error feedback over blocks of 8 columns, each block's rows rounded to their nearest codewords.
The result is dequantized back to W's basis (fake quantization): exactly what a program holding the codes and
applying both rotations computes.
"""

import dataclasses
from dataclasses import dataclass

import torch

from spinquant import e81b, e8p
from spinquant.cholesky import upper_cholesky_of_inverse
from spinquant.errors import UserError
from spinquant.hadamard import hadamard_matrix, random_hadamard_matrix

# Least mean squared error of s·Q(x/s) for x ~ N(0, 1) in each coordinate, Q the nearest E8P codeword: s from 0.94 to
# 0.98 in steps of 0.01 on 40,000 vectors, 0.9137 at 0.96 and 0.97 (0.0920 at 1.0). For 3 and 4 bits, s and the
# residual's gain g together, Q(y) = E8P(y) + R(g·(y − E8P(y)))/g, on 20,000 vectors over a grid of steps 0.05 (s)
# and 0.1 to 0.2 (g): 3 bits (R = E81B) 0.0299 at s 1.0, g 2.0; 4 bits (R = E8P) 0.0085 at s 1.1, g 3.8. Int4 in
# groups of 32 leaves about 0.01.
CODEBOOK_SCALE = {2: 0.965, 3: 1.0, 4: 1.1}
RESIDUAL_GAIN = {3: 2.0, 4: 3.8}
RESIDUAL_CODEBOOK = {3: e81b, 4: e8p}


def block_ldlq(w: torch.Tensor, hessian: torch.Tensor, quantize, block: int = e8p.DIM, damp: float = 0.01) -> torch.Tensor:
    """Columns of w (out, in) `block` at a time, left to right, each block quantized by `quantize` after the earlier
    blocks' errors are fed forward: the block's error E leaves the later columns W_rest − E·U_bb⁻¹·U_b,rest, with
    UᵀU = (H + λI)⁻¹ (GPTQ's Cholesky form, a block of columns at a time instead of one). Float64; the quantized w."""
    w = w.double().clone()
    u = upper_cholesky_of_inverse(hessian.double(), damp)
    q = torch.empty_like(w)
    for b0 in range(0, w.shape[1], block):
        b1 = b0 + block
        q[:, b0:b1] = quantize(w[:, b0:b1])
        error = torch.linalg.solve_triangular(u[b0:b1, b0:b1], w[:, b0:b1] - q[:, b0:b1], upper=True, left=False)
        w[:, b1:] -= error @ u[b0:b1, b1:]
    return q


def incoherence_rotations(out_features: int, in_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """R_out, R_in: random Hadamard rotations of each side (float64). R_in = diag(±1)·H and R_out = (diag(±1)·H)ᵀ, so
    that a program turns its input by x·R_in and its output by z·R_outᵀ both as signs then our Hadamard transform (H is
    not symmetric for every size). R_in is drawn from the seed and the input size alone, so linears that share an input
    (q, k, v) share it too: one online transform serves them all."""
    return (random_hadamard_matrix(out_features, torch.Generator().manual_seed(2 * seed + 1)).T,
            random_hadamard_matrix(in_features, torch.Generator().manual_seed(2 * seed)))


def incoherence_signs(out_features: int, in_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """s_out, s_in (float64 ±1) with R_outᵀ = diag(s_out)·H and R_in = diag(s_in)·H: what a program applies before
    each Hadamard transform. diag(R·Hᵀ), row by row (R ∘ H summed), recovers them, H being orthonormal."""
    r_out, r_in = incoherence_rotations(out_features, in_features, seed)
    return torch.sign((r_out.T * hadamard_matrix(out_features)).sum(1)), torch.sign((r_in * hadamard_matrix(in_features)).sum(1))


@dataclass
class E8PWeight:
    """A linear's weight as QuIP# stores it: the E8P codes of its incoherent form R_outᵀ·W·R_in / scale, for 3 and 4 bits
    the residual codes too, the scale, and the seed that draws R_out and R_in."""

    codes: torch.Tensor  # int16 (out, in / 8): each code's 16 bits
    scale: torch.Tensor  # float32, one value
    seed: int
    bits: int = 2
    residual: torch.Tensor | None = None  # (out, in / 8): int16 E8P codes (4 bits) or uint8 E81B codes (3 bits)

    def codewords(self) -> torch.Tensor:
        """The incoherent weight over its scale, float64 (out, in): each group's codeword plus its residual's."""
        words = e8p.decode(self.codes.long() & 0xFFFF)
        if self.residual is not None:
            words = words + RESIDUAL_CODEBOOK[self.bits].decode(self.residual.long() & 0xFFFF) / RESIDUAL_GAIN[self.bits]
        return words.flatten(-2)

    def to(self, device: str | torch.device) -> "E8PWeight":
        residual = self.residual.to(device) if self.residual is not None else None
        return dataclasses.replace(self, codes=self.codes.to(device), residual=residual)

    def dequantize(self) -> torch.Tensor:
        """The quantized weight in W's own basis, float64: R_out·(scale·codewords)·R_inᵀ."""
        out, groups = self.codes.shape
        r_out, r_in = (r.to(self.codes.device) for r in incoherence_rotations(out, groups * e8p.DIM, self.seed))
        return r_out @ (self.codewords() * self.scale.double()) @ r_in.T


class GroupCoder:
    """Rounds groups of 8 to the codebook of `bits` bits and keeps the codes it chose, in the order it was called
    (left to right, as BlockLDLQ goes)."""

    def __init__(self, bits: int):
        self.bits = bits
        self.codes: list[torch.Tensor] = []
        self.residual: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.unflatten(-1, (-1, e8p.DIM))
        first = e8p.encode(groups)
        self.codes.append(first)
        words = e8p.decode(first)
        if self.bits in RESIDUAL_GAIN:
            gain, book = RESIDUAL_GAIN[self.bits], RESIDUAL_CODEBOOK[self.bits]
            second = book.encode(gain * (groups - words))
            self.residual.append(second)
            words = words + book.decode(second) / gain
        return words.flatten(-2)

    def weight(self, scale: torch.Tensor, seed: int) -> E8PWeight:
        codes = torch.cat(self.codes, -1)
        residual = torch.cat(self.residual, -1) if self.residual else None
        if residual is not None:
            residual = residual.to(torch.uint8) if self.bits == 3 else as_int16(residual)
        return E8PWeight(as_int16(codes), scale.cpu(), seed, self.bits, residual)


def as_int16(codes: torch.Tensor) -> torch.Tensor:
    """16-bit codes (0 to 65535) in int16's bits."""
    return torch.where(codes >= 1 << 15, codes - (1 << 16), codes).to(torch.int16)


def quip_e8p(weight: torch.Tensor, hessian: torch.Tensor | None = None, seed: int = 0, damp: float = 0.01, bits: int = 2) -> E8PWeight:
    """QuIP#'s E8P weight of `bits` bits (2: E8P; 3: E8P + E81B; 4: E8P + E8P) for `weight` (out, in): BlockLDLQ under
    `hessian` (in, in), or without one each group's nearest codeword (round to nearest, no feedback)."""
    if bits not in CODEBOOK_SCALE:
        raise UserError(f"E8P codes are 2, 3 or 4 bits a weight, not {bits}")
    if weight.shape[1] % e8p.DIM:
        raise UserError(f"E8P codes 8 inputs at a time, and this weight has {weight.shape[1]}: a multiple of 8 is needed")
    r_out, r_in = (r.to(weight.device) for r in incoherence_rotations(*weight.shape, seed))
    w = r_out.T @ weight.double() @ r_in
    scale = (w.pow(2).mean().sqrt() * CODEBOOK_SCALE[bits]).float()
    target = w / scale.double()
    coder = GroupCoder(bits)
    if hessian is None:
        coder(target)
    else:
        block_ldlq(target, r_in.T @ hessian.to(weight.device, torch.float64) @ r_in, coder, damp=damp)
    return coder.weight(scale, seed)
