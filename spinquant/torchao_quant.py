"""Real quantization with torchao: the tensor layouts XNNPACK lowers, as the exported program holds them."""

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torchao.quantization import (
    Int8DynamicActivationIntxWeightConfig,
    IntxWeightOnlyConfig,
    PerAxis,
    PerGroup,
    quantize_,
)
from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor
from transformers import LlamaForCausalLM

from spinquant.errors import UserError
from spinquant.gptq import GPTQResult, QuantizedWeight
from spinquant.quant import PROGRAM_INT8_KV, QuantConfig
from spinquant.rotation import untie_embeddings

# e8p2, e8p4: QuIP#'s 2-bit E8P codes, or 4-bit E8P + E8P residual codes, through our operator (export/e8p_linear.py)
QLINEAR = ("8da4w", "8da8w", "4w", "e8p2", "e8p4", "none")
E8P_QLINEAR = {"e8p2": 2, "e8p4": 4}
QEMBEDDING = ("8w", "4w", "none")
LM_HEAD = ("8da8w", "8da4w", "8w", "none")
KV_CACHES = ("fp32", "int8")  # what ExecuTorch's KV-cache and SDPA ops run (export/kv_cache.py)


@dataclass(frozen=True)
class ProgramQuant:
    """The program's quantization: decoder linears, lm_head and embedding as torchao tensors.

    The default is Meta's shipped Llama 3.2 SpinQuant recipe: 8da4w group 32, 8-bit lm_head and embedding.
    """

    qlinear: str = "8da4w"
    group_size: int = 32
    qembedding: str = "8w"
    lm_head: str = "8da8w"
    kv_cache: str = "fp32"  # or "int8": export/kv_cache.py
    r3: bool = True  # with an int8 KV cache, queries and keys turned by the online Hadamard after RoPE

    @property
    def quantizes_kv(self) -> bool:
        return self.kv_cache != "fp32"

    @property
    def online_r3(self) -> bool:
        return self.quantizes_kv and self.r3

    def kv_fake_quant(self) -> QuantConfig:
        """The program's K/V quantization as fake quantization: what the eager model computes beside it."""
        return QuantConfig(**PROGRAM_INT8_KV, r3=self.r3) if self.quantizes_kv else QuantConfig()

    @classmethod
    def of(cls, options: dict) -> "ProgramQuant":
        """From the export's options (ExportOptions, or the record in an export_report.json, where a report made
        before an option existed has its default), which use these names."""
        return cls(**{f.name: options[f.name] for f in dataclasses.fields(cls) if f.name in options})

    def check_takes_gptq(self) -> None:
        if self.qlinear != "8da4w" and self.qlinear not in E8P_QLINEAR:
            raise UserError(f"GPTQ weights are int4 group-wise (or E8P codes): use --qlinear 8da4w (or e8p2, e8p4), not {self.qlinear}")

    @property
    def codebook(self) -> str:
        """What the decoder linears' GPTQ result must hold: GPTQConfig.codebook."""
        return "e8p" if self.qlinear in E8P_QLINEAR else "int"

    @property
    def weight_bits(self) -> int:
        """Bits per decoder weight that a GPTQ result for this program must hold."""
        return E8P_QLINEAR.get(self.qlinear, 4)


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


def check_group_size(model: LlamaForCausalLM, quant: ProgramQuant) -> None:
    """A group size that does not divide a quantized layer is refused before quantizing anything."""
    qlinear, lm_head, group_size = quant.qlinear, quant.lm_head, quant.group_size
    grouped = [
        (name, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and ((name == "lm_head" and lm_head == "8da4w") or (name != "lm_head" and qlinear in ("8da4w", "4w")))
    ]
    if quant.qembedding == "4w":
        grouped.append(("model.embed_tokens", model.config.hidden_size))
    for name, n in grouped:
        if n % group_size:
            raise UserError(f"--group-size {group_size} does not divide {name}'s {n} inputs")


def quantize_for_export(model: LlamaForCausalLM, quant: ProgramQuant, part: str = "") -> LlamaForCausalLM:
    """Quantize `model`'s linears and embedding with torchao, or only those under the module named `part`
    (prepare() quantizes each part as soon as it is rotated)."""
    check_group_size(model, quant)
    # padding_idx only shapes training gradients, and ExecuTorch's fusion of a dequantized
    # embedding into its quantized-embedding kernel matches only the default (none).
    model.model.embed_tokens.padding_idx = None
    if quant.qembedding != "none" or quant.lm_head != "none":
        untie_embeddings(model)  # embedding and lm_head get different tensor layouts
    decoder = lambda m, fqn: isinstance(m, nn.Linear) and fqn != "lm_head"  # noqa: E731
    in_part = lambda fqn: not part or fqn == part or fqn.startswith(f"{part}.")  # noqa: E731
    for config, only in (
        (linear_config(quant.qlinear, quant.group_size) if quant.codebook == "int" else None, decoder),
        (linear_config(quant.lm_head, quant.group_size), lambda m, fqn: fqn == "lm_head"),
        (embedding_config(quant.qembedding, quant.group_size), lambda m, fqn: isinstance(m, nn.Embedding)),
    ):
        if config is not None:
            quantize_(model, config, filter_fn=lambda m, fqn, only=only: in_part(fqn) and only(m, fqn))
    return model


def write_gptq_weights(model: LlamaForCausalLM, result: GPTQResult) -> None:
    """GPTQ's integers and scales into every decoder linear's torchao 8da4w tensor, bit for bit (the result
    checked to fit first: gptq.check_result_fits).

    torchao's quantize_ rounded the weights to nearest again; its IntxUnpackedToInt8Tensor (qdata int8,
    scale, zero point) is rebuilt from GPTQ's integers and scales, nothing recomputed.
    """
    for name, qw in result.weights.items():
        linear = model.get_submodule(name)
        linear.weight = nn.Parameter(gptq_tensor(linear.weight, qw, name), requires_grad=False)


def gptq_tensor(current: torch.Tensor, qw: QuantizedWeight, name: str) -> IntxUnpackedToInt8Tensor:
    if not isinstance(current, IntxUnpackedToInt8Tensor) or current.target_dtype != torch.int4:
        raise UserError(f"{name} is not an int4 8da4w weight; GPTQ needs --qlinear 8da4w")
    return IntxUnpackedToInt8Tensor(
        qdata=qw.qdata.to(current.qdata.device),
        scale=qw.scale.to(current.scale.device),
        zero_point=torch.zeros_like(current.zero_point),
        target_dtype=current.target_dtype,
        block_size=current.block_size,
        dtype=current.dtype,
        activation_quantization=current.activation_quantization,
    )
