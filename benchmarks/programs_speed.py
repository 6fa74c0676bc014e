"""Decode and prefill speed of several .pte programs of the demo model, side by side in one run:

    python benchmarks/programs_speed.py --pte default=out/demo --pte tuned=out/tuned --output results/programs_speed.md

Each program and thread count in a process of its own, timed by the loop benchmarks/decode_speed.py uses
(benchmarks/decode_engines.py), in turn, so that a drift of the machine shows up in every row alike. The first program
is the reference of the ratio column.
"""

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from decode_speed import prompt_ids, pte_label, run_worker
from spinquant.environment import describe_environment
from spinquant.files import write_atomic, write_json_atomic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pte", action="append", required=True, help="NAME=DIR of an export (repeatable; the first is the reference)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row; the median is reported")
    p.add_argument("--output", type=Path, default=Path("results/programs_speed.md"), help="the .json goes beside it")
    return p.parse_args(argv)


def markdown(results: dict) -> str:
    env = ", ".join(f"{k} {v}" for k, v in results["environment"].items())
    lines = ["# Programs side by side: prefill and decode speed", "", f"Command: `{results['command']}`", "",
             f"Machine and libraries: {env}.", "",
             f"Prompt {results['prompt_tokens']} tokens, then {results['new_tokens']} decoded; median of {results['repeats']} runs.", "",
             *(f"- {name}: {label}" for name, label in results["labels"].items()), "",
             "| program | threads | prefill tok/s | decode tok/s | decode vs the first | load average before |", "|---|---|---|---|---|---|"]
    first = {r["threads"]: r["decode_tokens_per_s"] for r in results["rows"] if r["name"] == results["rows"][0]["name"]}
    for r in results["rows"]:
        lines.append(f"| {r['name']} | {r['threads']} | {r['prefill_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['decode_tokens_per_s'] / first[r['threads']] - 1:+.1%} | {r['load_average_before']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    programs = {name: Path(d) for name, d in (pair.split("=", 1) for pair in args.pte)}
    reports = {name: json.loads((d / "export_report.json").read_text()) for name, d in programs.items()}
    prompt = prompt_ids(next(iter(programs.values())), args.prompt_tokens)
    rows = []
    for threads in args.threads:
        for name, directory in programs.items():
            spec = dict(label=name, engine="pte", path=str(directory / "model.pte"), threads=threads, prompt_ids=prompt,
                        new_tokens=args.new_tokens, repeats=args.repeats, warmup=1, context=reports[name]["options"]["max_seq_len"])
            load = os.getloadavg()[0]
            rows.append(dict(name=name, threads=threads, load_average_before=load, **run_worker("decode_engines.py", spec)))
            print(f"{name}, {threads} threads: decode {rows[-1]['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
    results = dict(command=shlex.join(["python", "benchmarks/programs_speed.py", *(sys.argv[1:] if argv is None else argv)]),
                   environment=describe_environment(), prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                   repeats=args.repeats, labels={name: pte_label(d, reports[name]) for name, d in programs.items()}, rows=rows)
    write_json_atomic(args.output.with_suffix(".json"), results)
    write_atomic(args.output, markdown(results).encode())
    print(markdown(results))


if __name__ == "__main__":
    main()
