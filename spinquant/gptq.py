"""GPTQ (Frantar et al. 2022): int4 group-wise weights that absorb each column's rounding error.

Layer by layer over the rotated model: each decoder layer's inputs come from the already-quantized
previous layers; inside a layer the linears go in SpinQuant's order (q/k/v, o, gate/up, down), each
group's Hessian H = 2XᵀX/n (float32) taken with the earlier groups already quantized. The linears of
one group share their input and so their Hessian: their rows are quantized as one matrix. `act_bits`
says whether the Hessians see the quantized model's inputs in full precision (16, SpinQuant's
gptq_utils) or int8 per token as the 8da4w program does (8, the default). down_proj's Hessian is taken
on the input of the inner linear of OnlineHadamardLinear, which is already Hadamard-transformed (R4).
A layer runs a stage at a time (StagedLayer): each stage goes up to its group's first linear, and what
a later stage needs (attention's output, the residual, the MLP's inner input) is kept, so every part of
the layer runs once per window; the full-precision layer runs once. With `lm_head`, GPTQ also
quantizes lm_head on the final norm of the last layer's outputs (the 8da4w lm_head).

GPTAQ-style asymmetric calibration (`asymmetric`, on by default): the full-precision model runs beside
the quantized one, layer by layer, and each linear is fitted to the full-precision model's output on
its own full-precision inputs X_fp rather than to W applied to the quantized model's inputs X̃, so the
error of the layers before is compensated too (Li et al. 2025, "GPTAQ"). Closed form, not GPTAQ's
column recursion: with C = 2X_fpᵀX̃/n, GPTQ of W' = W + W(C − H)(H + λI)⁻¹ on H minimises
‖X_fp Wᵀ − X̃ Qᵀ‖² (+ λ‖Q − W‖²) greedily column by column, exactly as GPTQ minimises ‖X̃ (W − Q)ᵀ‖².

Scales are torchao's 8da4w layout bit for bit: symmetric, max|w| / 7.5 per group of `group` inputs,
cast to the scale dtype (the export's is bfloat16), q = clamp(round(w · (1/scale)), −8, 7) with the
reciprocal taken in the scale dtype, as torchao's quantize_affine does. So the integers and scales
can be written into the exported program as they are. `method="rtn"` rounds to nearest in the same
layout (what torchao's quantize_ gives the RTN export): the baseline GPTQ is measured against.
"""

import copy
import dataclasses
import hashlib
import io
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from spinquant.cholesky import damped, upper_cholesky_of_inverse
from spinquant.data import text_sha256, token_windows
from spinquant.errors import UserError
from spinquant.families import ATTENTION_INPUTS, MLP_INPUTS, layer_linears
from spinquant.files import write_atomic
from spinquant.quant import QuantConfig, _qrange, _scale_and_zero, best_clip_ratio, quantize_input_hook
from spinquant.rotation import quantized_input_linear, untie_embeddings
from spinquant.e8p import DIM as E8P_DIM
from spinquant.quip import CODEBOOK_SCALE, E8PWeight, quip_e8p
from spinquant.scale_tuning import tune_scales
from spinquant.torch_files import describe_type, load_torch_file

SCALE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# SpinQuant's "true sequential" order: a group's Hessian sees the groups before it quantized.
# Each group is the linears of one input (a family has the split or the fused spelling: families.layer_linears).
SEQUENTIAL = (ATTENTION_INPUTS, ("self_attn.o_proj",), MLP_INPUTS, ("mlp.down_proj",))


