"""The export table: the demo model exported per rotation, then measured by running the .pte itself.

    python scripts/export_table.py --max-windows 16

For each rotation: `python -m export.to_pte` in a fresh process (its report gives size, time and
peak memory), the greedy completion of a fixed prompt, and perplexity of the program on the
evaluation text (prefill in chunks), beside fake quantization of the same rotation on the same windows here:
in the export's exact setting (`w4a8-export`: 8-bit embedding and lm_head, bf16 group scales) and in
the foundation's W4A8 (decoder linears only).
Writes results/export_smollm2.json (resumable) and results/export_smollm2.md.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from pte_tables import full_logits_export, resumed_results
from transformers import AutoTokenizer

from export.verify import PROMPT
from runner.generate import generate
from runner.pte import PteProgram
from spinquant.data import evaluation_text, read_text, token_windows
from spinquant.environment import describe_environment, environment_line
from spinquant.eval import evaluate
from spinquant.files import write_atomic, write_json_atomic
from spinquant.metrics import perplexity_of
from spinquant.quant import setting
from spinquant.rotation import LEARNED_ROTATIONS

ROTATIONS = ("none", "r4", "hadamard", "learned")
RESULTS = Path(__file__).resolve().parents[1] / "results"


def rotation_spec(model: str, rotation: str) -> str:
    """`learned` is the rotation file committed for the model (results/learned_rotation_smollm2.md)."""
    return str(LEARNED_ROTATIONS[model]) if rotation == "learned" else rotation


def measure(model: str, rotation: str, out: Path, text: str, max_windows: int) -> dict:
    rotation = rotation_spec(model, rotation)
    report, wall = full_logits_export(out, "--model", model, "--rotation", rotation)
    program = PteProgram(out / "model.pte")
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    completion = tokenizer.decode(generate(program, prompt, 16)[0])
    windows = token_windows(tokenizer, text, 2048, max_windows)
    return dict(
        rotation=rotation, pte_mib=report["pte_bytes"] / 2**20, export_seconds=report["export_seconds"],
        stage_seconds=report["stage_seconds"], wall_seconds=round(wall, 1),
        peak_rss_mb=report["peak_rss_mb"], verify=report["verify"], completion=completion,
        pte_perplexity=perplexity_of(program.prefill_logits, windows),
        fake_quant_perplexity=evaluate(model, rotation, setting("w4a8-export"), lambda _: windows),
        fake_quant_decoder_only_perplexity=evaluate(model, rotation, setting("w4a8"), lambda _: windows),
    )


def markdown(results: dict, command: str) -> str:
    lines = [
        "# SmolLM2-135M-Instruct exported to ExecuTorch: size, time, memory, and the .pte's own perplexity",
        "",
        f"Command: `{command}`",
        "",
        f"Machine and libraries: {results['environment']}. Every number here is from this machine's CPU.",
        "",
        "Each row: `python -m export.to_pte --rotation R` with the defaults (8da4w group 32 decoder linears with "
        "bf16 group scales, 8-bit per-channel embedding, 8da8w lm_head, KV cache of 2048, XNNPACK). Perplexity of "
        f"the .pte on the first {results['max_windows']} windows of 2048 tokens of `{results['text']}` "
        f"(sha256 `{results['text_sha256'][:16]}…`), computed by running the program (prefill in chunks of 256); "
        "the fake-quant columns are `spinquant.eval`'s numbers for the same rotation on the same windows and machine: "
        "`--quant w4a8-export` is the export's own setting (8da4w g32 with bf16 scales, 8da8w lm_head, 8-bit embedding), "
        "`--quant w4a8` the foundation's (decoder linears only, embedding and lm_head float).",
        "",
        "| rotation | .pte MiB | export s | peak RSS MB | verify: mean KL, top-1 | .pte perplexity | fake-quant w4a8-export | Δ | fake-quant w4a8 (decoder only) | greedy completion of \"" + PROMPT + "\" |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rotation in ROTATIONS:
        if rotation not in results["rows"]:
            continue
        r = results["rows"][rotation]
        fq = r["fake_quant_perplexity"]
        lines.append(
            f"| {rotation} | {r['pte_mib']:.1f} | {r['export_seconds']:.0f} | {r['peak_rss_mb']} | "
            f"{r['verify']['mean_kl']:.3g}, {r['verify']['top1_agreement']:.0%} | {r['pte_perplexity']:.2f} | {fq:.2f} | {r['pte_perplexity'] / fq - 1:+.2%} | "
            f"{r['fake_quant_decoder_only_perplexity']:.2f} | "
            f"{r['completion'].strip()!r} |"
        )
    learned = results["rows"].get("learned", {}).get("rotation", "spinquant/rotations/smollm2_w4a8.pt")
    lines += ["", "`learned` is `" + os.path.relpath(learned) + "`, "
              "the rotation learned for W4A8 (results/learned_rotation_smollm2.md), the default of `python -m export.to_pte` for this model."]
    lines += ["", "Where the export time goes (seconds per stage, from each export's report; wall-clock, so other jobs "
              "sharing the 2 cores lengthen them):", ""]
    stages = list(next(iter(results["rows"].values()))["stage_seconds"]) if results["rows"] else []
    lines += ["| rotation | " + " | ".join(stages) + " | wall incl. process start |", "|---" * (len(stages) + 2) + "|"]
    for rotation, r in ((k, results["rows"][k]) for k in ROTATIONS if k in results["rows"]):
        lines.append(f"| {rotation} | " + " | ".join(f"{r['stage_seconds'][k]:.0f}" for k in stages) + f" | {r['wall_seconds']:.0f} |")
    lines += ["", "## What the table shows", ""] + [f"- {line}" for line in findings(results["rows"])]
    return "\n".join(lines) + "\n"


def gpu_fake_quant() -> dict[str, float]:
    """The foundation's and the learned-rotation table's W4A8 numbers for the same windows, measured on an H200."""
    found = {}
    for path, key in ((RESULTS / "ppl_smollm2.json", "w4a8/{}"), (RESULTS / "learned_rotation_smollm2.json", "w4a8/{}")):
        if path.is_file():
            rows = json.loads(path.read_text())["rows"]
            found.update({r: rows[key.format(r)]["perplexity"] for r in ROTATIONS if key.format(r) in rows})
    return found


def findings(rows: dict) -> list[str]:
    """The issue's bars, stated as measured."""
    out = []
    for rotation, r in ((k, rows[k]) for k in ROTATIONS if k in rows):
        gap = r["pte_perplexity"] / r["fake_quant_perplexity"] - 1
        verdict = "within" if abs(gap) <= 0.01 else "NOT within"
        out.append(f"{rotation}: the .pte's perplexity {r['pte_perplexity']:.2f} is {verdict} 1% of fake-quant in the same setting {r['fake_quant_perplexity']:.2f} ({gap:+.2%}).")
    for rotation, gpu in gpu_fake_quant().items():
        if rotation in rows:
            here = rows[rotation]["fake_quant_decoder_only_perplexity"]
            out.append(f"{rotation}: the same fake-quant W4A8 on the H200 gave {gpu:.2f} against {here:.2f} on this CPU ({here / gpu - 1:+.2%}): "
                       "the same code on another device (and torch version) moves this model's quantized perplexity by that much.")
    if "r4" in rows and "none" in rows:
        r4, none = rows["r4"]["pte_perplexity"], rows["none"]["pte_perplexity"]
        out.append(f"r4 .pte {r4:.2f} against unrotated .pte {none:.2f}: r4 is {'no worse' if r4 <= none else 'WORSE'}.")
    if "learned" in rows:
        best = min(rows, key=lambda k: rows[k]["pte_perplexity"])
        out.append(f"Best .pte: {best} ({rows[best]['pte_perplexity']:.2f}).")
    slowest = max((r["export_seconds"] for r in rows.values()), default=0)
    out.append(f"Slowest export {slowest:.0f} s (load to .pte, without the check); the bar is 180 s.")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", type=Path, default=evaluation_text())
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--rotations", nargs="+", default=list(ROTATIONS), choices=ROTATIONS)
    p.add_argument("--work-dir", type=Path, default=Path("out/export_table"))
    p.add_argument("--output", type=Path, default=Path("results/export_smollm2"))
    args = p.parse_args()
    text = read_text(args.text)
    json_path = args.output.with_suffix(".json")
    results = resumed_results(json_path, args.text, text, args.max_windows)
    results.update(environment=environment_line(), environment_detail=describe_environment())
    command = ("python scripts/export_table.py " + " ".join(sys.argv[1:])).strip()
    for rotation in args.rotations:
        if rotation not in results["rows"]:
            results["rows"][rotation] = measure(args.model, rotation, args.work_dir / rotation, text, args.max_windows)
            write_json_atomic(json_path, results)
        write_atomic(args.output.with_suffix(".md"), markdown(results, command).encode())


if __name__ == "__main__":
    main()
