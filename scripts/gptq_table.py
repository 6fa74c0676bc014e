"""W4A8 g32 perplexity of round-to-nearest against GPTQ variants, for each rotation, and GPTQ's wall time.

    python scripts/gptq_table.py --device cuda --jobs 8 \
        --learned learned=spinquant/rotations/smollm2_w4a8.pt --learned learned-w16a8=spinquant/rotations/smollm2_w16a8.pt

Each cell is `spinquant.eval`'s own path (eval.quantized_model): load, rotate, weights by RTN or by
GPTQ on the calibration text, then perplexity on windows of the evaluation text (the first ones, or
from `--first-window` on: a held-out check on windows no method was chosen on) twice:
weights only (W4A16), then with int8 per-token activations (W4A8, fake quantization). GPTQ's
weights do not depend on the evaluation's activations, so the two columns isolate what activation
quantization does to each method. Cells run in `--jobs` processes (GPTQ's column loop is many small
kernels: one process leaves the GPU mostly idle). Writes results/gptq_smollm2.{json,md}; the json
is resumable (cells already in it are kept). `scripts/gptq_pte_table.py` adds the .pte columns.
"""

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from spinquant.data import calibration_text, evaluation_text, read_text, text_sha256, token_windows
from spinquant.environment import environment_line
from spinquant.eval import calibration_hashes, quantized_model, refuse_calibration_text
from spinquant.files import write_atomic, write_json_atomic
from spinquant.gptq import GPTQConfig
from spinquant.metrics import perplexity
from spinquant.models import load_model
from spinquant.quant import setting

PRESET_ROTATIONS = ("none", "hadamard")
DEFAULT_LEARNED = "learned=spinquant/rotations/smollm2_w4a8.pt"
# Every method names all its GPTQ choices, so a changed GPTQConfig default does not change a column.
# None: quant.py's round to nearest with float32 scales (the fake-quant tables' RTN).
PLAIN = dict(act_order=False, clip_search=False, act_bits=16, asymmetric=0.0)
METHODS: dict[str, dict | None] = {
    "rtn": None,
    "rtn-bf16": dict(PLAIN, method="rtn"),  # the integers and bf16 scales the RTN .pte holds
    "rtn-bf16-clip": dict(PLAIN, method="rtn", clip_search=True),
    "gptq": PLAIN,
    "gptq-act-order": dict(PLAIN, act_order=True),
    "gptq-act-order-clip": dict(PLAIN, act_order=True, clip_search=True),
    "gptq-a8": dict(PLAIN, act_bits=8),
    "gptq-act-order-a8": dict(PLAIN, act_order=True, act_bits=8),
    "gptq-clip": dict(PLAIN, clip_search=True),
    # GPTAQ-style asymmetric calibration (GPTQConfig.asymmetric): the full-precision model's outputs as each linear's target.
    "gptaq-act-order-clip": dict(PLAIN, act_order=True, clip_search=True, asymmetric=0.5),
    "gptaq-clip-a8": dict(PLAIN, clip_search=True, act_bits=8, asymmetric=0.5),
}
FAKE_QUANT = ("w4a16", "w4a8")


def gptq_config_for(method: str, args: argparse.Namespace) -> GPTQConfig | None:
    choices = METHODS[method]
    return None if choices is None else GPTQConfig(windows=args.gptq_windows, seqlen=args.seqlen, **choices)


