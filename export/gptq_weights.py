"""GPTQ's integers and scales put into torchao's 8da4w tensors, so the program holds them bit for bit.

torchao's quantize_ rounds the weights to nearest again; its IntxUnpackedToInt8Tensor (qdata int8,
scale, zero_point) is then rebuilt from GPTQ's integers and scales, nothing recomputed.
"""

from pathlib import Path

import torch
from torch import nn
from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from export.options import ExportOptions
from spinquant.errors import UserError
from spinquant.data import calibration_text
from spinquant.gptq import GPTQ_REMEDY, GPTQConfig, GPTQResult, QuantizedWeight, rotation_id, run_gptq


def gptq_for_export(opts: ExportOptions, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase) -> GPTQResult | None:
    """The saved result of --gptq-file (checked against this export), or GPTQ run now for --gptq; None without either."""
    rotation = rotation_id(opts.rotation, opts.seed)
    if opts.gptq_file:
        path = Path(opts.gptq_file)
        result = GPTQResult.load(path)
        check_result_fits(result, path, opts, rotation, model)
        return result
    if opts.gptq:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return run_gptq(model, tokenizer, calibration_text(), GPTQConfig(group=opts.group_size, windows=opts.gptq_windows), device, opts.model, rotation)
    return None


def check_result_fits(result: GPTQResult, path: Path, opts: ExportOptions, rotation: str, model: LlamaForCausalLM) -> None:
    """A GPTQ file made for another model, rotation or group size is refused before anything is quantized."""
    cfg = result.config
    if (cfg.bits, cfg.scale_dtype) != (4, "bf16"):
        raise misfit(path, f"holds int{cfg.bits} weights with {cfg.scale_dtype} scales; 8da4w needs int4 with bf16 scales")
    if not same_model(result.model, opts.model):
        raise misfit(path, f"was made for the model {result.model}, the export is of {opts.model}")
    if cfg.group != opts.group_size:
        raise misfit(path, f"was made with group size {cfg.group}, the export uses --group-size {opts.group_size}")
    if result.rotation != rotation:
        raise misfit(path, f"was made under rotation {result.rotation}, the export uses {rotation}")
    check_weights_fit(result, path, model, cfg.group)


def misfit(path: Path, problem: str) -> UserError:
    return UserError(f"the GPTQ file {path} {problem}; {GPTQ_REMEDY}")


def same_model(saved: str, given: str) -> bool:
    """The same name, or two spellings of one model directory or file."""
    return saved == given or (Path(saved).exists() and Path(saved).resolve() == Path(given).resolve())


def decoder_linears(model: LlamaForCausalLM) -> dict[str, nn.Linear]:
    """Every linear GPTQ quantizes, by module name (down_proj's inside its online-Hadamard wrapper)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"}


def check_weights_fit(result: GPTQResult, path: Path, model: LlamaForCausalLM, group: int) -> None:
    linears = decoder_linears(model)
    if missing := sorted(linears.keys() - result.weights.keys()):
        raise misfit(path, f"has no weights for {missing[0]} ({len(missing)} linears of this model missing)")
    if extra := sorted(result.weights.keys() - linears.keys()):
        raise misfit(path, f"has weights for {extra[0]}, which is not a decoder linear of this model")
    for name, qw in result.weights.items():
        out, inputs = linears[name].weight.shape
        if qw.qdata.shape != (out, inputs) or qw.scale.shape != (out, inputs // group):
            raise misfit(path, f"holds {tuple(qw.qdata.shape)} integers with {tuple(qw.scale.shape)} scales for {name}, whose weight is ({out}, {inputs})")


def write_gptq_weights(model: LlamaForCausalLM, result: GPTQResult) -> None:
    """Replace every decoder linear's torchao 8da4w weight by GPTQ's integers and scales."""
    decoder = decoder_linears(model).keys()
    if missing := sorted(decoder - set(result.weights)):
        raise UserError(f"the GPTQ result has no weights for {missing[0]} ({len(missing)} linears missing)")
    for name, qw in result.weights.items():
        if name not in decoder:
            raise UserError(f"the GPTQ result has weights for {name}, which is not a decoder linear of this model")
        linear = model.get_submodule(name)
        linear.weight = nn.Parameter(gptq_tensor(linear.weight, qw, name), requires_grad=False)


def gptq_tensor(current: torch.Tensor, qw: QuantizedWeight, name: str) -> IntxUnpackedToInt8Tensor:
    if not isinstance(current, IntxUnpackedToInt8Tensor) or current.target_dtype != torch.int4:
        raise UserError(f"{name} is not an int4 8da4w weight; GPTQ needs --qlinear 8da4w")
    if current.qdata.shape != qw.qdata.shape or current.scale.shape != qw.scale.shape or current.scale.dtype != qw.scale.dtype:
        raise UserError(f"{name}: the GPTQ weights {tuple(qw.qdata.shape)}/{tuple(qw.scale.shape)} do not fit the model's")
    return IntxUnpackedToInt8Tensor(
        qdata=qw.qdata.to(current.qdata.device),
        scale=qw.scale.to(current.scale.device),
        zero_point=torch.zeros_like(current.zero_point),
        target_dtype=current.target_dtype,
        block_size=current.block_size,
        dtype=current.dtype,
        activation_quantization=current.activation_quantization,
    )
