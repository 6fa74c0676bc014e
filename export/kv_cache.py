"""The program's KV cache and attention over it: float32, or int8 with a scale and zero point per token and head.

Both are ExecuTorch's own ops, as its Llama export uses them: `llama::update_cache` writes a call's rows into a
cache laid out (1, max_seq_len, kv_heads, head_dim), `llama::custom_sdpa` attends over it with GQA and the causal
mask built in, and `llama::custom_quantized_sdpa` does the same on int8 queries, keys and values, computing q·k as
int8 products (torchao's channelwise int8 matmul) and dequantizing values as it goes. The int8 cache quantizes keys
and values per (token, head), asymmetric, with torch's `quantized_decomposed` per-token ops, which ExecuTorch's
quantized kernels run; the cache then holds int8 rows beside float32 scales and int8 zero points (69 bytes per
64-value head row against 256). Queries are quantized the same way, as the int8 SDPA takes them.
"""

import torch
from torch import nn

import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers torch.ops.llama.*)
import executorch.kernels.quantized  # noqa: F401  (the per-token ops' out variants, which to_executorch emits)
from export.per_token_ops import PER_TOKEN


class FloatKVCache(nn.Module):
    def __init__(self, max_seq_len: int, n_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.scale = scale
        self.register_buffer("k_cache", torch.zeros(1, max_seq_len, n_kv_heads, head_dim), persistent=False)
        self.register_buffer("v_cache", torch.zeros(1, max_seq_len, n_kv_heads, head_dim), persistent=False)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """q (1, seq, heads, head_dim), k and v (1, seq, kv_heads, head_dim) at positions start.. → (1, seq, heads, head_dim)."""
        torch.ops.llama.update_cache(k, self.k_cache, start)
        torch.ops.llama.update_cache(v, self.v_cache, start)
        return torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start, None, 0.0, True, self.scale)


def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x's int8 values, float32 scales and int8 zero points, one of each per row of its last dimension (a head)."""
    scale, zero = PER_TOKEN.choose_qparams_per_token_asymmetric(x, torch.int8)
    return PER_TOKEN.quantize_per_token(x, scale, zero, -128, 127, torch.int8), scale.to(torch.float32), zero.to(torch.int8)


class Int8KVCache(nn.Module):
    def __init__(self, max_seq_len: int, n_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.scale = scale
        for name in ("k", "v"):
            self.register_buffer(f"{name}_cache", torch.zeros(1, max_seq_len, n_kv_heads, head_dim, dtype=torch.int8), persistent=False)
            self.register_buffer(f"{name}_scales", torch.ones(1, max_seq_len, n_kv_heads, 1), persistent=False)
            self.register_buffer(f"{name}_zeros", torch.zeros(1, max_seq_len, n_kv_heads, 1, dtype=torch.int8), persistent=False)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        for name, x in (("k", k), ("v", v)):
            values, scales, zeros = quantize_per_head(x)
            torch.ops.llama.update_cache(values, getattr(self, f"{name}_cache"), start)
            torch.ops.llama.update_cache(scales, getattr(self, f"{name}_scales"), start)
            torch.ops.llama.update_cache(zeros, getattr(self, f"{name}_zeros"), start)
        q8, q_scale, q_zero = quantize_per_head(q)
        return torch.ops.llama.custom_quantized_sdpa(
            q8, self.k_cache, self.v_cache, start, None, 0.0, True, self.scale,
            q_zero, q_scale, self.k_zeros, self.k_scales, self.v_zeros, self.v_scales,
        )


def kv_cache_module(kind: str, max_seq_len: int, n_kv_heads: int, head_dim: int, scale: float) -> FloatKVCache | Int8KVCache:
    return {"fp32": FloatKVCache, "int8": Int8KVCache}[kind](max_seq_len, n_kv_heads, head_dim, scale)
