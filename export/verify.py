"""The export's built-in check: the .pte against the eager quantized model, prefill then decode."""

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from export.program import with_static_cache
from runner.pte import PteProgram
from spinquant.errors import UserError

PROMPT = "The capital of France is"


@dataclass
class Agreement:
    max_abs_logit_diff: float
    max_abs_logit: float
    top1_agreement: float
    steps: int

    def record(self) -> dict:
        return asdict(self)


@torch.no_grad()
def compare_with_eager(pte: Path, model: LlamaForCausalLM, prompt_ids: list[int], max_seq_len: int, decode_steps: int = 8) -> Agreement:
    """Greedy on the eager model's choices, so both sides see the same tokens at every step."""
    program, eager = PteProgram(pte), with_static_cache(model, max_seq_len)
    ids = torch.tensor([prompt_ids[: max_seq_len - decode_steps]])
    pos = torch.arange(ids.shape[1])
    diffs, peaks, agree = [], [], []
    for _ in range(decode_steps + 1):
        ours, ref = program.forward(ids, pos)[:, -1], eager(input_ids=ids, cache_position=pos)[:, -1]
        diffs.append((ours - ref).abs().max().item())
        peaks.append(ref.abs().max().item())
        agree.append(bool(ours.argmax() == ref.argmax()))
        ids, pos = ref.argmax(-1, keepdim=True), pos[-1:] + 1
    return Agreement(max(diffs), max(peaks), sum(agree) / len(agree), len(agree))


def check_agreement(a: Agreement, rel_tolerance: float = 0.05, min_top1: float = 0.85) -> None:
    """Fail loudly: numerics of XNNPACK's int8 kernels differ slightly from torchao's eager ones, no more."""
    if a.max_abs_logit_diff > rel_tolerance * a.max_abs_logit or a.top1_agreement < min_top1:
        raise UserError(
            f"the exported program diverges from the eager quantized model: max |Δlogit| {a.max_abs_logit_diff:.4g} "
            f"(logits up to {a.max_abs_logit:.3g}), top-1 agreement {a.top1_agreement:.0%} over {a.steps} steps"
        )
