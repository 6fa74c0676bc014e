"""The demo's packaged GPTQ result (spinquant/rotations/smollm2_w4a8.gptq), made on a GPU: what the main job puts in its program.

    python scripts/package_gptq.py --device cuda

GPTQ's default (GPTAQ's target, MSE clip, int8 calibration inputs) on every window of the packaged calib.txt, under the
committed learned rotation, then 200 steps of tuning its group scales end to end (spinquant/scale_tuning.py), for the
program's setting with an 8da8w lm_head (the lm_head rounds to nearest at the export). The scale tuning is too slow for a
2-core CPU (minutes per step), so the result ships, compactly (spinquant/gptq_compact.py). Also measures the tuned
model's fake quantization on windows 0–15, 16–31 and 32–47 and writes results/packaged_gptq_smollm2.{json,md}.
"""

import argparse
import sys
import time
from pathlib import Path

from spinquant.data import evaluation_text, read_text, text_sha256, token_windows
from spinquant.environment import environment_line
from spinquant.eval import quantized_model
from spinquant.files import write_atomic, write_json_atomic
from spinquant.gptq import GPTQConfig
from spinquant.gptq_compact import save_compact
from spinquant.models import load_model
from spinquant.pipeline import prepare
from spinquant.quant import SETTINGS
from spinquant.rotation import default_rotation
from scale_tuning_table import ranges_perplexity


def markdown(results: dict, command: str) -> str:
    fp, tuned = results["full_precision"], results["tuned"]
    cells = " | ".join(f"{p:.3f} ({(p / f - 1) * 100:+.1f}%)" for p, f in zip(tuned, fp))
    return "\n".join([
        "# The demo's packaged GPTQ result (SmolLM2-135M-Instruct)", "",
        f"Command: `{command}`", "",
        f"Machine and libraries: {results['environment']}.", "",
        f"Rotation `{results['rotation']}`; setting `{results['setting']}` (8da4w g32 decoder with bf16 scales, int8 per-token "
        "activations, 8-bit embedding, 8da8w lm_head, int8 KV cache); GPTQ's default on every window of the packaged calib.txt "
        f"({results['windows']} of 2048 tokens), then {results['tune_steps']} steps of scale tuning. Evaluation `{results['text']}` "
        f"(sha256 `{results['text_sha256'][:16]}…`), windows of 2048 tokens; fake quantization on the device.", "",
        "| model | windows 0–15 | 16–31 | 32–47 |", "|---|---|---|---|",
        f"| full precision | {' | '.join(f'{p:.3f}' for p in fp)} |",
        f"| GPTQ + {results['tune_steps']} steps of scale tuning | {cells} |", "",
        f"- GPTQ and tuning: {results['gptq_seconds']} s on the device.",
        f"- `{results['output']}`: {results['compact_bytes'] / 1e6:.2f} MB, {results['compact_bytes'] * 8 / results['weights']:.2f} bits "
        f"per weight for {results['weights']:,} weights in {results['linears']} linears (a plain GPTQ file holds a byte per "
        f"weight and its scales: {results['plain_bytes'] / 1e6:.1f} MB); written in {results['compact_seconds']} s.",
    ]) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rotation", help="default: the model's committed learned rotation")
    p.add_argument("--setting", default="w4a8-export-kv8", choices=list(SETTINGS))
    p.add_argument("--tune-steps", type=int, default=200)
    p.add_argument("--text", type=Path, default=evaluation_text())
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", type=Path, default=Path("spinquant/rotations/smollm2_w4a8.gptq"))
    p.add_argument("--results", type=Path, default=Path("results/packaged_gptq_smollm2"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rotation = args.rotation or default_rotation(args.model)
    loaded = quantized_model(args.model, rotation, SETTINGS[args.setting], device=args.device, gptq=GPTQConfig(tune_steps=args.tune_steps))
    result = loaded.model.spinquant.gptq
    text = read_text(args.text)
    windows = token_windows(loaded.tokenizer, text, 2048, 48)
    tuned = ranges_perplexity(loaded.model, windows)
    del loaded
    original = load_model(args.model)
    full_precision = ranges_perplexity(original.model.to(args.device), windows)
    rotated = prepare(original.model.cpu(), rotation, SETTINGS["fp"])  # the float weights the integers are stored against
    start = time.time()
    save_compact(result, rotated, args.output)
    weights = sum(qw.qdata.numel() for qw in result.weights.values())
    results = dict(
        rotation=rotation, setting=args.setting, tune_steps=args.tune_steps, windows=result.windows, text=str(args.text),
        text_sha256=text_sha256(text), environment=environment_line(), full_precision=full_precision, tuned=tuned,
        gptq_seconds=result.seconds, output=str(args.output), compact_bytes=args.output.stat().st_size,
        compact_seconds=round(time.time() - start, 1), weights=weights, linears=len(result.weights),
        plain_bytes=weights + sum(qw.scale.numel() * qw.scale.element_size() for qw in result.weights.values()),
    )
    write_json_atomic(args.results.with_suffix(".json"), results)
    command = "python scripts/package_gptq.py " + " ".join(sys.argv[1:])
    write_atomic(args.results.with_suffix(".md"), markdown(results, command).encode())
    print(markdown(results, command))


if __name__ == "__main__":
    main()
