"""DuQuant's rotations (Lin et al., NeurIPS 2024), found from calibration activations without training, as R1 and R2:
`python -m spinquant.duquant --output FILE`, then `--rotation FILE` in evaluation and export.

Per activation: a greedy rotation in blocks (each step spreads the block's largest channel evenly over the block),
a zigzag permutation (channels sorted by their largest value dealt back and forth across the blocks, so that each
block gets a share of the large ones), and a second greedy rotation. Block rotations with a permutation are
orthogonal, so they fuse into the weights exactly as a learned R1 (the residual stream: every norm's output, gain
left out, as R1 sees it) and R2 (each layer's attention output, per head) do. R4 stays the online Hadamard.
Each greedy step is a Householder reflection taking the channel's axis to the block's uniform vector (DuQuant
builds a rotation with the same effect); the steps kept are those up to the lowest peak, per block.
"""

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from spinquant.data import calibration_text, read_text, text_sha256, token_windows
from spinquant.errors import UserError, one_line_errors
from spinquant.files import write_atomic, write_json_atomic
from spinquant.rotation import Rotations, head_dim


@dataclass(frozen=True)
class DuQuantConfig:
    block: int | None = None  # R1's block; None: the largest power of two up to DuQuant's 128 dividing the hidden size
    steps: int = 256  # greedy steps per rotation, at most
    windows: int = 8  # calibration windows of `seqlen` tokens
    seqlen: int = 256
    seed: int = 0  # which calibration windows


def residual_block(hidden: int, block: int | None) -> int:
    if block is None:
        return max(b for b in (2 ** i for i in range(8)) if hidden % b == 0)
    if block < 2 or hidden % block:
        raise UserError(f"--block {block} does not divide the hidden size {hidden}: pick a divisor of it, at least 2")
    return block


def greedy_block_rotation(x: torch.Tensor, block: int, steps: int) -> torch.Tensor:
    """Per block of `block` channels of the rows `x`, the product of reflections (block, block) that lowers the block's
    largest |value| most within `steps` greedy steps: (blocks, block, block), float64, x_block @ R."""
    blocks = x.shape[-1] // block
    xb = x.reshape(-1, blocks, block).transpose(0, 1).contiguous().float()  # (blocks, rows, block)
    uniform = torch.full((block,), block ** -0.5, dtype=torch.float64)
    rotation = torch.eye(block, dtype=torch.float64).repeat(blocks, 1, 1)
    best, best_peak = rotation.clone(), xb.abs().amax(dim=(1, 2))
    previous = torch.full((blocks,), -1)
    for _ in range(steps):
        channel = xb.abs().amax(dim=1).argmax(dim=-1)
        moving = channel != previous  # the same channel twice would undo the reflection: that block is done
        if not moving.any():
            break
        w = -uniform.repeat(blocks, 1)
        w[torch.arange(blocks), channel] += 1
        coefficient = torch.where(moving, 2 / (w * w).sum(-1), 0.0)
        xb -= (coefficient[:, None, None] * (xb.double() @ w[:, :, None]) * w[:, None, :]).float()
        rotation -= coefficient[:, None, None] * (rotation @ w[:, :, None]) * w[:, None, :]
        peak = xb.abs().amax(dim=(1, 2))
        better = peak < best_peak
        best[better], best_peak = rotation[better], torch.where(better, peak, best_peak)
        previous = torch.where(moving, channel, previous)
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


@torch.no_grad()
def calibration_activations(model: LlamaForCausalLM, windows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """What R1 and R2 turn: every norm's input, normalized without its gain (rows of the hidden size), and each layer's
    attention output per head (rows of the head size)."""
    residual, heads, hooks = [], [[] for _ in model.model.layers], []
    eps = model.config.rms_norm_eps
    head = head_dim(model.config)

    def keep_normalized(_module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        residual.append(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    for i, layer in enumerate(model.model.layers):
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            hooks.append(norm.register_forward_pre_hook(keep_normalized))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda _m, args, i=i: heads[i].append(args[0].reshape(-1, head).float())))
    hooks.append(model.model.norm.register_forward_pre_hook(keep_normalized))
    try:
        for window in windows:
            model(window[None])
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(residual), [torch.cat(h) for h in heads]


def calibration_windows(tokenizer: PreTrainedTokenizerBase, text: str, config: DuQuantConfig) -> torch.Tensor:
    """`config.windows` windows of `text`, chosen by `config.seed`."""
    windows = token_windows(tokenizer, text, config.seqlen, None)
    if len(windows) < config.windows:
        raise UserError(f"the calibration text gives {len(windows)} windows of {config.seqlen} tokens; DuQuant's search takes "
                        f"{config.windows}: a longer text, or fewer --windows")
    return windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(config.seed))[: config.windows]]


def duquant_rotations(model: LlamaForCausalLM, windows: torch.Tensor, config: DuQuantConfig) -> Rotations:
    """R1 from the residual stream and each layer's R2 from its attention heads, on the token `windows`."""
    residual, heads = calibration_activations(model, windows)
    r1 = duquant_transform(residual, residual_block(model.config.hidden_size, config.block), config.steps)
    return Rotations(r1=r1, r2=[duquant_transform(h, h.shape[-1], config.steps) for h in heads], r4=True)


def save_rotations(path: Path, rotations: Rotations, record: dict) -> None:
    """SpinQuant's layout (R1, model.layers.{i}.self_attn.R2), what `--rotation FILE` reads, and its record beside it."""
    import io

    state = {"R1": rotations.r1.float(), **{f"model.layers.{i}.self_attn.R2": r.float() for i, r in enumerate(rotations.r2)}}
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from spinquant.models import load_model

    args = parse_args(argv)
    if args.output.suffix != ".pt":
        raise UserError(f"--output {args.output}: name the rotation file .pt")
    if args.steps < 1 or args.windows < 1 or args.seqlen < 2:
        raise UserError("--steps and --windows must be at least 1, --seqlen at least 2")
    config = DuQuantConfig(args.block, args.steps, args.windows, args.seqlen, args.seed)
    loaded = load_model(args.model, torch.float32)
    residual_block(loaded.model.config.hidden_size, config.block)  # a bad block fails before the search
    text = read_text(args.calib_text)
    rotations = duquant_rotations(loaded.model, calibration_windows(loaded.tokenizer, text, config), config)
    record = dict(method="duquant", model=args.model, **asdict(config), r1_block=residual_block(loaded.model.config.hidden_size, config.block),
                  calibration=str(args.calib_text), calibration_sha256=text_sha256(text))
    save_rotations(args.output, rotations, record)
    print(f"spinquant.duquant: wrote {args.output}")
    return record


if __name__ == "__main__":
    with one_line_errors("spinquant.duquant"):
        main(sys.argv[1:])
