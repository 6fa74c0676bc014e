"""Wall time and peak memory of `python -m export.to_pte`: the demo model, or a random model with a real model's shapes.

    python benchmarks/export_time.py                      # the demo model, default options
    python benchmarks/export_time.py --model llama-3.2-1b-shape --rotation r4
    python benchmarks/export_time.py --model llama-3.2-3b-shape --rotation hadamard

Each export runs in a fresh process, exactly as a user runs it, timed from process start to exit
(imports and the built-in check included); peak RSS is the child's. For a shape (SHAPES) the model
(bf16 safetensors, as the real checkpoints ship, and SmolLM2's tokenizer: only the prompt of the built-in
check needs one) is built in a temporary directory first; its weights are random, so the check is one of
the lowering, not of the model's quality. Writes results/export_time_smollm2.md or the shape's file.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from spinquant.environment import environment_line
from spinquant.files import write_atomic
from spinquant.models import load_model


@dataclass(frozen=True)
class Shape:
    """A real model's shapes, for an export of random weights: its config and the file its table goes to."""

    name: str  # the real model, as the table's title names it
    config: dict  # transformers config keys, model_type included
    output: Path

    def model_config(self) -> PretrainedConfig:
        return AutoConfig.for_model(**self.config)


LLAMA_3 = dict(
    model_type="llama", vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
    tie_word_embeddings=True, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
    rope_scaling=dict(rope_type="llama3", factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                      original_max_position_embeddings=8192),
)
QWEN = dict(vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
SHAPES = {
    "llama-3.2-1b-shape": Shape("Llama 3.2 1B", dict(
        LLAMA_3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64), Path("results/export_1b_shape.md")),
    "llama-3.2-3b-shape": Shape("Llama 3.2 3B", dict(
        LLAMA_3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128), Path("results/export_3b_shape.md")),
    "qwen2.5-0.5b-shape": Shape("Qwen2.5-0.5B", dict(
        QWEN, model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=32768),
        Path("results/export_qwen2.5-0.5b_shape.md")),
    "qwen2.5-1.5b-shape": Shape("Qwen2.5-1.5B", dict(
        QWEN, model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, head_dim=128, max_position_embeddings=32768),
        Path("results/export_qwen2.5-1.5b_shape.md")),
    "qwen3-0.6b-shape": Shape("Qwen3-0.6B", dict(
        QWEN, model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960),
        Path("results/export_qwen3-0.6b_shape.md")),
    # Longrope's real factors are not reachable offline: made-up ones (a program with --max-seq-len up to
    # original_max_position_embeddings uses the short ones).
    "phi-4-mini-shape": Shape("Phi-4-mini", dict(
        model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
        head_dim=128, vocab_size=200064, max_position_embeddings=131072, original_max_position_embeddings=4096, partial_rotary_factor=0.75,
        rope_scaling=dict(type="longrope", short_factor=[1.0 + i / 48 for i in range(48)], long_factor=[4.0 + i for i in range(48)]),
        rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=262144, tie_word_embeddings=True, pad_token_id=199999,
        bos_token_id=199999, eos_token_id=199999), Path("results/export_phi-4-mini_shape.md")),
}
DEMO_TITLE = "Export of the demo model (SmolLM2-135M-Instruct)"
DEMO_OUTPUT = Path("results/export_time_smollm2.md")
DEMO_CONFIG_LINE = ("Model: the built-in demo model; every option at `python -m export.to_pte`'s default (learned rotation, "
                    "GPTQ 8da4w g32, 8-bit embedding, GPTQ 8da4w lm_head, int8 KV cache 2048).")


def config_line(shape: Shape) -> str:
    c = shape.config
    rope = c.get("rope_scaling", {}).get("rope_type", "no")
    return (f"Config: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} heads, "
            f"{c['num_key_value_heads']} KV heads, head_dim {c['head_dim']}, MLP {c['intermediate_size']}, vocabulary {c['vocab_size']}, "
            f"{'tied' if c['tie_word_embeddings'] else 'untied'} embeddings, {rope} RoPE scaling; random bf16 weights; defaults of "
            "`python -m export.to_pte --no-gptq` otherwise (8da4w g32 and 8da4w lm_head rounded to nearest, 8-bit embedding, int8 KV cache 2048).")


def write_random_model(directory: Path, shape: Shape, seed: int = 0) -> None:
    """Drawn in bf16 directly: a float32 draw of Llama 3.2 3B would take 13 GB beside the export it times."""
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(shape.model_config(), dtype=torch.bfloat16).save_pretrained(directory)
    load_model("smollm2-135m").tokenizer.save_pretrained(directory)


def timed_export(argv: list[str], out: Path) -> dict:
    """One export in its own process: wall seconds, its peak RSS, load average at its start, and its report."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "export.to_pte", *argv, "--output-dir", str(out)])
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage: its peak RSS, the check included
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"export_time: the export failed (exit {os.waitstatus_to_exitcode(status)})")
    report = json.loads((out / "export_report.json").read_text())
    return dict(wall=wall, load_at_start=load, peak_rss_mb=round(usage.ru_maxrss / 1024), report=report)


def row(run: dict, label: str) -> str:
    r, v = run["report"], run["report"]["verify"]
    return (f"| {label} | {run['wall']:.1f} | {r['export_seconds']:.1f} | {run['peak_rss_mb']} | {r['pte_bytes'] / 2**20:.0f} | "
            f"{v['mean_kl']:.3g}, {v['top1_agreement']:.0%} | {run['load_at_start']:.2f} |")


def stage_table(runs: list[dict], key: str, fmt: str) -> list[str]:
    stages = list(runs[0]["report"][key])
    return [
        "| run | " + " | ".join(stages) + " |",
        "|---|" + "---|" * len(stages),
        *(f"| {i + 1} | " + " | ".join(format(run["report"][key][s], fmt) for s in stages) + " |" for i, run in enumerate(runs)),
    ]


def markdown(args: argparse.Namespace, command: str, runs: list[dict]) -> str:
    shape = SHAPES.get(args.model)
    lines = [
        f"# Export of a random model with {shape.name}'s shapes" if shape else f"# {DEMO_TITLE}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine and libraries: {environment_line()}; {os.cpu_count()} cores. Load average (1 min) at each export's "
        "start is in the table: other processes running at the same time slow it down.",
        "",
        config_line(shape) if shape else DEMO_CONFIG_LINE,
        "",
        "| run | wall s (process start → exit, check included) | export s (load → .pte) | peak RSS MB | .pte MiB | check: mean KL, top-1 | load at start |",
        "|---|---|---|---|---|---|---|",
        *(row(run, f"{i + 1}, rotation {run['report']['options']['rotation']}") for i, run in enumerate(runs)),
        "",
        "Seconds per stage:",
        "",
        *stage_table(runs, "stage_seconds", ".1f"),
        "",
        "Peak RSS (MB) of the export process by the end of each stage (where it grows, that stage set a new peak):",
        "",
        *stage_table(runs, "stage_peak_rss_mb", "d"),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["demo", *SHAPES], default="demo")
    p.add_argument("--rotation", help="passed to export.to_pte (default: its own default for the model)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--output", type=Path, help=f"default: {DEMO_OUTPUT} or the shape's results file")
    args = p.parse_args()
    command = shlex.join(["python", "benchmarks/export_time.py", *sys.argv[1:]])
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--rotation", args.rotation] if args.rotation else []
        if args.model in SHAPES:
            write_random_model(Path(tmp) / "model", SHAPES[args.model])
            argv += ["--model", str(Path(tmp) / "model"), "--no-gptq"]  # random weights: GPTQ would fit noise, for hours
        for i in range(args.repeats):
            runs.append(timed_export(argv, Path(tmp) / f"out{i}"))
    output = args.output or (SHAPES[args.model].output if args.model in SHAPES else DEMO_OUTPUT)
    write_atomic(output, markdown(args, command, runs).encode())
    print(output.read_text())


if __name__ == "__main__":
    main()
