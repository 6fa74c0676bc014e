"""The export's built-in check: the .pte against the eager quantized model, prefill then decode.

Max |Δlogit| is recorded but does not decide: on real models the eager int8-activation model is
itself chaotic at float rounding level (perturbing SmolLM2's input embeddings by one part in 1e7
moves its logits by up to 2.7, a mean KL of 0.05 nats), so two correct implementations differ
that much. A wrong program (a missing rotation, a mis-laid weight) is off by nats.
"""

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from export.program import with_static_cache
from runner.pte import PteProgram
from spinquant.errors import UserError
from spinquant.metrics import kl_per_position

PROMPT = "The capital of France is"


@dataclass
class Agreement:
    max_abs_logit_diff: float
    max_abs_logit: float
    mean_kl: float  # KL(eager ‖ program) in nats, averaged over every compared position
    top1_agreement: float
    positions: int

    def record(self) -> dict:
        return asdict(self)


@dataclass
class EagerReference:
    """What the program is checked against: each step's inputs and the eager model's logits for them."""

    inputs: list[tuple[torch.Tensor, torch.Tensor]]  # (input_ids, cache_position) of each step
    logits: list[torch.Tensor]  # each step's logits [T, vocab], every position


@torch.no_grad()
def eager_reference(model: LlamaForCausalLM, prompt_ids: list[int], max_seq_len: int, longest_call: int,
                    decode_steps: int = 8) -> EagerReference:
    """The prompt in calls of at most `longest_call` tokens, as a runner prefills it, then greedy steps on the eager
    model's own choices, which the program is fed too.

    Taken before the lowering, so that the eager model can be freed before the program is loaded beside it."""
    eager = with_static_cache(model, max_seq_len)
    prompt = torch.tensor([prompt_ids[: max_seq_len - decode_steps]])
    inputs = [(ids, torch.arange(start, start + ids.shape[1])) for start, ids in zip(range(0, prompt.shape[1], longest_call),
                                                                                      prompt.split(longest_call, dim=1))]
    logits = [eager(input_ids=ids, cache_position=pos)[0] for ids, pos in inputs]
    for _ in range(decode_steps):
        inputs.append((logits[-1][-1].argmax().view(1, 1), inputs[-1][1][-1:] + 1))
        logits.append(eager(input_ids=inputs[-1][0], cache_position=inputs[-1][1])[0])
    return EagerReference(inputs, logits)


def compare_with_reference(pte: Path, reference: EagerReference) -> Agreement:
    """Every position the program returns logits for: the last of each step, or all of them (--full-logits)."""
    program = PteProgram(pte)
    steps = [program.forward(ids, pos)[0] for ids, pos in reference.inputs]
    ours, ref = torch.cat(steps), torch.cat([step[-len(mine):] for step, mine in zip(reference.logits, steps)])
    return Agreement(
        max_abs_logit_diff=(ours - ref).abs().max().item(),
        max_abs_logit=ref.abs().max().item(),
        mean_kl=kl_per_position(ref, ours).mean().item(),
        top1_agreement=(ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        positions=ref.shape[0],
    )


def check_agreement(a: Agreement, max_mean_kl: float = 0.1) -> None:
    """Fail loudly when the program's next-token distributions are not the eager model's.

    Top-1 agreement is recorded, not required: where the quantized model's best tokens are nearly
    tied (SmolLM2 unrotated: 54% agreement at a mean KL of 0.037), rounding decides between them.
    """
    if a.mean_kl > max_mean_kl:
        raise UserError(
            f"the exported program diverges from the eager quantized model: mean KL {a.mean_kl:.3g} nats "
            f"(allowed {max_mean_kl}), top-1 agreement {a.top1_agreement:.0%} over {a.positions} positions "
            f"(max |Δlogit| {a.max_abs_logit_diff:.3g}, logits up to {a.max_abs_logit:.3g})"
        )
