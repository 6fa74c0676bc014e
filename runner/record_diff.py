"""Two greedy records of one program (runner.greedy_record), e.g. x86 against arm64: same tokens, and
how far apart the per-position logits are."""

from dataclasses import asdict, dataclass

import torch

# The bar for "the same program on another instruction set".
MAX_RELATIVE_DELTA = 0.05  # max |Δlogit| / max |logit|
MAX_MEAN_KL = 0.01  # nats


@dataclass(frozen=True)
class RecordDiff:
    prompt_tokens: int
    generated: int  # greedy tokens of the reference run
    same_tokens: bool
    first_different_token: int | None  # index into the generated tokens
    max_abs_delta: float  # over every compared logit: prompt positions, then decode steps
    max_abs_logit: float  # of the reference
    relative_delta: float
    mean_kl: float  # KL(reference || other) per position, averaged
    max_kl: float
    top1_agreement: float  # share of compared positions whose argmax agrees
    positions: int  # compared positions: every prompt position + decode steps up to the first difference

    def passes(self) -> bool:
        return self.same_tokens and self.relative_delta <= MAX_RELATIVE_DELTA and self.mean_kl <= MAX_MEAN_KL

    def failures(self) -> list[str]:
        out = []
        if not self.same_tokens:
            out.append(f"greedy tokens differ from token {self.first_different_token}")
        if self.relative_delta > MAX_RELATIVE_DELTA:
            out.append(f"max |Δ| {self.relative_delta:.3g} × max|logit| > {MAX_RELATIVE_DELTA}")
        if self.mean_kl > MAX_MEAN_KL:
            out.append(f"mean KL {self.mean_kl:.3g} > {MAX_MEAN_KL} nats")
        return out

    def as_dict(self) -> dict:
        return asdict(self)


def compared_logits(reference: dict, other: dict) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """Rows both runs computed from the same inputs: every prompt position, then the decode steps
    while the greedy tokens agree (after a difference the inputs differ, so the logits do too)."""
    if reference["prompt_ids"] != other["prompt_ids"]:
        raise ValueError("the two records are of different prompts")
    ref_tokens, other_tokens = reference["tokens"], other["tokens"]
    first = next((i for i, (a, b) in enumerate(zip(ref_tokens, other_tokens)) if a != b), None)
    if first is None and len(ref_tokens) != len(other_tokens):
        first = min(len(ref_tokens), len(other_tokens))
    # Decode row i was computed from tokens[:i]: it is comparable up to and including the first difference.
    steps = min(len(reference["decode_logits"]), len(other["decode_logits"]))
    steps = steps if first is None else min(steps, first + 1)
    a = torch.cat([reference["prompt_logits"], reference["decode_logits"][:steps]]).double()
    b = torch.cat([other["prompt_logits"], other["decode_logits"][:steps]]).double()
    return a, b, first


def diff_records(reference: dict, other: dict) -> RecordDiff:
    a, b, first = compared_logits(reference, other)
    delta = (a - b).abs().max().item()
    peak = a.abs().max().item()
    log_p, log_q = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return RecordDiff(
        prompt_tokens=len(reference["prompt_ids"]),
        generated=len(reference["tokens"]),
        same_tokens=first is None,
        first_different_token=first,
        max_abs_delta=delta,
        max_abs_logit=peak,
        relative_delta=delta / peak if peak > 0 else float("inf"),
        mean_kl=kl.mean().item(),
        max_kl=kl.max().item(),
        top1_agreement=(a.argmax(-1) == b.argmax(-1)).double().mean().item(),
        positions=a.shape[0],
    )


def markdown(diff: RecordDiff, names: tuple[str, str] = ("x86", "arm64")) -> str:
    rows = [
        ("prompt tokens", str(diff.prompt_tokens)),
        (f"greedy tokens ({names[0]})", str(diff.generated)),
        ("same greedy tokens", "yes" if diff.same_tokens else f"no, from token {diff.first_different_token}"),
        ("positions compared", str(diff.positions)),
        ("max \\|Δ logit\\|", f"{diff.max_abs_delta:.4g}"),
        (f"max \\|logit\\| ({names[0]})", f"{diff.max_abs_logit:.4g}"),
        ("max \\|Δ\\| / max \\|logit\\|", f"{diff.relative_delta:.3g} (bar {MAX_RELATIVE_DELTA})"),
        (f"mean KL({names[0]} ‖ {names[1]})", f"{diff.mean_kl:.3g} nats (bar {MAX_MEAN_KL})"),
        ("max KL", f"{diff.max_kl:.3g} nats"),
        ("top-1 agreement", f"{diff.top1_agreement:.4f}"),
    ]
    return "\n".join(["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])
