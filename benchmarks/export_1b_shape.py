"""Export time and peak memory for a randomly initialised model with Llama 3.2 1B's exact shapes.

    python benchmarks/export_1b_shape.py

Builds the model (bf16 safetensors, SmolLM2's tokenizer: only the prompt of the built-in check
needs one) in a temporary directory, runs `python -m export.to_pte` on it in a fresh process and
writes the numbers of its report to results/export_1b_shape.md. Weights are random, so the
report's agreement check is a check of the lowering, not of the model's quality.
"""

import argparse
import json
import os
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


def write_random_model(directory: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_32_1B)).to(torch.bfloat16)
    model.save_pretrained(directory)
    load_model("smollm2-135m").tokenizer.save_pretrained(directory)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rotation", default="r4")
    p.add_argument("--output", type=Path, default=Path("results/export_1b_shape.md"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, out = Path(tmp) / "model", Path(tmp) / "out"
        write_random_model(model_dir)
        load_at_start = os.getloadavg()[0]
        start = time.time()
        subprocess.run([sys.executable, "-m", "export.to_pte", "--model", str(model_dir), "--rotation", args.rotation,
                        "--output-dir", str(out)], check=True)
        wall = time.time() - start
        report = json.loads((out / "export_report.json").read_text())
    v = report["verify"]
    lines = [
        "# Export of a random model with Llama 3.2 1B's shapes",
        "",
        f"Command: `python benchmarks/export_1b_shape.py --rotation {args.rotation}`",
        "",
        f"Machine and libraries: {environment_line()}. Load average (1 min) when the export started: "
        f"{load_at_start:.2f} on {os.cpu_count()} cores (other processes running at the same time slow it down).",
        "",
        "Config: hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, vocabulary 128256, tied embeddings, "
        "llama3 RoPE scaling; defaults of `python -m export.to_pte` otherwise (8da4w g32, 8-bit embedding, "
        "8da8w lm_head, KV cache 2048).",
        "",
        "| rotation | export s (load → .pte) | wall s (with the built-in check) | peak RSS MB | .pte MiB | check: mean KL, top-1 |",
        "|---|---|---|---|---|---|",
        f"| {args.rotation} | {report['export_seconds']:.0f} | {wall:.0f} | {report['peak_rss_mb']} | "
        f"{report['pte_bytes'] / 2**20:.0f} | {v['mean_kl']:.3g}, {v['top1_agreement']:.0%} |",
        "",
        "Seconds per stage: " + ", ".join(f"{k} {t:.0f}" for k, t in report["stage_seconds"].items()) + ".",
    ]
    write_atomic(args.output, ("\n".join(lines) + "\n").encode())
    print(args.output.read_text())


if __name__ == "__main__":
    main()
