"""Decode and prefill speed of several .pte programs of the demo model, side by side in one run:

    python benchmarks/programs_speed.py --pte default=out/demo --pte tuned=out/tuned --output results/programs_speed.md

Each program and thread count in a process of its own, timed by the loop benchmarks/decode_speed.py uses
(benchmarks/decode_engines.py), in turn, so that a drift of the machine shows up in every row alike; --rounds R goes
through the programs R times and reports each one's median round. The first program is the reference of the ratio column.
`--pte NAME=DIR@CHECKOUT` runs that program from another checkout of this repository (say a `git worktree` of an older
commit), with that checkout's own kernels: today's program against today's runtime, side by side with a change.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from decode_speed import ROOT, prompt_ids, pte_label, run_worker
from spinquant.environment import describe_environment
from spinquant.files import write_atomic, write_json_atomic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pte", action="append", required=True,
                   help="NAME=DIR of an export, or NAME=DIR@CHECKOUT to run it from another checkout (repeatable; the first is the reference)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row; the median is reported")
    p.add_argument("--rounds", type=int, default=1, help="passes over all the programs; each row is its median pass")
    p.add_argument("--output", type=Path, default=Path("results/programs_speed.md"), help="the .json goes beside it")
    return p.parse_args(argv)


def rounds_note(rounds: int) -> str:
    return "" if rounds == 1 else f", in each of {rounds} rounds over all the programs; each row is its median round (every round's decode tok/s in the .json)"


def markdown(results: dict) -> str:
    env = ", ".join(f"{k} {v}" for k, v in results["environment"].items())
    lines = ["# Programs side by side: prefill and decode speed", "", f"Command: `{results['command']}`", "",
             f"Machine and libraries: {env}.", "",
             f"Prompt {results['prompt_tokens']} tokens, then {results['new_tokens']} decoded; median of {results['repeats']} runs"
             f"{rounds_note(results.get('rounds', 1))}.", "",
             *(f"- {name}: {label}" for name, label in results["labels"].items()), "",
             "| program | threads | prefill tok/s | decode tok/s | decode vs the first | load average before |", "|---|---|---|---|---|---|"]
    first = {r["threads"]: r["decode_tokens_per_s"] for r in results["rows"] if r["name"] == results["rows"][0]["name"]}
    for r in results["rows"]:
        lines.append(f"| {r['name']} | {r['threads']} | {r['prefill_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['decode_tokens_per_s'] / first[r['threads']] - 1:+.1%} | {r['load_average_before']:.2f} |")
    return "\n".join(lines) + "\n"


def parse_programs(pairs: list[str]) -> dict[str, tuple[Path, Path]]:
    """NAME → (export directory, checkout that runs it)."""
    programs = {}
    for pair in pairs:
        name, _, where = pair.partition("=")
        directory, _, checkout = where.partition("@")
        if not name or not directory:
            sys.exit(f"--pte {pair!r}: expected NAME=DIR or NAME=DIR@CHECKOUT")
        programs[name] = (Path(directory).resolve(), Path(checkout).resolve() if checkout else ROOT)
    return programs


def label(directory: Path, checkout: Path, report: dict) -> str:
    if checkout == ROOT:
        return pte_label(directory, report)
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return f"{pte_label(directory, report)}, run from `{checkout}` (commit {commit or 'unknown'}) with its kernels"


def median_round(rounds: list[dict]) -> dict:
    """The round of median decode speed (of an even number, the lower of the middle two), with every round's decode
    speed beside it."""
    ranked = sorted(rounds, key=lambda r: r["decode_tokens_per_s"])
    return dict(ranked[(len(ranked) - 1) // 2], decode_rounds=[r["decode_tokens_per_s"] for r in rounds])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    programs = parse_programs(args.pte)
    reports = {name: json.loads((d / "export_report.json").read_text()) for name, (d, _) in programs.items()}
    prompt = prompt_ids(next(iter(programs.values()))[0], args.prompt_tokens)
    rows = []
    for threads in args.threads:
        rounds = {name: [] for name in programs}
        for _ in range(args.rounds):
            for name, (directory, checkout) in programs.items():
                spec = dict(label=name, engine="pte", path=str(directory / "model.pte"), threads=threads, prompt_ids=prompt,
                            new_tokens=args.new_tokens, repeats=args.repeats, warmup=1, context=reports[name]["options"]["max_seq_len"])
                load = os.getloadavg()[0]
                rounds[name].append(dict(load_average_before=load, **run_worker("decode_engines.py", spec, checkout)))
                print(f"{name}, {threads} threads: decode {rounds[name][-1]['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
        rows += [dict(name=name, threads=threads, checkout=str(programs[name][1]), **median_round(r)) for name, r in rounds.items()]
    results = dict(command=shlex.join(["python", "benchmarks/programs_speed.py", *(sys.argv[1:] if argv is None else argv)]),
                   environment=describe_environment(), prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                   repeats=args.repeats, rounds=args.rounds,
                   labels={name: label(d, c, reports[name]) for name, (d, c) in programs.items()}, rows=rows)
    write_json_atomic(args.output.with_suffix(".json"), results)
    write_atomic(args.output, markdown(results).encode())
    print(markdown(results))


if __name__ == "__main__":
    main()
