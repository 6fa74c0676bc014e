"""How far a model's next-token distributions are from the text, or from another model's: perplexity and KL.

Perplexity follows the field's convention: tokenize the whole text once, cut it into non-overlapping
windows of `seqlen` tokens, average the token-level negative log-likelihood over all of them, report exp.
"""

import math
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlamaForCausalLM


@torch.no_grad()
def perplexity_of(logits_of: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> float:
    """exp(mean next-token NLL) over the windows; `logits_of(batch)` gives (batch, seqlen, vocab) logits."""
    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="window", disable=not progress):
        logits = logits_of(batch)[:, :-1].float()
        targets = batch[:, 1:].to(logits.device)
        nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


def perplexity(model: LlamaForCausalLM, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> float:
    device = next(model.parameters()).device
    return perplexity_of(lambda b: model(b.to(device), use_cache=False).logits, windows, batch_size, progress)


def kl_per_position(reference: torch.Tensor, ours: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference) ‖ softmax(ours)) along the last dimension, in float64."""
    ref_log, our_log = F.log_softmax(reference.double(), -1), F.log_softmax(ours.double(), -1)
    return (ref_log.exp() * (ref_log - our_log)).sum(-1)
