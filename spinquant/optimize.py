"""Learn R1 and every layer's R2 by Cayley SGD on a fake-quantized model: `python -m spinquant.optimize`.

SpinQuant's recipe: start from random Hadamard rotations (or `--init duquant`: DuQuant's; or a file),
minimise the causal-LM cross-entropy of the rotated model with weights/activations/KV fake-quantized
(straight-through estimator), all weights frozen, 100 iterations, learning rate 1.5 with cosine decay
to 0, windows of 2048 tokens of calibration text. The result is a file in SpinQuant's layout that
`spinquant.eval --rotation` and `export.to_pte --rotation` read, with a JSON of how it was learned beside it.

On several GPUs: `torchrun --nproc-per-node N -m spinquant.optimize ...` (spinquant/data_parallel.py).
"""

import argparse
import csv
import dataclasses
import io
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from spinquant import data_parallel
from spinquant.cayley import CayleySGD
from spinquant.data import calibration_text, read_text, text_sha256, token_windows
from spinquant.duquant import DuQuantConfig
from spinquant.environment import describe_environment
from spinquant.errors import UserError, one_line_errors
from spinquant.files import write_atomic, write_json_atomic
from spinquant.models import load_model
from spinquant.quant import SETTINGS, QuantConfig
from spinquant.quiet import add_verbose_flag
from spinquant.rotated_model import RotatedLlama
from spinquant.rotation import Rotations, load_rotation_file, rotations_for

RECIPES = {
    # W16A8: 16-bit weights in the loss, because GPTQ quantizes them to 4 bits afterwards (Meta's
    # shipped Llama 3.2 SpinQuant models); activations int8 per token, asymmetric.
    "executorch": QuantConfig(a_bits=8),
    "w4a8": SETTINGS["w4a8"],  # int4 group-32 RTN weights, int8 activations: rotations for an RTN 8da4w export
    # The default program's whole quantization: bf16 group scales, the 8-bit embedding, the 8da8w lm_head, the int8 KV cache.
    "program": SETTINGS["w4a8-export-kv8"],
    "w4a4kv4": SETTINGS["w4a4kv4"],  # the paper's setting
}

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}  # fp64: exact checks on tiny models

# A loss this many times the first step's is divergence, not noise: stop before it spoils the rotation.
EXPLODING_RATIO = 4.0


@dataclass(frozen=True)
class Plan:
    """Everything that decides the result: a checkpoint resumes only under the same plan."""

    model: str
    recipe: str
    iters: int
    lr: float
    momentum: float
    windows: int
    seqlen: int
    batch_size: int
    grad_accum: int
    seed: int
    dtype: str
    calibration: str
    calibration_sha256: str
    init: str = "hadamard"  # where learning starts: random Hadamard from the seed, or a rotation file (--init duquant makes one)


@dataclass
class Progress:
    """What a checkpoint holds besides the rotations and the optimizer: the step and the loss so far."""

    step: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def cosine_lr(lr: float, step: int, iters: int) -> float:
    """Cosine decay from lr at step 0 towards 0 at step `iters` (no warm-up), as SpinQuant's trainer."""
    return lr * 0.5 * (1 + math.cos(math.pi * step / iters))


