"""Rotations computed once per model, kept beside the model: the learned ones of `--rotation learn` (export) and
DuQuant's of `--rotation duquant` (evaluation, export, and `spinquant.optimize --init duquant`).

The file is named by the model's content (config and weight files, or the GGUF file) and by the learning plan
(recipe, iterations, windows, seed, calibration text's sha256...) or DuQuant's settings and calibration text, so
a changed model or recipe never reuses a stale rotation, and the same ones are never computed twice. It goes in
`spinquant-rotations/` beside the model, or in the user cache where the model's folder is read-only.
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

from spinquant.data import read_text, text_sha256, token_windows
from spinquant.duquant import DuQuantConfig, write_duquant_file
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
    # Paths differ between machines; learning here always starts from Hadamard (keys made before `init` existed hold).
    key = {k: v for k, v in asdict(plan).items() if k not in ("model", "calibration", "init")}
    out = rotation_home(source) / f"{model_sha256(source)[:16]}-{recipe}-{settings_sha(key)}.pt"
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


def settings_sha(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def duquant_rotation(source: str, calib_text: Path, config: DuQuantConfig = DuQuantConfig()) -> Path:
    """DuQuant's rotation file for this model, searched now on `calib_text` (spinquant/duquant.py), unless already cached."""
    key = dict(asdict(config), calibration_sha256=text_sha256(read_text(calib_text)))
    out = rotation_home(source) / f"{model_sha256(source)[:16]}-duquant-{settings_sha(key)}.pt"
    if out.is_file():
        print(f"DuQuant rotation: {out} (cached)", file=sys.stderr)
        return out
    write_duquant_file(source, calib_text, config, out)
    print(f"DuQuant rotation: {out}", file=sys.stderr)
    return out


def say_how_long(seconds_per_step: float, iters: int, device: torch.device) -> None:
    minutes = seconds_per_step * iters / 60
    took = f"{minutes:.0f} min" if minutes >= 1 else f"{minutes * 60:.0f} s"
    line = f"learning rotations on the {device.type.upper()}: about {took} for {iters} iterations"
    if device.type == "cpu" and minutes > 10:
        fewer = max(1, int(10 * 60 / seconds_per_step))
        line += f"; --learn-iters {fewer} takes about 10 min (fewer iterations: a rotation nearer random Hadamard)"
    tqdm.write(line, file=sys.stderr)  # above the progress bar, not through it