@dataclass(frozen=True)
class GPTQConfig:
    bits: int = 4
    group: int = 32  # 0 = one scale per output channel
    damp: float = 0.01  # fraction of the Hessian's mean diagonal added to it
    # Defaults (`gptaq-clip-a8` in results/gptq_smollm2.md): below round to nearest (fp32 and bf16 scales) for
    # every rotation of the demo model and the best W4A8 with its learned rotation (20.43 against 21.13 for the
    # previous default, act order + MSE clip without GPTAQ). Without a rotation act order + GPTAQ is better
    # (21.84 against 22.32); plain GPTQ without act order or GPTAQ loses to RTN there.
    act_order: bool = False  # columns by decreasing H_ii; the group scales are then computed up front
    clip_search: bool = True  # per group, the clip ratio of quant.CLIP_GRID with the least squared error
    windows: int = 128
    seqlen: int = 2048
    block: int = 128  # columns per lazy batch update
    scale_dtype: str = "bf16"  # the export's 8da4w scales (spinquant/torchao_quant.py)
    # Calibration inputs fake-quantized per token (asymmetric) to this many bits; 16 = full precision, as
    # SpinQuant's gptq_utils. 8 = the int8 inputs the 8da4w program multiplies the weights with.
    act_bits: int = 8
    method: str = "gptq"  # or "rtn": round to nearest in this layout, no Hessian (GPTQ's baseline)
    # GPTAQ-style asymmetric calibration: each linear's target is the full-precision model's output X_fp·Wᵀ on
    # its own full-precision inputs, not W applied to the quantized model's inputs X̃. Solved in closed form:
    # GPTQ of W' = W + a·W(C − H)(H + λI)⁻¹, C = 2X_fpᵀX̃/n (the ridge solution of ‖X_fp Wᵀ − X̃ W'ᵀ‖² + λ‖W' − W‖²).
    # a = 0 is plain GPTQ; a = 1 the full correction. The default 0.5 is what results/gptq_smollm2.md measures.
    asymmetric: float = 0.5
    # Steps of end-to-end tuning of the group scales afterwards, integers fixed (spinquant/scale_tuning.py); 0 = none.
    tune_steps: int = 0
    tune_lr: float = 3e-3
    # Tune with the setting's activation and K/V fake quantization in the forward (rounding straight through), not in float.
    tune_activations: bool = False
    # "e8p": QuIP#'s incoherence and BlockLDLQ with the E8P codebook of `bits` (2, 3, 4) instead of int in groups (spinquant/quip.py);
    # GPTAQ's target still applies, act order and the clip search do not.
    codebook: str = "int"


@dataclass
class QuantizedWeight:
    qdata: torch.Tensor  # int8 (out, in), values in [qmin, qmax]
    scale: torch.Tensor  # (out, in // group) in the scale dtype; zero point 0

    def dequantize(self) -> torch.Tensor:
        group = self.qdata.shape[1] // self.scale.shape[1]
        return self.qdata.float() * self.scale.float().repeat_interleave(group, dim=1)


@dataclass
class GPTQResult:
    """Integer weights and scales per linear (module names of the rotated model) and where they came from."""

    weights: dict[str, QuantizedWeight]
    config: GPTQConfig
    model: str
    rotation: str  # rotation_id() of the rotation the weights were computed under
    calibration: str
    calibration_sha256: str
    windows: int
    seconds: float

    def describe(self) -> dict:
        info = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "weights"}
        return {**info, "config": dataclasses.asdict(self.config), "linears": len(self.weights)}

    def save(self, path: Path) -> None:
        buf = io.BytesIO()
        weights = {name: dataclasses.asdict(w) for name, w in self.weights.items()}
        torch.save({**self.describe(), "weights": weights}, buf)
        write_atomic(path, buf.getvalue())

    @staticmethod
    def load(path: Path) -> "GPTQResult":
        return GPTQResult.from_state(load_torch_file(Path(path), "GPTQ file", GPTQ_REMEDY), path)

    @staticmethod
    def from_state(state: object, path: Path) -> "GPTQResult":
        """A loaded GPTQ file's contents, checked; `path` names it in errors."""
        fields = [f.name for f in dataclasses.fields(GPTQResult)]
        if not isinstance(state, dict) or (missing := [name for name in fields if name not in state]):
            held = f"has no '{missing[0]}'" if isinstance(state, dict) else f"holds {describe_type(state)}"
            raise UserError(f"GPTQ file {path} {held}: it is not a saved GPTQ result; {GPTQ_REMEDY}")
        weights = {name: _saved_weight(w, name, path) for name, w in _saved_dict(state["weights"], "weights", path).items()}
        config = _saved_dict(state["config"], "config", path)
        if unknown := sorted(set(config) - {f.name for f in dataclasses.fields(GPTQConfig)}):
            raise UserError(f"GPTQ file {path}: unknown config field '{unknown[0]}' (a newer version's file?); {GPTQ_REMEDY}")
        info = {name: state[name] for name in fields if name not in ("weights", "config")}
        return GPTQResult(weights=weights, config=GPTQConfig(**config), **info)


