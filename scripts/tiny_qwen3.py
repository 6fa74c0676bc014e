"""A small Qwen3 trained briefly on the calibration text: a model with real structure, made offline in minutes.

    python scripts/tiny_qwen3.py --output /tmp/tiny-qwen3      # about 3 minutes on 2 CPU cores

A random model has no structure for a rotation to learn; this one has: a byte-level BPE tokenizer of
4,096 tokens trained on `calib.txt`, then 4 Qwen3 layers (hidden 256, MLP 768, 4 query and 2 KV heads of 64,
q_norm/k_norm, tied embeddings, context 256) trained by AdamW on windows of `calib.txt` with a cosine
schedule. Only `calib.txt` is seen: `eval.txt` stays for measuring. Seeded: the same files every run.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import Qwen3Config, Qwen3ForCausalLM

from spinquant.data import calibration_text, read_text, token_windows
from spinquant.models import train_bpe_tokenizer

CONFIG = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=64, max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-6)
VOCAB = 4096
STEPS = 300


def train(model: Qwen3ForCausalLM, windows: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    losses = []
    bar = tqdm(range(steps), desc="training", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        ids = windows[torch.randint(len(windows), (batch,), generator=gen)]
        logits = model(ids).logits[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return losses


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, required=True, help="the Hugging Face directory to write")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    text = read_text(calibration_text())
    tokenizer = train_bpe_tokenizer(text, VOCAB)
    windows = token_windows(tokenizer, text, args.seqlen, None)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), **CONFIG))
    losses = train(model.train(), windows, args.steps, args.batch, args.lr, args.seed)
    model.eval().save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"{args.output}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"training loss {losses[0]:.3f} -> {sum(losses[-20:]) / 20:.3f} (last 20 steps)", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
