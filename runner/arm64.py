"""`python -m runner.arm64`: a .pte made on x86, run on arm64 (under qemu-aarch64) and checked against x86.

    python -m runner.arm64 prepare                                  # once: the arm64 environment (~2 min)
    python -m runner.arm64 run --pte P --prompt TEXT --out arm64.pt   # prefill + greedy decode on arm64
    python -m runner.arm64 compare --pte P --prompt TEXT              # x86 and arm64, same tokens? logits?

`compare` exits 1 when the arm64 run differs (other tokens, or logits past record_diff's bars).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from runner.arm64_env import DEFAULT_CPU, REPO, Arm64Env, prepare, say
from spinquant.errors import UserError, one_line_errors
from spinquant.files import write_atomic

RECORD = "runner.greedy_record"


def prompt_ids(args: argparse.Namespace) -> list[int]:
    """Token ids from --ids, or --prompt through the tokenizer beside the .pte (on x86: the arm64
    environment has no tokenizer library)."""
    if args.ids:
        from runner.greedy_record import parse_ids

        return parse_ids(args.ids)
    from transformers import AutoTokenizer

    from runner.generate import prompt_ids as encode

    tokenizer_dir = args.tokenizer or args.pte.parent
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer.json in {tokenizer_dir}: pass --tokenizer DIR or --ids")
    return encode(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True), args.prompt, chat=args.chat)


def record_args(pte: Path, ids: list[int], max_new_tokens: int, out: Path) -> list[str]:
    return ["-m", RECORD, "--pte", str(pte.resolve()), "--ids", ",".join(map(str, ids)),
            "--max-new-tokens", str(max_new_tokens), "--out", str(out.resolve())]


def run_record(command: list[str], machine: str) -> None:
    """One greedy_record run; its progress line passes through, a failure is one line."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()] or ["no output"]
        raise UserError(f"the {machine} run failed ({result.returncode}): {lines[-1]}")
    say(f"{machine} run took {time.perf_counter() - start:.0f} s")


def run_arm64(env: Arm64Env, pte: Path, ids: list[int], max_new_tokens: int, out: Path, threads: int = 1, cpu: str = DEFAULT_CPU) -> None:
    say(f"running {pte.name} under qemu-aarch64 -cpu {cpu} ({len(ids)} prompt tokens, up to {max_new_tokens} new)")
    run_record(env.command(record_args(pte, ids, max_new_tokens, out), threads, cpu), "arm64")


def run_x86(pte: Path, ids: list[int], max_new_tokens: int, out: Path) -> None:
    say(f"running {pte.name} on this machine ({len(ids)} prompt tokens, up to {max_new_tokens} new)")
    run_record([sys.executable, *record_args(pte, ids, max_new_tokens, out)], "x86")


def compare(pte: Path, ids: list[int], max_new_tokens: int, out_dir: Path, threads: int = 1, cpu: str = DEFAULT_CPU) -> dict:
    """Both runs, their records in out_dir (x86.pt, arm64.pt) and the comparison (diff.json, diff.md)."""
    import torch

    from runner.record_diff import diff_records, markdown

    env = prepare()
    out_dir.mkdir(parents=True, exist_ok=True)
    run_x86(pte, ids, max_new_tokens, out_dir / "x86.pt")
    run_arm64(env, pte, ids, max_new_tokens, out_dir / "arm64.pt", threads, cpu)
    x86, arm64 = (torch.load(out_dir / f"{name}.pt") for name in ("x86", "arm64"))
    if arm64["machine"] != "aarch64":
        raise UserError(f"the arm64 run reports machine {arm64['machine']!r}, not aarch64")
    diff = diff_records(x86, arm64)
    payload = {"pte": str(pte), "qemu_cpu": cpu, "prompt_ids": ids, "x86_tokens": x86["tokens"], "arm64_tokens": arm64["tokens"],
               "diff": diff.as_dict(), "passes": diff.passes()}
    write_atomic(out_dir / "diff.json", (json.dumps(payload, indent=2) + "\n").encode())
    write_atomic(out_dir / "diff.md", (markdown(diff) + "\n").encode())
    return payload


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runner.arm64", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="prepare (once) and check the arm64 environment; prints its path")
    for name in ("run", "compare"):
        s = sub.add_parser(name)
        s.add_argument("--pte", type=Path, required=True)
        which = s.add_mutually_exclusive_group(required=True)
        which.add_argument("--prompt", help="text, tokenized on x86 with tokenizer.json beside the .pte")
        which.add_argument("--ids", help="prompt token ids, comma-separated")
        s.add_argument("--tokenizer", type=Path, help="directory with tokenizer.json (default: the .pte's)")
        s.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template")
        s.add_argument("--max-new-tokens", type=int, default=32)
        s.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the arm64 run (ExecuTorch's thread pool sizes itself)")
        s.add_argument("--cpu", default=DEFAULT_CPU, help=f"qemu's -cpu (default {DEFAULT_CPU}: see runner/arm64_env.py)")
    sub.choices["run"].add_argument("--out", type=Path, required=True, help="the arm64 record (torch.save)")
    sub.choices["compare"].add_argument("--out-dir", type=Path, help="default: <pte dir>/arm64/")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "prepare":
        start = time.perf_counter()
        print(prepare().path)
        say(f"{time.perf_counter() - start:.0f} s")
        return 0
    if not args.pte.is_file():
        raise UserError(f"program not found: {args.pte}")
    ids = prompt_ids(args)
    if args.command == "run":
        run_arm64(prepare(), args.pte, ids, args.max_new_tokens, args.out, args.threads, args.cpu)
        return 0
    from runner.record_diff import RecordDiff, markdown

    out_dir = args.out_dir or args.pte.parent / "arm64"
    payload = compare(args.pte, ids, args.max_new_tokens, out_dir, args.threads, args.cpu)
    diff = RecordDiff(**payload["diff"])
    print(markdown(diff))
    if not diff.passes():
        print(f"runner.arm64: arm64 differs from x86: {'; '.join(diff.failures())} ({out_dir / 'diff.json'})", file=sys.stderr)
        return 1
    say(f"arm64 matches x86 ({out_dir / 'diff.json'})")
    return 0


if __name__ == "__main__":
    with one_line_errors("runner.arm64"):
        sys.exit(main(sys.argv[1:]))
