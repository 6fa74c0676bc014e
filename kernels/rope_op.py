"""`spinquant::rope`: rotary position embedding in Hugging Face's half-split layout as one operator, x · cos +
rotate_half(x) · sin over a head's first cos.shape[-1] values (the rest, under partial rotary, unturned). This is its
eager side, the expression itself; kernels/cpu/op_rope.cpp runs its out variant in the program, one kernel call per
layer (queries and keys together) where ExecuTorch's CPU kernels take six."""

import torch

_lib = torch.library.Library("spinquant", "FRAGMENT")
_lib.define("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor")
_lib.define("rope.out(Tensor x, Tensor cos, Tensor sin, *, Tensor(a!) out) -> Tensor(a!)")


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, seq, heads, head_dim), cos and sin (batch, seq, 1, turned)."""
    turned = cos.shape[-1]
    if turned < x.shape[-1]:
        return torch.cat([rope(x[..., :turned], cos, sin), x[..., turned:]], dim=-1)
    half = turned // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if any(t.dtype != torch.float32 for t in (x, cos, sin)) or x.dim() != 4 or cos.shape != sin.shape or cos.shape[-1] > x.shape[-1] or cos.shape[-1] % 2:
        raise ValueError(f"spinquant::rope: x {tuple(x.shape)} and cos/sin {tuple(cos.shape)} must be float32, "
                         "(batch, seq, heads, head_dim) and (batch, seq, 1, an even count up to head_dim)")


@torch.library.impl(_lib, "rope", "CompositeExplicitAutograd")
def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    _check(x, cos, sin)
    return rope(x, cos, sin)


@torch.library.impl(_lib, "rope.out", "CompositeExplicitAutograd")
def _rope_out(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    _check(x, cos, sin)
    return out.copy_(rope(x, cos, sin))


@torch.library.register_fake("spinquant::rope")
def _rope_fake(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    _check(x, cos, sin)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("spinquant::rope.out")
def _rope_out_fake(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    return out
