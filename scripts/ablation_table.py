"""Each addition of the W4A8 program's quantization alone: rotation, GPTQ, GPTAQ's target, MSE clip, scale tuning, lm_head.

    python scripts/ablation_table.py --device cuda --jobs 6

Every variant is fake quantization of the program's setting (8da4w g32 decoder with bf16 scales, int8 per-token
activations, 8-bit embedding, int8 KV cache, 8da4w lm_head unless the row says 8da8w), evaluated on windows 0–15 (where
variants are chosen) and 16–31, 32–47 (held out). Rows add one thing at a time to round-to-nearest without rotation,
then take one thing away from the best 8da4w variant. The seconds are each variant's GPTQ and tuning on the device
(with the other variants running beside it, `--jobs`), and a learned rotation's learning time from its record.
Writes results/ablation_smollm2.{json,md}.
"""

import argparse
import dataclasses
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from spinquant.data import evaluation_text, read_text, text_sha256, token_windows
from spinquant.environment import environment_line
from spinquant.eval import quantized_model
from spinquant.files import write_atomic, write_json_atomic
from spinquant.gptq import GPTQConfig
from spinquant.models import load_model
from spinquant.quant import SETTINGS

from scale_tuning_table import ranges_perplexity

LEARNED = "spinquant/rotations/smollm2_w4a8.pt"
TUNED = 200  # scale tuning's steps, chosen on windows 0-15 (results/scale_tuning_smollm2.md)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    rotation: str
    gptq: dict | None = None  # GPTQConfig fields; None: round to nearest
    setting: str = "w4a8-program"


VARIANTS = [
    Variant("round to nearest, no rotation", "none"),
    Variant("+ random Hadamard rotation (QuaRot)", "hadamard"),
    Variant("+ learned rotation instead (SpinQuant, Cayley SGD)", LEARNED),
    Variant("+ GPTQ (plain target, MSE clip)", LEARNED, dict(asymmetric=0.0)),
    Variant("+ GPTAQ's target (GPTQ's default)", LEARNED, {}),
    Variant("+ scale tuning, 200 steps", LEARNED, dict(tune_steps=TUNED)),
    Variant("+ 8da8w lm_head", LEARNED, dict(tune_steps=TUNED), "w4a8-export-kv8"),
    Variant("best 8da4w without the learned rotation (random Hadamard)", "hadamard", dict(tune_steps=TUNED)),
    Variant("best 8da4w without any rotation", "none", dict(tune_steps=TUNED)),
    Variant("best 8da4w without GPTAQ's target", LEARNED, dict(asymmetric=0.0, tune_steps=TUNED)),
    Variant("best 8da4w without GPTQ's MSE clip", LEARNED, dict(clip_search=False, tune_steps=TUNED)),
]


def measure(variant: Variant, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    start = time.time()
    gptq = GPTQConfig(**variant.gptq) if variant.gptq is not None else None
    loaded = quantized_model(args.model, variant.rotation, SETTINGS[variant.setting], device=args.device, gptq=gptq)
    result = loaded.model.spinquant.gptq
    windows = token_windows(loaded.tokenizer, read_text(args.text), 2048, 48)
    ppl = ranges_perplexity(loaded.model, windows)
    print(f"{variant.name}: {', '.join(f'{p:.3f}' for p in ppl)}", file=sys.stderr, flush=True)
    return dict(variant=dataclasses.asdict(variant), perplexity=ppl, gptq_seconds=result.seconds if result is not None else None,
                seconds=round(time.time() - start, 1))


def learning_seconds(rotation: str) -> str:
    record = Path(rotation).with_suffix(".json")
    if not record.is_file():
        return ""
    learned = json.loads(record.read_text())
    return f"{learned['seconds']:.0f} ({learned['device']})"


def markdown(results: dict, command: str) -> str:
    fp = results["full_precision"]
    lines = [
        "# What each addition buys: the W4A8 program's quantization, one thing at a time (SmolLM2-135M-Instruct)", "",
        f"Command: `{command}`", "",
        f"Machine and libraries: {results['environment']}.", "",
        f"Evaluation `{results['text']}` (sha256 `{results['text_sha256'][:16]}…`), windows of 2048 tokens. Fake quantization of "
        "the program's setting: 8da4w g32 decoder with bf16 scales, int8 per-token activations, 8-bit embedding, int8 KV cache, "
        "8da4w lm_head (round to nearest, or GPTQ's with the decoder) unless the row says 8da8w. GPTQ on every window of the "
        f"packaged calib.txt (47 of 2048 tokens). Learned rotation: `{LEARNED}`. Seconds: GPTQ and tuning on the device, with the "
        "other variants running beside it; the learned rotation's learning time is from its record.", "",
        "| variant | lm_head | windows 0–15 | 16–31 (held out) | 32–47 (held out) | GPTQ + tuning s | rotation learning s |",
        "|---|---|---|---|---|---|---|",
        f"| full precision | float | {' | '.join(f'{p:.3f}' for p in fp)} | | |",
    ]
    for row in results["rows"]:
        v = row["variant"]
        cells = [f"{p:.3f} ({(p / f - 1) * 100:+.1f}%)" for p, f in zip(row["perplexity"], fp)]
        lm_head = "8da8w" if v["setting"] == "w4a8-export-kv8" else "8da4w"
        gptq = row["gptq_seconds"] if row["gptq_seconds"] is not None else ""
        lines.append(f"| {v['name']} | {lm_head} | {' | '.join(cells)} | {gptq} | {learning_seconds(v['rotation'])} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", type=Path, default=evaluation_text())
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="variants measured at once (processes)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per process")
    p.add_argument("--output", type=Path, default=Path("results/ablation_smollm2"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        rows = list(pool.map(measure, VARIANTS, [args] * len(VARIANTS)))
    loaded, text = load_model(args.model), read_text(args.text)
    windows = token_windows(loaded.tokenizer, text, 2048, 48)
    results = dict(text=str(args.text), text_sha256=text_sha256(text), environment=environment_line(),
                   full_precision=ranges_perplexity(loaded.model.to(args.device), windows), rows=rows)
    write_json_atomic(args.output.with_suffix(".json"), results)
    command = "python scripts/ablation_table.py " + " ".join(sys.argv[1:])
    write_atomic(args.output.with_suffix(".md"), markdown(results, command).encode())


if __name__ == "__main__":
    main()