def measure(args: argparse.Namespace, rotation: str, method: str, text: str) -> dict:
    """W4A16 then W4A8 perplexity of the same weights: GPTQ runs once, its result goes into the W4A8 model."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))
    start = time.time()
    spec = rotation_specs(args)[rotation]
    loaded = quantized_model(args.model, spec, setting("w4a16"), device=args.device, gptq=gptq_config_for(method, args), calib_text=args.calib_text)
    result = loaded.model.spinquant.gptq
    windows = token_windows(loaded.tokenizer, text, args.seqlen, args.max_windows, args.first_window)
    row = {"w4a16": perplexity(loaded.model, windows, progress=False)}
    del loaded
    w4a8 = quantized_model(args.model, spec, setting("w4a8"), device=args.device, gptq=result)
    row["w4a8"] = perplexity(w4a8.model, windows, progress=False)
    row["seconds"] = round(time.time() - start, 1)
    if result is not None:
        row["gptq"] = result.describe()
        if args.save_gptq:
            result.save(args.save_gptq / f"{rotation}_{method}.pt")
    return row


def measure_fp(args: argparse.Namespace, text: str) -> dict:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.jobs))
    loaded = quantized_model(args.model, "none", setting("fp"), device=args.device)
    windows = token_windows(loaded.tokenizer, text, args.seqlen, args.max_windows, args.first_window)
    return {"fp": perplexity(loaded.model, windows, progress=False)}


def rotation_specs(args: argparse.Namespace) -> dict[str, str]:
    learned = dict(pair.partition("=")[::2] for pair in args.learned)
    return {**{r: r for r in PRESET_ROTATIONS}, **learned}


def measure_all(args: argparse.Namespace, text: str, rows: dict, save: callable) -> dict:
    """Every missing cell, RTN first (cheap), in parallel processes; `rows` is saved after each."""
    cells = [(rotation, method) for method in args.methods for rotation in args.rotations if f"{rotation}/{method}" not in rows]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(measure, args, r, m, text): f"{r}/{m}" for r, m in cells}
        if "fp" not in rows:
            futures[pool.submit(measure_fp, args, text)] = "fp"
        for future in as_completed(futures):
            key = futures[future]
            rows[key] = future.result()
            print(f"{key}: {json.dumps({k: v for k, v in rows[key].items() if k != 'gptq'})}", file=sys.stderr, flush=True)
            save(rows)
    return rows


def cell(rows: dict, key: str, column: str) -> str:
    return f"{rows[key][column]:.2f}" if key in rows else "–"


def table(results: dict, column: str) -> list[str]:
    rows, methods = results["rows"], results["methods"]
    lines = ["| rotation | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for rotation in results["rotations"]:
        lines.append(f"| {rotation} | " + " | ".join(cell(rows, f"{rotation}/{m}", column) for m in methods) + " |")
    return lines


def windows_phrase(results: dict) -> str:
    first, n = results.get("first_window", 0), results["max_windows"]
    return f"the first {n} windows" if first == 0 else f"windows {first}–{first + n - 1} (0-based; the first {first} left out)"


def pte_parts(results: dict) -> dict[str, dict]:
    """The json's `pte` part (scripts/gptq_pte_table.py) by GPTQ method; a json of one method's part is read as such."""
    pte = results.get("pte") or {}
    return {pte["method"]: pte} if "method" in pte else pte


def pte_tables(results: dict) -> list[str]:
    lines = []
    for pte in pte_parts(results).values():
        lines += [f"### `{pte['method']}`", "", *pte_table(results, pte), ""]
    return lines


def pte_table(results: dict, pte: dict) -> list[str]:
    """The programs' own perplexity with one GPTQ method's integers."""
    method, rows = pte["method"], results["rows"]
    lines = [
        f"Command: `{pte['command']}`",
        "",
        f"Machine and libraries of the .pte numbers: {pte['environment']}.",
        "",
        f"Each program: `python -m export.to_pte --rotation R --gptq-file {{R}}_{method}.pt` (the GPTQ integers and bf16 scales "
        "of the table above, carried bit for bit; 8-bit per-channel embedding and 8da8w lm_head as every export). "
        "Perplexity computed by running the program (prefill in chunks of 256, scripts/export_table.py's code path) "
        f"on the same {results['max_windows']} windows. The fake-quant columns keep embedding and lm_head in float. "
        f"RTN .pte: {pte['rtn_source']}.",
        "",
        f"| rotation | fake-quant rtn-bf16 ({results['device_name']}) | fake-quant {method} ({results['device_name']}) | "
        f".pte RTN (CPU) | .pte {method} (CPU) | .pte {method} / full precision | export s (CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    fp = rows["fp"]["fp"]
    for rotation in results["rotations"]:
        lines.append(f"| {rotation} | {cell(rows, f'{rotation}/rtn-bf16', 'w4a8')} | {cell(rows, f'{rotation}/{method}', 'w4a8')} | "
                     + pte_cells(pte["rtn"].get(rotation), pte["rows"].get(rotation), fp) + " |")
    return lines


def pte_cells(rtn: float | None, row: dict | None, fp: float) -> str:
    measured = [f"{row['pte_perplexity']:.2f}", f"{row['pte_perplexity'] / fp - 1:+.1%}", f"{row['export_seconds']:.0f}"] if row else ["not measured", "–", "–"]
    return " | ".join([f"{rtn:.2f}" if rtn else "not measured", *measured])


def gptq_line(results: dict) -> str:
    runs = [r["gptq"] for r in results["rows"].values() if "gptq" in r and r["gptq"]["config"]["method"] == "gptq"]
    if not runs:
        return ""
    g, c = runs[0], runs[0]["config"]
    return (f"GPTQ: `{g['calibration']}` (sha256 `{g['calibration_sha256'][:16]}…`), {g['windows']} windows of {c['seqlen']} tokens, "
            f"damping {c['damp']} × mean diagonal, block {c['block']}, scales {c['scale_dtype']} (the export's 8da4w layout). "
            "Methods: `rtn` quant.py's round to nearest, float32 scales; `rtn-bf16` the same in the export's layout (bf16 scales: "
            "the integers the RTN .pte holds); `-clip` per-group MSE clip search; `act-order` columns by decreasing Hessian "
            "diagonal with static group scales; `-a8` Hessians from int8 per-token activations instead of full-precision ones; "
            "`gptaq` asymmetric calibration (GPTAQ): each linear's target is the full-precision model's output on its own "
            "full-precision inputs, GPTQ of W' = W + 0.5·W(C − H)(H + λI)⁻¹ with C = 2X_fpᵀX̃/n (`GPTQConfig.asymmetric` 0.5). "
            f"GPTQ wall time per model, {results['jobs']} models at a time on the {results['device_name']} (so each waits for the "
            f"others): {wall_times(results)}.")


def wall_times(results: dict) -> str:
    spans = []
    for method in results["methods"]:
        seconds = [r["gptq"]["seconds"] for k, r in results["rows"].items() if k.endswith(f"/{method}") and "gptq" in r]
        if seconds and METHODS[method].get("method", "gptq") == "gptq":
            spans.append(f"`{method}` {min(seconds):.0f}–{max(seconds):.0f} s")
    return ", ".join(spans)


def default_method() -> str:
    """The column measured with GPTQConfig's defaults (what spinquant.eval --w-gptq and export --gptq run)."""
    defaults = GPTQConfig()
    return next(m for m, c in METHODS.items() if c is not None and dataclasses.replace(defaults, **c) == defaults)


