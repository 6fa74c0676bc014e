"""GPTQ's group scales tuned end to end, its integers fixed (EfficientQAT's E2E-QP, Chen et al. 2024).

GPTQ picks each linear's integers and scales one layer at a time, against that layer's own outputs; the program is
judged by the whole model's next-token distribution. With the integers fixed, the scales (one per group of 32
weights, 3% of them) are trained so that the quantized model's distribution comes back to the full-precision one's:
KL divergence on the calibration windows, Adam on each scale's logarithm (a scale stays positive and moves in
proportion to its size), cosine decay to 0. The program holds the same integers and bf16 scales in the same layout,
so the tuning costs nothing at run time. Activations stay in float while tuning: at W4A8 the int8 activations cost
the demo 0.1% (results/gptq_smollm2_heldout.md), its weights the rest. Measured: results/scale_tuning_smollm2.md. At
4-bit activations they cost most of the gap; `activations` then runs the tuning through them, rounding straight through.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

from spinquant.quant import QuantConfig, quantize_activations

BATCH_WINDOWS = 4  # calibration windows per step (the demo's setting in results/scale_tuning_smollm2.md)


def tune_scales(
    model: nn.Module, teacher: nn.Module, weights: dict, windows: torch.Tensor, steps: int, lr: float,
    seed: int = 0, progress: bool = True, activations: QuantConfig | None = None,
) -> dict:
    """`weights` (name → gptq.QuantizedWeight)' scales tuned for `steps` steps so that `model` (holding those linears) matches `teacher`'s
    next-token distributions on `windows`; the tuned weights are written into `model` and returned (same integers,
    scales in their own dtype). With `activations`, `model` runs with that setting's activation and K/V quantization
    (straight through) while it is tuned."""
    device = next(model.parameters()).device
    ints = {name: qw.qdata.to(device, torch.float32) for name, qw in weights.items()}
    start = {name: qw.scale.to(device, torch.float32) for name, qw in weights.items()}
    log_scales = {name: torch.zeros_like(s, requires_grad=True) for name, s in start.items()}
    opt = torch.optim.Adam(log_scales.values(), lr=lr)
    order = torch.randint(len(windows), (steps, min(BATCH_WINDOWS, len(windows))), generator=torch.Generator().manual_seed(seed))
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    hooks = quantize_activations(model, activations, ste=True) if activations is not None else []
    try:
        for step in tqdm(range(steps), desc="scale tuning", unit="step", disable=not progress):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            scales = {name: start[name] * log_scales[name].exp() for name in weights}
            loss = distribution_loss(model, teacher, {f"{n}.weight": dequantized(ints[n], s) for n, s in scales.items()}, windows[order[step]].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for hook in hooks:
            hook.remove()
    tuned = {name: dataclasses.replace(qw, scale=(start[name] * log_scales[name].exp()).detach().to(qw.scale.dtype).cpu())
             for name, qw in weights.items()}
    with torch.no_grad():
        for name, qw in tuned.items():
            linear = model.get_submodule(name)
            linear.weight.data = qw.dequantize().to(linear.weight.device, linear.weight.dtype)
    return tuned


def dequantized(ints: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return ints * scale.repeat_interleave(ints.shape[1] // scale.shape[1], dim=1)


def distribution_loss(model: nn.Module, teacher: nn.Module, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher ‖ model with `weights`) over the tokens of `ids`; bf16 matrix products on a GPU."""
    with torch.autocast(ids.device.type, torch.bfloat16, enabled=ids.device.type == "cuda"):
        with torch.no_grad():
            target = log_probs(teacher(ids, use_cache=False).logits)
        ours = log_probs(functional_call(model, weights, (ids,), {"use_cache": False}).logits)
    return F.kl_div(ours, target, log_target=True, reduction="none").sum(-1).mean()


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """In float32 at least: bf16 logits round the KL of a well-tuned model away."""
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
