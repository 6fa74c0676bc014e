"""The KV-cache table: the demo model's program with a float32 and an int8 KV cache, with and without R3.

    python scripts/kv_cache_table.py --device cuda --skip-programs   # fake quantization, on a GPU
    python scripts/kv_cache_table.py                                 # the programs, on this CPU

Each program row: `python -m export.to_pte --kv-cache K [--no-r3] --full-logits` (learned rotation, the rest default)
in a fresh process, its KV cache bytes (export_report.json), and its perplexity on the evaluation text (prefill in
chunks), beside `spinquant.eval`'s fake quantization of the same setting on the same windows: `w4a8-export`, and
with the int8 cache `w4a8-export-kv8` (keys and values symmetric int8, one scale per token and head).
The program's attention kernel reads float32 or int8 rows, so the 4-bit rows are fake quantization alone.
Fake quantization of 16 windows of 2,048 tokens takes minutes a row on a 2-core CPU and seconds on a GPU: each part
is kept in results/kv_cache_smollm2.json with the device it ran on, and a run measures only what is missing.
Writes results/kv_cache_smollm2.json and results/kv_cache_smollm2.md.
"""

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from pte_tables import full_logits_export, resumed_results
from transformers import AutoTokenizer

from spinquant.data import evaluation_text, read_text, token_windows
from spinquant.environment import describe_environment, environment_line
from spinquant.eval import evaluate
from spinquant.files import write_atomic, write_json_atomic
from spinquant.metrics import perplexity_of
from spinquant.quant import QuantConfig, setting
from spinquant.rotation import LEARNED_ROTATIONS

ROOT = Path(__file__).resolve().parents[1]
PROFILE_PROMPT, PROFILE_STEPS = 128, 16
# name: (export flags or None for fake quantization alone, fake-quant setting)
ROWS: dict[str, tuple[list[str] | None, QuantConfig]] = {
    "fp32 KV": (["--kv-cache", "fp32"], setting("w4a8-export")),
    "int8 KV, R3": (["--kv-cache", "int8"], setting("w4a8-export-kv8")),
    "int8 KV, no R3": (["--kv-cache", "int8", "--no-r3"], setting("w4a8-export-kv8", r3=False)),
    "int4 K/V, R3": (None, setting("w4a8-export-kv8", k_bits=4, v_bits=4)),
    "int4 K/V, no R3": (None, setting("w4a8-export-kv8", k_bits=4, v_bits=4, r3=False)),
    "int4 K, int8 V, R3": (None, setting("w4a8-export-kv8", k_bits=4)),
    "int4 K, int8 V, no R3": (None, setting("w4a8-export-kv8", k_bits=4, r3=False)),
}


def fake_quant(model: str, name: str, text: str, max_windows: int, device: str) -> dict:
    qc = ROWS[name][1]
    windows_of = lambda tokenizer: token_windows(tokenizer, text, 2048, max_windows)  # noqa: E731
    ppl = evaluate(model, str(LEARNED_ROTATIONS[model]), qc, windows_of, device=device)
    return dict(fake_quant_perplexity=ppl, fake_quant_device=device_name(device), setting=dataclasses.asdict(qc))


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "this CPU"


def program_dir(work_dir: Path, name: str) -> Path:
    return work_dir / name.replace(" ", "_").replace(",", "")


def program(model: str, name: str, work_dir: Path, text: str, max_windows: int) -> dict:
    from runner.pte import PteProgram  # ExecuTorch's runtime: not on a GPU machine that runs the fake quantization alone

    out = program_dir(work_dir, name)
    report, _ = full_logits_export(out, "--model", model, *ROWS[name][0])
    pte, windows = PteProgram(out / "model.pte"), token_windows(AutoTokenizer.from_pretrained(out), text, 2048, max_windows)
    return dict(kv_cache_bytes=report["memory_plan_parts"]["kv_cache"], planned_memory_bytes=report["planned_memory_bytes"]["forward"],
                verify=report["verify"], pte_perplexity=perplexity_of(pte.prefill_logits, windows))


