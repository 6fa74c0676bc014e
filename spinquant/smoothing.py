"""SmoothQuant's per-channel scales, fused exactly: a linear's input divided by s, its weight's columns multiplied by s.

Where the division goes (after the rotations are fused, in the basis the quantizer sees):
- the residual stream's readers: the norm's gain becomes 1/s (R1 has folded the gains into the linears, so each
  layer's two norms are free to carry one), q/k/v or gate/up columns · s;
- the attention output: v_proj's rows / s, o_proj's columns · s (one s per KV head's channel, shared by the query
  heads that read it);
- down_proj's input: up_proj's rows / s, down_proj's columns · s (before R4's Hadamard is folded).
"""

from dataclasses import dataclass

import torch
from torch import nn

from spinquant.errors import UserError
from spinquant.families import layer_linears

PARTS = ("attention", "mlp", "values", "down")


@dataclass
class LayerSmoothing:
    attention: torch.Tensor  # (hidden,): q/k/v's input
    mlp: torch.Tensor  # (hidden,): gate/up's input
    values: torch.Tensor  # (kv_heads · head_dim,): o_proj's input, per KV head
    down: torch.Tensor  # (intermediate,): down_proj's input


def smoothing_scales(activation_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|x|^α / max|w|^(1−α) per channel (SmoothQuant; DuQuant's α is 0.6), float64, channels never seen kept at 1."""
    a, w = activation_max.double(), weight_max.double()
    s = a.pow(alpha) / w.pow(1 - alpha)
    return torch.where((a > 0) & (w > 0) & s.isfinite(), s, torch.ones_like(s))


def _scale(param: torch.Tensor, factor: torch.Tensor) -> None:
    param.data = (param.data.double() * factor).to(param.dtype)


ATTENTION_READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_READERS = ("mlp.gate_proj", "mlp.up_proj")


def check_separate_projections(layer: nn.Module) -> None:
    if len(layer_linears(layer, ATTENTION_READERS)) < 3 or len(layer_linears(layer, MLP_READERS)) < 2:
        raise UserError("smoothing needs separate q/k/v and gate/up projections, and this model family fuses them: DuQuant's "
                        "rotations alone are python -m spinquant.duquant --no-smoothing --output FILE.pt, then --rotation FILE.pt")


def fuse_smoothing(layer: nn.Module, smoothing: LayerSmoothing, head_dim: int) -> None:
    """Divide each of the layer's four quantized inputs by its s, and multiply its readers' columns by s: exact."""
    check_separate_projections(layer)
    attention, mlp = layer_linears(layer, ATTENTION_READERS), layer_linears(layer, MLP_READERS)
    for norm, readers, s in ((layer.input_layernorm, attention, smoothing.attention), (layer.post_attention_layernorm, mlp, smoothing.mlp)):
        _scale(norm.weight, 1 / s)
        for linear in readers.values():
            _scale(linear.weight, s)
    v, o = attention["self_attn.v_proj"], layer.self_attn.o_proj
    _scale(v.weight, 1 / smoothing.values[:, None])
    if v.bias is not None:
        _scale(v.bias, 1 / smoothing.values)
    groups = o.weight.shape[1] // smoothing.values.numel()
    _scale(o.weight, smoothing.values.view(-1, head_dim).repeat_interleave(groups, 0).flatten())
    up, down = mlp["mlp.up_proj"], layer.mlp.down_proj
    _scale(up.weight, 1 / smoothing.down[:, None])
    _scale(down.weight, smoothing.down)
