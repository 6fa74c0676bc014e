"""Perplexity of learned rotations against no rotation and random Hadamard, same evaluation as ppl_table.py.

    python scripts/learned_table.py --learned w4a8=spinquant/rotations/smollm2_w4a8.pt \
        --learned w4a4kv4=spinquant/rotations/smollm2_w4a4kv4.pt --max-windows 16 --device cuda

For each setting: `none`, `hadamard` (seed 0) and the learned file (SpinQuant's layout, learned by
`python -m spinquant.optimize` with the recipe of the same name), fused by rotation.py and
fake-quantized by quant.py exactly as results/ppl_smollm2.md. Writes results/learned_rotation_smollm2.{json,md};
the learned files' JSON sidecars say how each was learned.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ppl_table import measure
from spinquant.environment import environment_line
from spinquant.data import evaluation_text, read_text, text_sha256, token_windows
from spinquant.files import write_atomic, write_json_atomic
from spinquant.models import load_model

ROTATIONS = ("none", "hadamard", "learned")


def learned_files(pairs: list[str]) -> dict[str, Path]:
    files = {}
    for pair in pairs:
        setting, _, path = pair.partition("=")
        files[setting] = Path(path)
    return files


def measure_all(files: dict[str, Path], args: argparse.Namespace, windows, base) -> dict:
    rows = {}
    for setting, path in files.items():
        for rotation in ROTATIONS:
            start = time.time()
            spec = str(path) if rotation == "learned" else rotation
            ppl = measure(base, setting, spec, windows, args.device)
            rows[f"{setting}/{rotation}"] = dict(perplexity=ppl, seconds=round(time.time() - start, 1))
            print(f"{setting}/{rotation}: {ppl:.3f}", file=sys.stderr, flush=True)
    return rows


def verdicts(rows: dict, files: dict[str, Path]) -> list[str]:
    lines = []
    for setting in files:
        none, had, learned = (rows[f"{setting}/{r}"]["perplexity"] for r in ROTATIONS)
        lines.append(f"- {setting}: learned {learned:.2f} against random Hadamard {had:.2f} "
                     f"({'beats it' if learned < had else 'does not beat it'}, {had / learned:.2f}×), "
                     f"and against no rotation {none:.2f} ({'beats it' if learned < none else f'worse by {learned - none:.2f}'}).")
    return lines


def learning_lines(files: dict[str, Path]) -> list[str]:
    lines = ["| setting | file | iterations | lr | windows × tokens | batch | loss first → last | s | device |",
             "|---|---|---|---|---|---|---|---|---|"]
    commands = []
    for setting, path in files.items():
        info = json.loads(path.with_suffix(".json").read_text())
        lines.append(f"| {setting} | `{path}` | {info['iters']} | {info['lr']} | {info['windows']} × {info['seqlen']} | "
                     f"{info['batch_size']}×{info['grad_accum']} | {info['first_loss']:.3f} → {info['final_loss']:.3f} | "
                     f"{info['seconds']} | {info['environment']['device']} |")
        commands.append(f"- `{info['command']}` (calibration `{info['calibration']}`, sha256 `{info['calibration_sha256'][:16]}…`)")
    return lines + ["", "Commands:", "", *commands]


def markdown(results: dict, files: dict[str, Path], command: str) -> str:
    rows = results["rows"]
    table = ["| setting | " + " | ".join(ROTATIONS) + " |", "|---" * (len(ROTATIONS) + 1) + "|"]
    for setting in files:
        table.append(f"| {setting} | " + " | ".join(f"{rows[f'{setting}/{r}']['perplexity']:.2f}" for r in ROTATIONS) + " |")
    return "\n".join([
        "# Learned rotations on SmolLM2-135M-Instruct",
        "",
        f"Command: `{command}`",
        "",
        f"Data: `{results['text']}` (sha256 `{results['text_sha256'][:16]}…`), the first {results['max_windows']} windows "
        f"of {results['seqlen']} tokens, the windows of results/ppl_smollm2.md. Evaluation machine and libraries: "
        f"{results['environment']}.",
        "",
        "Fake quantization as in results/ppl_smollm2.md (quant.py, torchao's arithmetic): weights symmetric RTN group 32, "
        "activations asymmetric per token, K/V asymmetric group 64 with online R3. `hadamard` is random Hadamard "
        "R1/R2 + R4 (seed 0), the initialisation of the learned ones; every rotated model has R4.",
        "",
        *table,
        "",
        *verdicts(rows, files),
        "",
        "## How the rotations were learned",
        "",
        *learning_lines(files),
    ]) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--learned", action="append", required=True, help="SETTING=FILE, e.g. w4a8=spinquant/rotations/smollm2_w4a8.pt")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", type=Path, default=evaluation_text())
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--output", type=Path, default=Path("results/learned_rotation_smollm2"))
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way; TF32 stays off)")
    args = p.parse_args()
    files = learned_files(args.learned)
    text = read_text(args.text)
    base = load_model(args.model)
    windows = token_windows(base.tokenizer, text, args.seqlen, args.max_windows)
    results = dict(text=os.path.relpath(args.text), text_sha256=text_sha256(text), seqlen=args.seqlen,
                   max_windows=args.max_windows, device=args.device, environment=environment_line(),
                   rows=measure_all(files, args, windows, base))
    write_json_atomic(args.output.with_suffix(".json"), results)
    command = "python scripts/learned_table.py " + " ".join(sys.argv[1:])
    write_atomic(args.output.with_suffix(".md"), markdown(results, files, command).encode())
    print(args.output.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
