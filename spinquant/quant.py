"""Fake quantization (quantize then dequantize in float) of weights, activations and the KV cache.

The arithmetic is torchao's (`choose_qparams_affine` / `quantize_affine`): symmetric scale =
max|x| / ((qmax − qmin) / 2), asymmetric scale = (max⁺ − min⁻) / (qmax − qmin) with an integer
zero point, q = clamp(round(x · (1/scale)) + zp, qmin, qmax). So W4A8 g32 here computes what
torchao's 8da4w tensors compute, and what the exported program runs.
"""

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm import tqdm
from transformers import LlamaForCausalLM

from spinquant.attention import use_spinquant_attention
from spinquant.errors import UserError
from spinquant.quip import quip_e8p
from spinquant.rotation import head_dim, untie_embeddings

CLIP_GRID = torch.linspace(1.0, 0.5, 21).tolist()


@dataclass(frozen=True)
class QuantConfig:
    """Bits per tensor kind (16 = off). Group 0 = one scale per output channel / per token."""

    w_bits: int = 16
    w_group: int = 32
    w_sym: bool = True
    w_clip_search: bool = False
    w_clip: float = 1.0  # a fixed clip ratio of each group's range (DuQuant's --swc), where there is no search
    a_bits: int = 16
    a_sym: bool = False
    a_clip: float = 1.0
    k_bits: int = 16
    v_bits: int = 16
    kv_group: int = 64  # 0: a whole head
    kv_sym: bool = False  # symmetric K/V map max|x| to qmax (llama.cpp's q8_0 and the program's int8 cache)
    r3: bool = True  # where K/V are quantized, queries and keys are turned by an online Hadamard after RoPE
    w_scale_dtype: str = "fp32"  # of group-wise weight scales; "bf16" as the export stores them (per-channel stay fp32)
    lm_head_bits: int = 16  # lm_head's weight, symmetric in groups of lm_head_group; its input at a_bits
    lm_head_group: int = 0
    embedding_bits: int = 16  # symmetric, one scale per row (the export's 8-bit embedding)
    w_codebook: str = "int"  # or "e8p": QuIP#'s E8P lattice codes, w_bits 2, 3 or 4, with incoherence (spinquant/quip.py)

    @property
    def quantizes_kv(self) -> bool:
        return self.k_bits < 16 or self.v_bits < 16

    @property
    def online_r3(self) -> bool:
        return self.quantizes_kv and self.r3

    @property
    def lm_head(self) -> bool:
        return self.lm_head_bits < 16


SETTINGS = {
    "fp": QuantConfig(),
    "w4a16": QuantConfig(w_bits=4),
    "w4a8": QuantConfig(w_bits=4, a_bits=8),  # = torchao Int8DynamicActivationIntxWeightConfig(int4, PerGroup(32))
    "w8a8": QuantConfig(w_bits=8, w_group=0, a_bits=8),
    "w4a4": QuantConfig(w_bits=4, a_bits=4),
    "w4a4kv4": QuantConfig(w_bits=4, a_bits=4, k_bits=4, v_bits=4),
    # What `python -m export.to_pte` writes by default: 8da4w g32 with bf16 scales, 8da8w lm_head, 8-bit embedding.
    "w4a8-export": QuantConfig(w_bits=4, a_bits=8, w_scale_dtype="bf16", lm_head_bits=8, embedding_bits=8),
}
# The program's int8 KV cache (export/kv_cache.py): keys and values symmetric int8, one scale per token and head.
# w4a8-export-kv8 is what `python -m export.to_pte` writes by default.
PROGRAM_INT8_KV = dict(k_bits=8, v_bits=8, kv_group=0, kv_sym=True)
SETTINGS["w4a8-export-kv8"] = dataclasses.replace(SETTINGS["w4a8-export"], **PROGRAM_INT8_KV)
# The program with `--lm-head 8da4w` (export/options.py): that lm_head int4 in groups of 32 too, by GPTQ with the decoder.
SETTINGS["w4a8-program"] = dataclasses.replace(SETTINGS["w4a8-export-kv8"], lm_head_bits=4, lm_head_group=32)


def setting(name: str, **overrides) -> QuantConfig:
    if name not in SETTINGS:
        raise UserError(f"unknown quantization setting '{name}': use one of {', '.join(SETTINGS)}")
    return dataclasses.replace(SETTINGS[name], **overrides)


