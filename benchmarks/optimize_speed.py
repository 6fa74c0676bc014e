"""Seconds per rotation-learning iteration and peak GPU memory, batch 8 × 2048 tokens.

    python benchmarks/optimize_speed.py --device cuda
    torchrun --nproc-per-node 2 benchmarks/optimize_speed.py --models llama-3-8b-shape --checkpointing yes

Times `spinquant.optimize.train_step` + the Cayley step (what one iteration of
`python -m spinquant.optimize` does) on the demo model and on randomly initialised models with
Llama 3.2 1B's and Llama 3 8B's exact shapes, with and without activation checkpointing, on one GPU or,
under torchrun, on several (the batch split over them, spinquant/data_parallel.py), and writes
results/optimize_speed.md. Token ids are random: the speed does not depend on the text.
"""

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from export_time import LLAMA_3, SHAPES, Shape
from spinquant import data_parallel
from spinquant.cayley import CayleySGD
from spinquant.environment import environment_line
from spinquant.files import write_atomic
from spinquant.models import load_model
from spinquant.optimize import DTYPES, RECIPES, train_step
from spinquant.rotated_model import RotatedLlama
from spinquant.rotation import rotations_for


def demo_model(device: torch.device) -> LlamaForCausalLM:
    return load_model("smollm2-135m", torch.float32).model.to(device)


LLAMA_3_8B = Shape("Llama 3 8B", dict(
    LLAMA_3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, tie_word_embeddings=False, rope_scaling=None), Path("results/optimize_speed.md"))


def random_model(shape: Shape, device: torch.device) -> LlamaForCausalLM:
    """The shape's model with random weights, made on the device in bf16 (as the real checkpoints ship; 8B: 15 GiB)."""
    torch.manual_seed(0)
    with device:
        return LlamaForCausalLM(shape.model_config()).to(torch.bfloat16).eval()


MODELS = {
    "smollm2-135m": demo_model,
    "llama-3.2-1b-shape": lambda device: random_model(SHAPES["llama-3.2-1b-shape"], device),
    "llama-3-8b-shape": lambda device: random_model(LLAMA_3_8B, device),
}


@dataclass
class Timing:
    seconds: float  # per iteration, after the warm-up
    peak_gib: float  # torch.cuda.max_memory_allocated over the timed iterations
    resident_gib: float  # allocated before the first step: the frozen model, the rotations
    losses: list[float]  # every iteration's, warm-up included


def time_iterations(model: LlamaForCausalLM, args: argparse.Namespace, checkpointing: bool, device: torch.device) -> Timing:
    """`args.warmup` iterations, then `args.steps` timed ones, on the same batch."""
    qc = RECIPES[args.recipe]
    rm = RotatedLlama(model, rotations_for("hadamard", model.config, r3=qc.quantizes_kv), qc, DTYPES[args.dtype]).to(device)
    if checkpointing:
        rm.enable_activation_checkpointing()
    opt = CayleySGD(rm.rotation_parameters(), lr=1.5)
    batch = [torch.randint(0, model.config.vocab_size, (args.batch_size, args.seqlen), generator=torch.Generator().manual_seed(0))]
    resident = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    losses = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.time()
        losses.append(train_step(rm, opt, batch, device, lr=1.5))
        opt.step()
    sync(device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return Timing((time.time() - start) / args.steps, peak, resident, losses)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, args: argparse.Namespace, checkpointing: bool, device: torch.device) -> str:
    """One table row (under torchrun the slowest process's time and the largest memory); the losses to --losses."""
    gpus, ckpt = data_parallel.world_size(), "yes" if checkpointing else "no"
    try:
        t = time_iterations(MODELS[name](device), args, checkpointing, device)
        s, peak, resident = (data_parallel.maximum(x, device) for x in (t.seconds, t.peak_gib, t.resident_gib))
        row = f"| {name} | {gpus} | {ckpt} | {s:.2f} | {s * 100 / 60:.1f} | {resident:.1f} | {peak:.1f} |"
        if args.losses and data_parallel.rank() == 0:
            lines = ["iteration,loss", *(f"{i + 1},{loss:.6f}" for i, loss in enumerate(t.losses))]
            write_atomic(args.losses / f"{name}-{gpus}gpu-checkpointing-{ckpt}.csv", ("\n".join(lines) + "\n").encode())
    except torch.cuda.OutOfMemoryError:
        row = f"| {name} | {gpus} | {ckpt} | out of memory | – | – | – |"
    gc.collect()  # the last row's RotatedLlama: its layers' forwards refer back to it, a cycle refcounting leaves
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if data_parallel.rank() == 0:
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
    p.add_argument("--checkpointing", default="both", choices=["both", "yes", "no"], help="activation checkpointing")
    p.add_argument("--losses", type=Path, help="directory for each row's losses, iteration by iteration (CSV)")
    p.add_argument("--output", type=Path, default=Path("results/optimize_speed.md"))
    args = p.parse_args()
    device = data_parallel.start(args.device) if data_parallel.launched() else torch.device(args.device)
    modes = {"both": (False, True), "yes": (True,), "no": (False,)}[args.checkpointing]
    rows = [measure(name, args, ckpt, device) for name in args.models for ckpt in modes]
    writer = data_parallel.rank() == 0
    data_parallel.stop()
    if not writer:
        return
    lines = [
        "# Speed of rotation learning (`python -m spinquant.optimize`)",
        "",
        f"Command: `python benchmarks/optimize_speed.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine and libraries: {environment_line()}.",
        "",
        f"Recipe `{args.recipe}`, {args.dtype}, batch {args.batch_size} × {args.seqlen} tokens, one iteration = "
        f"forward + backward + Cayley step, mean of {args.steps} after {args.warmup} warm-up. Resident = "
        "torch.cuda.memory_allocated before the first step (the frozen model); peak = torch.cuda.max_memory_allocated. The 1B-shape model has random weights (hidden 2048, 16 layers, 32 heads, "
        "8 KV heads, MLP 8192, vocabulary 128256, tied embeddings, llama3 RoPE scaling); the 8B-shape one hidden 4096, "
        "32 layers, 32 heads, 8 KV heads, MLP 14336, vocabulary 128256, untied. Both in bf16. Under torchrun the batch is "
        "split over the GPUs; the row has the slowest process's time and the largest peak.",
        "",
        "| model | GPUs | activation checkpointing | s / iteration | min / 100 iterations | resident GiB | peak GiB |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    write_atomic(args.output, ("\n".join(lines) + "\n").encode())
    print(args.output.read_text())


if __name__ == "__main__":
    main()
