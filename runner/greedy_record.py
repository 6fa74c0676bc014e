"""`python -m runner.greedy_record`: prefill + greedy decode of a .pte, every logit written to a file.

The same code runs on x86 and, under qemu, in the arm64 environment (runner/arm64_env.py), so the two
records differ only by the machine. It imports no tokenizer (transformers is not in the arm64
environment): the caller passes token ids.

The record (torch.save of a dict): `prompt_ids`, `tokens` (the greedy tokens), `prompt_logits`
(T, vocab) from one prefill of the prompt, `decode_logits` (N, vocab): the logits each greedy token
was picked from (row 0 is the prefill's last row), and `machine`.
"""

import argparse
import io
import platform
import sys
import time
from pathlib import Path

import torch

from runner.pte import PteProgram
from spinquant.errors import UserError, one_line_errors
from spinquant.files import write_atomic


@torch.no_grad()
def greedy_record(program: PteProgram, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = False) -> dict:
    """Prefill the prompt (logits of every position: a program exported with --full-logits), then greedy tokens until an end token
    (unless `ignore_eos`), the cache's end or max_new_tokens; ends are kept in `tokens` so both machines stop alike."""
    meta = program.metadata()
    ends, max_len = set() if ignore_eos else set(meta.get("get_eos_ids", [])), meta["get_max_context_len"]
    if not 0 < len(prompt_ids) < max_len:
        raise UserError(f"the prompt has {len(prompt_ids)} tokens; the program holds 1 to {max_len - 1}")
    prompt_logits = program.prefill_logits(torch.tensor([prompt_ids]))[0].float()
    logits, tokens, rows = prompt_logits[-1], [], []
    while len(tokens) < max_new_tokens:
        rows.append(logits)
        tokens.append(int(logits.argmax()))
        position = len(prompt_ids) + len(tokens) - 1
        if tokens[-1] in ends or len(tokens) == max_new_tokens or position + 1 >= max_len:
            break
        logits = program.forward(torch.tensor([[tokens[-1]]]), torch.tensor([position]))[0, -1].float()
    return {
        "prompt_ids": list(prompt_ids),
        "tokens": tokens,
        "prompt_logits": prompt_logits.clone(),
        "decode_logits": torch.stack(rows) if rows else torch.empty(0, prompt_logits.shape[-1]),
        "machine": platform.machine(),
    }


def save_record(record: dict, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(record, buffer)
    write_atomic(path, buffer.getvalue())  # a half-written record is never read as a whole one


def parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--ids {text!r}: expected comma-separated token ids") from None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m runner.greedy_record", description=__doc__.splitlines()[0])
    p.add_argument("--pte", type=Path, required=True)
    p.add_argument("--ids", required=True, help="prompt token ids, comma-separated")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--ignore-eos", action="store_true", help="decode past end tokens, to max-new-tokens")
    p.add_argument("--out", type=Path, required=True, help="the record (torch.save)")
    args = p.parse_args(argv)
    if not args.pte.is_file():
        raise UserError(f"program not found: {args.pte}")
    start = time.perf_counter()
    program = PteProgram(args.pte)
    loaded = time.perf_counter()
    record = greedy_record(program, parse_ids(args.ids), args.max_new_tokens, args.ignore_eos)
    save_record(record, args.out)
    print(
        f"{record['machine']}: {len(record['prompt_ids'])} prompt tokens, {len(record['tokens'])} generated; "
        f"load {loaded - start:.1f} s, run {time.perf_counter() - loaded:.1f} s -> {args.out}",
        file=sys.stderr,
    )
    return record


if __name__ == "__main__":
    with one_line_errors("runner.greedy_record"):
        main(sys.argv[1:])
