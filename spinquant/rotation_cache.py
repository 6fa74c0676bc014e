"""Rotations learned once per model and recipe, kept beside the model: what `export.to_pte --rotation learn` uses.

The file is named by the model's content (config and weight files, or the GGUF file) and by the learning plan
(recipe, iterations, windows, seed, calibration text's sha256...), so a changed model or recipe never reuses a
stale rotation, and the same ones never learn twice. It goes in `spinquant-rotations/` beside the model, or in
the user cache where the model's folder is read-only.
"""

import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from spinquant.data import read_text, token_windows
from spinquant.files import cache_dir
from spinquant.models import DEMO_MODELS, demo_gguf_path, load_model
from spinquant.optimize import learn_and_save, make_plan

# SpinQuant's recipe (spinquant/optimize.py), with windows as long as the program's KV cache (at most 2,048).
ITERS, LR, BATCH_SIZE, MAX_SEQLEN = 100, 1.5, 8, 2048
# Steps between checkpoints: a resumed run loses at most this share of the work.
CHECKPOINTS_PER_RUN = 20


def model_files(source: str) -> list[Path]:
    """The files whose bytes make the model: its GGUF, or its directory's config and weights."""
    if source in DEMO_MODELS:
        return [demo_gguf_path(source)]
    path = Path(source)
    if path.is_file():
        return [path]
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))
    return [path / "config.json", *weights]


def model_sha256(source: str) -> str:
    digest = hashlib.sha256()
    for file in model_files(source):
        digest.update(file.name.encode())
        with file.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def rotation_home(source: str) -> Path:
    """`spinquant-rotations/` beside the model where that folder is writable, else under the user cache."""
    folder = model_files(source)[0].parent
    return folder / "spinquant-rotations" if os.access(folder, os.W_OK) else cache_dir() / "rotations"


def learned_rotation(source: str, tokenizer: PreTrainedTokenizerBase, recipe: str, calib_text: Path, max_seq_len: int,
                     iters: int = ITERS, resume: bool = False, seed: int = 0) -> Path:
    """The rotation file for this model (`tokenizer` is its) and recipe: learned now, on a GPU when there is one,
    on a float32 copy of the model loaded for it, unless already cached."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = read_text(calib_text)
    windows = token_windows(tokenizer, text, min(MAX_SEQLEN, max_seq_len), None)
    plan = make_plan(source, recipe, windows, calib_text, text, iters=iters, lr=LR, momentum=0.0, batch_size=BATCH_SIZE, grad_accum=1,
                     seed=seed, dtype="bf16" if device.type == "cuda" else "fp32")
    key = {k: v for k, v in asdict(plan).items() if k not in ("model", "calibration")}  # paths differ between machines
    plan_sha = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    out = rotation_home(source) / f"{model_sha256(source)[:16]}-{recipe}-{plan_sha[:12]}.pt"
    if out.is_file():
        print(f"learned rotation: {out} (cached)", file=sys.stderr)
        return out
    if not resume and out.with_suffix(".ckpt").is_file():
        print(f"an interrupted run left {out.with_suffix('.ckpt')}: --resume continues it; starting over", file=sys.stderr)
    command = f"python -m export.to_pte --model {source} --rotation learn --learn-iters {iters}"
    learn_and_save(load_model(source, torch.float32).model, windows, plan, device, out, command, resume=resume,
                   checkpoint_every=max(1, iters // CHECKPOINTS_PER_RUN), on_first_step=lambda s: say_how_long(s, iters, device))
    print(f"learned rotation: {out}", file=sys.stderr)
    return out


def say_how_long(seconds_per_step: float, iters: int, device: torch.device) -> None:
    minutes = seconds_per_step * iters / 60
    took = f"{minutes:.0f} min" if minutes >= 1 else f"{minutes * 60:.0f} s"
    line = f"learning rotations on the {device.type.upper()}: about {took} for {iters} iterations"
    if device.type == "cpu" and minutes > 10:
        fewer = max(1, int(10 * 60 / seconds_per_step))
        line += f"; --learn-iters {fewer} takes about 10 min (fewer iterations: a rotation nearer random Hadamard)"
    tqdm.write(line, file=sys.stderr)  # above the progress bar, not through it

