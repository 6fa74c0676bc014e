"""How much calibration GPTQ needs, and what GPTQ of the 4-bit lm_head buys: the program's setting in fake quantization.

    python scripts/gptq_calibration_table.py --device cuda --jobs 8

Each cell: `spinquant.eval`'s path (eval.quantized_model) with the learned rotation and the program's quantization
(`w4a8-export-kv8`: 8da4w g32 with bf16 scales, 8-bit embedding, int8 KV cache with R3), the lm_head 8-bit per channel
(8da8w) or 4-bit in groups of 32 (8da4w), weights by round to nearest or by GPTQ (`GPTQConfig()` but for its calibration
windows; with the 8da4w lm_head, GPTQ quantizes it too, as spinquant.pipeline.gptq_takes_lm_head says). Perplexity on
windows 0-15 of the evaluation text (where the export's default was chosen) and on windows 16-31 and 32-47 (held out,
never used for a choice). Writes results/gptq_calibration.{json,md}; the json is resumable (cells already in it are kept).
"""

import argparse
import multiprocessing
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from pte_tables import resumed_results

from spinquant.data import calibration_text, evaluation_text, read_text, token_windows
from spinquant.environment import environment_line
from spinquant.eval import quantized_model
from spinquant.files import write_atomic, write_json_atomic
from spinquant.gptq import GPTQConfig
from spinquant.metrics import perplexity
from spinquant.quant import setting
from spinquant.rotation import LEARNED_ROTATIONS

# Cell name -> (lm_head scheme, GPTQ calibration (windows, tokens each) or None for round to nearest).
CELLS = {
    "RTN, 8da8w lm_head": ("8da8w", None),
    "RTN, 8da4w lm_head": ("8da4w", None),
    "GPTQ 47×2048, 8da8w lm_head": ("8da8w", (47, 2048)),
    "GPTQ 47×2048, 8da4w lm_head": ("8da4w", (47, 2048)),
    "GPTQ 16×1024, 8da8w lm_head": ("8da8w", (16, 1024)),
    "GPTQ 16×1024, 8da4w lm_head": ("8da4w", (16, 1024)),
    "GPTQ 12×1024, 8da4w lm_head": ("8da4w", (12, 1024)),
    "GPTQ 8×1024, 8da8w lm_head": ("8da8w", (8, 1024)),
    "GPTQ 8×1024, 8da4w lm_head": ("8da4w", (8, 1024)),
    "GPTQ 32×512, 8da4w lm_head": ("8da4w", (32, 512)),
    "GPTQ 16×512, 8da4w lm_head": ("8da4w", (16, 512)),
}
RANGES = ((0, 16), (16, 32), (32, 48))


def measure(name: str, device: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    lm_head, calibration = CELLS[name]
    qc = setting("w4a8-export-kv8", **(dict(lm_head_bits=4, lm_head_group=32) if lm_head == "8da4w" else {}))
    gptq = GPTQConfig(windows=calibration[0], seqlen=calibration[1]) if calibration else None
    start = time.time()
    loaded = quantized_model("smollm2-135m", str(LEARNED_ROTATIONS["smollm2-135m"]), qc, device=device, gptq=gptq)
    prepared = time.time() - start
    windows = token_windows(loaded.tokenizer, read_text(evaluation_text()), 2048, RANGES[-1][1])
    result = loaded.model.spinquant.gptq
    return dict(
        perplexity={f"{a}-{b - 1}": perplexity(loaded.model, windows[a:b], progress=False) for a, b in RANGES},
        gptq_seconds=result.seconds if result else None, prepare_seconds=round(prepared, 1),
        gptq_linears=len(result.weights) if result else 0,
    )


def markdown(results: dict) -> str:
    cells = results["rows"]
    lines = [
        "# GPTQ's calibration size and the 4-bit lm_head, in fake quantization",
        "",
        "Commands: " + ", then ".join(f"`{c}`" for c in results["commands"]) + " (each measured the cells the one before had not)",
        "",
        f"Machine and libraries: {results['environment']}.",
        "",
        f"Learned rotation (`spinquant/rotations/smollm2_w4a8.pt`), the program's quantization (`w4a8-export-kv8`), the lm_head "
        f"8-bit per channel (8da8w) or 4-bit in groups of 32 (8da4w). GPTQ: `GPTQConfig()` (GPTAQ, MSE clip, int8 inputs) on the "
        f"first windows of `{results['calib_text']}`, W×T = W windows of T tokens; with the 8da4w lm_head GPTQ quantizes it too. "
        f"Perplexity on windows of 2048 tokens of `{results['text']}` (sha256 `{results['text_sha256'][:16]}…`): 0-15 chose the "
        "export's default; 16-31 and 32-47 are held out. GPTQ s: GPTQ's wall time on this device, with the other cells running beside it.",
        "",
        "| cell | windows 0-15 | 16-31 (held out) | 32-47 (held out) | GPTQ s | cells at a time | linears by GPTQ |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in (n for n in CELLS if n in cells):
        c = cells[name]
        ppl = [f"{c['perplexity'][f'{a}-{b - 1}']:.2f}" for a, b in RANGES]
        seconds = c["gptq_seconds"] if c["gptq_seconds"] is not None else "—"
        lines.append(f"| {name} | {' | '.join(ppl)} | {seconds} | {c['jobs']} | {c['gptq_linears']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="cells measured at a time, each in its own process")
    p.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS))
    p.add_argument("--output", type=Path, default=Path("results/gptq_calibration"))
    args = p.parse_args()
    json_path = args.output.with_suffix(".json")
    results = resumed_results(json_path, evaluation_text(), read_text(evaluation_text()), RANGES[-1][1])
    command = shlex.join(["python", "scripts/gptq_calibration_table.py", *sys.argv[1:]])
    results.update(commands=list(dict.fromkeys([*results.get("commands", []), command])), environment=environment_line(),
                   calib_text=os.path.relpath(calibration_text()))
    todo = [n for n in args.cells if n not in results["rows"]]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(measure, name, args.device, threads): name for name in todo}
        for future in as_completed(futures):
            results["rows"][futures[future]] = dict(future.result(), jobs=min(args.jobs, len(todo)))
            print(futures[future], results["rows"][futures[future]], file=sys.stderr, flush=True)
            write_json_atomic(json_path, results)
    write_atomic(args.output.with_suffix(".md"), markdown(results).encode())


if __name__ == "__main__":
    main()