GPTQ_REMEDY = "save one for this model, rotation and group size with python -m spinquant.eval --w-gptq --gptq-output FILE"


def _saved_dict(value: object, what: str, path: Path) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"GPTQ file {path}: its {what} is {describe_type(value)}, not a dict; {GPTQ_REMEDY}")
    return value


def _saved_weight(saved: object, name: str, path: Path) -> QuantizedWeight | E8PWeight:
    parts = _saved_dict(saved, f"entry {name}", path)
    if isinstance(parts.get("codes"), torch.Tensor) and isinstance(parts.get("scale"), torch.Tensor) and isinstance(parts.get("seed"), int):
        residual, bits = parts.get("residual"), parts.get("bits", 2)
        if bits not in CODEBOOK_SCALE or not (residual is None or isinstance(residual, torch.Tensor)):
            raise UserError(f"GPTQ file {path}: {name}'s E8P codes are of {bits!r} bits with a residual of {describe_type(residual)}; {GPTQ_REMEDY}")
        return E8PWeight(parts["codes"], parts["scale"], parts["seed"], bits, residual)
    if not all(isinstance(parts.get(key), torch.Tensor) for key in ("qdata", "scale")):
        raise UserError(f"GPTQ file {path}: {name} lacks a qdata or scale tensor; {GPTQ_REMEDY}")
    return QuantizedWeight(parts["qdata"], parts["scale"])


