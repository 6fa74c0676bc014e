"""The exported forward: a Hugging Face Llama's own modules, wired with ExecuTorch's KV-cache and SDPA ops.

transformers' static-cache wrapper traces the whole generic attention stack (mask builders,
cache classes, repeat_kv) into about 160 graph nodes per layer, and ExecuTorch's lowering passes
cost time per node. Reusing the model's norms, linears, MLP and rotary embedding but calling
`llama::update_cache` (the op ExecuTorch's own Llama export uses) and our `spinquant::attend_kv_cache`
(GQA and the causal mask built in; export/kv_cache.py) keeps the graph small and the runtime fast.

q/k/v and gate/up read the same input, so each set runs as one linear whose output rows (and
biases, for Llamas with attention_bias or mlp_bias) are theirs stacked: per-token activation scales
and per-row weight scales make that exactly the same arithmetic, with one quantized GEMM (and one
activation quantization) instead of three or two. That takes 7 XNNPACK partitions per layer down to 4, and the lowering's time with them.
Quantized linears are traced through export/per_token_ops.py's spelling of torchao's own.
"""

import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.activations import SiLUActivation

import kernels.rms_norm_op  # noqa: F401  (registers torch.ops.spinquant.rms_norm)
import kernels.rope_op  # noqa: F401  (registers torch.ops.spinquant.rope)
import kernels.silu_mul_op  # noqa: F401  (registers torch.ops.spinquant.silu_mul)
from export.e8p_linear import E8PLinears, has_e8p_codes
from export.kv_cache import KVCache
from export.per_token_ops import per_token_linear
from spinquant.rotation import head_dim

SILU = (nn.SiLU, SiLUActivation)  # transformers' ACT2FN["silu"] is its own class, ["swish"] torch's


def stacked_rows(weights: list[torch.Tensor]) -> torch.Tensor:
    """The weights' output rows in one tensor; a torchao quantized weight stays quantized (its row-wise parts stacked)."""
    first = weights[0]
    if not hasattr(first, "tensor_data_names"):
        return torch.cat(weights)
    data = [torch.cat([getattr(w, name) for w in weights]) for name in first.tensor_data_names]
    return type(first)(*data, *(getattr(first, name) for name in first.tensor_attribute_names))


def fused_linear(*linears: nn.Linear) -> nn.Linear:
    """One linear computing every given linear of the same input, outputs concatenated (biases too, where any has one)."""
    fused = nn.Linear(linears[0].in_features, sum(linear.out_features for linear in linears), bias=False, device="meta")
    fused.weight = nn.Parameter(stacked_rows([linear.weight for linear in linears]), requires_grad=False)
    if any(linear.bias is not None for linear in linears):
        fused.bias = nn.Parameter(torch.cat([stacked_bias(linear) for linear in linears]), requires_grad=False)
    return fused


def stacked_bias(linear: nn.Linear) -> torch.Tensor:
    """The linear's bias, zeros where it has none (attention_bias and mlp_bias are separate config flags)."""
    return linear.bias.detach() if linear.bias is not None else torch.zeros(linear.out_features, dtype=linear.weight.dtype)


def one_linear(module: nn.Module, fused: str, parts: tuple[str, ...]) -> nn.Module:
    """The module's linear `fused` (Phi-3 stores q/k/v and gate/up fused), or one made of its `parts`."""
    linears = [getattr(module, fused)] if hasattr(module, fused) else [getattr(module, part) for part in parts]
    if has_e8p_codes(linears[0]):
        return E8PLinears(linears)
    return linears[0] if len(linears) == 1 else fused_linear(*linears)