def _qrange(bits: int) -> tuple[int, int]:
    # torchao uses the signed range for both symmetric and asymmetric mappings.
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _scale_and_zero(x: torch.Tensor, bits: int, symmetric: bool, clip: torch.Tensor | float, narrow: bool = False):
    """x grouped in its last dimension; qparams per group, as torchao's choose_qparams_affine. `narrow` symmetric
    maps max|x| to qmax, as llama.cpp's q8_0 does: torchao's (qmax − qmin) / 2 puts a row's negative extreme on a
    rounding tie (-127.5), where float noise in x decides between -128 and -127."""
    qmin, qmax = _qrange(bits)
    eps = torch.finfo(x.dtype).smallest_normal
    lo = torch.clamp(x.amin(-1, keepdim=True), max=0) * clip
    hi = torch.clamp(x.amax(-1, keepdim=True), min=0) * clip
    if symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / (qmax if narrow else (qmax - qmin) / 2), min=eps)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=eps)
    zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator): lets rotations learn through quantization."""
    return x + (torch.round(x) - x).detach()


def _quant_dequant(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, ste: bool = False, scale_dtype: torch.dtype | None = None
) -> torch.Tensor:
    qmin, qmax = _qrange(bits)
    rounded = round_ste if ste else torch.round
    if scale_dtype is not None:
        scale = scale.to(scale_dtype)  # the reciprocal below is then taken in that dtype, as torchao's quantize_affine does
    q = torch.clamp(rounded(x * (1.0 / scale)) + zero, qmin, qmax)
    return (q - zero) * scale.to(x.dtype)


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    n = x.shape[-1]
    group = group or n
    if n % group:
        raise UserError(f"group size {group} does not divide the dimension {n}")
    return x.unflatten(-1, (n // group, group))


def fake_quantize(
    x: torch.Tensor, bits: int, group: int = 0, symmetric: bool = False, clip: float = 1.0, ste: bool = False,
    scale_dtype: torch.dtype | None = None, narrow: bool = False,
) -> torch.Tensor:
    """Quantize-dequantize x in groups of `group` along its last dimension (0 = whole rows).

    With `ste` the rounding passes gradients straight through (scale and zero point stay differentiable).
    """
    if bits >= 16:
        return x
    g = _grouped(x, group)
    scale, zero = _scale_and_zero(g, bits, symmetric, clip, narrow)
    return _quant_dequant(g, scale, zero, bits, ste, scale_dtype).flatten(-2)


@torch.no_grad()
def best_clip_ratio(g: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per group (g's last dimension), the ratio of CLIP_GRID whose quantization has the least squared
    error; the first of equals wins. (..., 1), in g's dtype, so that scaling by it is scaling by the float."""
    best, best_err = None, None
    for ratio in CLIP_GRID:
        scale, zero = _scale_and_zero(g, bits, symmetric, ratio)
        err = (_quant_dequant(g, scale, zero, bits, scale_dtype=scale_dtype) - g).pow(2).sum(-1, keepdim=True)
        if best is None:
            best, best_err = torch.full_like(err, ratio), err
        else:
            better = err < best_err
            best, best_err = torch.where(better, ratio, best), torch.where(better, err, best_err)
    return best


