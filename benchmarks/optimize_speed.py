"""Seconds per rotation-learning iteration and peak GPU memory, batch 8 × 2048 tokens.

    python benchmarks/optimize_speed.py --device cuda

Times `spinquant.optimize.train_step` + the Cayley step (what one iteration of
`python -m spinquant.optimize` does) on the demo model and on a randomly initialised model with
Llama 3.2 1B's exact shapes, with and without activation checkpointing, and writes
results/optimize_speed.md. Token ids are random: the speed does not depend on the text.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from export_time import SHAPES
from spinquant.cayley import CayleySGD
from spinquant.environment import environment_line
from spinquant.files import write_atomic
from spinquant.models import load_model
from spinquant.optimize import DTYPES, RECIPES, train_step
from spinquant.rotated_model import RotatedLlama
from spinquant.rotation import rotations_for


def demo_model(device: torch.device) -> LlamaForCausalLM:
    return load_model("smollm2-135m", torch.float32).model.to(device)


def llama_1b_shape(device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with device:
        return LlamaForCausalLM(SHAPES["llama-3.2-1b-shape"].model_config()).eval()


MODELS = {"smollm2-135m": demo_model, "llama-3.2-1b-shape": llama_1b_shape}


def seconds_per_iteration(model: LlamaForCausalLM, args: argparse.Namespace, checkpointing: bool) -> tuple[float, float]:
    """(seconds per iteration, peak GiB) over `args.steps` iterations after `args.warmup`."""
    device = torch.device(args.device)
    qc = RECIPES[args.recipe]
    rm = RotatedLlama(model, rotations_for("hadamard", model.config, r3=qc.quantizes_kv), qc, DTYPES[args.dtype]).to(device)
    if checkpointing:
        rm.enable_activation_checkpointing()
    opt = CayleySGD(rm.rotation_parameters(), lr=1.5)
    batch = [torch.randint(0, model.config.vocab_size, (args.batch_size, args.seqlen), generator=torch.Generator().manual_seed(0))]
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.time()
        train_step(rm, opt, batch, device, lr=1.5)
        opt.step()
    sync(device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return (time.time() - start) / args.steps, peak


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, args: argparse.Namespace, checkpointing: bool) -> str:
    try:
        s, peak = seconds_per_iteration(MODELS[name](torch.device(args.device)), args, checkpointing)
        row = f"| {name} | {'yes' if checkpointing else 'no'} | {s:.2f} | {s * 100 / 60:.1f} | {peak:.1f} |"
    except torch.cuda.OutOfMemoryError:
        row = f"| {name} | {'yes' if checkpointing else 'no'} | out of memory | – | – |"
    if args.device == "cuda":
        torch.cuda.empty_cache()
    print(row, flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--recipe", default="w4a8", choices=list(RECIPES))
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--output", type=Path, default=Path("results/optimize_speed.md"))
    args = p.parse_args()
    rows = [measure(name, args, ckpt) for name in args.models for ckpt in (False, True)]
    lines = [
        "# Speed of rotation learning (`python -m spinquant.optimize`)",
        "",
        f"Command: `python benchmarks/optimize_speed.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine and libraries: {environment_line()}.",
        "",
        f"Recipe `{args.recipe}`, {args.dtype}, batch {args.batch_size} × {args.seqlen} tokens, one iteration = "
        f"forward + backward + Cayley step, mean of {args.steps} after {args.warmup} warm-up. Peak = "
        "torch.cuda.max_memory_allocated. The 1B-shape model has random weights (hidden 2048, 16 layers, 32 heads, "
        "8 KV heads, MLP 8192, vocabulary 128256, tied embeddings, llama3 RoPE scaling).",
        "",
        "| model | activation checkpointing | s / iteration | min / 100 iterations | peak GiB |",
        "|---|---|---|---|---|",
        *rows,
    ]
    write_atomic(args.output, ("\n".join(lines) + "\n").encode())
    print(args.output.read_text())


if __name__ == "__main__":
    main()
