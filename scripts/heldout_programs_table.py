"""Programs run on WikiText's held-out windows: the bar of 3% from full precision is judged on the program itself.

    python scripts/heldout_programs_table.py --program tuned=out/tuned_full --first-windows 16 32

Each NAME=DIR is a `--full-logits` export of the demo model; its perplexity is computed by running the program (prefill
in chunks, as scripts/export_table.py) on 16 windows of 2048 tokens of eval.txt from each first window, with the float
model's beside it. Windows 0–15 are where variants are chosen; 16–31 and 32–47 are held out.
"""

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from runner.pte import PteProgram
from spinquant.data import evaluation_text, read_text, text_sha256, token_windows
from spinquant.environment import environment_line
from spinquant.files import write_atomic, write_json_atomic
from spinquant.metrics import perplexity, perplexity_of
from spinquant.models import load_model

WINDOWS = 16
SEQLEN = 2048


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--program", action="append", required=True, help="NAME=DIR of a --full-logits export (repeatable)")
    p.add_argument("--first-windows", type=int, nargs="+", default=[16, 32])
    p.add_argument("--output", type=Path, default=Path("results/heldout_programs"), help="path stem for .md and .json")
    return p.parse_args(argv)


def programs_from(pairs: list[str]) -> dict[str, Path]:
    dirs = dict(pair.split("=", 1) for pair in pairs)
    for name, directory in dirs.items():
        if not PteProgram(Path(directory) / "model.pte").every_position:
            sys.exit(f"--program {name}={directory}: export it with --full-logits")
    return {name: Path(directory) for name, directory in dirs.items()}


def program_line(name: str, directory: Path) -> str:
    options = json.loads((directory / "export_report.json").read_text())["options"]
    gptq = f"GPTQ file `{options['gptq_file']}`" if options.get("gptq_file") else ("GPTQ now" if options["gptq"] else "round to nearest")
    return f"- {name}: rotation `{Path(options['rotation']).name}`, {gptq}, lm_head {options['lm_head']}, KV cache {options['kv_cache']}"


def markdown(results: dict, dirs: dict[str, Path]) -> str:
    firsts = results["first_windows"]
    lines = ["# Programs on held-out windows of WikiText-2", "", f"Command: `{results['command']}`", "",
             f"Machine and libraries: {results['environment']}.", "",
             f"Text `{results['text']}` (sha256 `{results['text_sha256'][:16]}…`), {WINDOWS} windows of {SEQLEN} tokens from each first window.", "",
             *(program_line(name, d) for name, d in dirs.items()), "",
             "| model | " + " | ".join(f"windows {f}–{f + WINDOWS - 1}" for f in firsts) + " |", "|---|" + "---|" * len(firsts),
             "| full precision | " + " | ".join(f"{p:.3f}" for p in results["fp"]) + " |"]
    for name, ppl in results["programs"].items():
        lines.append(f"| {name} | " + " | ".join(f"{p:.3f} ({(p / f - 1) * 100:+.2f}%)" for p, f in zip(ppl, results["fp"])) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dirs = programs_from(args.program)
    loaded = load_model("smollm2-135m")
    text = read_text(evaluation_text())
    ranges = [token_windows(loaded.tokenizer, text, SEQLEN, WINDOWS, first) for first in args.first_windows]
    results = dict(
        command=shlex.join(["python", "scripts/heldout_programs_table.py", *(sys.argv[1:] if argv is None else argv)]),
        environment=environment_line(), text=os.path.relpath(evaluation_text()),
        text_sha256=text_sha256(text), first_windows=args.first_windows,
        fp=[perplexity(loaded.model, windows) for windows in ranges],
        programs={name: [perplexity_of(PteProgram(d / "model.pte").prefill_logits, windows) for windows in ranges] for name, d in dirs.items()},
    )
    write_json_atomic(args.output.with_suffix(".json"), results)
    report = markdown(results, dirs)
    write_atomic(args.output.with_suffix(".md"), report.encode())
    print(report)


if __name__ == "__main__":
    main()
