"""Real quantization for export with torchao: the tensor layouts XNNPACK lowers."""

import torch
from torch import nn
from torchao.quantization import (
    Int8DynamicActivationIntxWeightConfig,
    IntxWeightOnlyConfig,
    PerAxis,
    PerGroup,
    quantize_,
)
from transformers import LlamaForCausalLM

from spinquant.errors import UserError
from spinquant.rotation import untie_embeddings


def linear_config(scheme: str, group_size: int):
    """torchao config for a linear scheme; None for `none`."""
    return {
        "8da4w": lambda: Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(group_size), weight_scale_dtype=torch.bfloat16
        ),
        "8da8w": lambda: Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
        "4w": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size), scale_dtype=torch.bfloat16),
        "8w": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
        "none": lambda: None,
    }[scheme]()


def embedding_config(scheme: str, group_size: int):
    return {
        "8w": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
        "4w": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size)),
        "none": lambda: None,
    }[scheme]()


def check_group_size(model: LlamaForCausalLM, qlinear: str, lm_head: str, qembedding: str, group_size: int) -> None:
    """A group size that does not divide a quantized layer is refused before quantizing anything."""
    grouped = [
        (name, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and ((name == "lm_head" and lm_head == "8da4w") or (name != "lm_head" and qlinear in ("8da4w", "4w")))
    ]
    if qembedding == "4w":
        grouped.append(("model.embed_tokens", model.config.hidden_size))
    for name, n in grouped:
        if n % group_size:
            raise UserError(f"--group-size {group_size} does not divide {name}'s {n} inputs")


def quantize_for_export(model: LlamaForCausalLM, qlinear: str, lm_head: str, qembedding: str, group_size: int) -> LlamaForCausalLM:
    check_group_size(model, qlinear, lm_head, qembedding, group_size)
    # padding_idx only shapes training gradients, and ExecuTorch's fusion of a dequantized
    # embedding into its quantized-embedding kernel matches only the default (none).
    model.model.embed_tokens.padding_idx = None
    if qembedding != "none" or lm_head != "none":
        untie_embeddings(model)  # embedding and lm_head get different tensor layouts
    decoder = lambda m, fqn: isinstance(m, nn.Linear) and fqn != "lm_head"  # noqa: E731
    for config, only in (
        (linear_config(qlinear, group_size), decoder),
        (linear_config(lm_head, group_size), lambda m, fqn: fqn == "lm_head"),
        (embedding_config(qembedding, group_size), lambda m, fqn: isinstance(m, nn.Embedding)),
    ):
        if config is not None:
            quantize_(model, config, filter_fn=only)
    return model