def beats_rtn(rows: dict, rotations: list[str], method: str) -> bool:
    """Below round to nearest with float32 and with bf16 scales, for every rotation."""
    return all(rows[f"{r}/{method}"]["w4a8"] < min(rows[f"{r}/rtn"]["w4a8"], rows[f"{r}/rtn-bf16"]["w4a8"]) for r in rotations)


def findings(results: dict) -> list[str]:
    """The issue's bars and the unrotated model's case, read off the rows."""
    rows, rotations = results["rows"], results["rotations"]
    fp = rows["fp"]["fp"]
    gptq = [m for m in results["methods"] if METHODS[m] is not None and METHODS[m].get("method", "gptq") == "gptq"
            and all(f"{r}/{m}" in rows for r in rotations)]
    has_rtn = all(f"{r}/{rtn}" in rows for r in rotations for rtn in ("rtn", "rtn-bf16"))
    winners = [m for m in gptq if has_rtn and beats_rtn(rows, rotations, m)]
    out = [
        f"GPTQ methods below RTN (float32 and bf16 scales) for every rotation at W4A8: "
        f"{(', '.join(f'`{m}`' for m in winners) or 'none') if has_rtn else 'RTN not measured'}; "
        f"the default (`GPTQConfig()`, what `spinquant.eval --w-gptq` and `export.to_pte --gptq` run) is `{default_method()}`.",
    ]
    if gptq:  # a table of round-to-nearest methods alone has no best GPTQ
        best = min(((r, m) for r in rotations for m in gptq), key=lambda c: rows[f"{c[0]}/{c[1]}"]["w4a8"])
        best_ppl = rows[f"{best[0]}/{best[1]}"]["w4a8"]
        out.append(f"Best fake-quant W4A8: {best[0]} with `{best[1]}`, {best_ppl:.2f}, {best_ppl / fp - 1:+.1%} from full precision "
                   f"{fp:.2f} (bar: within 5%, {fp * 1.05:.2f}): {'met' if best_ppl <= fp * 1.05 else 'NOT met'}.")
    pairs = [(r, rows[f"{r}/rtn"]["w4a8"], rows[f"{r}/rtn-bf16"]["w4a8"]) for r in rotations if f"{r}/rtn-bf16" in rows and f"{r}/rtn" in rows]
    if pairs:
        out.append("RTN with the export's bf16 scales against float32 scales: "
                   + ", ".join(f"{r} {bf:.2f} vs {fp32:.2f} ({bf / fp32 - 1:+.1%})" for r, fp32, bf in pairs)
                   + ": the scale dtype alone moves RTN either way, so GPTQ is held to the lower of the two.")
    plain, rtn = rows.get("none/gptq"), rows.get("none/rtn")
    if plain and rtn:
        loses = [q for q in FAKE_QUANT if plain[q] >= rtn[q]]
        out.append(
            f"No rotation, plain GPTQ against RTN: {plain['w4a16']:.2f} vs {rtn['w4a16']:.2f} at W4A16 and {plain['w4a8']:.2f} vs "
            f"{rtn['w4a8']:.2f} at W4A8; it loses at {' and '.join(q.upper() for q in loses) or 'neither'}. "
            + ("Losing without activation quantization too, it is the weights' own rounding, not the int8 activations."
               if "w4a16" in loses else "").strip())
    programs = [(r, m, row["pte_perplexity"]) for m, pte in pte_parts(results).items() for r, row in pte["rows"].items()]
    if programs:
        r, m, ppl = min(programs, key=lambda p: p[2])
        out.append(f"Best .pte: {r} with `{m}`, {ppl:.2f}, {ppl / fp - 1:+.1%} from full precision "
                   f"(bar {fp * 1.05:.2f}): {'met' if ppl <= fp * 1.05 else 'NOT met'}.")
    return [f"- {line}" for line in out]


