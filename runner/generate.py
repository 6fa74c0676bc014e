"""`python -m runner.generate`: run a .pte as a user does — prompt in, text streamed out, speed printed.

The program's tokenizer (`tokenizer.json` beside the .pte, as the export writes it), the model's
chat template on request, the KV cache (prefill in chunks, then one token per step), greedy or
temperature/top-p sampling, and a stop at any of the program's end tokens.
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from runner.pte import PteProgram
from spinquant.errors import UserError, one_line_errors
from spinquant.quiet import add_verbose_flag


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    time_to_first_token_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float

    def line(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tokens, generated {self.new_tokens}; time to first token "
            f"{self.time_to_first_token_s * 1000:.0f} ms; prefill {self.prefill_tokens_per_s:.1f} tokens/s; "
            f"decode {self.decode_tokens_per_s:.1f} tokens/s"
        )


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest set of most likely tokens whose probability reaches top_p, renormalised."""
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the most likely token always stays
    kept = torch.zeros_like(probs)
    kept[order[keep]] = sorted_probs[keep]
    return kept / kept.sum()


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        probs = top_p_filter(probs, sampling.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    program: PteProgram,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    on_token: Callable[[int], None] = lambda token: None,
) -> tuple[list[int], GenerationStats]:
    """New token ids (without the end token) and the timings; stops at an end token or a full cache."""
    meta = program.metadata()
    ends, max_len = set(meta.get("get_eos_ids", [])), meta["get_max_context_len"]
    if not 0 < len(prompt_ids) < max_len:
        raise UserError(f"the prompt has {len(prompt_ids)} tokens; the program holds 1 to {max_len - 1}")
    generator = torch.Generator().manual_seed(sampling.seed)
    start = time.perf_counter()
    logits = program.prefill(torch.tensor([prompt_ids]))[0, -1]
    new: list[int] = []
    first_token_at = None
    while len(new) < max_new_tokens:
        token = next_token(logits, sampling, generator)
        first_token_at = first_token_at or time.perf_counter()
        if token in ends:
            break
        new.append(token)
        on_token(token)
        position = len(prompt_ids) + len(new) - 1
        if len(new) == max_new_tokens or position + 1 >= max_len:
            break  # no forward whose logits nobody samples: decode speed counts only the steps that give tokens
        logits = program.forward(torch.tensor([[token]]), torch.tensor([position]))[0, -1]
    end = time.perf_counter()
    first_token_at = first_token_at or end
    prefill_s, decode_s = first_token_at - start, end - first_token_at
    return new, GenerationStats(
        prompt_tokens=len(prompt_ids),
        new_tokens=len(new),
        time_to_first_token_s=prefill_s,
        prefill_tokens_per_s=len(prompt_ids) / prefill_s,
        decode_tokens_per_s=(len(new) - 1) / decode_s if len(new) > 1 and decode_s > 0 else float("nan"),
    )


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not tokenizer.chat_template:
        raise UserError("--chat: this tokenizer has no chat template")
    messages = [{"role": "user", "content": prompt}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


class TextStream:
    """Prints the decoded text of the new tokens as it grows, holding back an incomplete character."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, out=sys.stdout):
        self.tokenizer, self.out, self.tokens, self.printed = tokenizer, out, [], 0

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runner.generate", description=__doc__.splitlines()[0])
    p.add_argument("--pte", type=Path, required=True, help="the program (model.pte from python -m export.to_pte)")
    p.add_argument("--tokenizer", type=Path, help="directory with tokenizer.json (default: the .pte's directory)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    add_verbose_flag(p)
    args = p.parse_args(argv)
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p} must be in (0, 1]")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature} must be at least 0")
    return args


def main(argv: list[str] | None = None) -> GenerationStats:
    args = parse_args(argv)
    if not args.pte.is_file():
        raise UserError(f"program not found: {args.pte}")
    tokenizer_dir = args.tokenizer or args.pte.parent
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer.json in {tokenizer_dir}: pass --tokenizer DIR")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    program = PteProgram(args.pte)
    ids = prompt_ids(tokenizer, args.prompt, args.chat)
    sampling = Sampling(args.temperature, args.top_p, args.seed)
    _, stats = generate(program, ids, args.max_new_tokens, sampling, on_token=TextStream(tokenizer))
    print(file=sys.stdout)
    print(stats.line(), file=sys.stderr)
    return stats


if __name__ == "__main__":
    with one_line_errors("runner.generate"):
        main(sys.argv[1:])
