"""The demo model in Qwen3's layout: a Qwen3 with real structure (SmolLM2-135M's weights and outliers), made offline.

    python scripts/qwen3_from_smollm2.py --output /tmp/smollm2-qwen3      # about 4 minutes on 2 CPU cores

A Qwen3 trained from scratch on calib.txt alone (about 100 k tokens) stays too weak for quantization to cost it
anything and grows no activation outliers (tried: 300 to 1,800 AdamW steps, eval perplexity 450 to 1,300,
down_proj's max/median channel ratio 4-11×). SmolLM2-135M has them (3,000× in down_proj's input,
results/activations_smollm2.md), and its layers are Qwen3's but for the per-head RMSNorms that Qwen3 puts on
queries and keys before RoPE (q_norm, k_norm). So SmolLM2's weights go in unchanged; each new norm's gain starts
at the least-squares fit of RMSNorm(x)·g to x over calibration tokens, and then the gains alone (3,840 numbers)
are trained for a few steps on calib.txt to match SmolLM2's next-token distributions (KL). Only calib.txt is
seen: eval.txt stays for measuring. Seeded: the same files every run.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from spinquant.data import calibration_text, read_text, token_windows
from spinquant.models import load_model

DEMO = "smollm2-135m"
STEPS = 20


def qwen3_config(llama: LlamaForCausalLM) -> Qwen3Config:
    c = llama.config
    return Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_parameters["rope_theta"], tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
    )


@torch.no_grad()
def fitted_head_norm_gains(llama: LlamaForCausalLM, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per layer, the gains g minimising Σ (x/rms(x)·g − x)² over every head of q_proj's (k_proj's) outputs.

    Per head dimension d: g_d = Σ x_d²/r ÷ Σ x_d²/r², r the head's RMS, so each new norm starts near identity."""
    sums: dict[str, list[torch.Tensor]] = {}
    eps, head = llama.config.rms_norm_eps, llama.config.head_dim

    def accumulate(key: str, out: torch.Tensor) -> None:
        x = out.unflatten(-1, (-1, head)).flatten(0, -2).double()
        r = x.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
        num, den = (x * x / r).sum(0), (x * x / r / r).sum(0)
        sums[key] = [num, den] if key not in sums else [sums[key][0] + num, sums[key][1] + den]

    hooks = [
        getattr(layer.self_attn, f"{kind}_proj").register_forward_hook(
            lambda m, args, out, key=f"model.layers.{i}.self_attn.{kind}_norm.weight": accumulate(key, out))
        for i, layer in enumerate(llama.model.layers) for kind in ("q", "k")
    ]
    try:
        llama(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {key: (num / den).float() for key, (num, den) in sums.items()}


def distill_head_norm_gains(qwen3: Qwen3ForCausalLM, llama: LlamaForCausalLM, windows: torch.Tensor, steps: int, batch: int,
                            lr: float, seed: int) -> list[float]:
    """Adam on the q_norm/k_norm gains only, KL(SmolLM2 ‖ Qwen3) per token on calibration windows."""
    gains = [p for name, p in qwen3.named_parameters() if name.endswith(("q_norm.weight", "k_norm.weight"))]
    for p in qwen3.parameters():
        p.requires_grad_(False)
    for p in gains:
        p.requires_grad_(True)
    opt = torch.optim.Adam(gains, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc="fitting q_norm/k_norm", unit="step")
    for _ in bar:
        ids = windows[torch.randint(len(windows), (batch,), generator=gen)]
        with torch.no_grad():
            target = F.log_softmax(llama(ids, use_cache=False).logits, -1).flatten(0, 1)
        predicted = F.log_softmax(qwen3(ids, use_cache=False).logits, -1).flatten(0, 1)
        loss = F.kl_div(predicted, target, log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(kl=f"{loss.item():.3f}")
    return losses


def main(argv: list[str] | None = None) -> float:
    """Writes the model; returns the KL to SmolLM2 per token over the last 5 steps."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, required=True, help="the Hugging Face directory to write")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    demo = load_model(DEMO)
    llama, tokenizer = demo.model.eval(), demo.tokenizer
    windows = token_windows(tokenizer, read_text(calibration_text()), args.seqlen, None)
    qwen3 = Qwen3ForCausalLM(qwen3_config(llama))
    gains = fitted_head_norm_gains(llama, windows[:16])
    qwen3.load_state_dict({**llama.state_dict(), **gains})
    losses = distill_head_norm_gains(qwen3.train(), llama, windows, args.steps, args.batch, args.lr, args.seed)
    qwen3.eval().save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    final = sum(losses[-5:]) / 5
    print(f"{args.output}: Qwen3 from {DEMO}, KL to it per token {losses[0]:.3f} -> {final:.3f} (last 5 steps)", file=sys.stderr)
    return final


if __name__ == "__main__":
    main(sys.argv[1:])
