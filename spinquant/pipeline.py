"""`prepare(model, rotation, quant, gptq)`: the one way from a float model to a rotated, quantized one.

rotate (R1/R2 fused exactly, R4 folded with its online Hadamard, R3 when the KV cache is quantized)
→ GPTQ's integers when asked (run now on a calibration text, or a saved result) → quantize, either
as fake quantization (`QuantConfig`: what evaluation measures) or as torchao tensors
(`ProgramQuant`: what the exported program holds). Evaluation, the export, the comparison against
the program and the scripts all call it; nothing else chains these steps. The rotation goes a part (a
decoder layer, the embedding, lm_head) at a time, widening a bf16 model to float32 as it goes, and
torchao's quantization follows each part, so the export never holds a float32 copy of the whole model.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from spinquant.data import calibration_text
from spinquant.errors import UserError
from spinquant.gptq import GPTQConfig, GPTQResult, check_result_fits, gptq_linears, misfit, rotation_id, run_gptq
from spinquant.gptq_compact import CompactGPTQ, load_gptq_file
from spinquant.quip import quip_e8p
from spinquant.quant import QuantConfig, check_groups, quantize_model, use_kv_quantization
from spinquant.rotation import Rotations, rotated_parts, rotations_for
from spinquant.torchao_quant import ProgramQuant, check_group_size, quantize_for_export, write_gptq_weights


@dataclass
class Prepared:
    """What prepare() did, kept on the model as `model.spinquant`: for reports, and to save GPTQ's result."""

    rotation: str  # the spec given (a preset name or a file), "custom" for a Rotations object
    rotations: Rotations
    quant: QuantConfig | ProgramQuant
    gptq: GPTQResult | None


