"""The slow, obviously-correct GPTQ that spinquant.gptq.gptq_model must equal: every group's Hessian taken by
running the whole quantized model (and, for GPTAQ's cross term, the whole full-precision model) on every window."""

import copy

import torch
from torch import nn

from spinquant.families import layer_linears
from spinquant.gptq import SEQUENTIAL, GPTQConfig, HessianAccumulator, QuantizedWeight, inner_linear, quantize_calibration_inputs, quantize_group


@torch.no_grad()
def whole_model_gptq(model: nn.Module, windows: torch.Tensor, cfg: GPTQConfig, lm_head: bool) -> dict[str, QuantizedWeight]:
    full_precision = copy.deepcopy(model)
    groups = [
        ([inner_linear(layer, name) for name in layer_linears(layer, group)], inner_linear(fp_layer, next(iter(layer_linears(layer, group)))))
        for layer, fp_layer in zip(model.model.layers, full_precision.model.layers)
        for group in SEQUENTIAL
    ] + ([([model.lm_head], full_precision.lm_head)] if lm_head else [])
    names = {m: name for name, m in model.named_modules()}
    linears = [m for m in model.model.layers.modules() if isinstance(m, nn.Linear)] + ([model.lm_head] if lm_head else [])
    handles = quantize_calibration_inputs(linears, cfg.act_bits)
    result = {}
    for linears, fp_first in groups:
        acc = HessianAccumulator(linears[0], cross=bool(cfg.asymmetric))
        grab = fp_first.register_forward_pre_hook(lambda m, args: setattr(acc, "fp_input", args[0].reshape(-1, args[0].shape[-1]).float()))
        for window in windows:
            full_precision(window[None], use_cache=False)
            model(window[None], use_cache=False)
        grab.remove()
        result.update({names[linear]: qw for linear, qw in quantize_group(linears, acc.hessian(), cfg, acc.cross_term()).items()})
    for handle in handles:
        handle.remove()
    return result
