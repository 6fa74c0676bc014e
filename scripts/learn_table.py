"""One command from a new model to its program, measured: does `--rotation learn` beat random Hadamard?

    python scripts/learn_table.py          # about 10 minutes on 2 CPU cores; writes results/learn_one_command.md

OMP_NUM_THREADS=1 beside another job: two processes of two threads each on two cores take several times as long.

A small Qwen3 is trained on calib.txt (scripts/tiny_qwen3.py) so that it has structure to learn from; then
`python -m export.to_pte --model DIR --rotation learn --max-seq-len 256` runs in its own process, timed from
start to exit (learning, export and the program's check). Perplexity on eval.txt (windows of 256, the model's
context; the first 128) at W4A8 (torchao's 8da4w arithmetic) and at the exported program's setting (w4a8-export: bf16 scales,
8-bit embedding and lm_head), for the learned rotation and random Hadamard rotations of three seeds (the
learned one starts from seed 0's).
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import tiny_qwen3
from spinquant.data import evaluation_text, read_text, token_windows
from spinquant.environment import environment_line
from spinquant.files import write_atomic
from spinquant.metrics import perplexity
from spinquant.models import load_model
from spinquant.pipeline import prepare
from spinquant.quant import setting

SEQLEN = 256
EVAL_WINDOWS = 128  # the first 128 windows of 256 tokens of eval.txt: 32,768 tokens
SETTINGS = ("w4a8", "w4a8-export")
HADAMARD_SEEDS = (0, 1, 2)


def timed_export(model: Path, out: Path) -> tuple[list[str], float, float, dict]:
    """The one command in its own process: its argv, wall seconds, the load average at its start, its report."""
    argv = ["python", "-m", "export.to_pte", "--model", str(model), "--rotation", "learn", "--max-seq-len", str(SEQLEN), "--output-dir", str(out)]
    load, start = os.getloadavg()[0], time.perf_counter()
    subprocess.run([sys.executable, *argv[1:]], check=True)
    return argv, time.perf_counter() - start, load, json.loads((out / "export_report.json").read_text())


def eval_perplexity(model: Path, rotation: str, quant: str, seed: int = 0) -> float:
    loaded = load_model(str(model), torch.float32)
    prepare(loaded.model, rotation, setting(quant), seed=seed)
    windows = token_windows(loaded.tokenizer, read_text(evaluation_text()), SEQLEN, EVAL_WINDOWS)
    return perplexity(loaded.model, windows, progress=False)


def command_line() -> str:
    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"OMP_NUM_THREADS={threads} " if threads else "") + "python scripts/learn_table.py"


def markdown(command: list[str], seconds: float, load: float, report: dict, fp: float, ppl: dict[str, dict[str, float]]) -> str:
    learned = json.loads(Path(report["options"]["rotation"]).with_suffix(".json").read_text())
    v, c = report["verify"], tiny_qwen3.CONFIG
    shown = shlex.join(command[:4] + ["DIR"] + command[5:-2])
    return "\n".join([
        "# One command from a model to its program: `--rotation learn` on a small trained Qwen3",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Machine and libraries: {environment_line()}; {os.cpu_count()} cores.",
        "",
        f"Model: Qwen3, {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, MLP {c['intermediate_size']}, "
        f"{c['num_attention_heads']} query and {c['num_key_value_heads']} KV heads of {c['head_dim']}, a 4,096-token BPE "
        f"tokenizer, trained by `python scripts/tiny_qwen3.py --output DIR` ({tiny_qwen3.STEPS} AdamW steps on calib.txt only).",
        "",
        f"The one command, `{shown}`: **{seconds:.0f} s** from start to exit on this CPU (load average {load:.1f} at its start; learning "
        f"{report['stage_seconds']['learn rotations']:.0f} s: {learned['iters']} iterations of recipe `{learned['recipe']}`, "
        f"{learned['windows']} windows of {learned['seqlen']} tokens, batch {learned['batch_size']}, loss {learned['first_loss']:.3f} → "
        f"{learned['final_loss']:.3f}); program {report['pte_bytes'] / 2**20:.1f} MiB, its check: mean KL {v['mean_kl']:.3g}, "
        f"top-1 {v['top1_agreement']:.0%}.",
        "",
        f"Perplexity on eval.txt (its first {EVAL_WINDOWS} windows of {SEQLEN} tokens); full precision {fp:.3f}:",
        "",
        "| rotation | " + " | ".join(SETTINGS) + " |",
        "|---|" + "---|" * len(SETTINGS),
        *(f"| {name} | " + " | ".join(f"{by_setting[q]:.3f}" for q in SETTINGS) + " |" for name, by_setting in ppl.items()),
        "",
    ])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny-qwen3"
        tiny_qwen3.main(["--output", str(model)])
        command, seconds, load, report = timed_export(model, Path(tmp) / "out")
        rotations = {"none": ("none", 0), "learned (`--rotation learn`)": (report["options"]["rotation"], 0),
                     **{f"random Hadamard, seed {seed}": ("hadamard", seed) for seed in HADAMARD_SEEDS}}
        fp = eval_perplexity(model, "none", "fp")
        ppl = {name: {q: eval_perplexity(model, rotation, q, seed) for q in SETTINGS} for name, (rotation, seed) in rotations.items()}
        text = markdown(command, seconds, load, report, fp, ppl)
    output = Path("results/learn_one_command.md")
    write_atomic(output, text.encode())
    print(text)


if __name__ == "__main__":
    main()
