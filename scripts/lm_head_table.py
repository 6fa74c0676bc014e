"""What a 4-bit lm_head costs in quality: the .pte's perplexity with an 8da8w lm_head against the 8da4w one,
with round-to-nearest weights and with GPTQ's (which quantizes the 8da4w lm_head too).

    python scripts/lm_head_table.py --device cuda --skip-programs   # fake quantization, on a GPU
    python scripts/lm_head_table.py                                 # the programs, on this CPU

Each program is `python -m export.to_pte --full-logits --lm-head L --gptq|--no-gptq` in a fresh process (every other
option at its default: the learned rotation, GPTQ on 8 windows of 1,024 tokens of the packaged calibration text, on this
CPU), run on the first `--max-windows` windows of 2048 tokens of the evaluation text (prefill in chunks, as
scripts/export_table.py measures a program). Beside each program, `spinquant.eval`'s fake quantization of the same
setting (`w4a8-export-kv8`, the lm_head 4-bit in groups of 32 for 8da4w, the export's GPTQ request for the GPTQ rows).
Each part is kept with the device it ran on. Writes results/lm_head_4bit.json (resumable: rows and parts already there
are kept) and results/lm_head_4bit.md.
"""

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

import torch
from pte_tables import full_logits_export, resumed_results
from transformers import AutoTokenizer

from export.options import ExportOptions
from spinquant.data import evaluation_text, read_text, token_windows
from spinquant.environment import environment_line
from spinquant.eval import evaluate
from spinquant.files import write_atomic, write_json_atomic
from spinquant.metrics import perplexity_of
from spinquant.quant import setting
from spinquant.rotation import LEARNED_ROTATIONS

# Row name -> (lm_head scheme, GPTQ decoder weights or not); RTN rows first: they are quick.
ROWS = {
    "8da8w lm_head, RTN": ("8da8w", False),
    "8da4w lm_head, RTN": ("8da4w", False),
    "8da8w lm_head, GPTQ": ("8da8w", True),
    "8da4w lm_head, GPTQ (the default)": ("8da4w", True),
}


def fake_quant(name: str, text: str, max_windows: int, device: str) -> dict:
    """The row's setting in fake quantization: the export's default (`w4a8-export-kv8`), its lm_head and decoder weights."""
    lm_head, gptq = ROWS[name]
    qc = setting("w4a8-export-kv8", **(dict(lm_head_bits=4, lm_head_group=32) if lm_head == "8da4w" else {}))
    windows_of = lambda tokenizer: token_windows(tokenizer, text, 2048, max_windows)  # noqa: E731
    request = ExportOptions(lm_head=lm_head, gptq=gptq).check().gptq_request()
    ppl = evaluate("smollm2-135m", str(LEARNED_ROTATIONS["smollm2-135m"]), qc, windows_of, device=device, gptq=request)
    return dict(fake_quant_perplexity=ppl, fake_quant_device=torch.cuda.get_device_name() if device.startswith("cuda") else "this CPU",
                setting=dataclasses.asdict(qc))


def measure(lm_head: str, gptq: bool, out: Path, text: str, max_windows: int) -> dict:
    from runner.pte import PteProgram  # ExecuTorch's runtime: not on a GPU machine that runs the fake quantization alone

    report, _ = full_logits_export(out, "--lm-head", lm_head, "--gptq" if gptq else "--no-gptq")
    windows = token_windows(AutoTokenizer.from_pretrained(out), text, 2048, max_windows)
    return dict(
        lm_head=lm_head, gptq=report["gptq"], pte_perplexity=perplexity_of(PteProgram(out / "model.pte").prefill_logits, windows),
        pte_mib=report["pte_bytes"] / 2**20, lm_head_mb=report["parts"]["lm_head"] / 1e6, verify=report["verify"],
        rotation=report["options"]["rotation"],
    )


