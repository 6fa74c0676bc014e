"""Each model family at its real shapes, random weights, through the export: `results/architectures.md`.

    python benchmarks/architectures.py                         # every shape below, one after another
    python benchmarks/architectures.py --shapes qwen2.5-0.5b-shape   # some of them

Per shape: the Hadamard sizes its rotations need (R1 over the hidden size, R2 and R3 over a head, R4 over the
MLP), the fusion's error (float64 logits of the model with random Hadamard R1/R2 and R4 against the original's,
on 2 layers of the shape with a 1,024-token vocabulary: every rotated dimension as in the real model), and
`python -m export.to_pte --rotation hadamard` on the whole shape with random weights (bf16 safetensors, SmolLM2's
tokenizer: only the check's prompt needs one) in its own process: wall time, peak RSS, program size and the
check's KL. Random weights make it a check of the rotation and lowering, not of the model's quality.
"""

import argparse
import copy
import os
import shlex
import sys
import tempfile
import types
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

import spinquant
from export_time import SHAPES, timed_export, write_random_model
from spinquant.environment import environment_line
from spinquant.files import write_atomic
from spinquant.hadamard import factor_size
from spinquant.models import randomize_norm_gains
from spinquant.rotation import head_dim

ARCHITECTURES = ("qwen2.5-0.5b-shape", "qwen3-0.6b-shape", "qwen2.5-1.5b-shape", "phi-4-mini-shape", "llama-3.2-3b-shape")


def config_of(name: str, **overrides) -> PretrainedConfig:
    return AutoConfig.for_model(**{**SHAPES[name].config, **overrides})


def hadamard_sizes(config: PretrainedConfig) -> str:
    def size(n: int) -> str:
        k, power = factor_size(n)
        return f"{n} = {k}·{power}" if k > 1 else str(n)

    head = head_dim(config)
    return f"R1 {size(config.hidden_size)}, R2/R3 {size(head)}, R4 {size(config.intermediate_size)}"


def rms_norm_float64(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


@torch.no_grad()
def fusion_error(name: str) -> float:
    """max |Δ logits| in float64: the shape's 2 first layers, 1,024-token vocabulary, random Hadamard R1/R2 and R4."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_of(name, num_hidden_layers=2, vocab_size=1024, pad_token_id=0)).double().eval()
    randomize_norm_gains(model)
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):  # transformers' own computes in float32, whatever the model's dtype
            module.forward = types.MethodType(rms_norm_float64, module)
    ids = torch.randint(0, 1024, (1, 64))
    reference = model(ids).logits
    rotated = spinquant.prepare(copy.deepcopy(model), "hadamard")(ids).logits
    return (rotated - reference).abs().max().item()


def parameters(config: PretrainedConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def row(name: str, fusion: float, run: dict) -> str:
    r, v, config = run["report"], run["report"]["verify"], config_of(name)
    return (f"| {SHAPES[name].name} | {config.num_hidden_layers} | {parameters(config) / 1e9:.2f} B | {hadamard_sizes(config)} | {fusion:.1e} | "
            f"{run['wall']:.0f} | {run['peak_rss_mb']} | {r['pte_bytes'] / 2**20:.0f} | {v['mean_kl']:.2g}, {v['top1_agreement']:.0%} | "
            f"{run['load_at_start']:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", choices=ARCHITECTURES, default=list(ARCHITECTURES))
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--output", type=Path, default=Path("results/architectures.md"))
    args = p.parse_args()
    command = shlex.join(["python", "benchmarks/architectures.py", *sys.argv[1:]])
    rows = []
    for name in args.shapes:
        fusion = fusion_error(name)
        with tempfile.TemporaryDirectory() as tmp:
            write_random_model(Path(tmp) / "model", SHAPES[name])
            run = timed_export(["--model", str(Path(tmp) / "model"), "--rotation", "hadamard", "--no-gptq", "--max-seq-len", str(args.max_seq_len)],
                               Path(tmp) / "out")
        rows.append(row(name, fusion, run))
        print(rows[-1], file=sys.stderr)
    text = "\n".join([
        "# Model families at their real shapes (random weights) through the export",
        "",
        f"Command: `{command}`",
        "",
        f"Machine and libraries: {environment_line()}; {os.cpu_count()} cores. Load average (1 min) at each export's start is in the "
        "table: other processes running at the same time slow it down.",
        "",
        f"Every program: `python -m export.to_pte --rotation hadamard --no-gptq --max-seq-len {args.max_seq_len}` (random Hadamard R1/R2, R4 "
        "folded with our online Hadamard kernel; 8da4w g32 and 8da4w lm_head rounded to nearest, 8-bit embedding). Fusion error: float64, "
        "the shape's first 2 layers with a 1,024-token vocabulary, random norm gains.",
        "",
        "| shape | layers | parameters | Hadamard sizes | fusion error (max \\|Δ logit\\|) | export wall s (check included) | peak RSS MB | .pte MiB | check: mean KL, top-1 | load at start |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    write_atomic(args.output, text.encode())
    print(text)


if __name__ == "__main__":
    main()