def provenance(results: dict) -> list[str]:
    """Which cells this command measured and which it kept from earlier runs of the script (the json is resumable)."""
    if not results.get("earlier_runs"):
        return []
    def cells(keys: list[str]) -> str:
        return ", ".join(f"`{k}`" for k in keys)
    lines = [f"This command measured {cells(results.get('measured', []))}; the other cells were kept from the json of earlier runs:"]
    for run in results["earlier_runs"]:
        lines.append(f"`{run['command']}` on the {run['device_name']} ({run['environment']}): {cells(run['cells'])}.")
    return [" ".join(lines), ""]


def markdown(results: dict) -> str:
    fp = results["rows"]["fp"]["fp"]
    learned = ", ".join(f"`{name}` = `{path}`" for name, path in results["learned"].items())
    return "\n".join([
        "# GPTQ against round-to-nearest on SmolLM2-135M-Instruct, int4 weights group 32",
        "",
        f"Command: `{results['command']}`",
        "",
        *provenance(results),
        f"Evaluation: `{results['text']}` (sha256 `{results['text_sha256'][:16]}…`), {windows_phrase(results)} "
        f"of {results['seqlen']} tokens. Fake-quant machine and libraries: {results['environment']}.",
        "",
        f"Full precision: {fp:.2f}. Rotations: `none`, `hadamard` (random Hadamard R1/R2 + R4, seed 0), {learned}. "
        "Weights int4 symmetric, group 32; embedding and lm_head in float.",
        "",
        f"## W4A8 (int8 asymmetric per-token activations), fake quantization on the {results['device_name']}",
        "",
        *table(results, "w4a8"),
        "",
        f"## W4A16 (the same weights, activations in float), on the {results['device_name']}",
        "",
        *table(results, "w4a16"),
        "",
        gptq_line(results),
        "",
        *(["## The exported programs", "", *pte_tables(results)] if pte_parts(results) else []),
        "## What the tables show",
        "",
        *findings(results),
    ]) + "\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--learned", action="append", help=f"NAME=FILE, a learned rotation (default {DEFAULT_LEARNED})")
    p.add_argument("--rotations", nargs="+", help="default: none, hadamard and every --learned")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--text", type=Path, default=evaluation_text())
    p.add_argument("--calib-text", type=Path, default=calibration_text())
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--first-window", type=int, default=0, help="0-based index of the first evaluation window (default 0)")
    p.add_argument("--gptq-windows", type=int, default=128)
    p.add_argument("--jobs", type=int, default=1, help="cells measured at a time, each in its own process")
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way; TF32 stays off)")
    p.add_argument("--save-gptq", type=Path, help="folder: every GPTQ result as ROTATION_METHOD.pt, for export.to_pte --gptq-file")
    p.add_argument("--output", type=Path, default=Path("results/gptq_smollm2"))
    p.add_argument("--render", action="store_true", help="only rewrite the Markdown from the json (after a change of GPTQConfig's default)")
    args = p.parse_args()
    args.learned = args.learned or [DEFAULT_LEARNED]
    args.rotations = args.rotations or list(rotation_specs(args))
    return args


