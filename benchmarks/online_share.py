"""The online transforms' share of one decode step of any .pte, from ExecuTorch's ETDump profile.

    python benchmarks/online_share.py --pte /tmp/dq/pte --threads 1 2

What a rotation family leaves online runs as our kernel (spinquant::hadamard_transform); its milliseconds over the
step's, each thread count in a process of its own (benchmarks/decode_profile.py), printed as markdown with the profile.
decode_speed.py measures the default program this way beside llama.cpp; this one takes any program, alone.
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

from decode_speed import busy_machine_warning, cpu_text, libraries, profile_section, prompt_ids, run_worker, hadamard_share


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pte", type=Path, required=True, help="an export's directory (model.pte, tokenizer)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=16, help="decode steps profiled; each operator's median over them")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not (args.pte / "model.pte").is_file():
        sys.exit(f"{args.pte} has no model.pte: export one with python -m export.to_pte --output-dir {args.pte}")
    load_start = os.getloadavg()[0]
    prompt = prompt_ids(args.pte, args.prompt_tokens)
    profiles = [run_worker("decode_profile.py", dict(path=str(args.pte / "model.pte"), threads=t, prompt_ids=prompt, steps=args.steps))
                for t in args.threads]
    meta = dict(load_start=load_start, load_end=os.getloadavg()[0])
    lines = [f"Command: `{shlex.join(['python', 'benchmarks/online_share.py', *(sys.argv[1:] if argv is None else argv)])}`", "",
             f"Machine: {cpu_text()}, {os.cpu_count()} cores; load average (1 min) {meta['load_start']:.2f} at the start, "
             f"{meta['load_end']:.2f} at the end.{busy_machine_warning(meta)} Libraries: "
             f"{', '.join(f'{k} {v}' for k, v in libraries().items())}.", ""]
    for profile in profiles:
        lines.append(f"- {profile['threads']} thread(s): online transforms {hadamard_share(profile):.1%} of a decode step of "
                     f"{profile['step_ms']:.2f} ms")
    for profile in profiles:
        lines += ["", *profile_section(profile)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
