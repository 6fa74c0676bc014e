"""W4A8 g32 perplexity with round-to-nearest against GPTQ weights, for each rotation, and GPTQ's wall time.

    python scripts/gptq_table.py --max-windows 16 --device cuda

Each cell is `spinquant.eval`'s own path (eval.quantized_model): load, rotate, weights by RTN or by
GPTQ on the calibration text, activations int8 per token (fake quantization), perplexity on the
first windows of the evaluation text. Writes results/gptq_smollm2.{json,md}.
"""

import argparse
import os
import sys
import time
from pathlib import Path

from spinquant.environment import environment_line
from spinquant.eval import DEFAULT_CALIB, DEFAULT_TEXT, GPTQRequest, calibration_hashes, perplexity, quantized_model, read_text, refuse_calibration_text, text_sha256, token_windows
from spinquant.files import write_atomic, write_json_atomic
from spinquant.gptq import GPTQConfig
from spinquant.quant import setting

ROTATIONS = ("none", "hadamard", "learned")


def measure(args: argparse.Namespace, quant: str, spec: str, gptq: GPTQRequest | None, text: str) -> dict:
    start = time.time()
    loaded, result = quantized_model(args.model, spec, setting(quant), device=args.device, gptq=gptq)
    ppl = perplexity(loaded.model, token_windows(loaded.tokenizer, text, args.seqlen, args.max_windows), progress=False)
    row = dict(perplexity=ppl, seconds=round(time.time() - start, 1))
    if result is not None:
        row["gptq"] = result.describe()
    return row


def measure_all(args: argparse.Namespace, text: str) -> dict:
    methods = {"rtn": None, "gptq": GPTQRequest(GPTQConfig(windows=args.gptq_windows, seqlen=args.seqlen), args.calib_text)}
    if args.act_order:
        methods["gptq-act-order"] = GPTQRequest(GPTQConfig(windows=args.gptq_windows, seqlen=args.seqlen, act_order=True), args.calib_text)
    rows = {"fp": measure(args, "fp", "none", None, text)}
    for method, request in methods.items():  # act order last: an interrupted run still has the main columns
        for rotation in args.rotations:
            spec = args.learned if rotation == "learned" else rotation
            rows[f"{rotation}/{method}"] = measure(args, args.quant, spec, request, text)
            print(f"{rotation}/{method}: {rows[f'{rotation}/{method}']['perplexity']:.3f}", file=sys.stderr, flush=True)
            write_json_atomic(args.output.with_suffix(".partial.json"), rows)
    return rows


def markdown(results: dict, command: str) -> str:
    rows = results["rows"]
    fp = rows["fp"]["perplexity"]
    lines = [
        "# GPTQ against round-to-nearest on SmolLM2-135M-Instruct, W4A8 group 32",
        "",
        f"Command: `{command}`",
        "",
        f"Evaluation: `{results['text']}` (sha256 `{results['text_sha256'][:16]}…`), the first {results['max_windows']} windows "
        f"of {results['seqlen']} tokens. Machine and libraries: {results['environment']}.",
        "",
        f"Full precision: {fp:.2f}. Weights int4 symmetric, group 32; activations int8 asymmetric per token "
        "(fake quantization, quant.py = torchao's 8da4w arithmetic); embedding and lm_head in float.",
        "",
        "| rotation | RTN | GPTQ | GPTQ act order | GPTQ wall time (s) | .pte RTN | .pte GPTQ |",
        "|---|---|---|---|---|---|---|",
    ]
    for rotation in results["rotations"]:
        rtn, gptq = rows[f"{rotation}/rtn"], rows[f"{rotation}/gptq"]
        act = rows.get(f"{rotation}/gptq-act-order")
        act_cell = f"{act['perplexity']:.2f}" if act else "–"
        lines.append(f"| {rotation} | {rtn['perplexity']:.2f} | {gptq['perplexity']:.2f} | {act_cell} | "
                     f"{gptq['gptq']['seconds']} | not measured | not measured |")
    g = next(rows[k]["gptq"] for k in rows if k.endswith("/gptq"))
    lines += [
        "",
        f"GPTQ: `{g['calibration']}` (sha256 `{g['calibration_sha256'][:16]}…`), {g['windows']} windows of {g['config']['seqlen']} "
        f"tokens, damping {g['config']['damp']} × mean diagonal, block {g['config']['block']}, act order {g['config']['act_order']}, "
        f"MSE clip {g['config']['clip_search']} (act order in its own column), scales {g['config']['scale_dtype']} (the export's 8da4w layout). "
        "Wall time is GPTQ alone (calibration forwards, Hessians and the column loop), not the evaluation.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--learned", default="results/rotations/smollm2_w4a8.pt")
    p.add_argument("--rotations", nargs="+", default=list(ROTATIONS), choices=ROTATIONS)
    p.add_argument("--quant", default="w4a8")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--calib-text", type=Path, default=DEFAULT_CALIB)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--gptq-windows", type=int, default=128)
    p.add_argument("--act-order", action="store_true", help="also GPTQ with act order (static group scales)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way; TF32 stays off)")
    p.add_argument("--output", type=Path, default=Path("results/gptq_smollm2"))
    args = p.parse_args()
    text = read_text(args.text)
    for spec in ("none", args.learned):
        refuse_calibration_text(args.text, text_sha256(text), calibration_hashes(spec, args.calib_text))
    results = dict(text=os.path.relpath(args.text), text_sha256=text_sha256(text), seqlen=args.seqlen, max_windows=args.max_windows,
                   quant=args.quant, rotations=args.rotations, learned=args.learned, device=args.device,
                   environment=environment_line(), rows=measure_all(args, text))
    write_json_atomic(args.output.with_suffix(".json"), results)
    command = "python scripts/gptq_table.py " + " ".join(sys.argv[1:])
    write_atomic(args.output.with_suffix(".md"), markdown(results, command).encode())
    print(args.output.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
