"""DuQuant's rotations (Lin et al., NeurIPS 2024), found from calibration activations without training, as R1 and R2:
`python -m spinquant.duquant --output FILE`, then `--rotation FILE` in evaluation and export.

Per activation: a greedy rotation in blocks (each step spreads the block's largest channel evenly over the block),
a zigzag permutation (channels sorted by their largest value dealt back and forth across the blocks, so that each
block gets a share of the large ones), and a second greedy rotation. Block rotations with a permutation are
orthogonal, so they fuse into the weights exactly as a learned R1 (the residual stream: every norm's output, gain
left out, as R1 sees it) and R2 (each layer's attention output, per head) do. R4 stays the online Hadamard.
Each greedy step turns the block by an orthogonal matrix whose row for the block's largest channel is uniform (Helmert's,
as DuQuant's), and the steps kept are those up to the lowest peak, per block. Then SmoothQuant's scales (α, DuQuant's
0.6) for each layer's four quantized inputs, in the basis the quantizer sees (spinquant/smoothing.py fuses them).
"""

import argparse
import io
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from spinquant.data import calibration_text, read_text, text_sha256, token_windows
from spinquant.errors import UserError, one_line_errors
from spinquant.files import write_atomic, write_json_atomic
from spinquant.models import load_model
from spinquant.rotation import Rotations, head_dim, smoothing_key
from spinquant.smoothing import ATTENTION_READERS, MLP_READERS, PARTS, LayerSmoothing, check_separate_projections, smoothing_scales


@dataclass(frozen=True)
class DuQuantConfig:
    block: int | None = None  # R1's block; None: the largest power of two up to DuQuant's 128 dividing the hidden size
    steps: int = 256  # greedy steps per rotation, at most
    windows: int = 8  # calibration windows of `seqlen` tokens
    seqlen: int = 256
    seed: int = 0  # which calibration windows
    alpha: float | None = 0.6  # SmoothQuant's migration strength (DuQuant's 0.6); None: no smoothing


def residual_block(hidden: int, block: int | None) -> int:
    if block is None:
        return max(b for b in (2 ** i for i in range(8)) if hidden % b == 0)
    if block < 2 or hidden % block:
        raise UserError(f"--block {block} does not divide the hidden size {hidden}: pick a divisor of it, at least 2")
    return block


def helmert(n: int) -> torch.Tensor:
    """Helmert's orthogonal matrix: row 0 uniform, row k the contrast of the first k entries against entry k."""
    h = torch.zeros(n, n, dtype=torch.float64)
    h[0] = n ** -0.5
    for k in range(1, n):
        h[k, :k] = (k * (k + 1)) ** -0.5
        h[k, k] = -k * (k * (k + 1)) ** -0.5
    return h


def largest_magnitudes(xb: torch.Tensor) -> torch.Tensor:
    """max |x| per block and channel of (blocks, rows, block), from one pass over x without an |x| copy: the search's
    time goes to passes over the calibration rows (125,000 × 576 for the demo's R1)."""
    low, high = torch.aminmax(xb, dim=1)
    return torch.maximum(-low, high)


def greedy_block_rotation(x: torch.Tensor, block: int, steps: int) -> torch.Tensor:
    """Per block of `block` channels of the rows `x`, the product of greedy steps (block, block) that lowers the block's
    largest |value| most within `steps` steps: (blocks, block, block), float64, x_block @ R. A step turns the block by
    Helmert's matrix with the chosen channel in row 0's place: that channel spreads evenly, the others mix."""
    blocks = x.shape[-1] // block
    xb = x.reshape(-1, blocks, block).transpose(0, 1).contiguous().float()  # (blocks, rows, block)
    base = helmert(block)
    rotation = torch.eye(block, dtype=torch.float64).repeat(blocks, 1, 1)
    channel_max = largest_magnitudes(xb)
    best, best_peak = rotation.clone(), channel_max.amax(dim=-1)
    for _ in range(steps):
        swapped = torch.arange(block).repeat(blocks, 1)
        channel = channel_max.argmax(dim=-1)
        swapped[torch.arange(blocks), channel] = 0
        swapped[:, 0] = channel
        step = base[swapped[:, :, None], swapped[:, None, :]]  # rows and columns 0 and `channel` exchanged
        xb = torch.bmm(xb, step.float())
        rotation = torch.bmm(rotation, step)
        channel_max = largest_magnitudes(xb)
        peak = channel_max.amax(dim=-1)
        better = peak < best_peak
        best[better], best_peak = rotation[better], torch.where(better, peak, best_peak)
    return best


