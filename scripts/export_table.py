"""The export table: the demo model exported per rotation, then measured by running the .pte itself.

    python scripts/export_table.py --max-windows 16

For each rotation: `python -m export.to_pte` in a fresh process (its report gives size, time and
peak memory), the greedy completion of a fixed prompt, and perplexity of the program on the
evaluation text (prefill in chunks), beside the fake-quant W4A8 perplexity of the same rotation measured here on the same windows.
Writes results/export_smollm2.json (resumable) and results/export_smollm2.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

from export.verify import PROMPT
from runner.pte import PteProgram
from spinquant.environment import describe_environment, environment_line
from spinquant.eval import DEFAULT_TEXT, evaluate, perplexity_of, read_text, text_sha256, token_windows
from spinquant.files import write_atomic, write_json_atomic
from spinquant.quant import setting

ROTATIONS = ("none", "r4", "hadamard")


def export(model: str, rotation: str, out: Path) -> tuple[dict, float]:
    start = time.time()
    cmd = [sys.executable, "-m", "export.to_pte", "--model", model, "--rotation", rotation, "--output-dir", str(out)]
    subprocess.run(cmd, check=True)
    return json.loads((out / "export_report.json").read_text()), time.time() - start


def measure(model: str, rotation: str, out: Path, text: str, max_windows: int) -> dict:
    report, wall = export(model, rotation, out)
    program = PteProgram(out / "model.pte")
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    completion = tokenizer.decode(program.generate_greedy(prompt, 16))
    windows = token_windows(tokenizer, text, 2048, max_windows)
    return dict(
        pte_mib=report["pte_bytes"] / 2**20, export_seconds=report["export_seconds"], wall_seconds=round(wall, 1),
        peak_rss_mb=report["peak_rss_mb"], verify=report["verify"], completion=completion,
        pte_perplexity=perplexity_of(program.prefill_logits, windows),
        fake_quant_perplexity=evaluate(model, rotation, setting("w4a8"), lambda _: windows),
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
        "fake-quant W4A8 is `spinquant.eval`'s number for the same rotation on the same windows and machine "
        "(decoder linears only, embedding and lm_head float; the .pte also has 8-bit embedding and lm_head).",
        "",
        "| rotation | .pte MiB | export s | peak RSS MB | verify max abs Δlogit | .pte perplexity | fake-quant W4A8 | Δ | greedy completion of \"" + PROMPT + "\" |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rotation in ROTATIONS:
        if rotation not in results["rows"]:
            continue
        r = results["rows"][rotation]
        fq = r["fake_quant_perplexity"]
        lines.append(
            f"| {rotation} | {r['pte_mib']:.1f} | {r['export_seconds']:.0f} | {r['peak_rss_mb']} | "
            f"{r['verify']['max_abs_logit_diff']:.3g} | {r['pte_perplexity']:.2f} | {fq:.2f} | {r['pte_perplexity'] / fq - 1:+.2%} | "
            f"{r['completion'].strip()!r} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--rotations", nargs="+", default=list(ROTATIONS), choices=ROTATIONS)
    p.add_argument("--work-dir", type=Path, default=Path("out/export_table"))
    p.add_argument("--output", type=Path, default=Path("results/export_smollm2"))
    args = p.parse_args()
    text = read_text(args.text)
    json_path = args.output.with_suffix(".json")
    results = json.loads(json_path.read_text()) if json_path.exists() else {"rows": {}}
    results.update(text=os.path.relpath(args.text), text_sha256=text_sha256(text), max_windows=args.max_windows,
                   environment=environment_line(), environment_detail=describe_environment())
    for rotation in args.rotations:
        if rotation in results["rows"]:
            continue
        results["rows"][rotation] = measure(args.model, rotation, args.work_dir / rotation, text, args.max_windows)
        write_json_atomic(json_path, results)
        command = "python scripts/export_table.py " + " ".join(sys.argv[1:])
        write_atomic(args.output.with_suffix(".md"), markdown(results, command.strip()).encode())


if __name__ == "__main__":
    main()