def check_result_fits(
    result: GPTQResult, source: str, model: LlamaForCausalLM, model_name: str, rotation: str, group: int, lm_head: bool,
) -> None:
    """A saved result (the export's --gptq-file) made for another model, rotation or group size is refused before its weights go in.

    `model` is already rotated (down_proj's linear sits inside its online-Hadamard wrapper, as GPTQ saw it);
    `rotation` is rotation_id() of the rotation it was rotated with; `source` names the result in errors;
    `lm_head`: whether the quantization needs GPTQ's lm_head (int4 in the decoder's groups).
    """
    if not same_model(result.model, model_name):
        raise misfit(source, f"was made for the model {result.model}, the export is of {model_name}")
    if result.config.group != group:
        raise misfit(source, f"was made with group size {result.config.group}, the export uses --group-size {group}")
    if result.rotation != rotation:
        raise misfit(source, f"was made under rotation {result.rotation}, the export uses {rotation}")
    linears = gptq_linears(model, lm_head=False)
    if missing := sorted(linears.keys() - result.weights.keys()):
        raise misfit(source, f"has no weights for {missing[0]} ({len(missing)} linears of this model missing)")
    if extra := sorted(result.weights.keys() - linears.keys() - {"lm_head"}):
        raise misfit(source, f"has weights for {extra[0]}, which is not a linear of this model")
    if lm_head != ("lm_head" in result.weights):
        made, needs = ("with", "an 8-bit one") if not lm_head else ("without", "an int4 one in its groups")
        raise misfit(source, f"was made {made} a GPTQ lm_head; this quantization's lm_head is {needs}")
    linears = gptq_linears(model, lm_head)
    for name, qw in result.weights.items():
        out, inputs = linears[name].weight.shape
        if isinstance(qw, E8PWeight):
            if (qw.residual is None) != (qw.bits == 2):
                raise misfit(source, f"holds {qw.bits}-bit E8P codes for {name} {'without' if qw.residual is None else 'with'} residual codes")
            for codes in [qw.codes] + ([qw.residual] if qw.residual is not None else []):
                if codes.shape != (out, inputs // E8P_DIM):
                    raise misfit(source, f"holds {tuple(codes.shape)} E8P codes for {name}, whose weight is ({out}, {inputs})")
        elif qw.qdata.shape != (out, inputs) or qw.scale.shape != (out, inputs // (group or inputs)):
            raise misfit(source, f"holds {tuple(qw.qdata.shape)} integers with {tuple(qw.scale.shape)} scales for {name}, whose weight is ({out}, {inputs})")


def misfit(source: str, problem: str) -> UserError:
    return UserError(f"the GPTQ file {source} {problem}; {GPTQ_REMEDY}")


def same_model(saved: str, given: str) -> bool:
    """The same name, or two spellings of one model directory or file."""
    return saved == given or (Path(saved).exists() and Path(saved).resolve() == Path(given).resolve())


def gptq_linears(model: LlamaForCausalLM, lm_head: bool) -> dict[str, nn.Linear]:
    """Every linear GPTQ quantizes, by module name (down_proj's inside its online-Hadamard wrapper); lm_head with `lm_head`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and (lm_head or name != "lm_head")}


def gptq_request(options: dict) -> GPTQConfig | Path | None:
    """GPTQ as an export's options ask for it (ExportOptions' names, or its report's record of them): a saved result's
    file (`gptq_file`), GPTQ to run now on windows no longer than the program's context (`gptq`), or None."""
    if options.get("gptq_file"):
        return Path(options["gptq_file"])
    if options.get("gptq"):
        return GPTQConfig(group=options["group_size"], windows=options["gptq_windows"], seqlen=min(options["gptq_seqlen"], options["max_seq_len"]))
    return None


def rotation_id(spec: str, seed: int) -> str:
    """What a GPTQ result was computed under: a file by its content, a random preset with its seed."""
    path = Path(spec)
    if spec not in ("none", "r4", "hadamard", "orthogonal") and path.is_file():
        return "file:sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return f"{spec}:seed{seed}" if spec in ("hadamard", "orthogonal") else spec


def group_scale(w: torch.Tensor, bits: int, clip: float | torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """torchao's symmetric scale of each row of w (one group), cast to the scale dtype: (rows, 1)."""
    scale, _ = _scale_and_zero(w.float(), bits, True, clip)
    return scale.to(scale_dtype)


def quantize_with_scale(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers as torchao's quantize_affine: the reciprocal in the scale's dtype, the product in w's."""
    qmin, qmax = _qrange(bits)
    return torch.clamp(torch.round(w * (1.0 / scale)), qmin, qmax)


def best_group_scale(w: torch.Tensor, bits: int, scale_dtype: torch.dtype, clip_search: bool) -> torch.Tensor:
    ratio = best_clip_ratio(w.float(), bits, True, scale_dtype) if clip_search else 1.0
    return group_scale(w, bits, ratio, scale_dtype)


def group_scales(w: torch.Tensor, cfg: GPTQConfig) -> torch.Tensor:
    """Round-to-nearest scales of every group of w's current values: (out, in // group)."""
    scale_dtype = SCALE_DTYPES[cfg.scale_dtype]
    return torch.cat([best_group_scale(g, cfg.bits, scale_dtype, cfg.clip_search) for g in w.split(cfg.group or w.shape[1], 1)], 1)


def round_to_nearest(weight: torch.Tensor, cfg: GPTQConfig) -> QuantizedWeight:
    """torchao's 8da4w integers and scales of the weight (with the MSE clip when asked)."""
    w = weight.float()
    scales = group_scales(w, cfg)
    q = quantize_with_scale(w, scales.repeat_interleave(w.shape[1] // scales.shape[1], dim=1), cfg.bits)
    return QuantizedWeight(q.to(torch.int8), scales)


def asymmetric_target(w: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, cfg: GPTQConfig) -> torch.Tensor:
    """W' = W + a·W(C − H)(H + λI)⁻¹: GPTQ of W' on H minimises ‖X_fp Wᵀ − X̃ Qᵀ‖² (+ the ridge term λ‖Q − W'‖²)."""
    for h_damped in damped(hessian, max(cfg.damp, 1e-6)):
        lower, info = torch.linalg.cholesky_ex(h_damped)
        if info == 0:
            break
    # (H + λI)⁻¹ (C − H)ᵀ Wᵀ, transposed: H is symmetric.
    correction = torch.cholesky_solve((cross - hessian).T @ w.T, lower).T
    return w + cfg.asymmetric * correction


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, cfg: GPTQConfig, cross: torch.Tensor | None = None) -> QuantizedWeight:
    """GPTQ of one weight (out, in) under the Hessian (in, in); works in the Hessian's dtype. With `cross`
    (C = 2X_fpᵀX̃/n, the full-precision inputs against the quantized model's) and cfg.asymmetric, GPTAQ's target."""
    w = weight.to(hessian.dtype).clone()
    h = hessian.clone()
    n = w.shape[1]
    group = cfg.group or n
    if n % group:
        raise UserError(f"weight group size {group} does not divide the layer's {n} inputs")
    dead = (h.diagonal() == 0).nonzero().flatten()
    h[dead, dead] = 1  # an input that is always 0: any weight works; the reference zeroes it
    w[:, dead] = 0
    if cross is not None and cfg.asymmetric:
        w = asymmetric_target(w, h, cross.to(h.dtype), cfg)
        w[:, dead] = 0
    scale_dtype = SCALE_DTYPES[cfg.scale_dtype]
    static = group_scales(w, cfg) if cfg.act_order else None
    perm = torch.argsort(h.diagonal(), descending=True) if cfg.act_order else torch.arange(n, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    u = upper_cholesky_of_inverse(h, cfg.damp)
    q = torch.zeros_like(w)
    scales = static if static is not None else torch.empty(w.shape[0], n // group, dtype=scale_dtype, device=w.device)
    # Each permuted column's static scale, gathered once: indexing by an element of perm (on the GPU) in the loop can sync per column.
    column_scales = static[:, perm // group] if static is not None else None
    block = group * max(1, cfg.block // group)  # a group never straddles two blocks
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        wb, ub = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
        err = torch.zeros_like(wb)
        for i in range(b1 - b0):
            col = b0 + i
            if static is None and col % group == 0:
                # From the current weights: the error of earlier columns already moved this group.
                scales[:, col // group] = best_group_scale(wb[:, i : i + group], cfg.bits, scale_dtype, cfg.clip_search)[:, 0]
            s = column_scales[:, col] if column_scales is not None else scales[:, col // group]
            q[:, col] = quantize_with_scale(wb[:, i], s, cfg.bits)
            err[:, i] = (wb[:, i] - q[:, col] * s.to(w.dtype)) / ub[i, i]
            wb[:, i + 1 :].addr_(err[:, i], ub[i, i + 1 :], alpha=-1)  # in place: no rows × columns temporary per column
        w[:, b1:] -= err @ u[b0:b1, b1:]
    q = q[:, torch.argsort(perm)]
    return QuantizedWeight(q.to(torch.int8), scales)


class HessianAccumulator:
    """Σ xᵀx over every token seen by a linear's input (float32), then H = 2XᵀX / n; with `cross`, also
    C = 2X_fpᵀX̃/n against the full-precision model's input of the same tokens, set in `fp_input` before each call."""

    def __init__(self, linear: nn.Linear, cross: bool = False):
        self.sum = torch.zeros(linear.in_features, linear.in_features, dtype=torch.float32, device=linear.weight.device)
        self.cross = torch.zeros_like(self.sum) if cross else None
        self.fp_input: torch.Tensor | None = None
        self.tokens = 0
        self.handle = linear.register_forward_pre_hook(self.add)

    def add(self, module: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        self.sum.addmm_(x.T, x)
        if self.cross is not None:
            self.cross.addmm_(self.fp_input.T, x)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        self.handle.remove()
        return self.sum * (2.0 / self.tokens)

    def cross_term(self) -> torch.Tensor | None:
        return None if self.cross is None else self.cross * (2.0 / self.tokens)


class _StopForward(Exception):
    pass


def _stop(module: nn.Module, args: tuple) -> None:
    raise _StopForward


def run_until(stop_at: nn.Module, forward: Callable[[], object]) -> None:
    """Run `forward` up to `stop_at`'s input (its other pre-hooks, such as a Hessian's, still see it)."""
    handle = stop_at.register_forward_pre_hook(_stop)
    try:
        forward()
    except _StopForward:
        pass
    finally:
        handle.remove()


class _RawInputs:
    """Each call's input of a module as it arrives, before its own pre-hooks (int8 quantization) change it; on the CPU."""

    def __init__(self, module: nn.Module):
        self.inputs: list[torch.Tensor] = []
        self.handle = module.register_forward_pre_hook(lambda m, args: self.inputs.append(args[0].cpu()), prepend=True)

    def remove(self) -> list[torch.Tensor]:
        self.handle.remove()
        return self.inputs


@torch.no_grad()
def first_layer_inputs(model: LlamaForCausalLM, windows: torch.Tensor, device: torch.device) -> tuple[list[torch.Tensor], dict]:
    """Each window's hidden states entering layer 0 (kept on the CPU) and the layer's other arguments."""
    inner = model.model
    inner.embed_tokens.to(device)
    inner.rotary_emb.to(device)
    captured, kwargs = [], {}

    def catch(module: nn.Module, args: tuple, kw: dict):
        captured.append(args[0].cpu())
        kwargs.update(kw)
        raise _StopForward

    handle = inner.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for window in windows:
            try:
                inner(window[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured, kwargs


def inner_linear(layer: nn.Module, name: str) -> nn.Linear:
    return quantized_input_linear(layer.get_submodule(name))


def run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, device: torch.device) -> list[torch.Tensor]:
    return [layer(x.to(device), **kwargs).cpu() for x in inputs]


@torch.no_grad()
def full_precision_inputs(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, device: torch.device) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """One forward of the full-precision layer per window: each SEQUENTIAL group's input (GPTAQ's X_fp, per window,
    on the CPU) and the layer's outputs (the next layer's full-precision inputs)."""
    captured = [_RawInputs(inner_linear(layer, next(iter(layer_linears(layer, group))))) for group in SEQUENTIAL]
    outputs = run_layer(layer, inputs, kwargs, device)
    return [[x.reshape(-1, x.shape[-1]).float() for x in c.remove()] for c in captured], outputs


class StagedLayer:
    """A decoder layer run one SEQUENTIAL group at a time over the calibration windows, each part computed once:
    the layer is pre-norm, h = x + o_proj(attention z) and out = h + down_proj(d), d = mlp(post_attention_layernorm(h))
    up to down_proj, as in every family of families.py. Each stage runs up to its group's first linear, whose
    Hessian hook sees the input; what a later stage needs (z, h, d) is kept on the CPU."""

    def __init__(self, layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, device: torch.device):
        self.layer, self.inputs, self.kwargs, self.device = layer, inputs, kwargs, device
        self.attention = self.residual = self.mlp_inner = None

    def run(self, stage: int, stop_at: nn.Module, acc: HessianAccumulator, fp_inputs: list[torch.Tensor] | None) -> None:
        """Stage `stage` over every window, up to `stop_at`; `fp_inputs`: the full-precision model's input to the group
        in each window, for `acc`'s cross term."""
        layer, dev = self.layer, self.device
        kept = _RawInputs(layer.self_attn.o_proj if stage == 1 else layer.mlp.down_proj) if stage in (1, 3) else None
        for i, x in enumerate(self.inputs):
            if fp_inputs is not None:
                acc.fp_input = fp_inputs[i].to(dev)
            if stage < 2:
                run_until(stop_at, lambda: layer(x.to(dev), **self.kwargs))
            else:
                if stage == 2:
                    self.residual[i] = x + layer.self_attn.o_proj(self.attention[i].to(dev)).cpu()
                run_until(stop_at, lambda: layer.mlp(layer.post_attention_layernorm(self.residual[i].to(dev))))
        if stage == 1:
            self.attention, self.residual = kept.remove(), [None] * len(self.inputs)
        elif stage == 3:
            self.mlp_inner = kept.remove()

    def outputs(self) -> list[torch.Tensor]:
        """The layer's outputs, after its last group is quantized."""
        down = self.layer.mlp.down_proj
        return [h + down(d.to(self.device)).cpu() for h, d in zip(self.residual, self.mlp_inner)]


@torch.no_grad()
def quantize_layer(
    layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, cfg: GPTQConfig, device: torch.device,
    fp_inputs: list[torch.Tensor] | None = None,
) -> tuple[dict[nn.Linear, QuantizedWeight], list[torch.Tensor], list[torch.Tensor] | None]:
    """GPTQ every linear of one decoder layer in SpinQuant's order; their weights become the dequantized ones.
    Returns the integers and the next layer's inputs (quantized model; full-precision model with `fp_inputs`).

    The linears of one group share their input, so their Hessian: their rows are quantized as one matrix.
    With `fp_inputs` (the full-precision model's inputs to this layer, before it is quantized) also the cross
    term of GPTAQ's asymmetric calibration.
    """
    targets, next_fp = full_precision_inputs(full_precision_copy(layer), fp_inputs, kwargs, device) if fp_inputs is not None else (None, None)
    staged = StagedLayer(layer, inputs, kwargs, device)
    done = {}
    for stage, group in enumerate(SEQUENTIAL):
        linears = [inner_linear(layer, name) for name in layer_linears(layer, group)]
        acc = HessianAccumulator(linears[0], cross=targets is not None)
        staged.run(stage, linears[0], acc, targets[stage] if targets is not None else None)
        done.update(quantize_group(linears, acc.hessian(), cfg, acc.cross_term()))
    return done, staged.outputs(), next_fp


def quantize_group(linears: list[nn.Linear], hessian: torch.Tensor, cfg: GPTQConfig, cross: torch.Tensor | None) -> dict[nn.Linear, QuantizedWeight]:
    """GPTQ of linears sharing one input, as one matrix; each weight becomes its dequantized value."""
    if cfg.codebook == "e8p":
        return e8p_group(linears, hessian, cfg, cross)
    qw = gptq_quantize(torch.cat([linear.weight.data for linear in linears]), hessian, cfg, cross)
    rows = [linear.out_features for linear in linears]
    done = {}
    for linear, qdata, scale in zip(linears, qw.qdata.split(rows), qw.scale.split(rows)):
        part = QuantizedWeight(qdata, scale)
        linear.weight.data = part.dequantize().to(linear.weight.dtype)
        done[linear] = QuantizedWeight(qdata.cpu(), scale.cpu())
    return done


def e8p_group(linears: list[nn.Linear], hessian: torch.Tensor, cfg: GPTQConfig, cross: torch.Tensor | None) -> dict:
    """QuIP#'s E8P codes of each linear sharing this input (each its own R_out and scale, all one R_in); each weight
    becomes its dequantized value."""
    done = {}
    for linear in linears:
        w = linear.weight.data.to(hessian.dtype)
        if cross is not None and cfg.asymmetric:
            w = asymmetric_target(w, hessian, cross.to(hessian.dtype), cfg)
        qw = quip_e8p(w, hessian, damp=cfg.damp, bits=cfg.bits)
        linear.weight.data = qw.dequantize().to(linear.weight.dtype)
        done[linear] = qw.to("cpu")
    return done


def full_precision_copy(layer: nn.Module) -> nn.Module:
    """The layer as it is before quantization, without the calibration hooks (the full-precision model's layer)."""
    fp_layer = copy.deepcopy(layer)
    for module in fp_layer.modules():
        module._forward_pre_hooks.clear()
    return fp_layer


def check_calibration_tokens(model: LlamaForCausalLM, tokens: int) -> None:
    """Fewer tokens than a linear has inputs leave its Hessian rank-deficient: GPTQ would fit noise."""
    widest = max(m.in_features for m in model.model.layers.modules() if isinstance(m, nn.Linear))
    if tokens < widest:
        raise UserError(
            f"too few calibration tokens: {tokens}, fewer than the {widest} inputs of the widest linear; "
            "give more windows or a longer calibration text"
        )


def quantize_calibration_inputs(linears: list[nn.Linear], bits: int) -> list[RemovableHandle]:
    """Per-token fake quantization of each linear's input while calibrating; registered before the Hessian
    hooks, so those see the quantized inputs (and the next layers the quantized outputs)."""
    if bits >= 16:
        return []
    return [m.register_forward_pre_hook(quantize_input_hook(bits, False, 1.0)) for m in linears]


def gptq_model(
    model: LlamaForCausalLM, windows: torch.Tensor, cfg: GPTQConfig, device: torch.device, progress: bool = True, lm_head: bool = False,
) -> dict[str, QuantizedWeight]:
    """GPTQ of every decoder linear (and of lm_head with `lm_head`), in place (weights become their dequantized
    values); integers by module name."""
    check_calibration_tokens(model, windows.numel())
    names = {m: name for name, m in model.named_modules()}
    home = next(model.parameters()).device
    if lm_head:
        untie_embeddings(model)  # the embedding keeps its own weights
    linears = [m for m in model.model.layers.modules() if isinstance(m, nn.Linear)] + ([model.lm_head] if lm_head else [])
    handles = quantize_calibration_inputs(linears, cfg.act_bits)
    try:
        inputs, kwargs = first_layer_inputs(model, windows, device)
        # GPTAQ: the full-precision model's hidden states beside the quantized one's (the embedding is not quantized).
        fp_inputs = [x.clone() for x in inputs] if cfg.asymmetric else None
        result = {}
        for layer in tqdm(model.model.layers, desc="GPTQ", unit="layer", disable=not progress):
            layer.to(device)
            done, inputs, fp_inputs = quantize_layer(layer, inputs, kwargs, cfg, device, fp_inputs)
            result.update({names[linear]: qw for linear, qw in done.items()})
            layer.to(home)
        if lm_head:
            result["lm_head"] = quantize_lm_head(model, inputs, fp_inputs, cfg, device, home)
    finally:
        for handle in handles:
            handle.remove()
    model.model.embed_tokens.to(home)
    model.model.rotary_emb.to(home)
    return result


@torch.no_grad()
def quantize_lm_head(
    model: LlamaForCausalLM, inputs: list[torch.Tensor], fp_inputs: list[torch.Tensor] | None, cfg: GPTQConfig,
    device: torch.device, home: torch.device,
) -> QuantizedWeight:
    """GPTQ of lm_head on the final norm of the last layer's outputs (quantized model; GPTAQ's cross term
    against the full-precision model's with `fp_inputs`)."""
    norm, head = model.model.norm.to(device), model.lm_head.to(device)
    acc = HessianAccumulator(head, cross=fp_inputs is not None)
    for i, x in enumerate(inputs):
        if fp_inputs is not None:
            acc.fp_input = norm(fp_inputs[i].to(device)).reshape(-1, head.in_features).float()
        run_until(head, lambda: head(norm(x.to(device))))
    done = quantize_group([head], acc.hessian(), cfg, acc.cross_term())
    norm.to(home), head.to(home)
    return done[head]


@torch.no_grad()
def rtn_model(model: LlamaForCausalLM, cfg: GPTQConfig) -> dict[str, QuantizedWeight]:
    """Round to nearest of every decoder linear in GPTQ's layout, in place, as gptq_model returns it."""
    result = {}
    for name, linear in model.model.layers.named_modules(prefix="model.layers"):
        if isinstance(linear, nn.Linear):
            qw = round_to_nearest(linear.weight.data, cfg)
            linear.weight.data = qw.dequantize().to(linear.weight.device, linear.weight.dtype)
            result[name] = QuantizedWeight(qw.qdata.cpu(), qw.scale.cpu())
    return result


def run_gptq(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    calibration: Path,
    cfg: GPTQConfig,
    device: torch.device,
    model_name: str,
    rotation: str,
    lm_head: bool = False,
    activations: QuantConfig | None = None,
) -> GPTQResult:
    """GPTQ on the first `cfg.windows` windows of the calibration text (all of them if it has fewer); of lm_head too with `lm_head`.
    `activations`: the setting whose activation and K/V quantization the scale tuning runs through (cfg.tune_activations)."""
    if not calibration.is_file():
        raise UserError(f"calibration text not found: {calibration}")
    text = calibration.read_text(encoding="utf-8")
    windows = token_windows(tokenizer, text, cfg.seqlen, cfg.windows)
    if len(windows) < cfg.windows:
        print(f"GPTQ: the calibration text has {len(windows)} windows of {cfg.seqlen} tokens, using them all", file=sys.stderr)
    start = time.time()
    teacher = copy.deepcopy(model) if cfg.tune_steps else None  # the rotated float model: the same function as the original
    weights = rtn_model(model, cfg) if cfg.method == "rtn" else gptq_model(model, windows, cfg, device, lm_head=lm_head)
    if teacher is not None:
        weights = tune_scales(model, teacher, weights, windows, cfg.tune_steps, cfg.tune_lr, activations=activations)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return GPTQResult(
        weights=weights, config=cfg, model=model_name, rotation=rotation, calibration=str(calibration),
        calibration_sha256=text_sha256(text), windows=len(windows), seconds=round(time.time() - start, 1),
    )