def main() -> None:
    args = parse_args()
    if args.render:
        results = json.loads(args.output.with_suffix(".json").read_text())
        write_atomic(args.output.with_suffix(".md"), markdown(results).encode())
        return
    text = read_text(args.text)
    for spec in rotation_specs(args).values():
        refuse_calibration_text(args.text, text_sha256(text), calibration_hashes(spec, args.calib_text))
    load_model(args.model)  # the demo's one-time conversion, before the processes would race for it
    if args.save_gptq:
        args.save_gptq.mkdir(parents=True, exist_ok=True)
    json_path = args.output.with_suffix(".json")
    results = json.loads(json_path.read_text()) if json_path.exists() else {"rows": {}}
    for key in ("first_window", "max_windows"):  # resumed cells must be measured on the same windows
        if results["rows"] and results.get(key, 0 if key == "first_window" else None) != getattr(args, key):
            sys.exit(f"{json_path} was measured with --{key.replace('_', '-')} {results.get(key, 0)}; "
                     f"resume it with the same, or write another --output")
    if "command" in results:  # resuming: the cells kept come from the earlier runs, recorded as such
        results.setdefault("earlier_runs", []).append(
            {k: results[k] for k in ("command", "device_name", "environment")} | {"cells": results.pop("measured", sorted(results["rows"]))})
    kept = set(results["rows"])
    results.update(
        model=args.model, text=os.path.relpath(args.text), text_sha256=text_sha256(text), seqlen=args.seqlen, max_windows=args.max_windows,
        first_window=args.first_window,
        rotations=args.rotations, methods=args.methods, learned=dict(pair.partition("=")[::2] for pair in args.learned),
        device=args.device, device_name=torch.cuda.get_device_name() if args.device == "cuda" else "CPU", jobs=args.jobs,
        environment=environment_line(), command="python scripts/gptq_table.py " + " ".join(sys.argv[1:]),
    )
    def save(rows: dict) -> None:
        results["measured"] = sorted(set(rows) - kept)
        write_json_atomic(json_path, results)
    measure_all(args, text, results["rows"], save)
    save(results["rows"])
    write_atomic(args.output.with_suffix(".md"), markdown(results).encode())
    print(args.output.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
