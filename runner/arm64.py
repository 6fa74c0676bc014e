"""`python -m runner.arm64`: a .pte made on x86, run on arm64 (under qemu-aarch64) and checked against x86.

    python -m runner.arm64 prepare                                  # once: the arm64 environment (~2 min)
    python -m runner.arm64 run --pte P --prompt TEXT --out arm64.pt   # prefill + greedy decode on arm64
    python -m runner.arm64 compare --pte P --prompt TEXT              # x86 and arm64, same tokens? logits?
    python -m runner.arm64 compare --pte P --prompt TEXT --kernels    # and which arm64 kernels and extensions ran
    python -m runner.arm64 operators --pte P --ids 1                  # which operator's output differs first

`compare` exits 1 when the arm64 run differs (other tokens, or logits past record_diff's bars).
"""

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Decode:
    """What a run does, the same on both machines: prefill `ids`, then greedy tokens."""

    pte: Path
    ids: list[int]
    max_new_tokens: int
    ignore_eos: bool = False

    def record_args(self, out: Path) -> list[str]:
        """runner.greedy_record's arguments, its record written to `out`."""
        return ["--pte", str(self.pte.resolve()), "--ids", ",".join(map(str, self.ids)), "--max-new-tokens", str(self.max_new_tokens),
                "--out", str(out.resolve()), *(["--ignore-eos"] if self.ignore_eos else [])]

    def describe(self) -> str:
        return f"{len(self.ids)} prompt tokens, up to {self.max_new_tokens} new"


def run_record(command: list[str], machine: str) -> None:
    """One greedy_record run; its progress line passes through, a failure is one line."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()] or ["no output"]
        raise UserError(f"the {machine} run failed ({result.returncode}): {lines[-1]}")
    say(f"{machine} run took {time.perf_counter() - start:.0f} s")


def run_arm64(env: Arm64Env, decode: Decode, out: Path, threads: int = 1, cpu: str = DEFAULT_CPU) -> None:
    say(f"running {decode.pte.name} under qemu-aarch64 -cpu {cpu} ({decode.describe()})")
    run_record(env.command(["-m", RECORD, *decode.record_args(out)], threads, cpu), "arm64")


def run_arm64_traced(env: Arm64Env, decode: Decode, out: Path, threads: int = 1, cpu: str = DEFAULT_CPU) -> dict:
    """The arm64 run with qemu's translation log: its record, and which kernels and extensions ran (runner/arm64_trace.py),
    also written beside the record (kernels.json, kernels.md)."""
    from runner.arm64_trace import kernel_report, markdown

    log, maps = out.parent / "qemu-in_asm.log", out.parent / "maps.txt"
    say(f"running {decode.pte.name} under qemu-aarch64 -cpu {cpu} with its translation log ({decode.describe()})")
    guest = ["-m", "runner.arm64_trace", str(maps.resolve()), *decode.record_args(out)]
    try:
        run_record(env.command(guest, threads, cpu, ("-d", "in_asm", "-D", str(log.resolve()))), "arm64 (traced)")
        report = kernel_report(log, maps.read_text(), env.path)
    finally:
        log.unlink(missing_ok=True)  # hundreds of MB: every instruction qemu translated
    write_atomic(out.parent / "kernels.json", (json.dumps(report, indent=2) + "\n").encode())
    write_atomic(out.parent / "kernels.md", (markdown(report) + "\n").encode())
    return report


def run_x86(decode: Decode, out: Path) -> None:
    say(f"running {decode.pte.name} on this machine ({decode.describe()})")
    run_record([sys.executable, "-m", RECORD, *decode.record_args(out)], "x86")


def compare(decode: Decode, out_dir: Path, threads: int = 1, cpu: str = DEFAULT_CPU, trace: bool = False) -> dict:
    """Both runs, their records in out_dir (x86.pt, arm64.pt) and the comparison (diff.json, diff.md); with `trace`,
    the arm64 run is traced and the payload's "kernels" says what ran there."""
    import torch

    from runner.record_diff import diff_records, markdown

    env = prepare()
    out_dir.mkdir(parents=True, exist_ok=True)
    run_x86(decode, out_dir / "x86.pt")
    if trace:
        kernels = run_arm64_traced(env, decode, out_dir / "arm64.pt", threads, cpu)
    else:
        run_arm64(env, decode, out_dir / "arm64.pt", threads, cpu)
    x86, arm64 = (torch.load(out_dir / f"{name}.pt") for name in ("x86", "arm64"))
    if arm64["machine"] != "aarch64":
        raise UserError(f"the arm64 run reports machine {arm64['machine']!r}, not aarch64")
    diff = diff_records(x86, arm64)
    payload = {"pte": str(decode.pte), "qemu_cpu": cpu, "prompt_ids": decode.ids, "ignore_eos": decode.ignore_eos,
               "x86_tokens": x86["tokens"], "arm64_tokens": arm64["tokens"], "diff": diff.as_dict(), "passes": diff.passes(),
               **({"kernels": kernels} if trace else {})}
    write_atomic(out_dir / "diff.json", (json.dumps(payload, indent=2) + "\n").encode())
    write_atomic(out_dir / "diff.md", (markdown(diff) + "\n").encode())
    return payload


