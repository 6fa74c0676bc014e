"""torch.load of a file the user named: a corrupt, truncated or foreign file becomes one UserError line."""

import pickle
import struct
import warnings
from pathlib import Path

import torch

from spinquant.errors import UserError

# What torch.load(weights_only=True) raised on random bytes, truncated and byte-flipped .pt files and
# pickles of other things: UnpicklingError, RuntimeError (zip reader), EOFError, OSError, IndexError,
# KeyError, UnicodeDecodeError (a ValueError); the rest are what the unpickler's code can raise too.
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError, AttributeError, struct.error)


def load_torch_file(path: Path, what: str, remedy: str) -> object:
    """The file's contents, loaded weights-only on the CPU; `what` names the file in errors, `remedy` says how to get a good one."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, not a file: {remedy}")
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the weights-only unpickler warns about odd pickle protocols before failing
            return torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as e:
        raise UserError(f"{what} {path} is corrupt, truncated or not a torch file ({type(e).__name__} from torch.load): {remedy}") from None


def describe_type(value: object) -> str:
    """'a list', 'a Tensor': what a loaded file held where something else was expected."""
    name = type(value).__name__
    return f"an {name}" if name[0].lower() in "aeiou" else f"a {name}"
