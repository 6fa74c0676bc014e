"""`spinquant::e8p_linear`: a linear layer whose weight is QuIP#'s E8P codes (spinquant/e8p.py), 2 bits a weight, and one
float scale per matrix: y = x @ (scale · decode(codes).reshape(out, in))ᵀ. This is its eager side, the decoded weight
and torch's matmul; kernels/cpu/op_e8p_linear.cpp runs its out variant in the program, decoding as it multiplies, so the
program holds the weight at 2 bits and never a float copy of it.

codes: int16 (out_features, in_features / 8), each the 16-bit code's bits; scale: one float32."""

import torch

from spinquant import e8p

OP = "spinquant::e8p_linear"

_lib = torch.library.Library("spinquant", "FRAGMENT")
_lib.define("e8p_linear(Tensor x, Tensor codes, Tensor scale) -> Tensor")
_lib.define("e8p_linear.out(Tensor x, Tensor codes, Tensor scale, *, Tensor(a!) out) -> Tensor(a!)")


def e8p_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    weight = (e8p.decode(codes).flatten(-2) * scale.double()).float()  # codeword · scale, rounded once
    return x @ weight.T


def _check(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """One line naming the op for anything the C++ kernel cannot take, at call and at trace time."""
    if x.dtype != torch.float32 or codes.dtype != torch.int16 or scale.dtype != torch.float32:
        raise TypeError(f"{OP}: x and scale must be float32 and codes int16, got {x.dtype}, {codes.dtype} and {scale.dtype}")
    if x.dim() == 0 or codes.dim() != 2 or codes.shape[1] == 0 or scale.numel() != 1:
        raise ValueError(f"{OP}: needs x (..., in), codes (out, in / 8) and one scale, got {tuple(x.shape)}, {tuple(codes.shape)} and {tuple(scale.shape)}")
    if x.shape[-1] % e8p.DIM or x.shape[-1] != e8p.DIM * codes.shape[1]:
        raise ValueError(f"{OP}: in_features must be a multiple of 8 equal to 8 · codes.shape[1], got {x.shape[-1]} and {tuple(codes.shape)}")
    if not (x.is_contiguous() and codes.is_contiguous()):
        raise ValueError(f"{OP}: x and codes must be contiguous; call .contiguous() first")


@torch.library.impl(_lib, "e8p_linear", "CompositeExplicitAutograd")
def _e8p_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    _check(x, codes, scale)
    return e8p_linear(x, codes, scale)


@torch.library.impl(_lib, "e8p_linear.out", "CompositeExplicitAutograd")
def _e8p_linear_out(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    _check(x, codes, scale)
    return out.copy_(e8p_linear(x, codes, scale))


@torch.library.register_fake("spinquant::e8p_linear")
def _e8p_linear_fake(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    _check(x, codes, scale)
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


@torch.library.register_fake("spinquant::e8p_linear.out")
def _e8p_linear_out_fake(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    return out
