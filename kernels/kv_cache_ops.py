"""`spinquant::quantize_kv_rows` and `spinquant::attend_kv_cache`: the program's KV cache as PyTorch operators.

quantize_kv_rows turns float32 rows (a head's keys or values) into int8 rows: the head's values, symmetric int8,
followed by the bytes of their float32 scale (kernels/cpu/kv_attention.h), so one cache row holds a token's head and
its scale and ExecuTorch's `llama::update_cache` writes both at once. attend_kv_cache is causal attention of queries at
positions start.. over a float32 cache or one of such rows, with grouped-query heads. This is their eager, obviously
correct side (dequantize, then dense softmax attention); kernels/cpu/op_kv_cache.cpp runs their out variants in the
program, which to_executorch emits.
"""

import torch

SCALE_BYTES = 4  # a float32 scale after each int8 row

_lib = torch.library.Library("spinquant", "FRAGMENT")
_lib.define("quantize_kv_rows(Tensor x) -> Tensor")
_lib.define("quantize_kv_rows.out(Tensor x, *, Tensor(a!) out) -> Tensor(a!)")
_lib.define("attend_kv_cache(Tensor q, Tensor k_cache, Tensor v_cache, SymInt start_pos, float scale) -> Tensor")
_lib.define(
    "attend_kv_cache.out(Tensor q, Tensor k_cache, Tensor v_cache, SymInt start_pos, float scale, *, Tensor(a!) out) -> Tensor(a!)"
)


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., dim) float32 → (..., dim + 4) int8; the scale and rounding are spinquant.quant's narrow symmetric int8 ones."""
    scale = torch.clamp(x.abs().amax(-1, keepdim=True) / 127, min=torch.finfo(torch.float32).smallest_normal)
    values = torch.clamp(torch.round(x * (1.0 / scale)), -128, 127).to(torch.int8)
    return torch.cat([values, scale.view(torch.int8)], dim=-1)


def dequantize_rows(rows: torch.Tensor) -> torch.Tensor:
    """quantize_rows' output back to float32 (..., dim); a float32 cache as it is."""
    if rows.dtype != torch.int8:
        return rows
    scale = rows[..., -SCALE_BYTES:].contiguous().view(torch.float32)
    return rows[..., :-SCALE_BYTES].float() * scale


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """q (batch, seq, heads, dim) at positions start.., caches (batch, positions, kv_heads, row) → (batch, seq, heads, dim)."""
    seq, heads = q.shape[1], q.shape[2]
    k, v = (dequantize_rows(cache[:, : start + seq]).repeat_interleave(heads // cache.shape[2], dim=2) for cache in (k_cache, v_cache))
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    visible = torch.arange(k.shape[1]) <= torch.arange(start, start + seq)[:, None]
    probabilities = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("bhij,bjhd->bihd", probabilities, v)


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    width = q.shape[-1] + (SCALE_BYTES if k_cache.dtype == torch.int8 else 0)
    if k_cache.dtype not in (torch.float32, torch.int8) or v_cache.dtype != k_cache.dtype:
        raise TypeError(f"spinquant::attend_kv_cache: the caches must both be float32 or both int8, are {k_cache.dtype} and {v_cache.dtype}")
    if k_cache.shape != v_cache.shape or k_cache.shape[-1] != width or q.shape[2] % k_cache.shape[2]:
        raise ValueError(f"spinquant::attend_kv_cache: q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}")


@torch.library.impl(_lib, "quantize_kv_rows", "CompositeExplicitAutograd")
def _quantize_kv_rows(x: torch.Tensor) -> torch.Tensor:
    return quantize_rows(x)


@torch.library.impl(_lib, "quantize_kv_rows.out", "CompositeExplicitAutograd")
def _quantize_kv_rows_out(x: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    return out.copy_(quantize_rows(x))


@torch.library.register_fake("spinquant::quantize_kv_rows")
def _quantize_kv_rows_fake(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32:
        raise TypeError(f"spinquant::quantize_kv_rows: the rows must be float32, are {x.dtype}")
    return x.new_empty((*x.shape[:-1], x.shape[-1] + SCALE_BYTES), dtype=torch.int8)


@torch.library.impl(_lib, "attend_kv_cache", "CompositeExplicitAutograd")
def _attend_kv_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start_pos: int, scale: float) -> torch.Tensor:
    _check_cache(q, k_cache, v_cache)
    return attend(q, k_cache, v_cache, start_pos, scale)


@torch.library.impl(_lib, "attend_kv_cache.out", "CompositeExplicitAutograd")
def _attend_kv_cache_out(q, k_cache, v_cache, start_pos, scale, *, out):
    _check_cache(q, k_cache, v_cache)
    return out.copy_(attend(q, k_cache, v_cache, start_pos, scale))


@torch.library.register_fake("spinquant::attend_kv_cache")
def _attend_kv_cache_fake(q, k_cache, v_cache, start_pos, scale):
    _check_cache(q, k_cache, v_cache)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("spinquant::quantize_kv_rows.out")
def _quantize_kv_rows_out_fake(x: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    return out


@torch.library.register_fake("spinquant::attend_kv_cache.out")
def _attend_kv_cache_out_fake(q, k_cache, v_cache, start_pos, scale, *, out):
    return out
