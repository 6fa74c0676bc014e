"""Wall time and peak memory of `python -m export.to_pte`: the demo model, or a random model with Llama 3.2 1B's shapes.

    python benchmarks/export_time.py                      # the demo model, default options
    python benchmarks/export_time.py --model llama-3.2-1b-shape --rotation r4

Each export runs in a fresh process, exactly as a user runs it, timed from process start to exit
(imports and the built-in check included); peak RSS is the child's. For the 1B shape the model
(bf16 safetensors, SmolLM2's tokenizer: only the prompt of the built-in check needs one) is built
in a temporary directory first; its weights are random, so the check is one of the lowering, not
of the model's quality. Writes results/export_time_smollm2.md or results/export_1b_shape.md.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spinquant.environment import environment_line
from spinquant.files import write_atomic
from spinquant.models import load_model

LLAMA_32_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
    rope_scaling=dict(rope_type="llama3", factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                      original_max_position_embeddings=8192),
    bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
)
TITLES = {
    "demo": "Export of the demo model (SmolLM2-135M-Instruct)",
    "llama-3.2-1b-shape": "Export of a random model with Llama 3.2 1B's shapes",
}
OUTPUTS = {"demo": Path("results/export_time_smollm2.md"), "llama-3.2-1b-shape": Path("results/export_1b_shape.md")}
CONFIG_LINES = {
    "demo": "Model: the built-in demo model; every option at `python -m export.to_pte`'s default (learned rotation, "
            "8da4w g32, 8-bit embedding, 8da8w lm_head, KV cache 2048).",
    "llama-3.2-1b-shape": "Config: hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, vocabulary 128256, tied embeddings, "
                          "llama3 RoPE scaling; defaults of `python -m export.to_pte` otherwise (8da4w g32, 8-bit embedding, "
                          "8da8w lm_head, KV cache 2048).",
}


def write_random_model(directory: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_32_1B)).to(torch.bfloat16)
    model.save_pretrained(directory)
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


def markdown(args: argparse.Namespace, command: str, runs: list[dict]) -> str:
    stages = list(runs[0]["report"]["stage_seconds"])
    lines = [
        f"# {TITLES[args.model]}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine and libraries: {environment_line()}; {os.cpu_count()} cores. Load average (1 min) at each export's "
        "start is in the table: other processes running at the same time slow it down.",
        "",
        CONFIG_LINES[args.model],
        "",
        "| run | wall s (process start → exit, check included) | export s (load → .pte) | peak RSS MB | .pte MiB | check: mean KL, top-1 | load at start |",
        "|---|---|---|---|---|---|---|",
        *(row(run, f"{i + 1}, rotation {run['report']['options']['rotation']}") for i, run in enumerate(runs)),
        "",
        "Seconds per stage:",
        "",
        "| run | " + " | ".join(stages) + " |",
        "|---|" + "---|" * len(stages),
        *(f"| {i + 1} | " + " | ".join(f"{run['report']['stage_seconds'][s]:.1f}" for s in stages) + " |" for i, run in enumerate(runs)),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(TITLES), default="demo")
    p.add_argument("--rotation", help="passed to export.to_pte (default: its own default for the model)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--output", type=Path, help="default: results/export_time_smollm2.md or results/export_1b_shape.md")
    args = p.parse_args()
    command = shlex.join(["python", "benchmarks/export_time.py", *sys.argv[1:]])
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--rotation", args.rotation] if args.rotation else []
        if args.model == "llama-3.2-1b-shape":
            write_random_model(Path(tmp) / "model")
            argv += ["--model", str(Path(tmp) / "model")]
        for i in range(args.repeats):
            runs.append(timed_export(argv, Path(tmp) / f"out{i}"))
    output = args.output or OUTPUTS[args.model]
    write_atomic(output, markdown(args, command, runs).encode())
    print(output.read_text())


if __name__ == "__main__":
    main()
