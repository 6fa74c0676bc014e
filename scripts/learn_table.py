"""One command from a new model to its program, measured: does `--rotation learn` beat random Hadamard?

    python scripts/learn_table.py          # about 25 minutes on 2 CPU cores; writes results/learn_one_command.md

Run it alone: two processes of two threads each on two cores take several times as long.

A Qwen3 with real structure is made from the demo model (scripts/qwen3_from_smollm2.py); then
`python -m export.to_pte --model DIR --rotation learn --learn-iters N --max-seq-len 128` runs in its own process, timed
from start to exit (learning, export and the program's check). Perplexity on eval.txt (windows of 128, the
learning's; the first 64) at W4A8 (torchao's 8da4w arithmetic) and at the exported program's setting (w4a8-export:
bf16 scales, 8-bit embedding and lm_head), for the learned rotation and random Hadamard rotations of three seeds
(the learned one starts from seed 0's).
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

import qwen3_from_smollm2
from spinquant.data import evaluation_text, read_text, token_windows
from spinquant.environment import environment_line
from spinquant.files import write_atomic
from spinquant.metrics import perplexity
from spinquant.models import load_model
from spinquant.pipeline import prepare
from spinquant.quant import setting

SEQLEN = 128
LEARN_ITERS = 8  # what fits the one command in 5 minutes on this CPU: the export alone takes about 3 of them
EVAL_WINDOWS = 64  # the first 64 windows of 128 tokens of eval.txt: 8,192 tokens
SETTINGS = ("w4a8", "w4a8-export")
HADAMARD_SEEDS = (0, 1, 2)
LEARNED = "learned (`--rotation learn`)"


def timed_export(model: Path, out: Path) -> tuple[list[str], float, float, dict]:
    """The one command in its own process: its argv, wall seconds, the load average at its start, its report."""
    argv = ["python", "-m", "export.to_pte", "--model", str(model), "--rotation", "learn", "--learn-iters", str(LEARN_ITERS),
            "--max-seq-len", str(SEQLEN), "--output-dir", str(out)]
    load, start = os.getloadavg()[0], time.perf_counter()
    subprocess.run([sys.executable, *argv[1:]], check=True)
    return argv, time.perf_counter() - start, load, json.loads((out / "export_report.json").read_text())


def eval_perplexity(model: Path | str, rotation: str, quant: str, seed: int = 0) -> float:
    loaded = load_model(str(model), torch.float32)
    prepare(loaded.model, rotation, setting(quant), seed=seed)
    windows = token_windows(loaded.tokenizer, read_text(evaluation_text()), SEQLEN, EVAL_WINDOWS)
    return perplexity(loaded.model, windows, progress=False)


def command_line() -> str:
    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"OMP_NUM_THREADS={threads} " if threads else "") + "python scripts/learn_table.py"


def verdicts(seconds: float, ppl: dict[str, dict[str, float]]) -> list[str]:
    learned = ppl[LEARNED]
    lines = [f"- The one command: {seconds:.0f} s, {'under' if seconds < 300 else 'over'} 5 minutes."]
    for q in SETTINGS:
        best = min((by_setting[q], name) for name, by_setting in ppl.items() if name.startswith("random Hadamard"))
        lines.append(f"- {q}: learned {learned[q]:.2f} against the best random Hadamard ({best[1]}) {best[0]:.2f}: "
                     f"{'beats it' if learned[q] < best[0] else 'does not beat it'}; no rotation {ppl['none'][q]:.2f}.")
    return lines


def markdown(command: list[str], seconds: float, load: float, report: dict, conversion_kl: float, fp: dict[str, float],
             ppl: dict[str, dict[str, float]]) -> str:
    learned = json.loads(Path(report["options"]["rotation"]).with_suffix(".json").read_text())
    v = report["verify"]
    shown = shlex.join(command[:4] + ["DIR"] + command[5:-2])
    return "\n".join([
        "# One command from a model to its program: `--rotation learn` on a Qwen3 with real structure",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Machine and libraries: {environment_line()}; {os.cpu_count()} cores.",
        "",
        f"Model: the demo model in Qwen3's layout, `python scripts/qwen3_from_smollm2.py --output DIR` (SmolLM2-135M's "
        f"weights unchanged, 30 layers, hidden 576, MLP 1,536, 9 query and 3 KV heads of 64; Qwen3's q_norm/k_norm gains fitted "
        f"to it on calib.txt, {qwen3_from_smollm2.STEPS} steps, KL to SmolLM2 per token at the end {conversion_kl:.3f}). "
        "Why not a Qwen3 trained from scratch: the script's docstring.",
        "",
        f"The one command, `{shown}`: **{seconds:.0f} s** from start to exit on this CPU (load average {load:.1f} at its "
        f"start, counting the conversion this script ran just before; learning {report['stage_seconds']['learn rotations']:.0f} s: {learned['iters']} iterations of recipe "
        f"`{learned['recipe']}`, {learned['windows']} windows of {learned['seqlen']} tokens, batch {learned['batch_size']}, "
        f"loss {learned['first_loss']:.3f} → {learned['final_loss']:.3f}); program {report['pte_bytes'] / 2**20:.1f} MiB, "
        f"its check: mean KL {v['mean_kl']:.3g}, top-1 {v['top1_agreement']:.0%}.",
        "",
        f"Perplexity on eval.txt (its first {EVAL_WINDOWS} windows of {SEQLEN} tokens); full precision {fp['qwen3']:.2f} "
        f"(the demo model it came from: {fp['smollm2']:.2f}):",
        "",
        "| rotation | " + " | ".join(SETTINGS) + " |",
        "|---|" + "---|" * len(SETTINGS),
        *(f"| {name} | " + " | ".join(f"{by_setting[q]:.2f}" for q in SETTINGS) + " |" for name, by_setting in ppl.items()),
        "",
        *verdicts(seconds, ppl),
        "",
    ])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "smollm2-qwen3"
        conversion_kl = qwen3_from_smollm2.main(["--output", str(model)])
        command, seconds, load, report = timed_export(model, Path(tmp) / "out")
        rotations = {"none": ("none", 0), LEARNED: (report["options"]["rotation"], 0),
                     **{f"random Hadamard, seed {seed}": ("hadamard", seed) for seed in HADAMARD_SEEDS}}
        fp = {"qwen3": eval_perplexity(model, "none", "fp"), "smollm2": eval_perplexity(qwen3_from_smollm2.DEMO, "none", "fp")}
        ppl = {name: {q: eval_perplexity(model, rotation, q, seed) for q in SETTINGS} for name, (rotation, seed) in rotations.items()}
        text = markdown(command, seconds, load, report, conversion_kl, fp, ppl)
    output = Path("results/learn_one_command.md")
    write_atomic(output, text.encode())
    print(text)


if __name__ == "__main__":
    main()