def zigzag_permutation(channel_max: torch.Tensor, block: int) -> torch.Tensor:
    """Channel order (x[:, order]) that deals channels, largest first, to blocks 0, 1, …, n−1, n−1, …, 0, 0, 1, …"""
    blocks = channel_max.numel() // block
    cycle = list(range(blocks)) + list(range(blocks - 1, -1, -1))
    dealt = [[] for _ in range(blocks)]
    for i, channel in enumerate(channel_max.argsort(descending=True, stable=True).tolist()):
        dealt[cycle[i % len(cycle)]].append(channel)
    return torch.tensor([c for b in dealt for c in b])


def block_diagonal(rotations: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*rotations)


def duquant_transform(x: torch.Tensor, block: int, steps: int) -> torch.Tensor:
    """DuQuant's rotation, permutation, rotation for the rows `x` as one orthogonal (d, d) float64 matrix T: x @ T."""
    first = block_diagonal(greedy_block_rotation(x, block, steps))
    turned = x.double() @ first
    order = zigzag_permutation(turned.abs().amax(dim=0), block)
    permutation = torch.eye(x.shape[-1], dtype=torch.float64)[:, order]
    second = block_diagonal(greedy_block_rotation(turned[:, order], block, steps))
    return first @ permutation @ second


@dataclass
class LayerActivations:
    """One decoder layer's calibration activations: the rows R1 and R2 turn, and down_proj's input's channel maxima."""

    attention: list[torch.Tensor]  # input_layernorm's input, normalized without its gain: (tokens, hidden) per window
    mlp: list[torch.Tensor]  # post_attention_layernorm's, likewise
    heads: list[torch.Tensor]  # o_proj's input: (tokens, heads · head_dim) per window
    down_max: torch.Tensor | None = None  # (intermediate,)


@torch.no_grad()
def calibration_activations(model: LlamaForCausalLM, windows: torch.Tensor) -> tuple[list[LayerActivations], torch.Tensor]:
    """Each layer's activations on `windows`, and the final norm's normalized input (lm_head reads R1's basis too)."""
    layers, final, hooks = [LayerActivations([], [], []) for _ in model.model.layers], [], []
    eps = model.config.rms_norm_eps

    def normalized(into):
        def keep(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            into.append(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
        return keep

    def down_max(acts):
        def keep(_module, args):
            m = args[0].reshape(-1, args[0].shape[-1]).abs().amax(0).float()
            acts.down_max = m if acts.down_max is None else torch.maximum(acts.down_max, m)
        return keep

    for layer, acts in zip(model.model.layers, layers):
        hooks += [layer.input_layernorm.register_forward_pre_hook(normalized(acts.attention)),
                  layer.post_attention_layernorm.register_forward_pre_hook(normalized(acts.mlp)),
                  layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, args, a=acts: a.heads.append(args[0].flatten(0, 1).float())),
                  layer.mlp.down_proj.register_forward_pre_hook(down_max(acts))]
    hooks.append(model.model.norm.register_forward_pre_hook(normalized(final)))
    try:
        for window in windows:
            model(window[None])
    finally:
        for hook in hooks:
            hook.remove()
    return layers, torch.cat(final)


def layer_smoothing(layer: nn.Module, acts: LayerActivations, r1: torch.Tensor, r2: torch.Tensor, head: int, alpha: float) -> LayerSmoothing:
    """The layer's four smoothing scales, from its activations and weights in the basis the quantizer sees: after R1
    (norm gains folded into the readers) and R2 (per head), before R4."""
    def readers_max(norm: nn.Module, names: tuple[str, ...]) -> torch.Tensor:
        w = torch.cat([layer.get_submodule(n).weight.double() for n in names]) * norm.weight.double()
        return (w @ r1).abs().amax(0)

    heads = torch.cat(acts.heads).double()
    kv = layer.self_attn.v_proj.weight.shape[0] // head
    turned = (heads.unflatten(-1, (-1, head)) @ r2).unflatten(1, (kv, -1))  # (tokens, kv, groups, head)
    wo = (layer.self_attn.o_proj.weight.double().unflatten(1, (-1, head)) @ r2).unflatten(1, (kv, -1))  # (out, kv, groups, head)
    return LayerSmoothing(
        attention=smoothing_scales((torch.cat(acts.attention).double() @ r1).abs().amax(0),
                                   readers_max(layer.input_layernorm, ATTENTION_READERS), alpha),
        mlp=smoothing_scales((torch.cat(acts.mlp).double() @ r1).abs().amax(0),
                             readers_max(layer.post_attention_layernorm, MLP_READERS), alpha),
        values=smoothing_scales(turned.abs().amax(dim=(0, 2)).flatten(), wo.abs().amax(dim=(0, 2)).flatten(), alpha),
        down=smoothing_scales(acts.down_max, layer.mlp.down_proj.weight.double().abs().amax(0), alpha),
    )


def calibration_windows(tokenizer: PreTrainedTokenizerBase, text: str, config: DuQuantConfig) -> torch.Tensor:
    """`config.windows` windows of `text`, chosen by `config.seed`."""
    windows = token_windows(tokenizer, text, config.seqlen, None)
    if len(windows) < config.windows:
        raise UserError(f"the calibration text gives {len(windows)} windows of {config.seqlen} tokens; DuQuant's search takes "
                        f"{config.windows}: a longer text, or fewer --windows")
    return windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(config.seed))[: config.windows]]