def markdown(results: dict, command: str) -> str:
    rows = results["rows"]
    lines = [
        "# A 4-bit lm_head: what it costs in perplexity",
        "",
        f"Commands: {command}",
        "",
        f"Machine and libraries: {results['environment']}.",
        "",
        "Each row: `python -m export.to_pte --full-logits --lm-head L --gptq|--no-gptq` with every other option "
        f"at its default (learned rotation, 8da4w g32 decoder linears, 8-bit embedding, int8 KV cache). Perplexity of the .pte on the first "
        f"{results['max_windows']} windows of 2048 tokens of `{results['text']}` (sha256 `{results['text_sha256'][:16]}…`), "
        "computed by running the program (prefill in chunks). GPTQ: the export's own, on this CPU (8 windows of 1,024 tokens "
        "of the packaged calibration text); with the 8da4w lm_head it quantizes the lm_head too, the 8da8w one is rounded "
        "to nearest. lm_head MB: the lm_head's quantized weights as the export reports them (int4 values held in int8 "
        "before XNNPACK packs them).",
        "",
        "Fake quantization: `spinquant.eval` in the same setting on the same windows, on "
        + (", ".join(sorted({r["fake_quant_device"] for r in rows.values() if "fake_quant_device" in r})) or "no device yet") + ".",
        "",
        "| program | .pte perplexity | fake-quant perplexity | vs 8da8w lm_head, same decoder weights (.pte; fake quant) | .pte MiB | lm_head MB | verify: mean KL, top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in ((n, rows[n]) for n in ROWS if n in rows):
        base = rows.get(name.replace("8da4w", "8da8w").replace(" (the default)", ""), {})
        changes = [f"{r[k] / base[k] - 1:+.2%}" if base is not r and k in r and k in base else "—" for k in ("pte_perplexity", "fake_quant_perplexity")]
        pte = (f"{r['pte_perplexity']:.2f}", f"{r['pte_mib']:.1f}", f"{r['lm_head_mb']:.1f}",
               f"{r['verify']['mean_kl']:.3g}, {r['verify']['top1_agreement']:.0%}") if "pte_perplexity" in r else ("not measured",) + ("—",) * 3
        fake = f"{r['fake_quant_perplexity']:.2f}" if "fake_quant_perplexity" in r else "—"
        lines.append(f"| {name} | {pte[0]} | {fake} | {'; '.join(changes)} | {pte[1]} | {pte[2]} | {pte[3]} |")
    missing = [n for n in ROWS if "pte_perplexity" not in rows.get(n, {})]
    if missing:
        lines += ["", f"Programs not measured yet: {', '.join(missing)} (the command above with `--rows` naming them adds them)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", type=Path, default=evaluation_text())
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="which programs to measure (default all)")
    p.add_argument("--work-dir", type=Path, default=Path("out/lm_head"))
    p.add_argument("--output", type=Path, default=Path("results/lm_head_4bit"))
    p.add_argument("--device", default="cpu", help="where fake quantization runs (the programs run on this CPU)")
    p.add_argument("--skip-programs", action="store_true", help="fake quantization only (on a machine without ExecuTorch's runtime)")
    args = p.parse_args()
    text = read_text(args.text)
    json_path = args.output.with_suffix(".json")
    results = resumed_results(json_path, args.text, text, args.max_windows)
    if not args.skip_programs:
        results.update(environment=environment_line())
    command = shlex.join(["python", "scripts/lm_head_table.py", *sys.argv[1:]])
    results["commands"] = list(dict.fromkeys([*results.get("commands", []), command]))
    for name in args.rows:
        row = results["rows"].setdefault(name, {})
        if "fake_quant_perplexity" not in row:
            row.update(fake_quant(name, text, args.max_windows, args.device))
            write_json_atomic(json_path, results)
        lm_head, gptq = ROWS[name]
        if "pte_perplexity" not in row and not args.skip_programs:
            row.update(measure(lm_head, gptq, args.work_dir / name.replace(", ", "_").replace(" ", "_"), text, args.max_windows))
            print(f"{name}: .pte perplexity {row['pte_perplexity']:.3f}", file=sys.stderr, flush=True)
            write_json_atomic(json_path, results)
    write_atomic(args.output.with_suffix(".md"), markdown(results, ", then ".join(f"`{c}`" for c in results["commands"])).encode())


if __name__ == "__main__":
    main()
