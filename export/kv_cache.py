"""The program's KV cache and attention over it: float32, or int8 rows with a float32 scale per token and head.

ExecuTorch's `llama::update_cache` writes a call's rows into a cache laid out (1, max_seq_len, kv_heads, row), as in its
own Llama export; our `spinquant::attend_kv_cache` (kernels/kv_cache_ops.py, kernels/cpu/op_kv_cache.cpp) attends over
it with GQA and the causal mask built in. The int8 cache stores `spinquant::quantize_kv_rows`' rows: a head's 64
values, symmetric int8, and their scale's 4 bytes, 68 bytes against 256. Queries stay float32.
"""

import torch
from torch import nn

import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers torch.ops.llama.update_cache)
import kernels.kv_cache_ops  # noqa: F401  (registers torch.ops.spinquant.quantize_kv_rows and attend_kv_cache)


class KVCache(nn.Module):
    def __init__(self, kind: str, max_seq_len: int, n_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.quantized, self.scale = kind == "int8", scale
        shape = (1, max_seq_len, n_kv_heads, head_dim + kernels.kv_cache_ops.SCALE_BYTES if self.quantized else head_dim)
        dtype = torch.int8 if self.quantized else torch.float32
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """q (1, seq, heads, head_dim), k and v (1, seq, kv_heads, head_dim) at positions start.. → (1, seq, heads, head_dim)."""
        if self.quantized:
            k, v = torch.ops.spinquant.quantize_kv_rows(k), torch.ops.spinquant.quantize_kv_rows(v)
        torch.ops.llama.update_cache(k, self.k_cache, start)
        torch.ops.llama.update_cache(v, self.v_cache, start)
        return torch.ops.spinquant.attend_kv_cache(q, self.k_cache, self.v_cache, start, self.scale)