def compare_operators(pte: Path, ids: list[int], out_dir: Path, cpu: str = DEFAULT_CPU) -> str:
    """One forward of `ids` on both machines with every operator's output logged (runner/arm64_operators.py); the
    outputs that differ, in execution order, written to operators.md and returned."""
    from runner.arm64_operators import differences, first_delegate_input, markdown, operator_outputs

    env = prepare()
    runs = {"x86": out_dir / "operators-x86", "arm64": out_dir / "operators-arm64"}
    guest = ["-m", "runner.arm64_operators", str(pte.resolve()), ",".join(map(str, ids))]
    say(f"running one forward of {pte.name} ({len(ids)} tokens) on both machines, every operator's output logged")
    run_record([sys.executable, *guest, str(runs["x86"].resolve())], "x86")
    run_record(env.command([*guest, str(runs["arm64"].resolve())], cpu=cpu), "arm64")
    x86 = operator_outputs(runs["x86"])
    diffs = differences(x86, operator_outputs(runs["arm64"]))
    report = markdown(diffs, first_delegate_input(x86, diffs))
    write_atomic(out_dir / "operators.md", (report + "\n").encode())
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runner.arm64", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="prepare (once) and check the arm64 environment; prints its path")
    for name in ("run", "compare", "operators"):
        s = sub.add_parser(name)
        s.add_argument("--pte", type=Path, required=True)
        which = s.add_mutually_exclusive_group(required=True)
        which.add_argument("--prompt", help="text, tokenized on x86 with tokenizer.json beside the .pte")
        which.add_argument("--ids", help="prompt token ids, comma-separated")
        s.add_argument("--tokenizer", type=Path, help="directory with tokenizer.json (default: the .pte's)")
        s.add_argument("--chat", action="store_true", help="wrap --prompt in the model's chat template")
        s.add_argument("--cpu", default=DEFAULT_CPU, help=f"qemu's -cpu (default {DEFAULT_CPU}: see runner/arm64_env.py)")
    for name in ("run", "compare"):
        s = sub.choices[name]
        s.add_argument("--max-new-tokens", type=int, default=32)
        s.add_argument("--ignore-eos", action="store_true", help="decode past end tokens, to --max-new-tokens")
        s.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the arm64 run (ExecuTorch's thread pool sizes itself)")
    sub.choices["run"].add_argument("--out", type=Path, required=True, help="the arm64 record (torch.save)")
    for name in ("compare", "operators"):
        sub.choices[name].add_argument("--out-dir", type=Path, help="default: <pte dir>/arm64/")
    sub.choices["compare"].add_argument("--kernels", action="store_true",
                                        help="trace the arm64 run (qemu -d in_asm): which XNNPACK/KleidiAI kernels and "
                                             "instruction-set extensions ran, in kernels.json and kernels.md; slower")
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
    if args.command == "run":
        run_arm64(prepare(), Decode(args.pte, prompt_ids(args), args.max_new_tokens, args.ignore_eos), args.out, args.threads, args.cpu)
        return 0
    out_dir = args.out_dir or args.pte.parent / "arm64"
    if args.command == "operators":
        print(compare_operators(args.pte, prompt_ids(args), out_dir, args.cpu))
        return 0
    decode = Decode(args.pte, prompt_ids(args), args.max_new_tokens, args.ignore_eos)
    from runner.record_diff import RecordDiff, markdown

    payload = compare(decode, out_dir, args.threads, args.cpu, trace=args.kernels)
    diff = RecordDiff(**payload["diff"])
    print(markdown(diff))
    if args.kernels:
        print((out_dir / "kernels.md").read_text())
    if not diff.passes():
        print(f"runner.arm64: arm64 differs from x86: {'; '.join(diff.failures())} ({out_dir / 'diff.json'})", file=sys.stderr)
        return 1
    say(f"arm64 matches x86 ({out_dir / 'diff.json'})")
    return 0


if __name__ == "__main__":
    with one_line_errors("runner.arm64"):
        sys.exit(main(sys.argv[1:]))