def decode_profile(pte: Path, prompt: list[int]) -> dict:
    """benchmarks/decode_profile.py's ETDump of PROFILE_STEPS decode steps after `prompt`, one thread, in a process of its
    own: the step's milliseconds, and the attention's and the online Hadamard's (R4 and R3) inside it."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps(dict(path=str(pte), prompt_ids=prompt, steps=PROFILE_STEPS, threads=1)))
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_profile.py"), str(spec), str(result)], check=True)
        times = json.loads(result.read_text())
    ms = lambda *names: sum(o["ms"] for o in times["operators"] if o["operator"] in names)  # noqa: E731
    return dict(step_ms=times["step_ms"], sdpa_ms=ms("spinquant::attend_kv_cache.out"),
                hadamard_ms=ms("spinquant::hadamard_transform.out"), load_average=os.getloadavg()[0])


def kv_and_r3(name: str) -> tuple[str, str]:
    """A row's name as its two columns: "int4 K, int8 V, R3" → ("int4 K, int8 V", "R3"); "fp32 KV" → ("fp32 KV", "n/a")."""
    kv, _, r3 = name.rpartition(", ")
    return (kv, r3) if kv else (name, "n/a")


def markdown(results: dict, command: str) -> str:
    lines = [
        "# SmolLM2-135M-Instruct: the program's KV cache in float32 and int8, with and without R3",
        "",
        "Commands: " + ", then ".join(f"`{c}`" for c in results["commands"]),
        "",
        f"Machine and libraries of the programs' run: {results['environment']}; the programs ran on this CPU. "
        "Fake quantization ran on " + ", ".join(sorted({r['fake_quant_device'] for r in results['rows'].values() if 'fake_quant_device' in r})) + ".",
        "",
        "Each program row: `python -m export.to_pte --full-logits` with the learned rotation "
        "(`spinquant/rotations/smollm2_w4a8.pt`), the default quantization (8da4w g32, 8da8w lm_head, 8-bit embedding), "
        "a KV cache of 2048 positions and the KV options shown. Perplexity of the .pte on the first "
        f"{results['max_windows']} windows of 2048 tokens of `{results['text']}` (sha256 `{results['text_sha256'][:16]}…`), "
        "computed by running the program (prefill in chunks of 256); fake quantization is `spinquant.eval` on the same windows "
        "in the same setting: `w4a8-export`, and with int8 K/V `w4a8-export-kv8` (keys and values symmetric int8, max|x|/127, "
        "one scale per token and head, as the program's cache holds them; queries float32). The program's attention kernel "
        "reads float32 or int8 rows: the int4 rows are fake quantization alone (keys and values as shown, per token and head).",
        "",
        "| KV cache | R3 | KV cache bytes | planned memory bytes | verify: mean KL, top-1 | .pte perplexity | fake-quant perplexity | Δ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in ((n, results["rows"][n]) for n in ROWS if "fake_quant_perplexity" in results["rows"].get(n, {})):
        kv, r3 = kv_and_r3(name)
        fq = r["fake_quant_perplexity"]
        if "pte_perplexity" in r:
            v = r["verify"]
            program = (f"{r['kv_cache_bytes']:,} | {r['planned_memory_bytes']:,} | {v['mean_kl']:.3g}, {v['top1_agreement']:.0%} | "
                       f"{r['pte_perplexity']:.2f} | {fq:.2f} | {r['pte_perplexity'] / fq - 1:+.2%}")
        else:
            program = f"— | — | — | — | {fq:.2f} | —"
        lines.append(f"| {kv} | {r3} | {program} |")
    lines += ["", "## Where a decode step goes", "",
              f"ETDump of {PROFILE_STEPS} decode steps after a {PROFILE_PROMPT}-token prompt (the first window's tokens), one thread, "
              "each program in a process of its own (benchmarks/decode_profile.py; median step). The step's milliseconds move "
              "with other jobs on the machine (its 1-minute load average when each profile ended is shown); the shares within a step much less.", "",
              "| KV cache | R3 | step ms | attention ms | share | online Hadamard (R4, R3) ms | share | load average |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in ((n, results["rows"][n]) for n in ROWS if "decode_profile" in results["rows"].get(n, {})):
        kv, r3 = kv_and_r3(name)
        p = r["decode_profile"]
        lines.append(f"| {kv} | {r3} | {p['step_ms']:.1f} | {p['sdpa_ms']:.2f} | {p['sdpa_ms'] / p['step_ms']:.1%} | "
                     f"{p['hadamard_ms']:.3f} | {p['hadamard_ms'] / p['step_ms']:.2%} | {p['load_average']:.1f} |")
    lines += ["", "## What the table shows", ""] + [f"- {line}" for line in findings(results["rows"])]
    return "\n".join(lines) + "\n"


def findings(rows: dict) -> list[str]:
    """The issue's bars, stated as measured."""
    out = []
    base, r3 = (rows.get(k) for k in ("fp32 KV", "int8 KV, R3"))
    if base and r3 and "pte_perplexity" in base and "pte_perplexity" in r3:
        gap = r3["pte_perplexity"] / base["pte_perplexity"] - 1
        out.append(f"int8 KV with R3: .pte perplexity {r3['pte_perplexity']:.2f} against {base['pte_perplexity']:.2f} with a float32 "
                   f"cache ({gap:+.2%}; the bar is within 1%: {'met' if abs(gap) <= 0.01 else 'NOT met'}).")
        fq_gap = r3["pte_perplexity"] / r3["fake_quant_perplexity"] - 1
        out.append(f"int8 KV with R3: .pte against fake quantization of the same setting {fq_gap:+.2%} "
                   f"({'within' if abs(fq_gap) <= 0.01 else 'NOT within'} 1%).")
        out.append(f"KV cache bytes: {base['kv_cache_bytes']:,} float32 against {r3['kv_cache_bytes']:,} int8, "
                   f"{base['kv_cache_bytes'] / r3['kv_cache_bytes']:.2f}× smaller (64 int8 values and their float32 scale per "
                   "head row: 68 bytes against 256; 4× would leave no room for a scale).")
    if base and r3 and "decode_profile" in base and "decode_profile" in r3:
        sdpa, step = (r3["decode_profile"][k] / base["decode_profile"][k] for k in ("sdpa_ms", "step_ms"))
        out.append(f"A decode step with the int8 cache takes {step:.2f}× the float one's, its attention (spinquant::attend_kv_cache) "
                   f"{sdpa:.2f}×: the step reads the cache's rows from memory, and int8 rows are 3.8× fewer bytes.")
        out.append(f"The online Hadamard transforms (R4 and R3) take {r3['decode_profile']['hadamard_ms'] / r3['decode_profile']['step_ms']:.2%} "
                   "of the int8 program's decode step (the bar is 3%).")
    for bits in ("int8 KV", "int4 K/V", "int4 K, int8 V"):
        on, off = rows.get(f"{bits}, R3"), rows.get(f"{bits}, no R3")
        if on and off:
            key = "pte_perplexity" if "pte_perplexity" in on and "pte_perplexity" in off else "fake_quant_perplexity"
            out.append(f"{bits}: R3 {on[key]:.2f} against no R3 {off[key]:.2f} ({on[key] / off[key] - 1:+.2%}, "
                       f"{'.pte' if key == 'pte_perplexity' else 'fake quantization'}).")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", type=Path, default=evaluation_text())
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--device", default="cpu", help="where fake quantization runs (the programs run on this CPU)")
    p.add_argument("--skip-programs", action="store_true", help="fake quantization only (on a machine without ExecuTorch's runtime)")
    p.add_argument("--work-dir", type=Path, default=Path("out/kv_cache_table"))
    p.add_argument("--output", type=Path, default=Path("results/kv_cache_smollm2"))
    args = p.parse_args()
    text = read_text(args.text)
    json_path = args.output.with_suffix(".json")
    results = resumed_results(json_path, args.text, text, args.max_windows)
    command = shlex.join(["python", "scripts/kv_cache_table.py", *sys.argv[1:]])
    results["commands"] = list(dict.fromkeys([*results.get("commands", []), command]))
    if not args.skip_programs:
        results.update(environment=environment_line(), environment_detail=describe_environment())
    for name in args.rows:
        row = results["rows"].setdefault(name, {})
        if "fake_quant_perplexity" not in row:
            row.update(fake_quant(args.model, name, text, args.max_windows, args.device))
            write_json_atomic(json_path, results)
        if ROWS[name][0] is not None and "pte_perplexity" not in row and not args.skip_programs:
            row.update(program(args.model, name, args.work_dir, text, args.max_windows))
            write_json_atomic(json_path, results)
        if "pte_perplexity" in row and "decode_profile" not in row:
            out = program_dir(args.work_dir, name)
            prompt = token_windows(AutoTokenizer.from_pretrained(out), text, 2048, 1)[0, :PROFILE_PROMPT].tolist()
            row["decode_profile"] = decode_profile(out / "model.pte", prompt)
            write_json_atomic(json_path, results)
    if not args.skip_programs:
        write_atomic(args.output.with_suffix(".md"), markdown(results, command).encode())


if __name__ == "__main__":
    main()