class CachedAttention(nn.Module):
    """One layer's attention over a static cache (export/kv_cache.py), with R3 where the rotation has it: queries and
    keys turned by the online Hadamard after RoPE, so that the quantized keys see no outlier channels."""

    def __init__(self, attn: nn.Module, n_heads: int, n_kv_heads: int, head_dim: int, max_seq_len: int, kv: str):
        super().__init__()
        self.qkv_proj = per_token_linear(one_linear(attn, "qkv_proj", ("q_proj", "k_proj", "v_proj")))
        self.o_proj = per_token_linear(attn.o_proj)
        # Qwen3 normalizes each query and key head before RoPE.
        self.q_norm = RMSNorm(attn.q_norm) if hasattr(attn, "q_norm") else None
        self.k_norm = RMSNorm(attn.k_norm) if hasattr(attn, "k_norm") else None
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.online_r3 = getattr(attn, "online_r3", False)
        self.cache = KVCache(kv, max_seq_len, n_kv_heads, head_dim, attn.scaling)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor:
        seq, heads, kv_heads = x.shape[1], self.n_heads, self.n_kv_heads
        qk, v = self.qkv_proj(x).split([(heads + kv_heads) * self.head_dim, kv_heads * self.head_dim], dim=-1)
        qk = qk.view(1, seq, heads + kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = qk.split([heads, kv_heads], dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        qk = torch.ops.spinquant.rope(qk, cos, sin)  # queries and keys in one call (kernels/rope_op.py)
        if self.online_r3:  # one transform for queries and keys together: q·kᵀ is unchanged
            qk = torch.ops.spinquant.hadamard_transform(qk)
        q, k = qk.split([heads, kv_heads], dim=2)
        out = self.cache.attend(q, k, v.view(1, seq, kv_heads, self.head_dim), start)
        return self.o_proj(out.reshape(1, seq, self.n_heads * self.head_dim))


class FusedMLP(nn.Module):
    """Llama's MLP, down(act(gate(x)) · up(x)), with gate and up as one linear; with SiLU (every family here), the
    activation and product are our one `spinquant::silu_mul` call (kernels/silu_mul_op.py)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_up_proj = per_token_linear(one_linear(mlp, "gate_up_proj", ("gate_proj", "up_proj")))
        self.down_proj = per_token_linear(mlp.down_proj)
        self.act_fn = mlp.act_fn if hasattr(mlp, "act_fn") else mlp.activation_fn  # Phi-3's name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.act_fn, SILU):
            return self.down_proj(torch.ops.spinquant.silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class RMSNorm(nn.Module):
    """Llama's RMSNorm for a float32 program as our one `spinquant::rms_norm` call (kernels/rms_norm_op.py), where
    ExecuTorch's CPU kernels take five, and without the gain where rotation folded it into the next linears (all ones)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.eps = norm.variance_epsilon
        self.weight = None if bool((norm.weight == 1).all()) else norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.spinquant.rms_norm(x, self.weight, self.eps)


class ExportableLlama(nn.Module):
    """forward(input_ids[1, T], cache_position[T]) -> logits[1, 1, vocab] of the last position, ExecuTorch's LLM-runner
    convention (what a runner samples from); logits[1, T, vocab] with full_logits, for perplexity and comparisons.

    Last-only keeps the program's memory plan from holding T × vocab logits (2,048 × 49,152 floats: 384 MiB on the
    demo) and skips the lm_head for every prompt position but the last."""

    def __init__(self, model: LlamaForCausalLM, max_seq_len: int, full_logits: bool = False, kv_cache: str = "fp32"):
        super().__init__()
        self.full_logits = full_logits
        config = model.config
        head = head_dim(config)
        self.embed_tokens, self.norm, self.lm_head = model.model.embed_tokens, RMSNorm(model.model.norm), per_token_linear(model.lm_head)
        self.rotary_emb = model.model.rotary_emb
        self.max_seq_len = max_seq_len
        self.input_norms = nn.ModuleList(RMSNorm(layer.input_layernorm) for layer in model.model.layers)
        self.post_attention_norms = nn.ModuleList(RMSNorm(layer.post_attention_layernorm) for layer in model.model.layers)
        self.mlps = nn.ModuleList(FusedMLP(layer.mlp) for layer in model.model.layers)
        self.attentions = nn.ModuleList(
            CachedAttention(layer.self_attn, config.num_attention_heads, config.num_key_value_heads, head, max_seq_len, kv_cache)
            for layer in model.model.layers
        )

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        start = cache_position[0].item()
        torch._check(start >= 0)
        torch._check(start + input_ids.shape[1] <= self.max_seq_len)
        x = self.embed_tokens(input_ids)
        cos, sin = (t.unsqueeze(2) for t in self.rotary_emb(x, cache_position.unsqueeze(0)))
        for attn, mlp, norm1, norm2 in zip(self.attentions, self.mlps, self.input_norms, self.post_attention_norms):
            x = x + attn(norm1(x), cos, sin, start)
            x = x + mlp(norm2(x))
        return self.lm_head(self.norm(x if self.full_logits else x[:, -1:]))
