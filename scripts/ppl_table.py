"""The foundation's perplexity table: every rotation preset at every quantization setting.

    python scripts/ppl_table.py --max-windows 16

writes results/ppl_smollm2.json (resumable: settings already in it are skipped) and
results/ppl_smollm2.md. A diagnostic row folds the norm gains with no rotation at all
(R1 = I), which isolates what folding alone does to 4-bit weights on this model.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from spinquant.environment import describe_environment, environment_line
from spinquant.eval import DEFAULT_TEXT, perplexity, read_text, text_sha256, token_windows
from spinquant.files import write_atomic, write_json_atomic
from spinquant.models import load_model
from spinquant.quant import quantize_model, setting
from spinquant.rotation import Rotations, apply_rotations, rotations_for

ROTATIONS = ("none", "r4", "hadamard", "fold-only")
GRID = [("fp", r) for r in ROTATIONS] + [
    (q, r) for q in ("w4a16", "w4a8", "w8a8", "w4a4", "w4a4kv4") for r in ROTATIONS if r != "fold-only"
] + [("w4a16", "fold-only"), ("w4a8", "fold-only")]


def rotations(name: str, config, r3: bool) -> Rotations:
    if name == "fold-only":
        return Rotations(r1=torch.eye(config.hidden_size, dtype=torch.float64))
    return rotations_for(name, config, seed=0, r3=r3)


def measure(model_name: str, quant: str, rotation: str, windows_of) -> float:
    qc = setting(quant)
    loaded = load_model(model_name)
    model = apply_rotations(loaded.model, rotations(rotation, loaded.model.config, qc.quantizes_kv))
    return perplexity(quantize_model(model, qc), windows_of(loaded.tokenizer))


def markdown(results: dict, command: str) -> str:
    env = results["environment"]
    rows = results["rows"]
    lines = [
        "# Perplexity of SmolLM2-135M-Instruct under rotation and fake quantization",
        "",
        f"Command: `{command}`",
        "",
        f"Data: `{results['text']}` (sha256 `{results['text_sha256'][:16]}…`), first {results['max_windows']} "
        f"windows of {results['seqlen']} tokens. Machine and libraries: {env}.",
        "",
        "Fake quantization as torchao computes it (spinquant/quant.py): weights symmetric round-to-nearest, "
        "group 32 (W8: per channel); activations asymmetric per token; K/V asymmetric, group 64, with R3 "
        "for rotated models. Decoder linears only; embedding and lm_head in float.",
        "",
        "| setting | " + " | ".join(ROTATIONS) + " |",
        "|---" * (len(ROTATIONS) + 1) + "|",
    ]
    for quant in dict.fromkeys(q for q, _ in GRID):
        cells = [f"{rows[f'{quant}/{r}']['perplexity']:.2f}" if f"{quant}/{r}" in rows else "–" for r in ROTATIONS]
        lines.append(f"| {quant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--output", type=Path, default=Path("results/ppl_smollm2"))
    args = p.parse_args()
    text = read_text(args.text)
    json_path = args.output.with_suffix(".json")
    results = json.loads(json_path.read_text()) if json_path.exists() else {"rows": {}}
    results.update(text=str(args.text), text_sha256=text_sha256(text), seqlen=args.seqlen,
                   max_windows=args.max_windows, environment=environment_line(), environment_detail=describe_environment())
    windows_of = lambda tok: token_windows(tok, text, args.seqlen, args.max_windows)  # noqa: E731
    for quant, rotation in GRID:
        key = f"{quant}/{rotation}"
        if key in results["rows"]:
            continue
        start = time.time()
        ppl = measure(args.model, quant, rotation, windows_of)
        results["rows"][key] = dict(perplexity=ppl, seconds=round(time.time() - start, 1))
        print(f"{key}: {ppl:.3f}", file=sys.stderr)
        write_json_atomic(json_path, results)
    command = "python scripts/ppl_table.py " + " ".join(sys.argv[1:])
    md = args.output.with_suffix(".md")
    write_atomic(md, markdown(results, command.strip()).encode())


if __name__ == "__main__":
    main()