def duquant_rotations(model: LlamaForCausalLM, windows: torch.Tensor, config: DuQuantConfig) -> Rotations:
    """R1 from the residual stream, each layer's R2 from its attention heads, and (α set) the smoothing scales, on `windows`."""
    if config.alpha is not None:
        check_separate_projections(model.model.layers[0])
    layers, final = calibration_activations(model, windows)
    head = head_dim(model.config)
    with tqdm(total=1 + len(layers), desc="DuQuant's search", unit="rotation", disable=None) as bar:
        residual = torch.cat([x for acts in layers for x in (*acts.attention, *acts.mlp)] + [final])
        r1 = duquant_transform(residual, residual_block(model.config.hidden_size, config.block), config.steps)
        bar.update()
        r2 = []
        for acts in layers:
            r2.append(duquant_transform(torch.cat(acts.heads).reshape(-1, head), head, config.steps))
            bar.update()
    smoothing = None if config.alpha is None else [
        layer_smoothing(layer, acts, r1, r, head, config.alpha) for layer, acts, r in zip(model.model.layers, layers, r2)]
    return Rotations(r1=r1, r2=r2, r4=True, smoothing=smoothing)


def save_rotations(path: Path, rotations: Rotations, record: dict) -> None:
    """SpinQuant's layout (R1, model.layers.{i}.self_attn.R2) and the smoothing scales, what `--rotation FILE` reads, and
    its record beside it."""
    state = {"R1": rotations.r1.float(), **{f"model.layers.{i}.self_attn.R2": r.float() for i, r in enumerate(rotations.r2)}}
    for i, layer in enumerate(rotations.smoothing or []):
        state.update({smoothing_key(i, part): getattr(layer, part).float() for part in PARTS})
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue())
    write_json_atomic(path.with_suffix(".json"), record)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spinquant.duquant", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="built-in name, .gguf file or HF directory")
    p.add_argument("--output", type=Path, required=True, help="the rotation file (.pt); its record goes beside it (.json)")
    p.add_argument("--calib-text", type=Path, default=calibration_text())
    p.add_argument("--block", type=int, help="R1's block size (default: the largest power of two up to 128 dividing the hidden size)")
    for name, default in (("steps", DuQuantConfig.steps), ("windows", DuQuantConfig.windows), ("seqlen", DuQuantConfig.seqlen),
                          ("seed", DuQuantConfig.seed)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--alpha", type=float, default=DuQuantConfig.alpha, help="smoothing's migration strength (DuQuant's 0.6)")
    p.add_argument("--no-smoothing", action="store_true", help="rotations only")
    return p.parse_args(argv)


def write_duquant_file(source: str, calib_text: Path, config: DuQuantConfig, output: Path) -> dict:
    """DuQuant's rotations (and scales) for the model `source`, searched on `calib_text`, written to `output`; its record."""
    loaded = load_model(source, torch.float32)
    r1_block = residual_block(loaded.model.config.hidden_size, config.block)  # a bad block fails before the search
    text = read_text(calib_text)
    rotations = duquant_rotations(loaded.model, calibration_windows(loaded.tokenizer, text, config), config)
    record = dict(method="duquant", model=source, **asdict(config), r1_block=r1_block,
                  calibration=str(calib_text), calibration_sha256=text_sha256(text))
    save_rotations(output, rotations, record)
    return record


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.output.suffix != ".pt":
        raise UserError(f"--output {args.output}: name the rotation file .pt")
    if args.steps < 1 or args.windows < 1 or args.seqlen < 2:
        raise UserError("--steps and --windows must be at least 1, --seqlen at least 2")
    if not 0 <= args.alpha <= 1:
        raise UserError(f"--alpha {args.alpha}: a migration strength between 0 and 1")
    config = DuQuantConfig(args.block, args.steps, args.windows, args.seqlen, args.seed, None if args.no_smoothing else args.alpha)
    record = write_duquant_file(args.model, args.calib_text, config, args.output)
    print(f"spinquant.duquant: wrote {args.output}")
    return record


if __name__ == "__main__":
    with one_line_errors("spinquant.duquant"):
        main(sys.argv[1:])