def fake_quantize_weight_mse(
    w: torch.Tensor, bits: int, group: int, symmetric: bool, ste: bool = False, scale_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Per group, the clip ratio from CLIP_GRID with the least squared error (a grid search)."""
    g = _grouped(w, group)
    scale, zero = _scale_and_zero(g, bits, symmetric, best_clip_ratio(g, bits, symmetric, scale_dtype))
    return _quant_dequant(g, scale, zero, bits, ste, scale_dtype).flatten(-2)


def quantize_weight(w: torch.Tensor, qc: QuantConfig, ste: bool = False) -> torch.Tensor:
    if qc.w_bits >= 16:
        return w
    if qc.w_codebook == "e8p":
        if ste:
            raise UserError("rotations cannot be learned through E8P codes: learn them for int4 weights, then evaluate with E8P")
        return quip_e8p(w, bits=qc.w_bits).dequantize().to(w.dtype)
    scale_dtype = torch.bfloat16 if qc.w_scale_dtype == "bf16" and qc.w_group else None
    if qc.w_clip_search:
        return fake_quantize_weight_mse(w, qc.w_bits, qc.w_group, qc.w_sym, ste, scale_dtype)
    return fake_quantize(w, qc.w_bits, qc.w_group, qc.w_sym, qc.w_clip, ste=ste, scale_dtype=scale_dtype)


def lm_head_config(qc: QuantConfig) -> QuantConfig:
    """The config lm_head's weight is quantized with: its own bits and group, symmetric, no clipping."""
    return dataclasses.replace(qc, w_bits=qc.lm_head_bits, w_group=qc.lm_head_group, w_sym=True, w_clip_search=False, w_clip=1.0)


def activation_quantizer(bits: int, group: int, symmetric: bool, clip: float = 1.0, ste: bool = False, narrow: bool = False):
    """x ↦ fake_quantize(x) at these settings, computed in float32 at least (bf16 has 8 bits of mantissa);
    None when `bits` leaves x in float. With `ste`, rounding passes gradients straight through."""
    if bits >= 16:
        return None

    def quantize(x: torch.Tensor) -> torch.Tensor:
        wide = x if x.dtype in (torch.float32, torch.float64) else x.float()
        return fake_quantize(wide, bits, group, symmetric, clip, ste=ste, narrow=narrow).to(x.dtype)

    return quantize


def quantize_input_hook(bits: int, symmetric: bool, clip: float, ste: bool = False):
    """A forward pre-hook quantizing a linear's input per token, as the 8da4w program does."""
    quantize = activation_quantizer(bits, 0, symmetric, clip, ste=ste)

    def hook(module: nn.Module, args: tuple) -> tuple:
        return (quantize(args[0]), *args[1:])

    return hook


def use_kv_quantization(model: LlamaForCausalLM, qc: QuantConfig, ste: bool = False) -> None:
    """K/V fake quantization after RoPE and R3 (spinquant.attention applies it), groups of kv_group within a head."""
    if not qc.quantizes_kv:
        return
    group = min(qc.kv_group, head_dim(model.config))
    for layer in model.model.layers:
        for name, bits in (("key", qc.k_bits), ("value", qc.v_bits)):
            setattr(layer.self_attn, f"quantize_{name}", activation_quantizer(bits, group, qc.kv_sym, ste=ste, narrow=True))
    use_spinquant_attention(model)


def quantized_linears(model: LlamaForCausalLM, qc: QuantConfig) -> list[tuple[nn.Linear, QuantConfig]]:
    linears = [(m, qc) for m in model.model.layers.modules() if isinstance(m, nn.Linear)]
    return linears + [(model.lm_head, lm_head_config(qc))] if qc.lm_head else linears


def check_groups(model: LlamaForCausalLM, qc: QuantConfig) -> None:
    """Refuse a group size that does not divide a layer, before any work is done."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and qc.w_bits < 16 and qc.w_group and m.in_features % qc.w_group:
            raise UserError(f"weight group size {qc.w_group} does not divide {name}'s {m.in_features} inputs")


def quantize_activations(model: LlamaForCausalLM, qc: QuantConfig, ste: bool = False) -> list[RemovableHandle]:
    """The setting's input and K/V fake quantization on every forward of `model`; with `ste`, rounding straight through,
    so that training sees the activations the quantized model will have. Returns the input hooks' handles (a later
    call replaces the K/V's)."""
    use_kv_quantization(model, qc, ste=ste)
    if qc.a_bits >= 16:
        return []
    return [linear.register_forward_pre_hook(quantize_input_hook(qc.a_bits, qc.a_sym, qc.a_clip, ste=ste)) for linear, _ in quantized_linears(model, qc)]


def quantize_model(model: LlamaForCausalLM, qc: QuantConfig, weights_done: Collection[nn.Linear] = ()) -> LlamaForCausalLM:
    """Fake-quantize in place: weights now, activations and K/V on every forward. `weights_done`: linears whose
    weights hold quantized values already (GPTQ's), left as they are; their inputs are quantized all the same."""
    check_groups(model, qc)
    if qc.lm_head or qc.embedding_bits < 16:
        untie_embeddings(model)  # each gets its own quantization
    with torch.no_grad():
        embedding = model.model.embed_tokens
        embedding.weight.data = fake_quantize(embedding.weight.data, qc.embedding_bits, 0, symmetric=True)
        # Rounding to int takes a second; E8P's nearest-codeword search takes minutes on a CPU.
        for linear, linear_qc in tqdm(quantized_linears(model, qc), desc="E8P codes", unit="linear", disable=qc.w_codebook == "int"):
            if linear not in weights_done:
                linear.weight.data = quantize_weight(linear.weight.data, linear_qc)
    quantize_activations(model, qc)
    return model