def prepare(
    model: LlamaForCausalLM,
    rotation: str | Rotations = "none",
    quant: QuantConfig | ProgramQuant = QuantConfig(),
    gptq: GPTQConfig | GPTQResult | Path | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    calib_text: Path | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> LlamaForCausalLM:
    """Rotate, (GPTQ), quantize `model` in place and return it.

    rotation: none | r4 | hadamard | orthogonal | a rotation file | a Rotations object (random ones drawn from `seed`).
    gptq: a GPTQConfig runs GPTQ now on `calib_text` (default: the packaged calibration text) with `tokenizer`;
    a GPTQResult, or the file one was saved to (plain, or compact: spinquant/gptq_compact.py), puts its integers in:
    it must have been made for this model, under this rotation and group size.
    device: where the model goes after the rotation (fused in float64 where the model is), so that GPTQ and
    the quantization run there; the default leaves it where it is. A GPU rounds some scales differently
    from a CPU (it divides by a constant as a multiplication by its reciprocal), so the two differ in a few
    4-bit roundings.
    """
    source = str(gptq) if isinstance(gptq, (str, Path)) else "passed to prepare()"
    if isinstance(gptq, (str, Path)):
        gptq = load_gptq_file(Path(gptq))
    compact = gptq if isinstance(gptq, CompactGPTQ) else None
    if compact is not None:
        gptq = compact.result  # its scales and record now; its integers once the model is rotated
    rotations = rotation if isinstance(rotation, Rotations) else rotations_for(rotation, model.config, seed, r3=quant.online_r3)
    spec = "custom" if isinstance(rotation, Rotations) else rotation
    check_fits(model, quant, gptq, source)
    each_part = quantizes_each_part(quant, gptq, device)
    for part in rotated_parts(model, rotations):
        if each_part:
            quantize_for_export(model, quant, part)
    if device is not None:
        model.to(device)
    result = gptq
    if isinstance(gptq, GPTQConfig):
        if tokenizer is None:
            raise UserError("GPTQ needs the model's tokenizer for its calibration text")
        home = next(model.parameters()).device
        result = run_gptq(model, tokenizer, calib_text or calibration_text(), gptq, home, model.name_or_path, rotation_id(spec, seed),
                          lm_head=gptq_takes_lm_head(quant), activations=quant if gptq.tune_activations else None)
    elif isinstance(gptq, GPTQResult):
        # After the rotation: the saved names are the rotated model's (down_proj's linear inside its Hadamard wrapper).
        check_result_fits(gptq, source, model, model.name_or_path, rotation_id(spec, seed), weight_bits_and_group(quant)[1], gptq_takes_lm_head(quant))
        if compact is not None:
            gptq = result = compact.decoded(model, source)
        put_gptq_weights(model, gptq)
    if not each_part:
        quantize(model, quant, result)
    if isinstance(quant, ProgramQuant):
        use_kv_quantization(model, quant.kv_fake_quant())  # the eager model computes the program's int8 K/V
    model.spinquant = Prepared(spec, rotations, quant, result)
    return model


def quantizes_each_part(quant: QuantConfig | ProgramQuant, gptq: GPTQConfig | GPTQResult | None, device: str | torch.device | None) -> bool:
    """torchao's quantization runs on each part as soon as it is rotated, so that a model loaded in bf16 never
    holds a float32 copy of itself whole (Llama 3.2 3B: 13 GB). GPTQ needs the whole rotated model first,
    a device move the whole model, and fake quantization (evaluation) keeps its float weights anyway."""
    return isinstance(quant, ProgramQuant) and quant.codebook == "int" and gptq is None and device is None


def gptq_takes_lm_head(quant: QuantConfig | ProgramQuant) -> bool:
    """GPTQ quantizes lm_head too when it is int4 in the decoder linears' groups (the 8da4w lm_head): measured,
    with it the 4-bit lm_head costs +1.5% of perplexity over an 8-bit one at the export's calibration, +6.6% without
    (results/gptq_calibration.md)."""
    if isinstance(quant, ProgramQuant):
        return quant.lm_head == "8da4w" and quant.codebook == "int"
    return quant.lm_head and (quant.lm_head_bits, quant.lm_head_group) == (quant.w_bits, quant.w_group)


def weight_bits_and_group(quant: QuantConfig | ProgramQuant) -> tuple[int, int]:
    if isinstance(quant, ProgramQuant):
        return quant.weight_bits, quant.group_size
    return quant.w_bits, quant.w_group


def check_fits(model: LlamaForCausalLM, quant: QuantConfig | ProgramQuant, gptq: GPTQConfig | GPTQResult | None, source: str) -> None:
    """Settings that cannot work on this model are refused before minutes of rotation and GPTQ."""
    if isinstance(quant, ProgramQuant):
        check_group_size(model, quant)
        if gptq is not None:
            quant.check_takes_gptq()
        if isinstance(gptq, GPTQConfig) and gptq.tune_activations:
            raise UserError("tuning through the activations' quantization is for fake quantization (spinquant.eval); the program's are int8")
    else:
        check_groups(model, quant)
    bits, group = weight_bits_and_group(quant)
    if isinstance(gptq, GPTQConfig) and (gptq.bits, gptq.group) != (bits, group):
        raise UserError(f"GPTQ is asked for int{gptq.bits} in groups of {gptq.group}; this quantization needs int{bits} in groups of {group}")
    if isinstance(gptq, GPTQResult):
        held = f"int{gptq.config.bits} weights with {gptq.config.scale_dtype} scales"
        if gptq.config.bits != bits:
            codebook = gptq.config.codebook
            raise misfit(source, f"holds {gptq.config.bits}-bit {codebook} weights; this quantization needs {bits}-bit ones"
                         if codebook == "e8p" else f"holds {held}; this quantization needs int{bits}")
        if isinstance(quant, ProgramQuant) and gptq.config.codebook != quant.codebook:
            raise misfit(source, f"holds {gptq.config.codebook} weights; --qlinear {quant.qlinear} needs {quant.codebook} ones")
        if isinstance(quant, ProgramQuant) and gptq.config.scale_dtype != "bf16":
            raise misfit(source, f"holds {held}; 8da4w needs int4 with bf16 scales")


@torch.no_grad()
def put_gptq_weights(model: LlamaForCausalLM, result: GPTQResult) -> None:
    """A saved result's dequantized values into the rotated float model, as running GPTQ leaves them."""
    for name, qw in result.weights.items():
        linear = model.get_submodule(name)
        linear.weight.data = qw.dequantize().to(linear.weight.device, linear.weight.dtype)


@torch.no_grad()
def put_e8p_codes(model: LlamaForCausalLM, result: GPTQResult | None, bits: int) -> None:
    """Every decoder linear on E8P codes, kept as `linear.e8p` for the export (export/e8p_linear.py), its weight their
    dequantized value for the eager model: BlockLDLQ's codes from `result`, else each group's nearest codeword."""
    linears = gptq_linears(model, lm_head=False)
    for name, linear in tqdm(linears.items(), desc="E8P codes", unit="linear", disable=result is not None):
        linear.e8p = result.weights[name] if result is not None else quip_e8p(linear.weight.data, bits=bits)
        linear.weight.data = linear.e8p.dequantize().to(linear.weight.device, linear.weight.dtype)


def quantize(model: LlamaForCausalLM, quant: QuantConfig | ProgramQuant, gptq: GPTQResult | None) -> None:
    if isinstance(quant, ProgramQuant):
        quantize_for_export(model, quant)
        if quant.codebook == "e8p":
            put_e8p_codes(model, gptq, quant.weight_bits)
        elif gptq is not None:
            write_gptq_weights(model, gptq)  # torchao rounded to nearest: GPTQ's integers replace its own
    else:
        # GPTQ's linears hold their quantized values already: only their inputs, and K/V, are left to quantize.
        done = [model.get_submodule(name) for name in gptq.weights] if gptq is not None else []
        quantize_model(model, quant, weights_done=done)
