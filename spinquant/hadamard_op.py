"""`spinquant::hadamard_transform`: the online Hadamard rotation as a PyTorch operator.

y = x @ hadamard_matrix(n) over the last dimension. One node in torch.export graphs; its out
variant is what ExecuTorch's to_executorch emits, and kernels/cpu implements that at run time.
Every input check runs when the op is called or traced (fake tensors included), so a program
that exported never meets them at run time.
"""

import functools
import math
from importlib.util import find_spec
from types import ModuleType

import torch

from spinquant import hadamard
from spinquant.errors import UserError

OP = "spinquant::hadamard_transform"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # what the C++ kernel runs

_lib = torch.library.Library("spinquant", "DEF")
_lib.define("hadamard_transform(Tensor x) -> Tensor")
_lib.define("hadamard_transform.out(Tensor x, *, Tensor(a!) out) -> Tensor(a!)")
# x @ Hᵀ, the transform's gradient. Not the same transform: H_K is not symmetric for most K.
_lib.define("hadamard_transform_transposed(Tensor x) -> Tensor")


def check_input(x: torch.Tensor, op: str = OP) -> tuple[int, int]:
    """(K, 2^m) of x's last dimension; a clear error naming `op` for any input it cannot take."""
    if x.dtype not in DTYPES:
        raise TypeError(f"{op}: dtype {x.dtype} is not supported; use float32, float16, bfloat16 or float64")
    if x.dim() == 0:
        raise ValueError(f"{op}: the input needs at least one dimension")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(
            f"{op}: the last dimension must be contiguous (stride 1), got stride {x.stride(-1)}; "
            "call .contiguous() first"
        )
    try:
        return hadamard.factor_size(x.shape[-1])
    except UserError as e:
        raise UserError(f"{op}: {e}") from None


@functools.cache
def _fast_hadamard_transform() -> ModuleType | None:
    """The CUDA package SpinQuant itself uses, when installed."""
    if find_spec("fast_hadamard_transform") is None:
        return None
    import fast_hadamard_transform

    return fast_hadamard_transform


def _sylvester(z: torch.Tensor) -> torch.Tensor:
    """z @ S/√m over the last dimension m, a power of two."""
    fht = _fast_hadamard_transform() if z.is_cuda else None
    if fht is not None:
        return fht.hadamard_transform(z.contiguous(), scale=1 / math.sqrt(z.shape[-1]))
    # The butterfly on other devices too: a dense H for n = 14336 would be 0.8 GB.
    return hadamard.hadamard_transform(z)


def transform(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x @ H, or x @ Hᵀ, over the last dimension; half types are computed in float32 and rounded
    once, as the C++ kernel does. H = (H_K ⊗ S)/√n, so the K axis meets H_K and the rest S."""
    k, m = check_input(x, "spinquant::hadamard_transform_transposed" if transpose else OP)
    wide = x if x.dtype in (torch.float32, torch.float64) else x.float()
    y = _sylvester(wide.reshape(*x.shape[:-1], k, m))
    if k > 1:
        hk = hadamard.hadamard_k(k).to(y.device, y.dtype) / math.sqrt(k)
        # (H_K ⊗ S)[(a,b),(c,d)] = H_K[a,c]·S[b,d]: x @ H contracts H_K's row index a, x @ Hᵀ its column.
        y = torch.einsum("...ad,ca->...cd" if transpose else "...ad,ac->...cd", y, hk)
    return y.reshape(x.shape).to(x.dtype)


@torch.library.impl(_lib, "hadamard_transform", "CompositeExplicitAutograd")
def _hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    return transform(x)


@torch.library.impl(_lib, "hadamard_transform_transposed", "CompositeExplicitAutograd")
def _hadamard_transform_transposed(x: torch.Tensor) -> torch.Tensor:
    return transform(x, transpose=True)


@torch.library.impl(_lib, "hadamard_transform.out", "CompositeExplicitAutograd")
def _hadamard_transform_out(x: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    _check_out(x, out)
    return out.copy_(transform(x))


def _check_out(x: torch.Tensor, out: torch.Tensor) -> None:
    check_input(x, f"{OP}.out")
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(
            f"{OP}.out: out is {tuple(out.shape)} {out.dtype}, the input {tuple(x.shape)} {x.dtype}"
        )


@torch.library.register_fake("spinquant::hadamard_transform")
def _fake(x: torch.Tensor) -> torch.Tensor:
    check_input(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("spinquant::hadamard_transform_transposed")
def _fake_transposed(x: torch.Tensor) -> torch.Tensor:
    check_input(x, "spinquant::hadamard_transform_transposed")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("spinquant::hadamard_transform.out")
def _fake_out(x: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    _check_out(x, out)
    return out


def _no_context(ctx, inputs, output) -> None:
    """The transforms are linear: their backward needs nothing saved."""


def _backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    return torch.ops.spinquant.hadamard_transform_transposed(grad.contiguous())


def _backward_transposed(ctx, grad: torch.Tensor) -> torch.Tensor:
    return torch.ops.spinquant.hadamard_transform(grad.contiguous())


torch.library.register_autograd("spinquant::hadamard_transform", _backward, setup_context=_no_context)
torch.library.register_autograd(
    "spinquant::hadamard_transform_transposed", _backward_transposed, setup_context=_no_context
)
