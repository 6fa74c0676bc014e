"""The texts every command calibrates and measures on, their token windows and their hashes.

WikiText-2's test split ships inside the package (`spinquant/texts/wikitext2/`, split by article
into `calib.txt` and `eval.txt`; its README gives the source, licence and sha256), so the defaults
resolve from a checkout and from an installed wheel alike. `SPINQUANT_DATA=DIR` points them at
another folder holding `calib.txt` and `eval.txt`; `--calib-text` / `--text` at single files. Text of another
domain ships beside it, to measure only (`spinquant/texts/devils_dictionary/`, public domain; its README says whence).
"""

import hashlib
import os
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from spinquant.errors import UserError

PACKAGED = Path(__file__).resolve().parent / "texts" / "wikitext2"
DATA_ENV = "SPINQUANT_DATA"
OUT_OF_DOMAIN_TEXT = PACKAGED.parent / "devils_dictionary" / "eval.txt"


def data_dir() -> Path:
    return Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else PACKAGED


def calibration_text() -> Path:
    """The default text for anything that learns or calibrates (rotations, GPTQ)."""
    return data_dir() / "calib.txt"


def evaluation_text() -> Path:
    """The default text for anything that measures; never calibrated on."""
    return data_dir() / "eval.txt"


def read_text(path: Path) -> str:
    if not Path(path).is_file():
        hint = f" (set by {DATA_ENV})" if os.environ.get(DATA_ENV) and Path(path).parent == data_dir() else ""
        raise UserError(f"text file not found: {path}{hint}")
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_windows(tokenizer: PreTrainedTokenizerBase, text: str, seqlen: int, max_windows: int | None, first: int = 0) -> torch.Tensor:
    """(windows, seqlen) token ids from window `first` on (0-based); the tail shorter than a window is dropped, as the field does."""
    if first < 0:
        raise UserError(f"the first window must be 0 or more, not {first}")
    if seqlen < 2:
        raise UserError(f"a window needs at least 2 tokens, not {seqlen}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = ids.numel() // seqlen - first
    if n <= 0:
        raise UserError(f"the text has {ids.numel()} tokens, fewer than {'one window' if first == 0 else f'{first + 1} windows'} of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[first * seqlen : (first + n) * seqlen].view(n, seqlen)