def sample_order(n_windows: int, count: int, seed: int) -> torch.Tensor:
    """Window indices for `count` samples: one seeded permutation per pass over the windows."""
    gen = torch.Generator().manual_seed(seed)
    passes = -(-count // n_windows)
    return torch.cat([torch.randperm(n_windows, generator=gen) for _ in range(passes)])[:count]


def step_batches(windows: torch.Tensor, order: torch.Tensor, plan: Plan, step: int) -> list[torch.Tensor]:
    """The `grad_accum` micro-batches of step `step`: fixed by the seed alone, so a resumed run sees the same data."""
    per_step = plan.batch_size * plan.grad_accum
    idx = order[step * per_step : (step + 1) * per_step]
    return [windows[chunk] for chunk in idx.split(plan.batch_size)]


def checkpoint_bytes(rm: RotatedLlama, opt: CayleySGD, plan: Plan, progress: Progress) -> bytes:
    buf = io.BytesIO()
    torch.save(
        dict(
            plan=asdict(plan),
            progress=asdict(progress),
            rotations=rm.spinquant_state(),
            optimizer=opt.state_dict(),
            cpu_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        ),
        buf,
    )
    return buf.getvalue()


def resume_from(path: Path, rm: RotatedLlama, opt: CayleySGD, plan: Plan) -> Progress:
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["plan"] != asdict(plan):
        changed = sorted(k for k, v in asdict(plan).items() if state["plan"].get(k) != v)
        raise UserError(f"--resume: checkpoint {path} was made with other settings ({', '.join(changed)})")
    with torch.no_grad():
        rm.r1.copy_(state["rotations"]["R1"])
        for i, r2 in enumerate(rm.r2):
            r2.copy_(state["rotations"][f"model.layers.{i}.self_attn.R2"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["cpu_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return Progress(**state["progress"])


def check_loss(loss: float, progress: Progress, checkpoint: Path | None) -> None:
    """Stop on a NaN or exploding loss before the optimizer step can spoil the rotations."""
    first = progress.losses[0] if progress.losses else None
    if math.isfinite(loss) and (first is None or loss <= EXPLODING_RATIO * first):
        return
    kept = f"the last good checkpoint {checkpoint} is kept" if checkpoint and checkpoint.is_file() else "no checkpoint was written yet"
    what = f"loss is {loss}" if not math.isfinite(loss) else f"loss {loss:.3f} exploded (first step {first:.3f})"
    raise UserError(f"step {progress.step + 1}: {what}; stopped, {kept}; try a lower --lr")


def train_step(rm: RotatedLlama, opt: CayleySGD, batches: list[torch.Tensor], device: torch.device, lr: float) -> float:
    """One optimizer step's gradients over the micro-batches (accumulated; under torchrun each process takes its share
    of every micro-batch and the gradients are averaged over the processes); returns the step's mean loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    total = 0.0
    with rm.matmul_precision():
        for ids in batches:
            loss = rm.loss(data_parallel.local_share(ids).to(device)) / len(batches)
            loss.backward()
            total += loss.item()
    data_parallel.average_gradients(rm.rotation_parameters())
    return data_parallel.mean(total, device)


def learn(
    model: LlamaForCausalLM,
    windows: torch.Tensor,
    plan: Plan,
    device: torch.device,
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    activation_checkpointing: bool = False,
    progress_bar: bool = True,
    on_first_step: Callable[[float], None] | None = None,
) -> tuple[RotatedLlama, Progress]:
    """Run (or continue) the plan; returns the model holding the learned rotations and the loss history.
    `on_first_step` hears the seconds the first step of this run took (to say how long the rest will)."""
    qc = RECIPES[plan.recipe]
    rm = RotatedLlama(model.to(device), initial_rotations(plan, model.config, qc.online_r3), qc, DTYPES[plan.dtype]).to(device)  # folds on the device: fast
    if activation_checkpointing:
        rm.enable_activation_checkpointing()
    opt = CayleySGD(rm.rotation_parameters(), lr=plan.lr, momentum=plan.momentum)
    progress = resume_from(checkpoint, rm, opt, plan) if resume else Progress()
    order = sample_order(len(windows), plan.iters * plan.batch_size * plan.grad_accum, plan.seed)
    writer = data_parallel.rank() == 0  # under torchrun, one process writes and shows progress
    bar = tqdm(range(progress.step, plan.iters), initial=progress.step, total=plan.iters, desc="rotations",
               disable=not (progress_bar and writer))
    for step in bar:
        start = time.time()
        loss = train_step(rm, opt, step_batches(windows, order, plan, step), device, cosine_lr(plan.lr, step, plan.iters))
        check_loss(loss, progress, checkpoint)
        opt.step()
        progress.step, progress.seconds = step + 1, progress.seconds + time.time() - start
        progress.losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}")
        if on_first_step is not None and step == bar.initial:
            on_first_step(time.time() - start)
        if writer and checkpoint and checkpoint_every and progress.step % checkpoint_every == 0:
            write_atomic(checkpoint, checkpoint_bytes(rm, opt, plan, progress))
    return rm, progress


def initial_rotations(plan: Plan, config: LlamaConfig, r3: bool) -> Rotations:
    """SpinQuant's start, random Hadamard rotations from the plan's seed, or a rotation file's R1 and R2s."""
    if plan.init == "hadamard":
        return rotations_for("hadamard", config, seed=plan.seed, r3=r3)
    rotations = load_rotation_file(Path(plan.init), config, r3=r3)
    if rotations.smoothing is not None:
        raise UserError(f"--init {plan.init}: learning turns R1 and R2 only, and this file holds smoothing scales too: "
                        "start from one without them (python -m spinquant.duquant --no-smoothing)")
    return rotations


def rotation_bytes(rm: RotatedLlama) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.float() for k, v in rm.spinquant_state().items()}, buf)
    return buf.getvalue()


def write_loss_curve(losses: list[float], plan: Plan, csv_path: Path, png_path: Path) -> None:
    """The loss per step as CSV, and as a PNG where matplotlib is installed."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["step", "lr", "loss"])
    for step, loss in enumerate(losses):
        writer.writerow([step + 1, f"{cosine_lr(plan.lr, step, plan.iters):.6g}", f"{loss:.6f}"])
    write_atomic(csv_path, out.getvalue().encode())
    plot_loss_curve(csv_path, png_path, f"{plan.model}, recipe {plan.recipe}")


def plot_loss_curve(csv_path: Path, png_path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: loss curve written to {csv_path} only", file=sys.stderr)
        return
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
    ax.set(xlabel="step", ylabel="fake-quantized cross-entropy", title=title)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_atomic(png_path, buf.getvalue())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spinquant.optimize", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="built-in name, .gguf file or HF directory")
    p.add_argument("--recipe", default="w4a8", choices=list(RECIPES), help="fake quantization in the loss")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--lr", type=float, default=1.5, help="peak learning rate, cosine decay to 0")
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--windows", type=int, help="calibration windows to use (default: all in the text)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8, help="windows per micro-batch, over all processes under torchrun")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0, help="seed of the initial Hadamard rotations and the data order")
    p.add_argument("--init", default="hadamard", help="where learning starts: hadamard (random, SpinQuant's) | duquant (DuQuant's "
                   "rotations on the calibration text, cached beside the model) | a rotation file without smoothing scales")
    p.add_argument("--calib-text", type=Path, default=calibration_text(), help="calibration text (never the evaluation text)")
    p.add_argument("--output", type=Path, default=Path("rotations/R.pt"), help="rotation file; .json, .loss.csv, .loss.png, .ckpt beside it")
    p.add_argument("--checkpoint-every", type=int, default=10, help="steps between checkpoints (0: none)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --output")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute layers in backward: less memory")
    add_verbose_flag(p)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    for name in ("iters", "seqlen", "batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0:
        raise UserError("--lr must be positive")
    if args.init not in ("hadamard", "duquant") and not Path(args.init).is_file():
        raise UserError(f"--init {args.init}: not hadamard, duquant or a rotation file")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    data_parallel.check_batch_splits(args.batch_size, data_parallel.launched_processes())


def sidecar(plan: Plan, progress: Progress, device: torch.device, command: str) -> dict:
    return dict(
        **asdict(plan),
        quant=asdict(RECIPES[plan.recipe]),
        optimizer="Cayley SGD (spinquant/cayley.py)",
        w_r_products="tf32" if plan.dtype == "bf16" and device.type == "cuda" else "ieee",  # RotatedLlama.matmul_precision
        schedule="cosine to 0",
        first_loss=progress.losses[0],
        final_loss=progress.losses[-1],
        seconds=round(progress.seconds, 1),
        device=str(device),
        processes=data_parallel.world_size(),
        environment=describe_environment(),
        command=command,
    )


def make_plan(model: str, recipe: str, windows: torch.Tensor, calib_text: Path, text: str, **settings) -> Plan:
    """The plan for these windows of `text` (read from `calib_text`); `settings` are Plan's other fields."""
    return Plan(model=model, recipe=recipe, windows=len(windows), seqlen=windows.shape[1], calibration=os.path.relpath(calib_text),
                calibration_sha256=text_sha256(text), **settings)


def learn_and_save(
    model: LlamaForCausalLM, windows: torch.Tensor, plan: Plan, device: torch.device, out: Path, command: str, *,
    resume: bool = False, checkpoint_every: int = 10, activation_checkpointing: bool = False,
    on_first_step: Callable[[float], None] | None = None,
) -> dict:
    """Learn (or finish learning) the plan's rotations and write them to `out`, with what it took beside them
    (.json, .loss.csv, .loss.png; .ckpt: the checkpoint a resumed run starts from). Returns the .json's record."""
    rm, progress = learn(model, windows, plan, device, out.with_suffix(".ckpt"), checkpoint_every, resume, activation_checkpointing,
                         on_first_step=on_first_step)
    info = sidecar(plan, progress, device, command)
    if data_parallel.rank() == 0:
        write_atomic(out, rotation_bytes(rm))
        write_json_atomic(out.with_suffix(".json"), info)
        write_loss_curve(progress.losses, plan, out.with_suffix(".loss.csv"), out.with_suffix(".loss.png"))
    return info


def initial_rotation_spec(args: argparse.Namespace) -> str:
    """--init as the plan records it: hadamard, or a rotation file (DuQuant's made now, unless cached)."""
    from spinquant.rotation_cache import duquant_rotation  # it imports this module

    if args.init == "duquant":
        return str(duquant_rotation(args.model, args.calib_text, DuQuantConfig(alpha=None)))
    return args.init


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    check_args(args)
    device = data_parallel.start(args.device) if data_parallel.launched() else torch.device(args.device)
    text = read_text(args.calib_text)
    loaded = load_model(args.model, torch.float32)
    windows = token_windows(loaded.tokenizer, text, args.seqlen, args.windows)  # refuses a text shorter than one window
    plan = make_plan(args.model, args.recipe, windows, args.calib_text, text, iters=args.iters, lr=args.lr, momentum=args.momentum,
                     batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed, dtype=args.dtype,
                     init=initial_rotation_spec(args))
    out = args.output
    command = "python -m spinquant.optimize " + " ".join(sys.argv[1:])
    info = learn_and_save(loaded.model, windows, plan, device, out, command, resume=args.resume,
                          checkpoint_every=args.checkpoint_every, activation_checkpointing=args.activation_checkpointing)
    if data_parallel.rank() == 0:
        print(f"{out}: loss {info['first_loss']:.4f} -> {info['final_loss']:.4f} in {info['seconds']} s")
    return info


def cli(argv: list[str] | None = None) -> None:
    with one_line_errors("spinquant.optimize"):
        try:
            main(argv)
        finally:
            data_parallel.stop()


if __name__ == "__main__":
    cli(sys.argv[1:])
