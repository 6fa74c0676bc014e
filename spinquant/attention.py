"""The one place inside attention where SpinQuant acts: online R3 on queries/keys and K/V fake-quant.

Both happen after RoPE and on the full K/V of the cache, which transformers' attention hook
receives; everything else is transformers' own SDPA attention.
"""

import torch
from transformers import AttentionInterface, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from spinquant.hadamard import hadamard_transform

ATTN_NAME = "spinquant_sdpa"


def spinquant_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
    if getattr(module, "online_r3", False):
        # The same orthonormal H on q and k leaves q·kᵀ unchanged and spreads k's outliers before quantization.
        query, key = hadamard_transform(query), hadamard_transform(key)
    if (quantize_key := getattr(module, "quantize_key", None)) is not None:
        key = quantize_key(key)
    if (quantize_value := getattr(module, "quantize_value", None)) is not None:
        value = quantize_value(value)
    return sdpa_attention_forward(module, query, key, value, *args, **kwargs)


AttentionInterface.register(ATTN_NAME, spinquant_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


def use_spinquant_attention(model: LlamaForCausalLM) -> None:
    model.set_attn_implementation(ATTN_NAME)
