"""What a 4-bit lm_head costs in quality: the .pte's perplexity with the default 8da8w lm_head against
`--lm-head 8da4w`, with round-to-nearest and with GPTQ decoder weights.

    python scripts/lm_head_table.py

Each program is `python -m export.to_pte --full-logits [--lm-head 8da4w] [--gptq-file FILE]` in a fresh
process (the default rotation: the learned one), run on the first `--max-windows` windows of 2048 tokens
of the evaluation text (prefill in chunks, as scripts/export_table.py measures a program). GPTQ
(spinquant/gptq.py) quantizes the decoder's linears only and leaves the lm_head to round-to-nearest, so
one GPTQ result serves both lm_heads: it is made once, as `export.to_pte --gptq` makes it (GPTQConfig()
on the packaged calibration text, on this CPU), saved beside the programs and given to both GPTQ exports.
Writes results/lm_head_4bit.json (resumable: rows already there are kept) and results/lm_head_4bit.md.
"""

import argparse
import shlex
import sys
from pathlib import Path

from pte_tables import full_logits_export, resumed_results
from transformers import AutoTokenizer

from export.options import ExportOptions
from runner.pte import PteProgram
from spinquant.data import evaluation_text, read_text, token_windows
from spinquant.environment import environment_line
from spinquant.files import write_atomic, write_json_atomic
from spinquant.metrics import perplexity_of
from spinquant.models import load_model
from spinquant.pipeline import prepare

# Row name -> (lm_head scheme, GPTQ decoder weights or not); RTN rows first: they are quick.
ROWS = {
    "8da8w lm_head, RTN": ("8da8w", False),
    "8da4w lm_head, RTN": ("8da4w", False),
    "8da8w lm_head, GPTQ": ("8da8w", True),
    "8da4w lm_head, GPTQ": ("8da4w", True),
}


def make_gptq_file(path: Path) -> dict:
    """GPTQ exactly as `export.to_pte --gptq` runs it for the default export, saved for --gptq-file."""
    opts = ExportOptions(gptq=True).check()
    loaded = load_model(opts.model, None)
    model = prepare(loaded.model, opts.rotation, opts.program_quant(), opts.gptq_request(), tokenizer=loaded.tokenizer,
                    calib_text=opts.calib_text, seed=opts.seed)
    model.spinquant.gptq.save(path)
    return dict(file=str(path), **model.spinquant.gptq.describe())


def measure(lm_head: str, gptq_file: Path | None, out: Path, text: str, max_windows: int) -> dict:
    report, _ = full_logits_export(out, "--lm-head", lm_head, *(["--gptq-file", str(gptq_file)] if gptq_file else []))
    windows = token_windows(AutoTokenizer.from_pretrained(out), text, 2048, max_windows)
    return dict(
        lm_head=lm_head, gptq_file=str(gptq_file) if gptq_file else None, pte_perplexity=perplexity_of(PteProgram(out / "model.pte").prefill_logits, windows),
        pte_mib=report["pte_bytes"] / 2**20, lm_head_mb=report["parts"]["lm_head"] / 1e6, verify=report["verify"],
        rotation=report["options"]["rotation"],
    )


def markdown(results: dict, command: str) -> str:
    rows = results["rows"]
    lines = [
        "# A 4-bit lm_head: what it costs in perplexity",
        "",
        f"Command: `{command}`",
        "",
        f"Machine and libraries: {results['environment']}.",
        "",
        "Each row: `python -m export.to_pte --full-logits --lm-head L [--gptq-file FILE]` with every other option "
        f"at its default (learned rotation, 8da4w g32 decoder linears, 8-bit embedding). Perplexity of the .pte on the first "
        f"{results['max_windows']} windows of 2048 tokens of `{results['text']}` (sha256 `{results['text_sha256'][:16]}…`), "
        "computed by running the program (prefill in chunks). GPTQ covers the decoder's linears only "
        "(`spinquant/gptq.py` skips the lm_head): in the GPTQ rows the lm_head is round-to-nearest too, and both "
        f"take the same GPTQ integers ({gptq_line(results.get('gptq'))}). lm_head MB: the lm_head's quantized weights "
        "as the export reports them (int4 values held in int8 before XNNPACK packs them).",
        "",
        "| program | .pte perplexity | vs 8da8w lm_head, same decoder weights | .pte MiB | lm_head MB | verify: mean KL, top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in ((n, rows[n]) for n in ROWS if n in rows):
        base = rows.get(name.replace("8da4w", "8da8w"))
        change = f"{r['pte_perplexity'] / base['pte_perplexity'] - 1:+.2%}" if base and base is not r else "—"
        lines.append(f"| {name} | {r['pte_perplexity']:.2f} | {change} | {r['pte_mib']:.1f} | {r['lm_head_mb']:.1f} | "
                     f"{r['verify']['mean_kl']:.3g}, {r['verify']['top1_agreement']:.0%} |")
    missing = [n for n in ROWS if n not in rows]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)} (the command above with `--rows` naming them adds them)."]
    return "\n".join(lines) + "\n"


def gptq_line(gptq: dict | None) -> str:
    if not gptq:
        return "not made yet"
    return (f"`GPTQConfig()` on `{gptq['calibration']}`, {gptq['windows']} windows, "
            f"{gptq['linears']} linears, {gptq['seconds']:.0f} s on this CPU")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", type=Path, default=evaluation_text())
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="which programs to measure (default all)")
    p.add_argument("--work-dir", type=Path, default=Path("out/lm_head"))
    p.add_argument("--output", type=Path, default=Path("results/lm_head_4bit"))
    args = p.parse_args()
    text = read_text(args.text)
    json_path = args.output.with_suffix(".json")
    results = resumed_results(json_path, args.text, text, args.max_windows)
    results.update(environment=environment_line())
    command = shlex.join(["python", "scripts/lm_head_table.py", *sys.argv[1:]])
    gptq_file = args.work_dir / "gptq.pt"
    for name in (n for n in args.rows if n not in results["rows"]):
        lm_head, gptq = ROWS[name]
        if gptq and not gptq_file.is_file():
            results["gptq"] = make_gptq_file(gptq_file)
        results["rows"][name] = measure(lm_head, gptq_file if gptq else None, args.work_dir / name.replace(", ", "_").replace(" ", "_"), text, args.max_windows)
        print(f"{name}: .pte perplexity {results['rows'][name]['pte_perplexity']:.3f}", file=sys.stderr, flush=True)
        write_json_atomic(json_path, results)
    write_atomic(args.output.with_suffix(".md"), markdown(results, command).encode())


if __name__ == "__main__":
    main()
